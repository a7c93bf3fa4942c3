"""The session side of the bridge: one `AvatarSession.Stream` per room.

`SessionStream` is the part of `services.client.AvatarStream` the bridge uses; `GrpcBackend` opens
real ones with `services.client.AvatarClient` (the session token and target of the join order),
and `FakeBackend` opens `FakeStream`s: an in-process stand-in that answers like the ingress (25 fps
in blocks, in real time on the loop's clock, each frame with its slice of the avatar audio,
Interrupted with the first frame generated without the dropped audio), so the bridge's protocol,
pacing and lifecycle are tested in seconds, on a simulated clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from services.client import AvatarClient, Frame, FrameTiming
from services.client.session import session_options
from services.wire.errors import ServerError
from services.wire.protos import Limit, pb

log = logging.getLogger("services.bridge")
FRAME_US = 1_000_000 // Limit.FPS
SAMPLES_PER_FRAME = Limit.SAMPLES_PER_FRAME


@dataclass(frozen=True)
class JoinOrder:
    """A dispatch join order (services.gateway.livekit's contract), the fields the bridge uses."""

    session_id: str
    room: str
    livekit_url: str
    bridge_token: str = field(repr=False)
    session_token: str = field(repr=False)
    avatar_id: str
    avatar_identity: str
    agent_identity: str = ""
    grpc_target: str = ""
    tenant_id: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    expires_ms: int = 0
    issued_ms: int = 0

    @classmethod
    def from_order(cls, order: dict[str, Any]) -> JoinOrder:
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in order.items() if k in known})

    def expired(self, now_ms: float | None = None) -> bool:
        now_ms = time.time() * 1000 if now_ms is None else now_ms
        return bool(self.expires_ms) and now_ms >= self.expires_ms


class SessionStream(Protocol):
    """What the bridge needs of one session stream (services.client.AvatarStream has all of it)."""

    started: pb.Started | None
    frames_received: int

    async def send_avatar_audio(self, samples: Any, timestamp_us: int | None = None) -> int: ...

    async def send_user_audio(self, samples: Any, timestamp_us: int | None = None) -> int: ...

    async def send_user_frame(self, image: Any, timestamp_us: int | None = None) -> int: ...

    async def interrupt(self, wait: bool = True, timeout_s: float = 10.0) -> int | None: ...

    def frames(self) -> AsyncIterator[Frame]: ...

    async def end_input(self) -> None: ...

    async def close(self) -> None: ...


class SessionBackend(Protocol):
    def open(self, order: JoinOrder) -> AbstractAsyncContextManager[SessionStream]: ...


