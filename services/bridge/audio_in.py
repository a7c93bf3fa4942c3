"""Audio into the session, at the contract's 16 kHz mono int16.

`PcmDecoder`: the agent's speech, a byte stream of interleaved int16 LE PCM at the stream's own
rate and channels (chunks may split a sample), to 16 kHz mono.
`MicTimeline`: the human's microphone frames (any rate, any size) to 16 kHz mono chunks with
their session timestamps: consecutive audio stays contiguous (jitter only bunches frames), and
after a gap (the human muted, left, or the network stalled) the cursor jumps to the session
clock, never backwards, so timestamps always increase.
"""

from __future__ import annotations

import numpy as np
from livekit import rtc

from services.wire.protos import Limit

SAMPLE_RATE = Limit.SAMPLE_RATE


class Resampler:
    """Mono int16 at `rate` -> mono int16 at 16 kHz (the SDK's `rtc.AudioResampler`; none at 16 kHz)."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._resampler = None if rate == SAMPLE_RATE else rtc.AudioResampler(rate, SAMPLE_RATE, num_channels=1)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        if self._resampler is None or pcm.shape[0] == 0:
            return pcm
        frame = rtc.AudioFrame(pcm.astype("<i2").tobytes(), self.rate, 1, pcm.shape[0])
        return _concat(self._resampler.push(frame))

    def flush(self) -> np.ndarray:
        if self._resampler is None:
            return np.zeros(0, np.int16)
        return _concat(self._resampler.flush())


def _concat(frames: list[rtc.AudioFrame]) -> np.ndarray:
    if not frames:
        return np.zeros(0, np.int16)
    return np.concatenate([np.frombuffer(bytes(f.data), "<i2") for f in frames]).astype(np.int16)


def downmix(pcm: np.ndarray, channels: int) -> np.ndarray:
    """Interleaved int16 (N * channels,) -> mono int16 (N,)."""
    if channels == 1:
        return pcm
    return pcm.reshape(-1, channels).mean(axis=1).round().astype(np.int16)


class PcmDecoder:
    """Bytes of one speech segment (int16 LE, `channels` interleaved, `rate` Hz) -> 16 kHz mono."""

    def __init__(self, rate: int, channels: int) -> None:
        self.channels = channels
        self._resampler = Resampler(rate)
        self._rest = b""

    def push(self, data: bytes) -> np.ndarray:
        data = self._rest + bytes(data)
        whole = len(data) - len(data) % (2 * self.channels)
        self._rest = data[whole:]
        pcm = np.frombuffer(data[:whole], "<i2").astype(np.int16)
        return self._resampler.push(downmix(pcm, self.channels))

    def flush(self) -> np.ndarray:
        self._rest = b""
        return self._resampler.flush()


class MicTimeline:
    """The human's microphone on the session timeline (see the module docstring)."""

    def __init__(self, resync_s: float = 0.2) -> None:
        self.resync_samples = round(resync_s * SAMPLE_RATE)
        self.cursor = 0  # the next sample's position on the session timeline
        self.resyncs = 0
        self._resamplers: dict[tuple[int, int], Resampler] = {}

    def place(self, frame: rtc.AudioFrame, session_now_s: float) -> tuple[np.ndarray, int]:
        """(16 kHz mono samples, their first sample's timeline position) of one microphone frame."""
        key = (frame.sample_rate, frame.num_channels)
        resampler = self._resamplers.get(key)
        if resampler is None:
            resampler = self._resamplers[key] = Resampler(frame.sample_rate)
        pcm = np.frombuffer(bytes(frame.data), "<i2").astype(np.int16)
        samples = resampler.push(downmix(pcm, frame.num_channels))
        now = round(session_now_s * SAMPLE_RATE)
        expected = max(0, now - samples.shape[0])  # where a frame that just arrived would start
        if expected - self.cursor > self.resync_samples:  # a gap: jump to the clock
            self.cursor = expected
            self.resyncs += 1
        start = self.cursor
        self.cursor += samples.shape[0]
        return samples, start
