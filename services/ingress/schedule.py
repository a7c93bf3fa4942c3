"""Which block of a session is ready, and what its features are computed from.

Block k is complete once the media horizon (`MediaState.horizon`) passes its last frame plus
the audio encoder's look-ahead, or at EndOfInput (the last block may be short). The one
exception is the first block after an Interrupt (`MediaState.prompt`): it is scheduled at once,
with the media not yet arrived read as silence and the last camera frame held, so that the
avatar is back to listening one block's processing after the interruption rather than after
waiting up to a block for the live media as well. Its audio
features are computed from a bounded window of each timeline: `left_context_s` before the
block, the block, and the look-ahead. Nothing older is ever read for features, which is what
lets the timelines forget audio behind `features_from` (`AudioTimeline.release`).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import numpy as np

from avatar_forcing.config import SAMPLES_PER_FRAME
from services.common.telemetry import BlockTrace
from services.ingress.config import IngressSettings
from services.ingress.media import MediaState
from services.ingress.session import SessionContext
from services.ingress.timeline import AudioTimeline
from services.wire.protos import Limit, pb
from services.wire.tensors import encode

__all__ = [
    "BlockSpan",
    "PendingBlock",
    "absent_motion",
    "blocks_behind",
    "extract_request",
    "features_from",
    "left_frames",
    "next_block",
    "read_window",
    "zero_features",
]


@dataclass(frozen=True)
class BlockSpan:
    first: int  # session frame index
    frames: int
    last: bool  # the session's last block (input ended)
    total: int | None  # frames begun when the input ended (windows stop there); None while it goes on
    padded: bool = False  # scheduled before its input was complete (after an Interrupt): the rest is silence


@dataclass
class PendingBlock:
    first: int  # session frame index
    frames: int
    ready_at: float  # the pipeline's clock when its input was complete
    features: asyncio.Task | None = None  # -> (avatar_audio, user_audio, user_motion) tensors
    last: bool = False
    trace: BlockTrace | None = None  # its trace (root span `block`) and metrics
    has_slot: bool = False  # holds one of the pipeline's feature slots


def next_block(media: MediaState, block: int, lookahead_frames: int) -> BlockSpan | None:
    """The block starting at the cursor if its input is complete, else None (the cursor is not moved)."""
    first = media.next_block_frame
    horizon = media.horizon()
    total = -(-horizon // SAMPLES_PER_FRAME)  # frames begun
    if media.ended:
        if first >= total:
            return None
        frames = min(block, total - first)
        return BlockSpan(first, frames, first + frames >= total, total)
    if media.prompt:
        return BlockSpan(first, block, False, None, padded=True)
    if horizon < (first + block + lookahead_frames) * SAMPLES_PER_FRAME:
        return None
    return BlockSpan(first, block, False, None)


def left_frames(left_context_s: float) -> int:
    """Frames of left context before a block (the audio encoder's)."""
    return round(left_context_s * Limit.FPS)


def features_from(next_block_frame: int, left_context_s: float) -> int:
    """The first sample any block from `next_block_frame` on reads for its features."""
    return max(0, next_block_frame - left_frames(left_context_s)) * SAMPLES_PER_FRAME


def read_window(
    span: BlockSpan, timeline: AudioTimeline, horizon: int, left_context_s: float, lookahead_frames: int
) -> tuple[np.ndarray, int]:
    """The bounded window the streaming audio encoder would use for the block's frames, as float32 in
    [-1, 1], and how many of its samples are left context."""
    start = max(0, span.first - left_frames(left_context_s))
    end = span.first + span.frames + lookahead_frames
    received = max(horizon, timeline.end)
    if span.padded:  # the window is read before its audio arrived: what has not is silence
        received = end * SAMPLES_PER_FRAME
    if span.total is not None:
        end = min(end, span.total)
    stop = min(end * SAMPLES_PER_FRAME, received)
    window = timeline.read(start * SAMPLES_PER_FRAME, stop).astype(np.float32) / 32768.0
    return window, (span.first - start) * SAMPLES_PER_FRAME


def extract_request(
    span: BlockSpan, source: int, timeline: AudioTimeline, horizon: int, settings: IngressSettings, ctx: SessionContext
) -> pb.ExtractFeaturesRequest:
    """The AudioFeatures.Extract request of a block's `source` audio, its window read now."""
    window, left = read_window(span, timeline, horizon, settings.left_context_s, settings.lookahead_frames)
    return pb.ExtractFeaturesRequest(
        session_id=ctx.session_id,
        tenant_id=ctx.tenant_id,
        source=source,
        samples=encode(window, "samples"),
        sample_rate=Limit.SAMPLE_RATE,
        first_frame=span.first,
        num_frames=span.frames,
        left_context_samples=left,
    )


def blocks_behind(media: MediaState, block: PendingBlock) -> int:
    """Complete blocks scheduled after `block` (how far it is behind the live edge)."""
    return (media.next_block_frame - block.first - block.frames) // max(1, block.frames)


def zero_features(frames: int) -> pb.Tensor:
    """Absent conditions for `frames` frames (what classifier-free guidance uses as 'no input')."""
    return encode(np.zeros((frames, Limit.MOTION_DIM), np.float32), "features")


async def absent_motion(frames: int) -> pb.EncodeUserMotionResponse:
    """What the motion encoder would answer for a block without a face: absent conditions."""
    return pb.EncodeUserMotionResponse(latents=zero_features(frames))