class GrpcBackend:
    """Real sessions: `AvatarClient(order.grpc_target, order.session_token)`, Start with the
    order's session id and avatar id. Dropped media (`Error` messages) are logged, not raised."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = (), **session_kwargs: Any) -> None:
        self.metadata = metadata
        self.session_kwargs = session_kwargs

    @asynccontextmanager
    async def open(self, order: JoinOrder) -> AsyncIterator[SessionStream]:
        def on_error(error: ServerError) -> None:
            log.info("session %s: server dropped a message: %s", order.session_id, error)

        client = AvatarClient(order.grpc_target, order.session_token, metadata=self.metadata)
        try:
            stream = client.session(
                avatar_id=order.avatar_id,
                session_id=order.session_id,
                options=session_options(order.options) if order.options else None,
                on_error=on_error,
                **self.session_kwargs,
            )
            async with stream:
                yield stream
        finally:
            await client.close()


def frame_marker(image: np.ndarray) -> tuple[int, bool, bool]:
    """(frame index, speaking, saw the user) that `FakeStream` paints into pixel (0, 0)."""
    r, g, b = (int(v) for v in image[0, 0])
    return r | (g << 8), bool(b & 1), bool(b & 2)


class FakeStream:
    """An in-process session stream (see the module docstring). Time is the loop's clock."""

    def __init__(
        self,
        session_id: str = "fake",
        *,
        block: int = 5,
        width: int = 16,
        height: int = 16,
        latency_s: float = 0.1,
        jitter_s: float = 0.0,
        seed: int = 0,
        max_ahead_ms: float = 3000.0,
    ) -> None:
        self.started = pb.Started(
            session_id=session_id,
            fps=Limit.FPS,
            block=block,
            sample_rate=Limit.SAMPLE_RATE,
            samples_per_frame=SAMPLES_PER_FRAME,
            width=width,
            height=height,
            output_format=pb.RAW_RGB,
        )
        self.block = block
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self._rng = np.random.default_rng(seed)
        self.max_ahead_ms = max_ahead_ms
        self.frames_received = 0
        self.generated = 0  # next frame to generate
        self.interrupted_frame_index: int | None = None
        self.avatar = np.zeros(0, np.int16)  # the avatar timeline (what has not been dropped)
        self.avatar_chunks = 0
        self.late_avatar_samples = 0  # avatar audio timestamped before frames already generated
        self.user_audio_samples = 0
        self.user_audio_end = 0
        self.user_audio_order_errors = 0
        self.user_frame_stamps: list[int] = []
        self.user_frame_shapes: set[tuple[int, ...]] = set()
        self.interrupts = 0
        self.input_ended = False
        self.closed = False
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        self._t0 = 0.0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> FakeStream:
        self._t0 = asyncio.get_running_loop().time()
        self._task = asyncio.create_task(self._generate(), name=f"fake-stream-{self.started.session_id}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- generation -------------------------------------------------------------------------------

    async def _generate(self) -> None:
        loop = asyncio.get_running_loop()
        k = 0
        try:
            while not self._stop.is_set():
                jitter = float(self._rng.uniform(0, self.jitter_s)) if self.jitter_s else 0.0
                due = self._t0 + (k + 1) * self.block / Limit.FPS + self.latency_s + jitter
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), max(0.0, due - loop.time()))
                if self._stop.is_set():
                    break
                for i in range(k * self.block, (k + 1) * self.block):
                    self._queue.put_nowait(self._frame(i))
                self.generated = (k + 1) * self.block
                k += 1
        finally:
            self._queue.put_nowait(None)

    def _frame(self, i: int) -> Frame:
        audio = np.zeros(SAMPLES_PER_FRAME, np.int16)
        piece = self.avatar[i * SAMPLES_PER_FRAME : (i + 1) * SAMPLES_PER_FRAME]
        audio[: piece.shape[0]] = piece
        frame_us = i * FRAME_US
        saw_user = any(abs(s - frame_us) <= 200_000 for s in self.user_frame_stamps[-20:])
        image = np.zeros((self.started.height, self.started.width, 3), np.uint8)
        image[0, 0] = (i & 255, (i >> 8) & 255, int(bool(np.any(audio))) | (2 if saw_user else 0))
        timing = FrameTiming(0.0, int(time.time() * 1000), 1, "DEGRADATION_NONE", time.time() * 1000)
        return Frame(i, frame_us, image, audio, timing)

    # --- the SessionStream interface -------------------------------------------------------------------

    async def frames(self) -> AsyncIterator[Frame]:
        while True:
            frame = await self._queue.get()
            if frame is None:
                self._queue.put_nowait(None)
                if self._failure is not None:
                    raise self._failure
                return
            self.frames_received = frame.index + 1
            yield frame

    async def send_avatar_audio(self, samples: Any, timestamp_us: int | None = None) -> int:
        pcm = np.asarray(samples, np.int16)
        start = round((timestamp_us or 0) * Limit.SAMPLE_RATE / 1_000_000)
        end_us = (start + pcm.shape[0]) * 1_000_000 // Limit.SAMPLE_RATE
        while not self._stop.is_set() and end_us - self.frames_received * FRAME_US > self.max_ahead_ms * 1000:
            await asyncio.sleep(0.02)  # AvatarStream holds media back the same way
        self._check_open()
        late = max(0, min(pcm.shape[0], self.generated * SAMPLES_PER_FRAME - start))
        self.late_avatar_samples += late
        if self.avatar.shape[0] < start + pcm.shape[0]:
            grown = np.zeros(max(start + pcm.shape[0], 2 * self.avatar.shape[0]), np.int16)
            grown[: self.avatar.shape[0]] = self.avatar
            self.avatar = grown
        self.avatar[start + late : start + pcm.shape[0]] = pcm[late:]
        self.avatar_chunks += 1
        return int(timestamp_us or 0)

    async def send_user_audio(self, samples: Any, timestamp_us: int | None = None) -> int:
        self._check_open()
        n = np.asarray(samples).shape[0]
        start = round((timestamp_us or 0) * Limit.SAMPLE_RATE / 1_000_000)
        if start < self.user_audio_end:
            self.user_audio_order_errors += 1
        self.user_audio_end = start + n
        self.user_audio_samples += n
        return int(timestamp_us or 0)

    async def send_user_frame(self, image: Any, timestamp_us: int | None = None) -> int:
        self._check_open()
        stamp = int(timestamp_us or 0)
        if self.user_frame_stamps and stamp <= self.user_frame_stamps[-1]:
            raise ValueError(f"user_frame.timestamp_us: got {stamp}; expected after the previous frame")
        self.user_frame_stamps.append(stamp)
        self.user_frame_shapes.add(tuple(np.asarray(image).shape))
        return stamp

    async def interrupt(self, wait: bool = True, timeout_s: float = 10.0) -> int | None:
        self._check_open()
        self.interrupts += 1
        await asyncio.sleep(0)  # the round trip
        index = self.generated
        self.avatar[index * SAMPLES_PER_FRAME :] = 0
        self.interrupted_frame_index = index
        return index if wait else None

    async def end_input(self) -> None:
        self.input_ended = True
        self._stop.set()

    async def close(self) -> None:
        self.closed = True
        self._stop.set()
        if self._task is not None:
            await self._task

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    # --- test controls ------------------------------------------------------------------------------------

    def stop(self) -> None:
        """The gateway stopped the session: the stream ends with OK after the current block."""
        self._stop.set()

    def fail(self, exc: BaseException) -> None:
        self._failure = exc
        self._stop.set()

    def _check_open(self) -> None:
        if self.closed or self._stop.is_set():
            from services.wire.errors import SessionClosedError

            raise SessionClosedError("the call has ended")


class FakeBackend:
    """Opens `FakeStream`s; keeps them (`streams[session_id]`) for the test to look at."""

    def __init__(self, **stream_kwargs: Any) -> None:
        self.stream_kwargs = stream_kwargs
        self.streams: dict[str, FakeStream] = {}
        self.refuse: BaseException | None = None

    @asynccontextmanager
    async def open(self, order: JoinOrder) -> AsyncIterator[SessionStream]:
        if self.refuse is not None:
            raise self.refuse
        stream = FakeStream(order.session_id, **self.stream_kwargs)
        self.streams[order.session_id] = stream
        async with stream:
            yield stream
