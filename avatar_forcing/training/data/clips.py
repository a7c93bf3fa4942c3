"""Where a conversation's clips are: frame ranges in which both faces are visible.

A face detector misses the odd frame (blur, a hand, a turn of the head); a gap of at most
`max_gap` frames between two visible stretches is bridged (the cropper interpolates the box
across it). A longer gap means the face is lost: the conversation is split there. Stretches
shorter than `min_frames` are dropped (and counted); longer than `max_frames` are cut into
consecutive pieces of `max_frames` (a last piece shorter than `min_frames` is dropped).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ClipPlan:
    kept: list[tuple[int, int]]  # [start, end) frame ranges that become clips
    dropped: list[tuple[int, int]]  # [start, end) ranges with faces, too short to keep

    @property
    def dropped_frames(self) -> int:
        return sum(end - start for start, end in self.dropped)


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) ranges of consecutive True values."""
    padded = np.concatenate([[False], mask, [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))  # rises at starts, falls at ends
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2], strict=True)]


def bridge_gaps(present: np.ndarray, max_gap: int) -> np.ndarray:
    """(T,) bool -> (T,) bool with inner False runs of length <= max_gap set to True."""
    bridged = present.copy()
    for start, end in _runs(~present):
        if start > 0 and end < present.shape[0] and end - start <= max_gap:
            bridged[start:end] = True
    return bridged


def plan_clips(present: np.ndarray, min_frames: int, max_gap: int = 0, max_frames: int = 0) -> ClipPlan:
    """Per-frame face presence (T,) bool -> the clips to keep and the stretches dropped.

    max_frames = 0 means no upper limit.
    """
    present = np.asarray(present)
    if present.ndim != 1 or present.dtype != bool:
        raise ValueError(f"present: expected a 1-D bool array, got {present.dtype} {present.shape}")
    if min_frames < 1:
        raise ValueError(f"min_frames: expected >= 1, got {min_frames}")
    if max_gap < 0:
        raise ValueError(f"max_gap: expected >= 0, got {max_gap}")
    if max_frames and max_frames < min_frames:
        raise ValueError(f"max_frames: expected 0 (no limit) or >= min_frames = {min_frames}, got {max_frames}")
    kept: list[tuple[int, int]] = []
    dropped: list[tuple[int, int]] = []
    for start, end in _runs(bridge_gaps(present, max_gap)):
        step = max_frames or end - start
        for piece_start in range(start, end, step):
            piece = (piece_start, min(piece_start + step, end))
            (kept if piece[1] - piece[0] >= min_frames else dropped).append(piece)
    return ClipPlan(kept, dropped)
