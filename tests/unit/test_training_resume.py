"""Checkpoints: an interrupted run resumes to exactly the uninterrupted one; the files load anywhere."""

import pytest
import torch

from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.training import checkpointing
from avatar_forcing.training.dpo import DPOConfig
from avatar_forcing.training.run import RunSpec, build_trainer, train_local
from avatar_forcing.training.trainer import LocalSink, TrainConfig


def spec(out, steps=4, dpo=None, seed=0, **train):
    config = TrainConfig(steps=steps, batch_size=2, lr=1e-3, warmup_steps=2, ema_decay=0.9, log_every=1,
                         checkpoint_every=2, val_every=0, seed=seed, dpo=dpo, **train)  # fmt: skip
    # 5 examples of 60 frames: a 2-step epoch (odd data order across epochs) and random window offsets.
    return RunSpec(train=config, out_dir=str(out), data="synthetic:5:60:3", preset="tiny", progress=False)


def rows_of(out):
    import csv

    with (out / "metrics.csv").open() as f:
        return [{k: v for k, v in r.items()} for r in csv.DictReader(f)]


@pytest.mark.parametrize("dpo", [None, DPOConfig(beta=50.0, loser_nfe=2)], ids=["df", "dpo"])
def test_resume_gives_the_next_losses_of_an_uninterrupted_run_exactly(tmp_path, dpo):
    straight = train_local(spec(tmp_path / "a", dpo=dpo))
    # The interrupted run: stop after step 2 (a checkpoint), then a fresh process-like rebuild resumes.
    first = train_local(spec(tmp_path / "b", dpo=dpo), until=2)
    assert first.step == 2
    del first
    resumed = train_local(spec(tmp_path / "b", dpo=dpo))
    assert resumed.step == 4
    a, b = rows_of(tmp_path / "a"), rows_of(tmp_path / "b")
    assert [r["step"] for r in b] == ["1", "2", "3", "4"]
    for column in ("loss", "grad_norm", "lr") + (("reward_margin",) if dpo else ()):
        assert [r[column] for r in a] == [r[column] for r in b], column  # as printed: bit for bit
    for (name, x), y in zip(straight.flow.state_dict().items(), resumed.flow.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    for name, x in straight.ema.shadow.items():
        assert torch.equal(x, resumed.ema.shadow[name]), name


def test_checkpoint_is_a_weights_directory_with_the_ema_weights(tmp_path):
    trainer = train_local(spec(tmp_path, steps=2))
    latest = checkpointing.latest_checkpoint(tmp_path / "checkpoints")
    assert latest is not None and latest.name == "step_00000002"
    model = load_pretrained(latest)
    ema = trainer.ema.weights(trainer.flow)
    for name, value in model.flow_transformer.state_dict().items():
        assert torch.equal(value, ema[name]), name
    # The raw weights are back in the trainer after writing, and differ from the EMA.
    raw = checkpointing.read_state(latest)["flow"]
    assert all(torch.equal(raw[k], v) for k, v in trainer.flow.state_dict().items())
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    exported = load_pretrained(trainer.export(tmp_path / "export"))
    assert all(torch.equal(v, ema[k]) for k, v in exported.flow_transformer.state_dict().items())


def test_resume_with_another_seed_names_the_field(tmp_path):
    train_local(spec(tmp_path, steps=2))
    with pytest.raises(ValueError, match="seed"):
        train_local(spec(tmp_path, steps=4, seed=1))


def test_half_written_checkpoints_are_never_resumed(tmp_path):
    trainer = build_trainer(spec(tmp_path, steps=2))
    root = tmp_path / "checkpoints"
    (root / "step_00000009.tmp").mkdir(parents=True)
    (root / "step_00000008").mkdir()  # no files: not a checkpoint
    assert checkpointing.latest_checkpoint(root) is None
    trainer.run(trainer_sink := LocalSink(root))
    assert trainer_sink.latest().name == "step_00000002"


class CrashAt(LocalSink):
    """A sink whose run dies right after logging `step` (past the last checkpoint)."""

    def __init__(self, root, step):
        super().__init__(root)
        self.step = step

    def report(self, metrics):
        if metrics["step"] == self.step:
            raise RuntimeError("killed")


def test_a_crashed_run_resumes_without_duplicate_log_rows(tmp_path):
    trainer = build_trainer(spec(tmp_path, steps=4))
    with pytest.raises(RuntimeError, match="killed"):
        trainer.run(CrashAt(tmp_path / "checkpoints", 3))  # checkpoint at 2, step 3 logged, then dead
    assert [r["step"] for r in rows_of(tmp_path)] == ["1", "2", "3"]
    del trainer
    resumed = train_local(spec(tmp_path, steps=4))
    assert resumed.step == 4
    assert [r["step"] for r in rows_of(tmp_path)] == ["1", "2", "3", "4"]  # step 3 once, from the resumed run


def test_resume_with_another_number_of_workers_is_refused(tmp_path):
    train_local(spec(tmp_path, steps=2))  # one worker
    trainer = build_trainer(spec(tmp_path, steps=4), rank=0, world_size=2)
    with pytest.raises(ValueError, match="world_size"):
        trainer.run(LocalSink(tmp_path / "checkpoints"))
