"""The conditions of a training window, chunked as the streaming engine chunks them.

The Dual Motion Encoder attends over the whole chunk it is given (model-spec §3). The engine
encodes the first window as one chunk and every later block as one chunk
[t - lookahead, t + block). Each block's cross-attention also sees the previous chunk's
`cross_window` frames through its cache (`engine/chunks.py`). For each frame of a window, the
trainer gives the cross-attention the condition keys that the engine's forward for that frame
sees:

- a noisy frame: the keys of its own block's forward;
- a clean frame (the clean-context prefix): the keys of the forward whose K/V the engine keeps.
  That is `ChunkSchedule.owner`: the last `lookahead` clean frames are the context of the next
  block, as at inference.

Each chunk that a window needs is encoded on its own, from the clip's condition frames around
the window (`ConditionContext`). Past the clip's end the last frame is repeated, as the engine
pads. The network still runs as one uncached pass over the window, with absolute session
positions, and its cross-attention mask lets each frame see only its chunk's keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from avatar_forcing.engine.chunks import ChunkSchedule
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.nn.kv_cache import LayerKV
from avatar_forcing.sampling.block_sampler import pad_frames

CONDITION_TRACKS = ("avatar_audio", "user_audio", "user_motion")


@dataclass
class ConditionContext:
    """The condition frames of each example's session around its window: [origin, origin + Lc)."""

    avatar_audio: Tensor  # (B, Lc, A)
    user_audio: Tensor  # (B, Lc, A)
    user_motion: Tensor  # (B, Lc, D)
    start: Tensor  # (B,) long: session frame of window frame 0
    origin: Tensor  # (B,) long: session frame of context frame 0

    def to(self, device: torch.device | str) -> ConditionContext:
        return ConditionContext(*(getattr(self, n).to(device) for n in self.__dataclass_fields__))


def context_extent(schedule: ChunkSchedule, start: int, frames: int) -> tuple[int, int]:
    """Session frames [origin, stop) that the chunks of the window [start, start + frames) read."""
    chunks = schedule.chunks_for(start, frames)
    return schedule.span(chunks[0])[0], schedule.span(chunks[-1])[1]


def clip_context(
    tracks: Sequence[tuple[Tensor, Tensor, Tensor]],
    lengths: Sequence[int],
    starts: Sequence[int],
    frames: int,
    schedule: ChunkSchedule,
) -> ConditionContext:
    """The context of windows [start, start + frames) cut from whole clips.

    `tracks[i]` = (avatar audio, user audio, user motion) of clip i, each (T_i, ·), whose first
    `lengths[i]` frames are real. Clip frame 0 is session frame 0.
    """
    extents = [context_extent(schedule, s, frames) for s in starts]
    size = max(stop - origin for origin, stop in extents)
    out = []
    for k in range(3):
        out.append(
            torch.stack(
                [
                    pad_frames(track[k][origin : min(stop, length)].float(), size)
                    for track, length, (origin, stop) in zip(tracks, lengths, extents, strict=True)
                ]
            )
        )
    return ConditionContext(
        *out, torch.tensor(list(starts), dtype=torch.long), torch.tensor([o for o, _ in extents], dtype=torch.long)
    )


@dataclass
class ChunkLayout:
    """Where each chunk's condition entries sit in the cross-attention keys of a batch."""

    frames: Tensor  # (B, K) long: session frame of each entry
    chunk: Tensor  # (B, K) long: chunk index of each entry; -1 for an unused slot
    first_window: bool  # the first slot holds chunk 0 (window frames); then n slots of lookahead + block
    blocks: int  # n


