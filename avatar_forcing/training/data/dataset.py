"""Prepared shards as the trainer's dataset: a `Sequence[TrainingExample]` (training/batch.py).

    dataset = ShardDataset("data/prepared")                 # one example per clip
    dataset = ShardDataset("data/prepared", window=50)      # 50-frame windows of the clips
    example = dataset[0]                                    # a TrainingExample
    example.avatar_motion       # (T, D) float32   (T = 50 with window=50)
    example.user_motion         # (T, D)
    example.avatar_audio        # (T, A)
    example.user_audio          # (T, A)
    example.reference_motion    # (D,)  r_s of the clip's reference avatar frame
    example.length              # T (prepared clips have no padding)
    example.key                 # "<conversation>#<clip>" (+ "@<start>" for windows): stable ids

Windows start every `stride` frames (default: `window`, no overlap); a clip shorter than the
window gives none. Only the window's rows are read from disk (safetensors slices), so a
loader holds one window at a time. `identity(i)` gives s_r, which the trainer does not need.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from avatar_forcing.training.batch import TrainingExample
from avatar_forcing.training.data import shards


@dataclass(frozen=True)
class WindowRef:
    shard: str  # file name under shards/
    key: str  # clip key inside the shard
    conversation: str
    start: int  # first frame of the window inside the clip
    length: int


class ShardDataset(Sequence[TrainingExample]):
    def __init__(self, root: str | Path, window: int | None = None, stride: int | None = None) -> None:
        self.root = Path(root)
        self.index = shards.read_index(self.root)
        if window is not None and (not isinstance(window, int) or window < 1):
            raise ValueError(f"window: expected None (whole clips) or an integer >= 1, got {window!r}")
        stride = window if stride is None else stride
        if window is not None and (not isinstance(stride, int) or stride < 1):
            raise ValueError(f"stride: expected an integer >= 1, got {stride!r}")
        self.window = window
        self.items: list[WindowRef] = []
        for clip in self.index["clips"]:
            frames = clip["num_frames"]
            if window is None:
                self.items.append(WindowRef(clip["shard"], clip["key"], clip["conversation"], 0, frames))
                continue
            for start in range(0, frames - window + 1, stride):
                self.items.append(WindowRef(clip["shard"], clip["key"], clip["conversation"], start, window))

    @property
    def settings(self) -> dict:
        return self.index["settings"]

    def __len__(self) -> int:
        return len(self.items)

    def _ref(self, i: int) -> WindowRef:
        if not -len(self.items) <= i < len(self.items):
            raise IndexError(f"shard dataset {self.root}: index {i} out of range for {len(self.items)} examples")
        return self.items[i]

    def _read(self, ref: WindowRef, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
        path = self.root / shards.SHARD_DIR / ref.shard
        out: dict[str, torch.Tensor] = {}
        try:
            with safe_open(str(path), framework="pt") as shard:
                for name in names:
                    if name in shards.SEQUENCE_ARRAYS:
                        out[name] = shard.get_slice(f"{ref.key}/{name}")[ref.start : ref.start + ref.length]
                    else:
                        out[name] = shard.get_tensor(f"{ref.key}/{name}")
        except (OSError, RuntimeError) as exc:  # missing file, torn file, missing tensor
            raise ValueError(f"{path}: clip {ref.key}: not readable ({exc})") from exc
        return out

    def __getitem__(self, i: int) -> TrainingExample:  # type: ignore[override]
        ref = self._ref(i)
        arrays = self._read(ref, (*shards.SEQUENCE_ARRAYS, "reference_motion"))
        key = f"{ref.conversation}#{ref.key}" + ("" if self.window is None else f"@{ref.start}")
        return TrainingExample(**arrays, key=key)

    def identity(self, i: int) -> torch.Tensor:
        """s_r (D,) of example i's clip (its reference avatar frame)."""
        return self._read(self._ref(i), ("identity",))["identity"]
