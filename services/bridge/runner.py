"""`BridgeSession`: one room <-> one session stream.

Into the session: the agent's speech (one `lk.audio_stream` byte stream per segment, decoded to
16 kHz mono and placed on the avatar timeline), the human's microphone (16 kHz, on the session
clock) and camera (its latest frame sampled on a 25 fps grid; nothing while the camera is off
or stale, so the session listens to audio alone). Out of it: the avatar's frames, published by
`video_out.AvatarPublisher` at 25 fps with their audio.

Playback events, per segment and in segment order, each exactly once:
- `lk.playback_started` when the segment's first frame is published (skipped for good once the
  agent answers UNSUPPORTED_METHOD: it did not ask for them);
- `lk.playback_finished` {position = seconds of the segment actually published, interrupted}
  when the segment's stream has closed and its last sample has been published (plus the
  room's audio queue), or at once, `interrupted=true`, when `lk.clear_buffer` arrives, or when
  the session ends with the segment unfinished. An empty segment finishes with position 0.
Interruption: `lk.clear_buffer` from the agent drops the speech not yet sent, silences the
speech already buffered (the room's audio queue), drops the talking frames (in the jitter
buffer and in flight from the session, holding the last published image) until the first
frame generated without the speech (Interrupted.frame_index), tells the session (Interrupt)
and places the next segment after the Interrupted frame.
A stream whose trailer never comes ends when a newer stream starts, or after 10 s idle.

The session ends (and `run` returns why) when the room closes, the agent leaves, the human
leaves and does not come back within `human_grace_s`, the session's stream ends (the gateway
stopped it) or fails, or `stop()` is called (a leave order). Every task is cancelled and
awaited, handlers are unregistered and unfinished segments are reported before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from livekit import rtc

from services.bridge import protocol
from services.bridge.audio_in import SAMPLE_RATE, MicTimeline, PcmDecoder
from services.bridge.backend import JoinOrder, SessionBackend, SessionStream
from services.bridge.room import AvatarTracks, ByteStreamReader, Participant, Room
from services.bridge.video_out import SAMPLES_PER_FRAME, AvatarPublisher
from services.client.audio import samples_to_us
from services.wire.errors import ServiceError

log = logging.getLogger("services.bridge")
FRAME_US = 1_000_000 // 25
SPEECH_PIECE = 3200  # samples sent per message of speech (0.2 s): how soon a clear stops the sending


@dataclass
class BridgeSettings:
    prebuffer_frames: int = 2  # jitter buffer before publishing starts (80 ms)
    max_buffer_frames: int = 0  # 0: three blocks
    speech_lead_frames: int = 0  # a new segment starts this far past the frames received; 0: one block
    human_grace_s: float = 30.0  # the human left: wait this long for them (or another) to come back
    agent_join_timeout_s: float = 60.0
    video_stale_s: float = 0.5  # no camera frame for this long: send none (the session listens to audio)
    user_max_side: int = 512  # camera frames are scaled down to this before encoding
    mic_chunk_samples: int = 640  # microphone audio is sent in 40 ms messages
    drain_s: float = 1.0  # at the end: how long the last playback events may take to leave


@dataclass
class Segment:
    index: int
    reader: ByteStreamReader
    start: int | None = None  # its first sample on the avatar timeline
    sent: int = 0
    closed: bool = False
    cleared: bool = False
    started_sent: bool = False
    finished: bool = False
    superseded: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def end(self) -> int:
        return (self.start or 0) + self.sent


@dataclass
class SessionStats:
    segments: int = 0
    clears: int = 0
    started_sent: int = 0
    finished_sent: int = 0
    rpc_failures: int = 0
    user_frames_sent: int = 0
    user_audio_sent: int = 0  # samples
    rejected_streams: int = 0
    human_joins: int = 0
    finished: list[tuple[int, float, bool]] = field(default_factory=list)  # (segment, position, interrupted)
    clear_at: list[float] = field(default_factory=list)  # loop time of each lk.clear_buffer
    # recent (frame index, loop time) of camera frames sent and avatar frames published (bench.bridge)
    user_frames_at: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=3000))
    published_at: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=3000))


class BridgeSession:
    def __init__(
        self, room: Room, backend: SessionBackend, order: JoinOrder, settings: BridgeSettings | None = None
    ) -> None:
        self.room = room
        self.backend = backend
        self.order = order
        self.settings = settings or BridgeSettings()
        self.stats = SessionStats()
        self.reason = ""
        self.stream: SessionStream | None = None
        self.publisher: AvatarPublisher | None = None
        self.tracks: AvatarTracks | None = None
        self.agent = order.agent_identity or ""
        self.human = ""
        self.segments: list[Segment] = []
        self._new_segment = asyncio.Event()
        self._next_segment = 0
        self._avatar_floor = 0  # no speech before this sample (after an Interrupted)
        self._avatar_cursor = 0  # one past the last speech sample placed
        self._clear_done = asyncio.Event()
        self._clear_done.set()
        self._mute: list[float] | None = None
        self._started_supported = True
        self._notify: asyncio.Queue[tuple[str, str, Segment | None]] = asyncio.Queue()
        self._human_here = asyncio.Event()
        self._agent_here = asyncio.Event()
        self._ended = asyncio.Event()
        self.joined = asyncio.Event()  # the room was joined (the worker acks the order then)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._grace: asyncio.TimerHandle | None = None
        self._t0 = 0.0
        self._camera: tuple[rtc.VideoFrame, float] | None = None
        self._camera_rgb: tuple[rtc.VideoFrame, np.ndarray] | None = None
        self.mic = MicTimeline()

    # --- lifecycle ------------------------------------------------------------------------------------

    @property
    def session_id(self) -> str:
        return self.order.session_id

    def stop(self, reason: str = "stopped") -> None:
        """End the session (a leave order); `run` returns soon after."""
        self._end(reason)

    def _end(self, reason: str) -> None:
        if not self._ended.is_set():
            self.reason = reason
            self._ended.set()

    def _spawn(self, coro: Awaitable[Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.set_name(f"bridge-{self.session_id}-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if self._ended.is_set():  # e.g. a send racing the session's end
                return
            if isinstance(exc, ServiceError):  # a send found the call over: the frames task says how it ended
                log.debug("session %s: %s stopped: %r", self.session_id, task.get_name(), exc)
                return
            log.warning("session %s: %s failed: %r", self.session_id, task.get_name(), exc)
            self._end(f"error: {type(exc).__name__}")

    async def run(self) -> str:
        """Join, stream, publish until the session ends; returns why it ended."""
        loop = asyncio.get_running_loop()
        room = self.room
        room.on("participant_joined", self._on_joined)
        room.on("participant_left", self._on_left)
        room.on("disconnected", self._on_disconnected)
        registered = False
        try:
            await room.connect()
            self.joined.set()
            room.register_byte_stream_handler(protocol.AUDIO_STREAM_TOPIC, self._on_stream)
            room.register_rpc_method(protocol.RPC_CLEAR_BUFFER, self._on_clear_buffer)
            registered = True
            for participant in room.participants():
                self._on_joined(participant)
            async with self.backend.open(self.order) as stream:
                self.stream = stream
                self._t0 = loop.time()
                started = stream.started
                block = started.block if started is not None and started.block else 10
                self.tracks = await room.publish_avatar(started.width, started.height, SAMPLE_RATE)
                self.publisher = AvatarPublisher(
                    self.tracks,
                    started.width,
                    started.height,
                    prebuffer_frames=self.settings.prebuffer_frames,
                    max_buffer_frames=self.settings.max_buffer_frames or 3 * block,
                    on_published=self._on_published,
                )
                self._lead_frames = self.settings.speech_lead_frames or block
                self._spawn(self._receive_frames(stream), "frames")
                self._spawn(self.publisher.run(), "publish")
                self._spawn(self._speech(), "speech")
                self._spawn(self._microphone(), "microphone")
                self._spawn(self._camera_in(), "camera")
                self._spawn(self._camera_out(), "camera-out")
                self._spawn(self._notifier(), "notify")
                self._spawn(self._watch_agent(), "agent-watch")
                await self._ended.wait()
                await self._shutdown(stream)
        except ServiceError as exc:
            self._end(f"session_failed: {exc}")
        finally:
            await self._cancel_all()
            if self._grace is not None:
                self._grace.cancel()
            room.off("participant_joined", self._on_joined)
            room.off("participant_left", self._on_left)
            room.off("disconnected", self._on_disconnected)
            if registered:
                room.unregister_byte_stream_handler(protocol.AUDIO_STREAM_TOPIC)
                room.unregister_rpc_method(protocol.RPC_CLEAR_BUFFER)
            if self.tracks is not None:
                with contextlib.suppress(Exception):
                    await self.tracks.aclose()
            with contextlib.suppress(Exception):
                await room.disconnect()
        self._end("ended")
        log.info("session %s ended: %s", self.session_id, self.reason)
        return self.reason

    async def _shutdown(self, stream: SessionStream) -> None:
        """Report unfinished segments, let the reports leave, end the session's input."""
        for segment in self.segments:
            if not segment.finished:
                self._finish(segment, interrupted=True)
        if self.agent and self.agent in {p.identity for p in self.room.participants()}:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.drain_s):
                    await self._notify.join()
        if not self.reason.startswith(("session_", "error")):
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await stream.end_input()

    async def _cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for segment in self.segments:
            with contextlib.suppress(Exception):
                close = getattr(segment.reader, "close", None)
                if close is not None:
                    close()
        self.segments.clear()

    # --- participants -----------------------------------------------------------------------------------

    def _on_joined(self, participant: Participant) -> None:
        if participant.identity == self.room.identity:
            return
        if self.agent and participant.identity == self.agent:
            self._agent_here.set()
        elif not self.agent and participant.is_agent and not participant.publishes_on_behalf:
            self.agent = participant.identity
            self._agent_here.set()
        elif not participant.is_agent and not participant.publishes_on_behalf and not self.human:
            self.human = participant.identity
            self.stats.human_joins += 1
            if self._grace is not None:
                self._grace.cancel()
                self._grace = None
            self._human_here.set()

    def _on_left(self, identity: str) -> None:
        if identity == self.agent:
            self._end("agent_left")
        elif identity == self.human:
            self.human = ""
            self._human_here.clear()
            self._camera = None
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(self.settings.human_grace_s, self._end, "human_left")
            for participant in self.room.participants():  # someone else may take their place
                if participant.identity != identity:
                    self._on_joined(participant)

    def _on_disconnected(self, reason: Any = "") -> None:
        self._end("room_closed")

    async def _watch_agent(self) -> None:
        try:
            async with asyncio.timeout(self.settings.agent_join_timeout_s):
                await self._agent_here.wait()
        except TimeoutError:
            self._end("agent_never_joined")

    # --- the session's frames out -----------------------------------------------------------------------------

    async def _receive_frames(self, stream: SessionStream) -> None:
        assert self.publisher is not None
        reason = "session_ended"
        try:
            async for frame in stream.frames():
                self.publisher.push(frame)
        except ServiceError as exc:
            reason = f"session_failed: {type(exc).__name__}"
        self.publisher.end_input()
        if reason == "session_ended":  # the gateway's stop: publish what is buffered first
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    while self.publisher.buffered:
                        await asyncio.sleep(0.04)
        self._end(reason)

    def _on_published(self, index: int | None) -> None:
        """After each published frame (or a segment's end): playback events of the segments reached."""
        played = self.publisher.played_until if self.publisher is not None else 0
        if index is not None:
            self.stats.published_at.append((index, asyncio.get_running_loop().time()))
        for segment in self.segments:
            if segment.finished:
                continue
            if segment.start is None:  # nothing placed yet: only an empty closed segment can finish
                if segment.closed and segment.sent == 0:
                    self._finish(segment, interrupted=False)
                    continue
                break
            if not segment.started_sent and segment.sent and played > segment.start:
                segment.started_sent = True
                if self._started_supported:
                    self._notify.put_nowait((protocol.RPC_PLAYBACK_STARTED, "", segment))
            if segment.closed and played >= segment.end:
                self._finish(segment, interrupted=False)
                continue
            break
        self.segments = [s for s in self.segments if not s.finished]

    def _position(self, segment: Segment) -> float:
        """Seconds of the segment actually played: published minus what the room still queues."""
        if segment.start is None or self.publisher is None:
            return 0.0
        played = min(segment.sent, max(0, self.publisher.played_until - segment.start))
        return played / SAMPLE_RATE

    def _finish(self, segment: Segment, interrupted: bool) -> None:
        if segment.finished:
            return
        segment.finished = True
        position = self._position(segment)
        if interrupted and self.tracks is not None:
            position = max(0.0, position - self.tracks.queued_audio_s())
        self.stats.finished.append((segment.index, round(position, 6), interrupted))
        self._notify.put_nowait(
            (protocol.RPC_PLAYBACK_FINISHED, protocol.playback_finished_payload(position, interrupted), segment)
        )

    async def _notifier(self) -> None:
        """Playback events to the agent, in order, with retries."""
        while True:
            method, payload, _segment = await self._notify.get()
            try:
                normal_end = method == protocol.RPC_PLAYBACK_FINISHED and '"interrupted": false' in payload
                if normal_end and self.tracks is not None and (queued := self.tracks.queued_audio_s()) > 0:
                    await asyncio.sleep(queued)  # finished only once the last sample has played out
                await self._rpc(method, payload)
            finally:
                self._notify.task_done()

    async def _rpc(self, method: str, payload: str) -> None:
        if not self.agent or (method == protocol.RPC_PLAYBACK_STARTED and not self._started_supported):
            return
        for attempt in range(protocol.RPC_RETRIES):
            try:
                await self.room.perform_rpc(self.agent, method, payload)
                if method == protocol.RPC_PLAYBACK_STARTED:
                    self.stats.started_sent += 1
                else:
                    self.stats.finished_sent += 1
                return
            except rtc.RpcError as exc:
                if exc.code == rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD and method == protocol.RPC_PLAYBACK_STARTED:
                    self._started_supported = False  # the agent did not ask for playback_started
                    return
                if attempt == protocol.RPC_RETRIES - 1:
                    self.stats.rpc_failures += 1
                    log.warning("session %s: %s failed: %s", self.session_id, method, exc)
                    return
                await asyncio.sleep(protocol.RPC_RETRY_DELAY_S)

    # --- the agent's speech in ----------------------------------------------------------------------------

    def _on_stream(self, reader: ByteStreamReader, sender: str) -> None:
        if not self.agent or sender != self.agent:
            self.stats.rejected_streams += 1
            with contextlib.suppress(Exception):
                reader.close()  # type: ignore[attr-defined]
            return
        for segment in self.segments:  # the sender never overlaps streams: an open one lost its trailer
            if not segment.closed:
                segment.superseded.set()
        segment = Segment(self._next_segment, reader)
        self._next_segment += 1
        self.stats.segments += 1
        self.segments.append(segment)
        self._new_segment.set()

    async def _speech(self) -> None:
        done = 0
        while True:
            pending = [s for s in self.segments if s.index >= done and not s.closed]
            if not pending:
                self._new_segment.clear()
                await self._new_segment.wait()
                continue
            segment = pending[0]
            await self._play_segment(segment)
            done = segment.index + 1

    async def _play_segment(self, segment: Segment) -> None:
        try:
            rate, channels = protocol.stream_format(segment.reader.info.attributes)
        except ValueError as exc:
            log.warning("session %s: segment %d refused: %s", self.session_id, segment.index, exc)
            segment.closed = True
            self._on_published(None)
            return
        decoder = PcmDecoder(rate, channels)
        async for data in self._chunks(segment):
            if segment.cleared:
                break
            await self._send_speech(segment, decoder.push(data))
        if not segment.cleared:
            await self._send_speech(segment, decoder.flush())
        segment.closed = True
        self._on_published(None)  # a segment already played out (or empty) finishes now

    async def _chunks(self, segment: Segment):
        """The segment's chunks, ending early when it is superseded, cleared, or idle too long."""
        iterator = segment.reader.__aiter__()
        superseded = asyncio.ensure_future(segment.superseded.wait())
        try:
            while not segment.cleared:
                chunk = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait(
                    {chunk, superseded}, timeout=protocol.STREAM_IDLE_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
                )
                if chunk not in done and superseded in done:  # queued data and a trailer in flight win
                    done, _ = await asyncio.wait({chunk}, timeout=0.5)
                if chunk in done:
                    try:
                        yield chunk.result()
                    except (StopAsyncIteration, ConnectionError):  # the trailer, or an aborted stream
                        return
                    continue
                chunk.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration, Exception):
                    await chunk
                return
        finally:
            superseded.cancel()

    async def _send_speech(self, segment: Segment, pcm: np.ndarray) -> None:
        if pcm.shape[0] == 0 or self.stream is None:
            return
        if segment.start is None:
            await self._clear_done.wait()
            if segment.cleared:
                return
            horizon = (self.stream.frames_received + self._lead_frames) * SAMPLES_PER_FRAME
            segment.start = max(self._avatar_cursor, self._avatar_floor, horizon)
            if self._mute is not None:  # the silence after a clear ends where the new speech begins
                self._mute[1] = float(segment.start)
                self._mute = None
        for offset in range(0, pcm.shape[0], SPEECH_PIECE):
            if segment.cleared:
                return
            piece = pcm[offset : offset + SPEECH_PIECE]
            position = segment.start + segment.sent
            segment.sent += piece.shape[0]  # counted before the await: a clear meanwhile sees it
            self._avatar_cursor = segment.start + segment.sent
            await self.stream.send_avatar_audio(piece, timestamp_us=samples_to_us(position))

    def _on_clear_buffer(self, data: rtc.RpcInvocationData) -> str:
        if not self.agent or data.caller_identity != self.agent:
            return "reject"
        loop = asyncio.get_running_loop()
        self.stats.clears += 1
        self.stats.clear_at.append(loop.time())
        pending = [s for s in self.segments if not s.finished]
        if not pending or self.stream is None or self.publisher is None:
            return "ok"
        played_until = self.publisher.played_until
        for segment in pending:
            segment.cleared = True
            segment.superseded.set()
            self._finish(segment, interrupted=True)
        self.segments = [s for s in self.segments if not s.finished]
        if self.tracks is not None:
            self.tracks.clear_audio()
        if self._mute is None:
            self._mute = self.publisher.mute_from(played_until)
        # The buffered frames and those still coming until Interrupted are the cleared speech's
        # face: dropped, the last published image held, until the first listening frame arrives.
        self.publisher.interrupt()
        self._avatar_cursor = max(self._avatar_cursor, played_until)
        self._clear_done.clear()
        self._spawn(self._interrupt(self.stream), "interrupt")
        return "ok"

    async def _interrupt(self, stream: SessionStream) -> None:
        index = None
        try:
            index = await stream.interrupt(wait=True)
            if index is not None:
                self._avatar_floor = max(self._avatar_floor, index * SAMPLES_PER_FRAME)
        finally:
            if self.publisher is not None:  # no answer: publish what comes rather than freeze
                self.publisher.resume_at(index or 0)
            self._clear_done.set()

    # --- the human in --------------------------------------------------------------------------------------

    def _session_now(self) -> float:
        return asyncio.get_running_loop().time() - self._t0

    async def _microphone(self) -> None:
        assert self.stream is not None
        chunk = self.settings.mic_chunk_samples
        while True:
            await self._human_here.wait()
            identity = self.human
            pending: list[np.ndarray] = []
            pending_start = 0
            pending_len = 0
            async for frame in self.room.audio_frames(identity):
                samples, start = self.mic.place(frame, self._session_now())
                if pending and start != pending_start + pending_len:  # a gap: send what is held first
                    await self._send_mic(np.concatenate(pending), pending_start)
                    pending, pending_len = [], 0
                if not pending:
                    pending_start = start
                pending.append(samples)
                pending_len += samples.shape[0]
                if pending_len >= chunk:
                    await self._send_mic(np.concatenate(pending), pending_start)
                    pending, pending_len = [], 0
            if pending:
                await self._send_mic(np.concatenate(pending), pending_start)
            if self.human == identity:  # the track ended but they are still here: wait for a new one
                await asyncio.sleep(0.1)

    async def _send_mic(self, samples: np.ndarray, start: int) -> None:
        assert self.stream is not None
        if samples.shape[0]:
            await self.stream.send_user_audio(samples, timestamp_us=samples_to_us(start))
            self.stats.user_audio_sent += samples.shape[0]

    async def _camera_in(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._human_here.wait()
            identity = self.human
            async for frame in self.room.video_frames(identity):
                self._camera = (frame, loop.time())
            if self.human == identity:
                await asyncio.sleep(0.1)

    async def _camera_out(self) -> None:
        """The latest camera frame on the session's 25 fps grid (frames k * 40 ms)."""
        assert self.stream is not None
        loop = asyncio.get_running_loop()
        k = math.ceil(self._session_now() * 25)
        while True:
            delay = self._t0 + k / 25 - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            now_k = math.floor(self._session_now() * 25)
            k = max(k, now_k)  # late ticks are skipped, never sent in a burst
            latest = self._camera
            if latest is not None and loop.time() - latest[1] <= self.settings.video_stale_s:
                image = self._rgb(latest[0])
                self.stats.user_frames_at.append((k, latest[1]))  # when the frame reached the bridge
                await self.stream.send_user_frame(image, timestamp_us=k * FRAME_US)
                self.stats.user_frames_sent += 1
            k += 1

    def _rgb(self, frame: rtc.VideoFrame) -> np.ndarray:
        if self._camera_rgb is not None and self._camera_rgb[0] is frame:
            return self._camera_rgb[1]
        if frame.type == rtc.VideoBufferType.RGB24:
            image = np.frombuffer(bytes(frame.data), np.uint8).reshape(frame.height, frame.width, 3)
        else:  # the SDK converts anything to RGBA (not to RGB24)
            rgba = frame if frame.type == rtc.VideoBufferType.RGBA else frame.convert(rtc.VideoBufferType.RGBA)
            image = np.frombuffer(bytes(rgba.data), np.uint8).reshape(rgba.height, rgba.width, 4)[:, :, :3]
        side = max(image.shape[:2])
        if side > self.settings.user_max_side:
            import cv2

            scale = self.settings.user_max_side / side
            size = (max(16, round(image.shape[1] * scale)), max(16, round(image.shape[0] * scale)))
            image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
        self._camera_rgb = (frame, image)
        return image
