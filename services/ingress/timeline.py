"""The bounded audio timeline of one source (the avatar's or the user's audio) in a session.

Sample s of the session timeline is the s-th sample at 16 kHz since the session began; chunks
are placed by their timestamp and the gaps between them are silence. A session may last hours,
but the pipeline only ever reads a bounded window behind its cursor: the audio encoder's left
context before the next block, and the avatar audio of frames not yet sent. So the timeline
keeps samples from `start` to `end` only; the owner moves `start` forward with `release` as
its cursors advance, and a read before `start` is a bug in the caller (`AudioWindowError`).

The kept samples live in one preallocated int16 buffer, from index `offset` on. A write copies
its chunk (and zeros for a gap) in place. When the buffer's tail is full, the kept samples are
moved to its front (at most half the buffer, so each move is paid for by as many samples
written since the last) or, when they fill more than half of it, into a buffer twice the size:
a write costs O(chunk) amortised, whatever the session's length.
"""

from __future__ import annotations

import numpy as np

from services.wire.errors import ValidationError
from services.wire.protos import Limit

__all__ = ["AudioTimeline", "AudioWindowError"]

_INITIAL_CAPACITY = 1 << 14  # ~1 s; grows by doubling to twice the window its owner keeps


class AudioWindowError(LookupError):
    """A read of samples the timeline no longer keeps: the caller released them (a bug, not bad input)."""


class AudioTimeline:
    """int16 samples of one source on the session timeline, kept from `start` to `end`; gaps are silence."""

    def __init__(self, name: str, capacity: int = _INITIAL_CAPACITY) -> None:
        self.name = name
        self._buffer = np.zeros(max(1, capacity), np.int16)
        self._offset = 0  # buffer index of sample `start`
        self._start = 0  # first sample kept (may pass `end` when the owner released past it)
        self._end = 0  # one past the last sample received
        # Samples copied inside or between buffers to make room: the cost writes pay besides their
        # own samples; amortised at most about one per sample written (a test checks it).
        self.samples_moved = 0

    @property
    def start(self) -> int:
        """The first sample kept: reads must start here or later."""
        return self._start

    @property
    def end(self) -> int:
        """One past the last sample received (what the session's horizon is made of)."""
        return self._end

    @property
    def kept(self) -> int:
        """Samples held in memory."""
        return max(0, self._end - self._start)

    @property
    def capacity(self) -> int:
        """Samples the buffer has room for (its memory is twice that in bytes)."""
        return self._buffer.shape[0]

    def write(self, timestamp_us: int, pcm: np.ndarray) -> None:
        """Place int16 `pcm` at `timestamp_us`; the gap since the last chunk is silence. Overlaps are refused."""
        first = timestamp_us * Limit.SAMPLE_RATE // 1_000_000
        if first < self._end:
            raise ValidationError(
                f"audio({self.name}).timestamp_us",
                f"{timestamp_us} overlaps audio already received up to {self._end * 1_000_000 // Limit.SAMPLE_RATE} us",
            )
        stop = first + pcm.shape[0]
        if stop > self._start:  # else all of it lies before what is kept: nothing to store
            self._reserve(stop - self._start)
            base = self._offset - self._start  # buffer index of sample s is s + base
            gap_from = max(self._end, self._start)
            self._buffer[gap_from + base : max(first, gap_from) + base] = 0  # the tail may hold stale samples
            skip = max(0, self._start - first)
            self._buffer[first + skip + base : stop + base] = pcm[skip:]
        self._end = stop

    def read(self, start: int, stop: int) -> np.ndarray:
        """Samples [start, stop) as a new int16 array, silence past the end."""
        if stop <= start:
            return np.zeros(0, np.int16)
        if start < self._start:
            raise AudioWindowError(
                f"audio({self.name}): samples [{start}, {stop}) were asked for, but only samples from "
                f"{self._start} on are kept (released: behind every block's left context and every unsent frame)"
            )
        out = np.zeros(stop - start, np.int16)
        available = min(stop, self._end)
        if available > start:
            base = self._offset - self._start
            out[: available - start] = self._buffer[start + base : available + base]
        return out

    def release(self, before: int) -> None:
        """Samples before `before` will never be read again: forget them."""
        if before <= self._start:
            return
        if before >= self._end:
            self._offset = 0  # nothing is kept: the next write starts at the buffer's front
        else:
            self._offset += before - self._start
        self._start = before

    def truncate(self, sample: int) -> None:
        """Drop the samples from `sample` on (an interrupt): later writes may start there again."""
        self._end = min(self._end, max(0, sample))

    def _reserve(self, size: int) -> None:
        """Room for `size` samples from `start` on, moving what is kept when the tail is full."""
        capacity = self._buffer.shape[0]
        if self._offset + size <= capacity:
            return
        kept = self.kept
        source = self._buffer[self._offset : self._offset + kept]
        if 2 * size <= capacity:  # at most half full: moving to the front frees at least half of it
            self._buffer[:kept] = source  # numpy copies overlapping ranges correctly
        else:
            while 2 * size > capacity:
                capacity *= 2
            grown = np.zeros(capacity, np.int16)
            grown[:kept] = source
            self._buffer = grown
        self._offset = 0
        self.samples_moved += kept
