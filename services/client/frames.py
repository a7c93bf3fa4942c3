"""What the client hands its user per avatar frame (`Frame`, `FrameTiming`), decoded from an
`AvatarFrame` message (session.proto)."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from services.wire.errors import ProtocolError
from services.wire.images import decode_frame_image
from services.wire.protos import Limit, pb

__all__ = ["FRAME_US", "Frame", "FrameTiming", "frame_from_message"]

FRAME_US = 1_000_000 // Limit.FPS  # media time of one frame


@dataclass(frozen=True)
class FrameTiming:
    """session.proto FrameTiming, plus when the client received the frame."""

    block_latency_ms: float  # from the block's last input to its frames being ready (server)
    generated_unix_ms: int  # wall clock when the server had the frame ready
    nfe_used: int  # sampler steps of the frame's block
    degradation: str  # "DEGRADATION_NONE", "REDUCED_NFE" or "HELD_FRAME"
    received_unix_ms: float  # wall clock when this client had the frame decoded


@dataclass(frozen=True)
class Frame:
    """One avatar frame with its slice of the avatar audio."""

    index: int  # session frame index, from 0, no gaps
    timestamp_us: int  # index * FRAME_US
    image: np.ndarray  # (H, W, 3) uint8 RGB
    audio: np.ndarray  # (SAMPLES_PER_FRAME,) int16: the avatar audio of this frame (silence where there is none)
    timing: FrameTiming

    def audio_float32(self) -> np.ndarray:
        """The audio slice as float32 in [-1, 1)."""
        return self.audio.astype(np.float32) / 32768.0


def frame_from_message(frame: pb.AvatarFrame, started: pb.Started) -> Frame:
    """An `AvatarFrame` as a `Frame`; a frame that breaks the contract raises ProtocolError.
    `started` gives the size of RAW_RGB images that leave their own at 0."""
    expected_bytes = Limit.SAMPLES_PER_FRAME * 2
    if len(frame.audio_pcm_s16le) != expected_bytes:
        raise ProtocolError(f"frame.audio_pcm_s16le: got {len(frame.audio_pcm_s16le)} bytes; expected {expected_bytes}")
    image = decode_frame_image(frame.image, started.width, started.height)
    audio = np.frombuffer(frame.audio_pcm_s16le, "<i2").astype(np.int16)
    timing = FrameTiming(
        block_latency_ms=frame.timing.block_latency_ms,
        generated_unix_ms=frame.timing.generated_unix_ms,
        nfe_used=frame.timing.nfe_used,
        degradation=pb.DegradationLevel.Name(frame.timing.degradation),
        received_unix_ms=time.time() * 1000.0,
    )
    return Frame(frame.frame_index, frame.timestamp_us, image, audio, timing)
