"""Multi-worker training through Ray Train: the same `Trainer` loop in every worker.

    result = train_ray(spec, num_workers=2, storage_path="runs/", name="df-tiny")
    result.checkpoint.path   # a weights directory (config.json, model.safetensors) + training state

`TorchTrainer` starts the workers and the process group (gloo on CPU, NCCL on GPU); the
trainer wraps its model in DDP when the world is larger than one. Rank 0 writes each
checkpoint into a temporary folder and hands it to `ray.train.report`; the other ranks report
the same step's metrics without one (report is collective). To resume after an interruption,
call `train_ray` again with the same `name` and `storage_path`: `ray.train.get_checkpoint()`
then returns the latest checkpoint and the loop continues from its step (Ray Train V2 has
no `resume_from_checkpoint`). The resumed run's losses, weights and EMA equal the uninterrupted
run's bit for bit (tests/integration/test_ray_train.py). The number of workers must stay the
same: the data position is the step for one global batch size.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from avatar_forcing.training.run import RunSpec, build_model, build_trainer, open_dataset, prepare_losers


class RaySink:
    """Checkpoints through Ray Train (`get_checkpoint` / `report`)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self._restored: tempfile.TemporaryDirectory | None = None

    def latest(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        self._restored = tempfile.TemporaryDirectory(prefix="af-restore-")
        return Path(checkpoint.to_directory(self._restored.name))

    def save(self, step: int, write: Callable[[Path], None], metrics: dict[str, float]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory(prefix="af-ckpt-") as tmp:
            directory = Path(tmp) / f"step_{step:08d}"
            write(directory)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(directory)))

    def report(self, metrics: dict[str, float]) -> None:
        import ray.train

        ray.train.report(metrics)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    spec = RunSpec.from_dict(config["spec"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    trainer = build_trainer(spec, rank, world, ray.train.torch.get_device())
    trainer.run(RaySink(rank), config.get("until"))


def train_ray(
    spec: RunSpec,
    num_workers: int,
    storage_path: str | Path,
    name: str,
    use_gpu: bool = False,
    cpus_per_worker: float = 1,
    until: int | None = None,
):
    """Run (or resume) `spec` on `num_workers` Ray Train workers; returns the `ray.train.Result`.

    `until` stops the run after that many steps (with a checkpoint there), as `Trainer.run`
    does; a later call with the same `name` and `storage_path` continues to `spec.train.steps`.

    The DPO losers are generated here once, before the workers start, so that each worker
    reads them from the cache instead of sampling them again.
    """
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if num_workers < 1:
        raise ValueError(f"num_workers: got {num_workers}; expected >= 1")
    if spec.train.dpo is not None:
        model = build_model(spec)
        prepare_losers(spec, model, open_dataset(spec.data, model.config))
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"spec": spec.to_dict(), "until": until},
        scaling_config=ScalingConfig(
            num_workers=num_workers, use_gpu=use_gpu, resources_per_worker={"CPU": cpus_per_worker}
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str(Path(storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=spec.train.keep_checkpoints),
        ),
    )
    return trainer.fit()
