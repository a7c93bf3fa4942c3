"""Audio as the client sends it: mono samples -> int16 PCM -> timestamped `AudioChunk` messages."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np

from services.wire.errors import ValidationError
from services.wire.protos import Limit, pb

__all__ = ["audio_chunks", "samples_to_us", "to_pcm16"]


def to_pcm16(samples: Any, name: str = "samples") -> np.ndarray:
    """Mono samples -> int16 (N,): int16 as is, float in [-1, 1] scaled by 32767 (clipped)."""
    array = np.asarray(samples)
    if array.ndim != 1:
        raise ValidationError(name, f"expected mono samples of shape (N,), got shape {array.shape}")
    if array.dtype == np.int16:
        return array
    if not np.issubdtype(array.dtype, np.floating):
        raise ValidationError(name, f"expected float samples in [-1, 1] or int16, got dtype {array.dtype}")
    if not np.all(np.isfinite(array)):
        raise ValidationError(name, "samples contain NaN or infinity")
    return np.round(np.clip(array, -1.0, 1.0) * 32767.0).astype(np.int16)


def samples_to_us(samples: int) -> int:
    """The media time of `samples` samples at SAMPLE_RATE, in microseconds (rounded down)."""
    return samples * 1_000_000 // Limit.SAMPLE_RATE


def audio_chunks(
    source: int, pcm: np.ndarray, base_us: int, chunk_samples: int
) -> Iterator[tuple[pb.AudioChunk, int, int]]:
    """`pcm` (int16 (N,)) from `base_us` on, as chunks of at most `chunk_samples` samples:
    (the AudioChunk, the media time its samples end at in us, the samples sent with it and before)."""
    for offset in range(0, pcm.shape[0], chunk_samples):
        piece = pcm[offset : offset + chunk_samples]
        start_us = base_us + samples_to_us(offset)
        chunk = pb.AudioChunk(
            source=source,
            timestamp_us=start_us,
            pcm_s16le=piece.astype("<i2", copy=False).tobytes(),
            sample_rate=Limit.SAMPLE_RATE,
        )
        yield chunk, start_us + samples_to_us(piece.shape[0]), offset + piece.shape[0]
