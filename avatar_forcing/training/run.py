"""A training run from a plain description (`RunSpec`): what the CLI and every Ray worker build.

The spec holds only strings and numbers, so it crosses process boundaries as a dict; each
process turns it into the model, the datasets, the DPO losers and a `Trainer` the same way.

Data specs (`--data`, `--val-data`):
    DIR                  prepared shards (`avatar-forcing prepare`; training/data/dataset.py)
    FILE.safetensors     an examples file (`batch.save_examples`)
    synthetic:N[:T[:S]]  N deterministic synthetic clips of T frames (default 50), seed S (default 0)
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from avatar_forcing.config import ModelConfig, preset
from avatar_forcing.nn.model import AvatarForcing
from avatar_forcing.training.batch import SyntheticDataset, TrainingExample, load_examples
from avatar_forcing.training.trainer import LocalSink, TrainConfig, Trainer

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LOSER_CACHE = "losers.safetensors"


@dataclass(frozen=True)
class RunSpec:
    train: TrainConfig
    out_dir: str  # metrics.csv, checkpoints/ (one-process runs), losers.safetensors
    data: str
    val_data: str | None = None
    init_weights: str | None = None  # a converted weights directory to fine-tune; None: random init
    preset: str = "tiny"  # the random init's config
    init_seed: int = 0
    device: str = "cpu"
    threads: int = 0  # torch CPU threads per process; 0: torch's default
    progress: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["train"] = self.train.to_dict()
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        data = dict(data)
        data["train"] = TrainConfig.from_dict(data["train"])
        return cls(**data)


def open_dataset(spec: str, config: ModelConfig, option: str = "--data") -> Sequence[TrainingExample]:
    """A data spec (see the module docstring) -> a dataset whose widths fit `config`."""
    if spec.startswith("synthetic:"):
        parts = spec.split(":")[1:]
        try:
            numbers = [int(p) for p in parts]
            if not 1 <= len(numbers) <= 3:
                raise ValueError
        except ValueError:
            raise ValueError(f"{option} {spec!r}: expected synthetic:N[:frames[:seed]] with integers") from None
        size, frames, seed = (*numbers, config.flow.window, 0)[:3] if len(numbers) == 1 else (*numbers, 0)[:3]
        data: Sequence[TrainingExample] = SyntheticDataset(
            size, frames, config.flow.motion_dim, config.flow.audio_dim, seed
        )
    else:
        path = Path(spec)
        if path.is_dir():
            from avatar_forcing.training.data import ShardDataset

            data = ShardDataset(path)
        elif path.is_file() and path.suffix == ".safetensors":
            data = load_examples(path)
        else:
            raise ValueError(
                f"{option} {spec!r}: not found; expected a prepared data folder, an examples .safetensors "
                "file or synthetic:N[:frames[:seed]]"
            )
    if len(data) == 0:
        raise ValueError(f"{option} {spec!r}: no examples")
    first = data[0]
    for name, width, expected in (
        ("avatar_motion", first.avatar_motion.shape[1], config.flow.motion_dim),
        ("avatar_audio", first.avatar_audio.shape[1], config.flow.audio_dim),
    ):
        if width != expected:
            raise ValueError(f"{option} {spec!r}: {name} width {width}; expected {expected} (model config)")
    return data


def build_model(spec: RunSpec) -> AvatarForcing:
    if spec.init_weights:
        from avatar_forcing.nn.checkpoints import load_pretrained

        return load_pretrained(spec.init_weights)
    from avatar_forcing.nn.model import random_model

    with torch.random.fork_rng(devices=[]):
        return random_model(preset(spec.preset), seed=spec.init_seed)


def prepare_losers(
    spec: RunSpec, model: AvatarForcing, data: Sequence[TrainingExample], device: str | None = None
) -> dict[str, Tensor] | None:
    """DPO's losers for every training example: from the cache, or generated (batched) and cached."""
    dpo = spec.train.dpo
    if dpo is None:
        return None
    from avatar_forcing.training.losers import ensure_losers

    if dpo.loser_weights:
        from avatar_forcing.nn.checkpoints import load_pretrained

        flow = load_pretrained(dpo.loser_weights).flow_transformer
        if flow.config != model.config.flow:
            raise ValueError(
                f"dpo loser_weights {dpo.loser_weights}: flow config differs from the trained model's; expected "
                "a talking-only model of the same size"
            )
    else:
        flow = copy.deepcopy(model.flow_transformer)  # the start weights, user conditions dropped
    flow = flow.to(device or dpo.loser_device or spec.device)
    examples = [data[i] for i in range(len(data))]
    return ensure_losers(
        flow, examples, Path(spec.out_dir) / LOSER_CACHE, dpo.loser_nfe, dpo.loser_audio_guidance, dpo.loser_seed,
        dpo.loser_batch,
    )  # fmt: skip


def build_trainer(
    spec: RunSpec, rank: int = 0, world_size: int = 1, device: str | torch.device | None = None
) -> Trainer:
    if spec.threads:
        torch.set_num_threads(spec.threads)
    model = build_model(spec)
    data = open_dataset(spec.data, model.config)
    val = None if spec.val_data is None else open_dataset(spec.val_data, model.config, "--val-data")
    losers = prepare_losers(spec, model, data)
    return Trainer(
        spec.train,
        model,
        data,
        val,
        device or spec.device,
        rank,
        world_size,
        losers,
        log_dir=spec.out_dir if rank == 0 else None,
        progress=spec.progress,
    )


def train_local(spec: RunSpec, until: int | None = None) -> Trainer:
    """One process: checkpoints in OUT/checkpoints; rerunning with the same OUT resumes."""
    trainer = build_trainer(spec)
    trainer.run(LocalSink(Path(spec.out_dir) / CHECKPOINT_DIR, spec.train.keep_checkpoints), until)
    return trainer
