"""Which condition frames the streaming engine encodes together (model-spec §3 and §5).

The Dual Motion Encoder attends over the whole chunk it is given, unmasked, so the condition
of a frame depends on its chunk. The engine (`MotionStream.next_request`, the DPO loser
rollout) encodes the first window as one chunk [0, window). Every later block, whose first
new frame is t, gets one chunk [t - lookahead, t + block). The cross-attention cache adds the
`cross_window` condition frames just before that chunk, as the previous chunk encoded them
(`BlockSampler._write_cache` keeps `cross_window` entries).

`condition_span` is the engine's own rule. `ChunkSchedule` numbers the chunks of a session:
chunk 0 is the first window and chunk b >= 1 is the b-th block after it. The trainer uses it
to give each training window the conditioning the engine would give it
(`training/conditioning.py`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_forcing.config import FlowConfig


def condition_span(next_frame: int, first: bool, window: int, block: int, lookahead: int) -> tuple[int, int]:
    """Frames [start, stop) of the condition chunk for the block whose first new frame is `next_frame`.

    The first window is one chunk of `window` frames. A later block gets its `lookahead`
    context frames and its `block` new frames.
    """
    if first:
        return 0, window
    return next_frame - lookahead, next_frame + block


@dataclass(frozen=True)
class ChunkSchedule:
    """The engine's condition chunks of one session, numbered 0 (first window), 1, 2, ..."""

    window: int
    block: int
    lookahead: int
    cross_window: int

    @classmethod
    def of(cls, config: FlowConfig, block: int | None = None) -> ChunkSchedule:
        return cls(config.window, config.block if block is None else block, config.lookahead, config.cross_window)

    def first_frame(self, index: int) -> int:
        """The first new frame of chunk `index`'s block: 0, window, window + block, ..."""
        return 0 if index == 0 else self.window + (index - 1) * self.block

    def span(self, index: int) -> tuple[int, int]:
        """Frames [start, stop) that chunk `index` encodes together."""
        return condition_span(self.first_frame(index), index == 0, self.window, self.block, self.lookahead)

    def cached_span(self, index: int) -> tuple[int, int]:
        """Frames of chunk `index - 1` that the cross-attention cache adds to chunk `index` (none for 0)."""
        if index == 0:
            return 0, 0
        start = self.span(index)[0]
        return start - self.cross_window, start

    def index_of(self, frames: Tensor) -> Tensor:
        """The chunk whose block generates each frame (integer tensor in, same shape out)."""
        later = 1 + torch.div(frames - self.window, self.block, rounding_mode="floor")
        return torch.where(frames < self.window, torch.zeros_like(frames), later)

    def owner(self, frames: Tensor, clean: Tensor) -> Tensor:
        """The chunk the engine computes each frame with.

        A noisy frame is denoised in its own block. A clean frame's K/V reach later blocks through the
        self-attention cache. The engine writes them in the block whose chunk covers the frame without
        the last `lookahead` frames: the block's newest frames come back as the next block's context,
        where that block's chunk computes them again. Chunk 0 covers [0, window - lookahead) and chunk b
        covers [t_b - lookahead, t_b + block - lookahead).
        """
        return self.index_of(frames + self.lookahead * clean.to(frames.dtype))

    def chunks_for(self, start: int, frames: int) -> range:
        """Every chunk that the window [start, start + frames) needs, those of its cross caches included."""
        first = int(self.index_of(torch.tensor(start)))
        last = int(self.index_of(torch.tensor(start + frames - 1 + self.lookahead)))
        return range(max(0, first - 1), last + 1)