def chunk_layout(schedule: ChunkSchedule, starts: list[int], frames: int) -> ChunkLayout:
    """One slot per chunk that the windows need (`ChunkSchedule.chunks_for`), padded to the batch's most."""
    needed = [schedule.chunks_for(s, frames) for s in starts]
    first_slot = any(c[0] == 0 for c in needed)
    blocks = [[c for c in chunks if c > 0] for chunks in needed]
    n = max(len(b) for b in blocks)
    size = schedule.lookahead + schedule.block
    rows_f, rows_c = [], []
    for chunks, later in zip(needed, blocks, strict=True):
        f, c = [], []
        if first_slot:
            used = chunks[0] == 0
            f += range(*schedule.span(0))
            c += [0 if used else -1] * schedule.window
        for j in range(n):
            index = later[j] if j < len(later) else -1
            lo = schedule.span(index)[0] if index > 0 else 0
            f += range(lo, lo + size)
            c += [index] * size
        rows_f.append(f)
        rows_c.append(c)
    return ChunkLayout(torch.tensor(rows_f, dtype=torch.long), torch.tensor(rows_c, dtype=torch.long), first_slot, n)


def visible_conditions(schedule: ChunkSchedule, layout: ChunkLayout, positions: Tensor, clean: Tensor) -> Tensor:
    """(B, T, K) True where window frame n may attend to condition entry k, as in the engine.

    positions (B, T) session frames; clean (B, T) frames at t = 0. A frame sees the entries of
    its owner chunk and the cached entries of the chunk before, within ±cross_window frames.
    """
    owner = schedule.owner(positions, clean)[:, :, None]  # (B, T, 1)
    chunk, frame = layout.chunk[:, None, :], layout.frames[:, None, :]  # (B, 1, K)
    near = (frame - positions[:, :, None]).abs() <= schedule.cross_window
    # The cross cache of chunk c: the cross_window frames before c's span, from chunk c - 1.
    span_start = (schedule.first_frame(1) - schedule.lookahead) + (owner - 1) * schedule.block
    cached = (owner >= 1) & (chunk == owner - 1) & (frame >= span_start - schedule.cross_window) & (frame < span_start)
    return near & (chunk >= 0) & ((chunk == owner) | cached)


@dataclass
class WindowConditions:
    """What the flow's cross-attention takes for a batch of windows."""

    kv: list[LayerKV]  # per layer (B, h, K, d)
    frames: Tensor  # (B, K) session frame of each entry
    visible: Tensor  # (B, T, K) bool
    positions: Tensor  # (B, T) session frame of each window frame


def encode_window_conditions(
    flow: FlowTransformer,
    avatar_audio: Tensor,
    user_audio: Tensor,
    user_motion: Tensor,
    start: Tensor,
    origin: Tensor,
    timesteps: Tensor,
    block: int | None = None,
) -> WindowConditions:
    """Encode each chunk the windows need on its own, as the engine does, and say who sees what.

    Condition context tracks (B, Lc, ·) from session frame `origin` (B,); windows of T =
    timesteps.shape[1] frames from `start` (B,); frames with timestep 0 are clean.
    """
    schedule = ChunkSchedule.of(flow.config, block)
    B, T = timesteps.shape
    device = timesteps.device
    layout = chunk_layout(schedule, start.tolist(), T)
    frames, chunk = layout.frames.to(device), layout.chunk.to(device)
    index = (frames - origin.to(device)[:, None]).clamp(0, avatar_audio.shape[1] - 1)  # unused slots: any frame
    tracks = (avatar_audio, user_audio, user_motion)
    gathered = [x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1])) for x in tracks]
    parts, offset = [], 0
    if layout.first_window:  # chunk 0: the first window, one chunk
        parts.append(flow.embed_conditions(*(g[:, : schedule.window] for g in gathered)))
        offset = schedule.window
    if layout.blocks:  # every later chunk: one (lookahead + block)-frame chunk each, batched
        n, size = layout.blocks, schedule.lookahead + schedule.block
        chunks = [g[:, offset:].reshape(B * n, size, g.shape[-1]) for g in gathered]
        parts.append(flow.embed_conditions(*chunks).view(B, n * size, -1))
    cond = torch.cat(parts, dim=1)  # (B, K, H)
    positions = start.to(device)[:, None] + torch.arange(T, device=device)
    layout = ChunkLayout(frames, chunk, layout.first_window, layout.blocks)
    visible = visible_conditions(schedule, layout, positions, timesteps == 0)
    return WindowConditions(flow.condition_kv(cond), frames, visible, positions)
