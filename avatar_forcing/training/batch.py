"""What the trainer consumes: one dyadic clip in motion-latent space, and a batch of them.

Per example (T frames, D = motion latent width, A = projected audio feature width):

    avatar_motion     (T, D)  motion latents of the avatar (the diffusion target x0)
    user_motion       (T, D)  motion latents of the user (a condition)
    avatar_audio      (T, A)  projected audio features of the avatar's speech (a condition)
    user_audio        (T, A)  projected audio features of the user's speech (a condition)
    reference_motion  (D,)    r_s, the motion latent of the portrait (concatenated to every token)
    length            int     valid frames (frames >= length are padding and carry no loss)
    key               str     a stable clip id (the loser cache is keyed by it)

Any `Sequence[TrainingExample]` is a dataset. `SyntheticDataset` is a deterministic
in-memory one for tests and benchmarks; `save_examples` / `load_examples` store examples in
one safetensors file (an interchange format for prepared data).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from avatar_forcing.training.conditioning import ConditionContext

TRACKS = ("avatar_motion", "user_motion", "avatar_audio", "user_audio")


@dataclass
class TrainingExample:
    avatar_motion: Tensor  # (T, D)
    user_motion: Tensor  # (T, D)
    avatar_audio: Tensor  # (T, A)
    user_audio: Tensor  # (T, A)
    reference_motion: Tensor  # (D,)
    length: int | None = None  # valid frames; None: all T
    key: str = ""

    def __post_init__(self) -> None:
        T = self.avatar_motion.shape[0] if self.avatar_motion.dim() == 2 else -1
        for name in TRACKS:
            track = getattr(self, name)
            if track.dim() != 2 or track.shape[0] != T:
                raise ValueError(
                    f"example {self.key!r}: {name} has shape {tuple(track.shape)}; expected (T, width) with "
                    f"T = {T} (the avatar_motion frame count)"
                )
        D = self.avatar_motion.shape[1]
        if self.user_motion.shape[1] != D or tuple(self.reference_motion.shape) != (D,):
            raise ValueError(
                f"example {self.key!r}: user_motion {tuple(self.user_motion.shape)} / reference_motion "
                f"{tuple(self.reference_motion.shape)}; expected width D = {D} (avatar_motion's)"
            )
        if self.avatar_audio.shape[1] != self.user_audio.shape[1]:
            raise ValueError(
                f"example {self.key!r}: avatar_audio width {self.avatar_audio.shape[1]} != user_audio width "
                f"{self.user_audio.shape[1]}; expected one audio feature width A"
            )
        if self.length is None:
            self.length = T
        if not 1 <= self.length <= T:
            raise ValueError(f"example {self.key!r}: length {self.length}; expected 1 <= length <= T = {T}")

    @property
    def frames(self) -> int:
        return self.avatar_motion.shape[0]

    def window(self, start: int, frames: int) -> TrainingExample:
        """Frames [start, start + frames), zero-padded past the end (padding is masked out)."""
        if start < 0 or start >= self.length:
            raise ValueError(f"example {self.key!r}: window start {start}; expected 0 <= start < {self.length}")

        def cut(track: Tensor) -> Tensor:
            part = track[start : start + frames]
            missing = frames - part.shape[0]
            return torch.cat([part, part.new_zeros(missing, part.shape[1])]) if missing > 0 else part

        return replace(
            self,
            **{name: cut(getattr(self, name)) for name in TRACKS},
            length=min(frames, self.length - start),
        )


@dataclass
class TrainingBatch:
    avatar_motion: Tensor  # (B, T, D)
    user_motion: Tensor  # (B, T, D)
    avatar_audio: Tensor  # (B, T, A)
    user_audio: Tensor  # (B, T, A)
    reference_motion: Tensor  # (B, D)
    mask: Tensor  # (B, T) bool, True = a real frame
    keys: list[str]
    loser_motion: Tensor | None = None  # (B, T, D) DPO's less-preferred motion, same windows
    # The condition frames around each window, for the engine's chunking (the trainer sets it);
    # None: each window begins its session.
    context: ConditionContext | None = None

    def __len__(self) -> int:
        return self.avatar_motion.shape[0]

    def to(self, device: torch.device | str) -> TrainingBatch:
        move = lambda x: None if x is None else x.to(device)
        return TrainingBatch(
            *(move(getattr(self, n)) for n in (*TRACKS, "reference_motion", "mask")),
            keys=self.keys,
            loser_motion=move(self.loser_motion),
            context=move(self.context),
        )


def collate(examples: Sequence[TrainingExample], losers: Sequence[Tensor] | None = None) -> TrainingBatch:
    """Stack examples of one frame count T (cut them with `TrainingExample.window` first)."""
    lengths = {e.frames for e in examples}
    if len(lengths) != 1:
        raise ValueError(f"collate: examples have frame counts {sorted(lengths)}; expected one T (window them first)")
    T = lengths.pop()
    stack = lambda name: torch.stack([getattr(e, name) for e in examples]).float()
    mask = torch.arange(T)[None, :] < torch.tensor([e.length for e in examples])[:, None]
    return TrainingBatch(
        *(stack(name) for name in TRACKS),
        reference_motion=stack("reference_motion"),
        mask=mask,
        keys=[e.key for e in examples],
        loser_motion=None if losers is None else torch.stack(list(losers)).float(),
    )


class SyntheticDataset(Sequence[TrainingExample]):
    """Deterministic dyadic clips whose avatar motion is a learnable function of the conditions.

    Conditions are smooth random tracks; the avatar's motion is a fixed random map of its own
    audio, the user's motion a frame earlier, and the reference: a trained model can fit it,
    an untrained one cannot. Example i depends only on (seed, i).
    """

    def __init__(self, size: int, frames: int = 50, motion_dim: int = 512, audio_dim: int = 512, seed: int = 0) -> None:
        for name, value, low in (("size", size, 1), ("frames", frames, 1), ("motion_dim", motion_dim, 1)):
            if value < low:
                raise ValueError(f"synthetic dataset: {name} = {value}; expected >= {low}")
        self.size, self.frames, self.motion_dim, self.audio_dim, self.seed = size, frames, motion_dim, audio_dim, seed
        g = torch.Generator().manual_seed(seed)
        self._audio_map = torch.randn(audio_dim, motion_dim, generator=g) / math.sqrt(audio_dim)
        self._user_map = torch.randn(motion_dim, motion_dim, generator=g) / math.sqrt(motion_dim)

    def __len__(self) -> int:
        return self.size

    def _smooth(self, g: torch.Generator, width: int) -> Tensor:
        raw = torch.randn(self.frames + 4, width, generator=g)
        return (raw[:-4] + raw[1:-3] + raw[2:-2] + raw[3:-1] + raw[4:]) / math.sqrt(5)  # (T, width)

    def __getitem__(self, index: int) -> TrainingExample:  # type: ignore[override]
        if not -self.size <= index < self.size:
            raise IndexError(f"synthetic dataset: index {index} out of range for {self.size} examples")
        index %= self.size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index + 1)
        avatar_audio = self._smooth(g, self.audio_dim)
        user_audio = self._smooth(g, self.audio_dim)
        user_motion = self._smooth(g, self.motion_dim)
        reference = 0.5 * torch.randn(self.motion_dim, generator=g)
        previous_user = torch.cat([user_motion[:1], user_motion[:-1]])
        avatar_motion = torch.tanh(avatar_audio @ self._audio_map) + 0.5 * previous_user @ self._user_map + reference
        return TrainingExample(
            avatar_motion, user_motion, avatar_audio, user_audio, reference, key=f"synthetic-{self.seed}-{index}"
        )


def save_examples(path: str | Path, examples: Sequence[TrainingExample]) -> Path:
    """Examples -> one safetensors file (`{i}.{track}` tensors; keys and lengths in the metadata)."""
    path = Path(path)
    tensors: dict[str, Tensor] = {}
    for i, e in enumerate(examples):
        for name in (*TRACKS, "reference_motion"):
            tensors[f"{i}.{name}"] = getattr(e, name).float().contiguous()
    index = [{"key": e.key, "length": e.length} for e in examples]
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path, metadata={"format": "avatar-forcing-examples", "examples": json.dumps(index)})
    return path


def load_examples(path: str | Path) -> list[TrainingExample]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"examples file: {path} not found; expected a file written by save_examples")
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "avatar-forcing-examples" or "examples" not in meta:
        raise ValueError(
            f"examples file {path}: metadata 'format' is {meta.get('format')!r}; expected an examples file"
        )
    tensors = load_file(path)
    out = []
    for i, entry in enumerate(json.loads(meta["examples"])):
        try:
            parts = {name: tensors[f"{i}.{name}"] for name in (*TRACKS, "reference_motion")}
        except KeyError as exc:
            raise ValueError(f"examples file {path}: missing tensor {exc.args[0]!r}") from None
        out.append(TrainingExample(**parts, length=entry["length"], key=entry["key"]))
    return out
