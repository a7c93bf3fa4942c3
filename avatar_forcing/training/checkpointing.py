"""Training checkpoints: a weights directory the engine and the services load, plus the state to resume.

    step_00000100/
      config.json, model.safetensors   `nn.checkpoints.save_pretrained` of the whole model with the
                                        inference weights (EMA when enabled): `load_pretrained` and the
                                        services' `AF_WEIGHTS_DIR` take this directory as it is
      training_state.pt                 raw flow-transformer weights, optimiser, LR schedule, grad
                                        scaler, EMA, DPO reference, RNG states, step (= data position),
                                        the training config

Directories are written under a temporary name and renamed, so a crash never leaves a
half-written checkpoint that resume would pick.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import torch

from avatar_forcing.nn.checkpoints import CONFIG_FILE, WEIGHTS_FILE, save_pretrained
from avatar_forcing.nn.model import AvatarForcing

STATE_FILE = "training_state.pt"
STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step:08d}"


def write_checkpoint(directory: Path, model: AvatarForcing, state: dict[str, Any]) -> Path:
    """Write `model` (inference weights) and `state` into `directory` atomically."""
    directory = Path(directory)
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    save_pretrained(model, tmp)
    torch.save(state, tmp / STATE_FILE)
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    return directory


def read_state(directory: Path) -> dict[str, Any]:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: {path} not found; expected a directory written by the trainer")
    return torch.load(path, map_location="cpu", weights_only=True)


def is_checkpoint(directory: Path) -> bool:
    return all((Path(directory) / name).is_file() for name in (CONFIG_FILE, WEIGHTS_FILE, STATE_FILE))


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and is_checkpoint(p)]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))  # type: ignore[union-attr]


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def prune_checkpoints(root: Path, keep: int) -> None:
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old)
