"""What a session pipeline is given: the stage services it calls and its settings.

`Stages` are async callables, one per stage RPC: Serve deployment handles in production
(`deployment.handle_stages`), the servicers themselves or fakes in tests.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from avatar_forcing.engine.streaming_audio import DEFAULT_LEFT_CONTEXT_S, DEFAULT_LOOKAHEAD_FRAMES

__all__ = ["Call", "IngressSettings", "Stages"]

Call = Callable[[object], Awaitable[object]]


@dataclass
class Stages:
    extract: Call  # AudioFeatures.Extract
    encode_user_motion: Call  # MotionEncoder.EncodeUserMotion
    encode_portrait: Call  # MotionEncoder.EncodePortrait
    open_session: Call  # MotionGenerator.OpenSession (routed to the session's replica)
    generate_block: Call  # MotionGenerator.GenerateBlock (routed to the session's replica)
    close_session: Call  # MotionGenerator.CloseSession
    decode: Call  # FrameDecoder.Decode


@dataclass(frozen=True)
class IngressSettings:
    image_size: int
    crop_scale: float = 1.8  # the served auto-encoder's framing of a face (MotionAutoEncoderConfig.crop_scale)
    left_context_s: float = DEFAULT_LEFT_CONTEXT_S
    lookahead_frames: int = DEFAULT_LOOKAHEAD_FRAMES
    latency_budget_s: float = 0.8  # a block later than this after its input counts as late
    degrade: bool = True  # the real-time policy; off: every block at full quality, however late
    # After an Interrupt, schedule the block at the cursor at once from the media already arrived
    # (the rest silence, the camera held) instead of waiting up to a block for its live media:
    # the avatar is back to listening that much sooner (docs/bridge.md, "Interruption").
    prompt_after_interrupt: bool = True
    face_detect_every: int = 5
    video_grace_frames: int = 5  # how far the camera may lag the microphone before its frames are held
    # Beyond this many complete blocks waiting, a block is held without computing its features
    # (absent conditions): under overload even the feature stages cannot make latency grow.
    max_backlog_with_features: int = 3
    prefetch_blocks: int = 3  # blocks with features computed or in flight: k (generating), k+1, k+2
    heartbeat_s: float = 5.0
