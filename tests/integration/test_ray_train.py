"""Ray Train with 2 CPU workers: the run completes, its checkpoint serves the engine and the services,
and a run stopped at a checkpoint continues, when rerun with the same name and storage, exactly
as the uninterrupted run does.

The three fits (uninterrupted; stopped after 2 of 4 steps; rerun to 4) run once for the module.
"""

import csv

import pytest
import torch

from avatar_forcing.engine.motion_stream import MotionStream
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.training import checkpointing
from avatar_forcing.training.run import RunSpec
from avatar_forcing.training.trainer import TrainConfig
from services.local.ray_start import init_local_ray

pytestmark = pytest.mark.integration

STEPS, STOP = 4, 2


def stream_frames(model, frames=60):
    stream = MotionStream(model.block_sampler(), torch.zeros(512), seed=0)
    g = torch.Generator().manual_seed(0)
    stream.push(*(torch.randn(frames, 512, generator=g) for _ in range(3)))
    stream.finish()
    out = []
    while (request := stream.next_request(nfe=2)) is not None:
        block = stream.accept(stream.sampler.run([request])[0])
        if block is not None:
            out.append(block.latents)
    return torch.cat(out)


def rows_of(out):
    with (out / "metrics.csv").open() as f:
        return list(csv.DictReader(f))


def spec(out, init_seed=0):
    config = TrainConfig(steps=STEPS, batch_size=2, lr=1e-3, warmup_steps=3, ema_decay=0.9, log_every=1,
                         checkpoint_every=2, val_every=2, val_batches=1)  # fmt: skip
    # 12 clips of 60 frames over 2 workers x 2: a 3-step epoch, so the stop at step 2 is mid-epoch and
    # the rest crosses into epoch 1; window offsets are random (60 > 50 frames).
    return RunSpec(train=config, out_dir=str(out), data="synthetic:12:60:3", val_data="synthetic:2:50:7",
                   preset="tiny", init_seed=init_seed, threads=1, progress=False)  # fmt: skip


@pytest.fixture(scope="module")
def fits(tmp_path_factory):
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.train.torch", exc_type=ImportError)
    from avatar_forcing.training.ray_train import train_ray

    root = tmp_path_factory.mktemp("ray-train")
    storage = root / "ray"
    init_local_ray(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        straight = train_ray(spec(root / "a"), num_workers=2, storage_path=storage, name="straight")
        stopped = train_ray(spec(root / "b"), num_workers=2, storage_path=storage, name="resumed", until=STOP)
        stopped_rows = rows_of(root / "b")
        # The rerun builds its workers from another random init: only the checkpoint it resumes from
        # can make it continue the first run (a restart from step 0 would train other weights).
        resumed = train_ray(spec(root / "b", init_seed=1), num_workers=2, storage_path=storage, name="resumed")
    finally:
        ray.shutdown()
    return {"root": root, "straight": straight, "stopped": stopped, "stopped_rows": stopped_rows,
            "resumed": resumed}  # fmt: skip


def test_two_cpu_workers_train_and_the_checkpoint_loads_everywhere(fits):
    result = fits["straight"]
    assert result.error is None
    assert result.metrics["step"] == STEPS and torch.isfinite(torch.tensor(result.metrics["loss"]))
    path = result.checkpoint.path
    assert checkpointing.read_state(path)["step"] == STEPS
    assert checkpointing.read_state(path)["world_size"] == 2

    model = load_pretrained(path)
    from avatar_forcing.nn.model import random_model

    start = random_model(model.config, seed=0).flow_transformer.state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in model.flow_transformer.state_dict().items())
    latents = stream_frames(model)  # the engine runs on the trained weights
    assert latents.shape == (60, 512) and torch.isfinite(latents).all()

    from services.common.config import Settings
    from services.common.model_loader import load_model

    served = load_model(Settings(weights_dir=path, model_preset="tiny"), device="cpu")
    for name, value in model.state_dict().items():
        assert torch.equal(served.state_dict()[name], value), name


def test_rerun_with_the_same_name_resumes_to_exactly_the_uninterrupted_run(fits):
    """Exact, bit for bit, across the 2 DDP workers too.

    Every draw of step s on rank r is seeded by (seed, s, r) and the data order by (seed, epoch), so
    the step is the data position. DDP averages the 2 ranks' gradients with one addition per element
    (gloo), and a + b == b + a in floating point, so the bucket order cannot change the bits; the
    logged loss is the same 2-rank mean. Hence the resumed steps must print the same numbers.
    """
    stopped, resumed, straight = fits["stopped"], fits["resumed"], fits["straight"]
    assert stopped.error is None and resumed.error is None
    assert stopped.metrics["step"] == STOP and checkpointing.read_state(stopped.checkpoint.path)["step"] == STOP
    assert [r["step"] for r in fits["stopped_rows"]] == ["1", "2"]
    assert resumed.metrics["step"] == STEPS

    a, b = rows_of(fits["root"] / "a"), rows_of(fits["root"] / "b")
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]  # the rerun logged steps 3 and 4 only
    assert [r["epoch"] for r in b] == ["0", "0", "1", "1"] == [r["epoch"] for r in a]
    for column in ("loss", "grad_norm", "lr", "val_loss", "val_loss_ema"):
        assert [r[column] for r in a] == [r[column] for r in b], column  # as printed: bit for bit
    assert b[1]["val_loss_ema"] and b[3]["val_loss_ema"] != b[3]["val_loss"]

    x, y = checkpointing.read_state(straight.checkpoint.path), checkpointing.read_state(resumed.checkpoint.path)
    assert x["step"] == y["step"] == STEPS and y["world_size"] == 2
    for name, value in x["flow"].items():
        assert torch.equal(value, y["flow"][name]), name
    assert x["ema"]["updates"] == y["ema"]["updates"] == STEPS
    for name, value in x["ema"]["shadow"].items():
        assert torch.equal(value, y["ema"]["shadow"][name]), name
    assert x["lr_schedule"] == y["lr_schedule"]
    for index, state in x["optimizer"]["state"].items():  # Adam's moments and step counts
        for key, value in state.items():
            assert torch.equal(value, y["optimizer"]["state"][index][key]), (index, key)
    # The exported (EMA) flow weights of the two final checkpoints are the same too. (The frozen
    # auto-encoder and audio encoder are not training state: they come from the run's own init,
    # init_seed=1 here, and so differ on purpose.)
    ema_a, ema_b = load_pretrained(straight.checkpoint.path), load_pretrained(resumed.checkpoint.path)
    for name, value in ema_a.flow_transformer.state_dict().items():
        assert torch.equal(value, ema_b.flow_transformer.state_dict()[name]), name
