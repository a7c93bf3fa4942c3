"""The avatar's frames out to the room, paced at exactly 25 fps, each with its own audio.

The session sends frames in bursts (a block at a time, with network jitter on top). The
publisher keeps them in a small jitter buffer and captures one every 1/25 s on a fixed grid
(`t_start + n / 25`: no drift however long the call), the video frame and its 640 samples of
audio together, so audio and video leave aligned by construction. It starts `prebuffer_frames`
frame periods after the first frame arrives (the jitter it absorbs); when the buffer runs dry
it repeats the last image with silence (a held frame) rather than stalling the track; when it
holds more than `max_buffer_frames` (the session ran ahead, e.g. after a stall) it drops the
oldest to keep latency bounded.
Audio the runner has muted (an interruption: stale speech still in buffered frames) is zeroed
at capture time. On an interruption the runner also drops the talking frames: `interrupt()`
drops what is buffered and holds the last published image until `resume_at(index)` names the
first frame the session generated without the speech (Interrupted.frame_index); frames before
it are dropped, from it on they are published at once. Publishing those frames instead would
keep the avatar's face talking for the whole buffer (up to three blocks) after the agent
stopped it.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from livekit import rtc

from services.bridge.room import AvatarTracks
from services.client import Frame
from services.wire.protos import Limit

FPS = Limit.FPS
SAMPLES_PER_FRAME = Limit.SAMPLES_PER_FRAME
FRAME_S = 1.0 / FPS


@dataclass
class PublishStats:
    published: int = 0
    held: int = 0  # ticks with no frame ready: the last image repeated, silence
    dropped: int = 0  # frames dropped to bound the buffer
    interrupted: int = 0  # talking frames dropped after an interruption (never published)
    resyncs: int = 0  # the loop fell far behind its grid and restarted it
    max_buffered: int = 0


class AvatarPublisher:
    """Frames in (`push`), paced capture out (`run`); `on_published(frame_index or None)` after each tick."""

    def __init__(
        self,
        tracks: AvatarTracks,
        width: int,
        height: int,
        *,
        prebuffer_frames: int = 2,
        max_buffer_frames: int = 30,
        on_published: Callable[[int | None], None] = lambda index: None,
        now: Callable[[], float] | None = None,
    ) -> None:
        self.tracks = tracks
        self.width = width
        self.height = height
        self.prebuffer_frames = max(1, prebuffer_frames)
        self.max_buffer_frames = max(self.prebuffer_frames + 1, max_buffer_frames)
        self.on_published = on_published
        self.stats = PublishStats()
        self.played_until = 0  # one past the last avatar-timeline sample published
        self.first_capture_at: float | None = None
        self._buffer: deque[Frame] = deque()
        self._arrived = asyncio.Event()
        self._input_ended = False
        self._last_video: rtc.VideoFrame | None = None
        self._silence = np.zeros(SAMPLES_PER_FRAME, np.int16)
        self.mutes: list[list[float]] = []  # [start, end) avatar-timeline samples to silence
        self._resume_index = 0  # frames below this index are dropped (an interruption)
        self._paused = False  # interrupted, Interrupted.frame_index not known yet: hold the last image

    # --- input ------------------------------------------------------------------------------------

    def push(self, frame: Frame) -> None:
        if frame.index < self._resume_index:  # generated from speech the agent cleared
            self.stats.interrupted += 1
            return
        self._buffer.append(frame)
        self.stats.max_buffered = max(self.stats.max_buffered, len(self._buffer))
        self._arrived.set()

    def end_input(self) -> None:
        self._input_ended = True
        self._arrived.set()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def mute_from(self, sample: int) -> list[float]:
        """Silence avatar audio from `sample` on (until the returned range's end is set)."""
        mute = [float(sample), math.inf]
        self.mutes.append(mute)
        return mute

    def interrupt(self) -> None:
        """Drop the buffered frames (the cleared speech's) and publish none until `resume_at`.

        Frames arriving meanwhile are kept, not published: the session's first listening frames
        may overtake the Interrupted answer on the way to `resume_at`, and must not be lost.
        """
        self._paused = True
        self._drop_before(math.inf)

    def resume_at(self, index: int) -> None:
        """Publish again from frame `index` on; earlier frames are dropped (0: the Interrupt got no
        answer, publish what comes)."""
        self._resume_index = max(self._resume_index, index)
        self._drop_before(self._resume_index)
        self._paused = False

    def _drop_before(self, index: float) -> None:
        kept = [f for f in self._buffer if f.index >= index]
        self.stats.interrupted += len(self._buffer) - len(kept)
        self._buffer = deque(kept)

    # --- the paced loop -------------------------------------------------------------------------------

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._buffer and not self._input_ended:
            self._arrived.clear()
            await self._arrived.wait()
        # frames come in bursts (a block at a time): start `prebuffer_frames` periods after the first,
        # so a later burst may be that late without the track running dry
        await asyncio.sleep(self.prebuffer_frames * FRAME_S)
        t_start = loop.time()
        n = 0
        while self._buffer or not self._input_ended:
            due = t_start + n * FRAME_S
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            elif delay < -10 * FRAME_S:  # far behind (the process stalled): restart the grid
                self.stats.resyncs += 1
                t_start, n = loop.time(), 0
            while len(self._buffer) > self.max_buffer_frames:
                self._buffer.popleft()
                self.stats.dropped += 1
            frame = self._buffer.popleft() if self._buffer and not self._paused else None
            await self._capture(frame, n)
            n += 1

    async def _capture(self, frame: Frame | None, n: int) -> None:
        if frame is None:
            if self._last_video is None:
                return
            video, audio, index = self._last_video, self._silence, None
            self.stats.held += 1
        else:
            image = np.ascontiguousarray(frame.image, dtype=np.uint8)
            height, width = image.shape[:2]
            video = rtc.VideoFrame(width, height, rtc.VideoBufferType.RGB24, image.tobytes())
            audio = self._muted(frame)
            index = frame.index
        pcm = rtc.AudioFrame(audio.astype("<i2").tobytes(), Limit.SAMPLE_RATE, 1, SAMPLES_PER_FRAME)
        await self.tracks.capture(video, pcm, n * 1_000_000 // FPS)
        if self.first_capture_at is None:
            self.first_capture_at = asyncio.get_running_loop().time()
        self._last_video = video
        self.stats.published += 1
        if index is not None:
            self.played_until = (index + 1) * SAMPLES_PER_FRAME
        self.on_published(index)

    def _muted(self, frame: Frame) -> np.ndarray:
        start = frame.index * SAMPLES_PER_FRAME
        end = start + SAMPLES_PER_FRAME
        audio = frame.audio
        self.mutes = [m for m in self.mutes if m[1] > start]
        for lo, hi in self.mutes:
            if lo < end and hi > start:
                if audio is frame.audio:
                    audio = audio.copy()
                audio[max(0, int(lo) - start) : min(SAMPLES_PER_FRAME, int(min(hi, end)) - start)] = 0
        return audio
