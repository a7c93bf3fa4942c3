"""AudioFeatures.Extract: a bounded window of 16 kHz audio -> one 512-d feature per video frame.

Stateless: the caller sends the window. The waveform holds the session's samples from
`first_frame * 640 - left_context_samples` to whatever end the caller chose (it may run past
the output frames: that is look-ahead audio the bidirectional encoder sees but emits nothing
for). The features are exactly those `avatar_forcing.streaming_audio.StreamingAudioFeatures`
computes in-process for the same window (`window_features`), so a distributed session and
the embedded engine produce the same stream:

    window     | left context (C frames) | output frames (num_frames) | look-ahead ... |
               ^ first_frame*640 - left_context_samples                    end of waveform ^
    frames_in_window = ceil(len(waveform) / 640); rows [C, C + num_frames) are returned

Ray-free; `deployment.py` adapts it to Ray Serve.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch

from avatar_forcing.engine.streaming_audio import window_features
from avatar_forcing.nn.model import AvatarForcing
from services.common.config import Settings
from services.common.telemetry import rpc_span
from services.store import SessionStore
from services.wire.errors import ValidationError
from services.wire.ids import check_id
from services.wire.protos import Limit, pb
from services.wire.tensors import decode, encode

log = logging.getLogger(__name__)

SOURCES = (pb.AVATAR, pb.USER)


@torch.no_grad()
def request_waveform(request: pb.ExtractFeaturesRequest) -> np.ndarray:
    """The request's waveform as float32 (n,), validated against the contract's limits."""
    which = request.WhichOneof("waveform")
    if which is None:
        raise ValidationError("waveform", "missing; expected pcm_s16le bytes or a FLOAT32 samples tensor")
    if which == "pcm_s16le":
        data = request.pcm_s16le
        if len(data) % 2:
            raise ValidationError("pcm_s16le", f"{len(data)} bytes is odd; expected 2 bytes per int16 sample")
        if len(data) > 2 * Limit.MAX_WAVEFORM_SAMPLES:
            raise ValidationError(
                "pcm_s16le",
                f"{len(data) // 2} samples exceeds MAX_WAVEFORM_SAMPLES = {Limit.MAX_WAVEFORM_SAMPLES}",
            )
        wave = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
        field = "pcm_s16le"
    else:
        max_bytes = 4 * Limit.MAX_WAVEFORM_SAMPLES
        wave = decode(request.samples, "samples", shape=(None,), dtypes=("FLOAT32",), max_bytes=max_bytes)
        peak = float(np.abs(wave).max()) if wave.size else 0.0
        if peak > 1.0:
            raise ValidationError("samples", f"peak amplitude {peak:g}; expected samples in [-1, 1]")
        field = "samples"
    if wave.size == 0:
        raise ValidationError(field, "empty; expected at least one sample")
    return wave


class AudioFeaturesServicer:
    """The AudioFeatures service over one model (its audio encoder)."""

    def __init__(self, model: AvatarForcing, store: SessionStore | None = None, settings: Settings | None = None):
        self.encoder = model.audio_encoder
        self.store = store  # unused: the service is stateless (uniform construction with the others)
        self.settings = settings
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="audio-features")  # one model pass at a time

    async def _compute(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    @rpc_span("avatar_forcing.v1.AudioFeatures/Extract")
    async def Extract(self, request: pb.ExtractFeaturesRequest, context=None) -> pb.ExtractFeaturesResponse:
        check_id("session_id", request.session_id)
        check_id("tenant_id", request.tenant_id)
        if request.source not in SOURCES:
            raise ValidationError("source", f"got {pb.AudioSource.Name(request.source)}; expected AVATAR or USER")
        if request.sample_rate != Limit.SAMPLE_RATE:
            expected = f"expected SAMPLE_RATE = {Limit.SAMPLE_RATE} (resample first)"
            raise ValidationError("sample_rate", f"got {request.sample_rate} Hz; {expected}")
        if request.first_frame < 0:
            raise ValidationError("first_frame", f"got {request.first_frame}; expected >= 0")
        if not 1 <= request.num_frames <= Limit.MAX_FRAMES_PER_REQUEST:
            expected = f"expected 1 to MAX_FRAMES_PER_REQUEST = {Limit.MAX_FRAMES_PER_REQUEST}"
            raise ValidationError("num_frames", f"got {request.num_frames}; {expected}")
        per_frame = Limit.SAMPLES_PER_FRAME
        left = request.left_context_samples
        if left % per_frame:
            raise ValidationError(
                "left_context_samples", f"got {left}; expected a multiple of SAMPLES_PER_FRAME = {per_frame}"
            )
        if left > request.first_frame * per_frame:
            raise ValidationError(
                "left_context_samples",
                f"got {left}, which starts before the session's first sample (first_frame {request.first_frame} "
                f"begins at sample {request.first_frame * per_frame}); expected at most that",
            )
        wave = request_waveform(request)
        context_frames = left // per_frame
        frames_in_window = -(-wave.size // per_frame)
        available = frames_in_window - context_frames  # output frames with at least one sample
        if request.num_frames > available:
            raise ValidationError(
                "num_frames",
                f"got {request.num_frames} but the waveform ({wave.size} samples, {left} of them context) "
                f"covers {max(available, 0)} frames after the context; expected len(waveform) >= "
                f"left_context_samples + (num_frames - 1) * {per_frame} + 1",
            )
        window = torch.from_numpy(wave)
        features = await self._compute(window_features, self.encoder, window, context_frames, request.num_frames)
        return pb.ExtractFeaturesResponse(
            features=encode(features.float().cpu(), "features", dtype="FLOAT32"), first_frame=request.first_frame
        )

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
