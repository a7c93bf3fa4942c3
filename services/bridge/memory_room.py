"""An in-memory room: participants, byte streams, RPC and media between objects of one process.

Each `MemoryRoom` is one participant's view. It implements the bridge's `room.Room` and also the
part of `livekit.rtc.Room` that livekit-agents' `DataStreamAudioOutput` uses (`on`/`off`,
`isconnected`, `remote_participants` with `track_publications`, `local_participant` with
`stream_bytes`, `register_rpc_method`, `perform_rpc`, `_rpc_handlers`), so the agent side of a
test runs LiveKit's own classes against it.

What is real and what is not:
- Media are the SDK's `rtc.AudioFrame` / `rtc.VideoFrame`, passed as they are.
- RPC: handlers get the SDK's `rtc.RpcInvocationData`; failures are `rtc.RpcError` with the
  SDK's codes (UNSUPPORTED_METHOD for a method not registered, RECIPIENT_DISCONNECTED for a
  participant not in the room, APPLICATION_ERROR for a handler that raised); payloads are the
  strings the caller sent.
- Byte streams carry the bytes the writer wrote, cut into the SDK's `STREAM_CHUNK_SIZE` chunks,
  with the SDK's `rtc.ByteStreamInfo` (topic, name, attributes). The SDK's own
  `ByteStreamWriter`/`ByteStreamReader` cannot be used: in rtc 1.1.x and 1.2.x both are handles
  into the native FFI (the header/chunk/trailer packets are built in Rust), so the writer and
  reader here are small stand-ins with the same methods (`write`, `aclose`; async iteration,
  `info`, `close`).
- Participants and track publications are plain objects with the SDK's attribute names and enum
  values (`rtc.ParticipantKind`, `rtc.ParticipantState`, `rtc.TrackKind`, `rtc.TrackSource`);
  the SDK's are built from FFI-owned handles.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from livekit import rtc

from services.bridge.room import ByteStreamHandler, Participant, RpcHandler

STREAM_CHUNK_SIZE = 15_000  # rtc/data_stream.py: bytes per data-packet chunk
_END = object()
_ids = itertools.count(1)


class MemoryServer:
    """The room all `MemoryRoom`s of one test share (a LiveKit server with one room, in memory)."""

    def __init__(self, name: str = "room") -> None:
        self.name = name
        self.rooms: dict[str, MemoryRoom] = {}
        self.closed = False

    def room(self, identity: str, kind: int = rtc.ParticipantKind.PARTICIPANT_KIND_STANDARD, **attributes: str):
        """A participant's room, not yet connected."""
        return MemoryRoom(self, identity, kind, dict(attributes))

    async def close(self) -> None:
        """The room ends: every participant is disconnected."""
        self.closed = True
        rooms = list(self.rooms.values())
        for room in rooms:  # everyone is disconnected at once: nobody sees the others leave first
            room._notify_others = False
        for room in rooms:
            await room.disconnect(reason="room_deleted")


@dataclass
class MemoryTrackPublication:
    sid: str
    kind: int  # rtc.TrackKind
    source: int  # rtc.TrackSource
    name: str
    subscribed: bool = True
    track: Any = None
    muted: bool = False


@dataclass
class MemoryRemoteParticipant:
    identity: str
    kind: int
    attributes: dict[str, str]
    sid: str = field(default_factory=lambda: f"PA_{next(_ids)}")
    name: str = ""
    state: int = rtc.ParticipantState.PARTICIPANT_STATE_ACTIVE
    track_publications: dict[str, MemoryTrackPublication] = field(default_factory=dict)


class MemoryTrack:
    """A published track: fans frames out to its subscribers' queues."""

    def __init__(self, owner: MemoryRoom, kind: int, source: int, name: str) -> None:
        self.owner = owner
        self.publication = MemoryTrackPublication(f"TR_{next(_ids)}", kind, source, name)
        self.publication.track = self
        self.subscribers: list[asyncio.Queue[Any]] = []
        self.ended = False
        self.frames_captured = 0

    async def capture_frame(self, frame: Any) -> None:
        if self.ended:
            raise RuntimeError(f"track {self.publication.name!r} is unpublished")
        self.frames_captured += 1
        for queue in self.subscribers:
            queue.put_nowait(frame)

    def end(self) -> None:
        self.ended = True
        for queue in self.subscribers:
            queue.put_nowait(_END)

    async def frames(self) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Any] = asyncio.Queue()
        self.subscribers.append(queue)
        try:
            while not self.ended or not queue.empty():
                item = await queue.get()
                if item is _END:
                    return
                yield item
        finally:
            self.subscribers.remove(queue)

    async def unpublish(self) -> None:
        await self.owner.unpublish(self)


class MemoryByteStreamReader:
    """The receiving end of one byte stream: async iteration over its chunks, `info`, `close`."""

    def __init__(self, info: rtc.ByteStreamInfo) -> None:
        self._info = info
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._closed = False
        self.error: str | None = None

    @property
    def info(self) -> rtc.ByteStreamInfo:
        return self._info

    def __aiter__(self) -> MemoryByteStreamReader:
        return self

    async def __anext__(self) -> bytes:
        if self._closed and self._queue.empty():
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self._closed = True
            if self.error is not None:
                raise rtc.StreamError(self.error) if hasattr(rtc, "StreamError") else ConnectionError(self.error)
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        self._closed = True
        self._queue.put_nowait(_END)

    async def aclose(self) -> None:
        self.close()

    def _chunk(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    def _trailer(self, attributes: dict[str, str] | None, error: str | None = None) -> None:
        if attributes:
            self._info.attributes = {**(self._info.attributes or {}), **attributes}
        self.error = error
        self._queue.put_nowait(_END)


class MemoryByteStreamWriter:
    """The sending end: `write` cuts the bytes into chunks and delivers them; `aclose` sends the trailer."""

    def __init__(self, sender: MemoryRoom, info: rtc.ByteStreamInfo, readers: list[MemoryByteStreamReader]) -> None:
        self._sender = sender
        self._info = info
        self._readers = readers
        self._closed = False
        self.bytes_written = 0

    @property
    def info(self) -> rtc.ByteStreamInfo:
        return self._info

    async def write(self, data: bytes) -> None:
        if self._closed:
            raise RuntimeError("Cannot write after stream is closed")
        data = bytes(data)
        for offset in range(0, len(data), STREAM_CHUNK_SIZE):
            chunk = data[offset : offset + STREAM_CHUNK_SIZE]
            for reader in self._readers:
                reader._chunk(chunk)
        self.bytes_written += len(data)
        await asyncio.sleep(0)  # a data packet leaves: let the receiver run

    async def aclose(self, *, reason: str = "", attributes: dict[str, str] | None = None) -> None:
        if self._closed:
            raise RuntimeError("Stream already closed")
        self._closed = True
        self._sender._open_writers.discard(self)
        for reader in self._readers:
            reader._trailer(attributes, error=reason or None)
        await asyncio.sleep(0)

    def _abort(self, error: str) -> None:
        if not self._closed:
            self._closed = True
            for reader in self._readers:
                reader._trailer(None, error=error)


class MemoryLocalParticipant:
    """`room.local_participant`: the rtc.LocalParticipant methods the avatar protocol uses."""

    def __init__(self, room: MemoryRoom) -> None:
        self._room = room
        self._rpc_handlers: dict[str, RpcHandler] = {}
        self.track_publications: dict[str, MemoryTrackPublication] = {}

    @property
    def identity(self) -> str:
        return self._room._identity

    @property
    def kind(self) -> int:
        return self._room._kind

    @property
    def attributes(self) -> dict[str, str]:
        return self._room._attributes

    def register_rpc_method(self, method_name: str, handler: RpcHandler | None = None) -> Any:
        if handler is None:

            def decorator(fn: RpcHandler) -> RpcHandler:
                self._rpc_handlers[method_name] = fn
                return fn

            return decorator
        self._rpc_handlers[method_name] = handler
        return None

    def unregister_rpc_method(self, method: str) -> None:
        self._rpc_handlers.pop(method, None)

    async def perform_rpc(
        self, *, destination_identity: str, method: str, payload: str, response_timeout: float | None = None
    ) -> str:
        timeout = 15.0 if response_timeout is None else float(response_timeout)
        return await self._room._server_rpc(destination_identity, method, payload, timeout)

    async def stream_bytes(
        self,
        name: str,
        *,
        total_size: int | None = None,
        mime_type: str = "application/octet-stream",
        attributes: dict[str, str] | None = None,
        stream_id: str | None = None,
        destination_identities: list[str] | None = None,
        topic: str = "",
        **_: Any,
    ) -> MemoryByteStreamWriter:
        return self._room._open_stream(name, topic, attributes or {}, destination_identities, stream_id, mime_type)

    async def publish_track(self, track: MemoryTrack, options: Any = None) -> MemoryTrackPublication:
        return track.publication


class MemoryRoom(rtc.EventEmitter):
    """One participant's view of a `MemoryServer` (see the module docstring)."""

    def __init__(self, server: MemoryServer, identity: str, kind: int, attributes: dict[str, str]) -> None:
        super().__init__()
        self._server = server
        self._identity = identity
        self._kind = kind
        self._attributes = attributes
        self._connected = False
        self.local_participant = MemoryLocalParticipant(self)
        self.remote_participants: dict[str, MemoryRemoteParticipant] = {}
        self._byte_handlers: dict[str, ByteStreamHandler] = {}
        self._tracks: list[MemoryTrack] = []
        self._open_writers: set[MemoryByteStreamWriter] = set()
        self._open_readers: list[MemoryByteStreamReader] = []
        # what this participant published as the avatar: (loop time, timestamp_us, video, audio)
        self.published: list[tuple[float, int, rtc.VideoFrame, rtc.AudioFrame]] = []

    # --- rtc.Room surface ---------------------------------------------------------------------------

    @property
    def name(self) -> str:
        return self._server.name

    def isconnected(self) -> bool:
        return self._connected

    @property
    def connection_state(self) -> int:
        return rtc.ConnectionState.CONN_CONNECTED if self._connected else rtc.ConnectionState.CONN_DISCONNECTED

    # --- the bridge's Room interface ----------------------------------------------------------------

    @property
    def identity(self) -> str:
        return self._identity

    async def connect(self) -> None:
        if self._connected:
            return
        if self._server.closed:
            raise ConnectionError(f"room {self._server.name!r} is closed")
        if self._identity in self._server.rooms:  # LiveKit replaces a participant joining twice
            await self._server.rooms[self._identity].disconnect(reason="duplicate_identity")
        for other in self._server.rooms.values():
            self.remote_participants[other._identity] = other._as_remote()
            for track in other._tracks:
                self.remote_participants[other._identity].track_publications[track.publication.sid] = track.publication
        self._server.rooms[self._identity] = self
        self._connected = True
        self.emit("connection_state_changed", rtc.ConnectionState.CONN_CONNECTED)
        self.emit("connected")
        for other in list(self._server.rooms.values()):
            if other is not self:
                other._participant_joined(self)

    async def disconnect(self, reason: str = "client_initiated") -> None:
        if not self._connected:
            return
        self._connected = False
        self._server.rooms.pop(self._identity, None)
        notify = getattr(self, "_notify_others", True)
        for track in self._tracks:
            track.end()
        for writer in list(self._open_writers):
            writer._abort("participant disconnected")
        for reader in self._open_readers:
            reader._trailer(None, error="room disconnected")
        self._open_readers.clear()
        if notify:
            for other in list(self._server.rooms.values()):
                other._participant_left(self._identity)
        self.remote_participants.clear()
        self.emit("connection_state_changed", rtc.ConnectionState.CONN_DISCONNECTED)
        self.emit("disconnected", reason)

    def participants(self) -> list[Participant]:
        return [Participant(p.identity, p.kind, dict(p.attributes)) for p in self.remote_participants.values()]

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        if topic in self._byte_handlers:  # as rtc.Room does
            raise ValueError(f"byte stream handler for topic '{topic}' already set")
        self._byte_handlers[topic] = handler

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._byte_handlers.pop(topic, None)

    def register_rpc_method(self, method: str, handler: RpcHandler) -> None:
        self.local_participant.register_rpc_method(method, handler)

    def unregister_rpc_method(self, method: str) -> None:
        self.local_participant.unregister_rpc_method(method)

    async def perform_rpc(
        self, destination_identity: str, method: str, payload: str, response_timeout: float = 5.0
    ) -> str:
        return await self.local_participant.perform_rpc(
            destination_identity=destination_identity, method=method, payload=payload, response_timeout=response_timeout
        )

    async def audio_frames(self, identity: str) -> AsyncIterator[rtc.AudioFrame]:
        async for frame in self._media(identity, rtc.TrackSource.SOURCE_MICROPHONE):
            yield frame

    async def video_frames(self, identity: str) -> AsyncIterator[rtc.VideoFrame]:
        async for frame in self._media(identity, rtc.TrackSource.SOURCE_CAMERA):
            yield frame

    async def publish_avatar(self, width: int, height: int, sample_rate: int) -> MemoryAvatarTracks:
        video = await self.publish(rtc.TrackKind.KIND_VIDEO, rtc.TrackSource.SOURCE_CAMERA, "avatar_video")
        audio = await self.publish(rtc.TrackKind.KIND_AUDIO, rtc.TrackSource.SOURCE_MICROPHONE, "avatar_audio")
        return MemoryAvatarTracks(self, video, audio)

    # --- publishing (the human's side in tests) -------------------------------------------------------

    async def publish(self, kind: int, source: int, name: str) -> MemoryTrack:
        """A new track of this participant; others see `track_published` then `track_subscribed`."""
        track = MemoryTrack(self, kind, source, name)
        self._tracks.append(track)
        self.local_participant.track_publications[track.publication.sid] = track.publication
        self.emit("local_track_published", track.publication, track)
        for other in list(self._server.rooms.values()):
            if other is not self:
                other._track_published(self._identity, track)
        return track

    async def publish_microphone(self) -> MemoryTrack:
        return await self.publish(rtc.TrackKind.KIND_AUDIO, rtc.TrackSource.SOURCE_MICROPHONE, "microphone")

    async def publish_camera(self) -> MemoryTrack:
        return await self.publish(rtc.TrackKind.KIND_VIDEO, rtc.TrackSource.SOURCE_CAMERA, "camera")

    async def unpublish(self, track: MemoryTrack) -> None:
        if track in self._tracks:
            self._tracks.remove(track)
            self.local_participant.track_publications.pop(track.publication.sid, None)
            track.end()
            for other in list(self._server.rooms.values()):
                if other is not self:
                    publication = other.remote_participants.get(self._identity)
                    if publication is not None:
                        publication.track_publications.pop(track.publication.sid, None)
                    other.emit("track_unpublished", track.publication, publication)

    # --- the server's side ----------------------------------------------------------------------------

    def _as_remote(self) -> MemoryRemoteParticipant:
        return MemoryRemoteParticipant(self._identity, self._kind, dict(self._attributes), name=self._identity)

    def _participant_joined(self, room: MemoryRoom) -> None:
        remote = room._as_remote()
        self.remote_participants[room._identity] = remote
        self.emit("participant_connected", remote)
        self.emit("participant_active", remote)
        self.emit("participant_joined", Participant(remote.identity, remote.kind, dict(remote.attributes)))

    def _participant_left(self, identity: str) -> None:
        remote = self.remote_participants.pop(identity, None)
        if remote is None:
            return
        for reader in list(self._open_readers):
            if getattr(reader, "_sender", None) == identity:
                reader._trailer(None, error="sender disconnected")
                self._open_readers.remove(reader)
        self.emit("participant_disconnected", remote)
        self.emit("participant_left", identity)

    def _track_published(self, identity: str, track: MemoryTrack) -> None:
        remote = self.remote_participants.get(identity)
        if remote is None:
            return
        remote.track_publications[track.publication.sid] = track.publication
        self.emit("track_published", track.publication, remote)
        self.emit("track_subscribed", track, track.publication, remote)

    async def _media(self, identity: str, source: int) -> AsyncIterator[Any]:
        """Frames of the participant's track of `source`: waits for it to be published; ends when
        it is unpublished or the participant leaves."""
        while self._connected:
            other = self._server.rooms.get(identity)
            if other is None:
                return
            track = next((t for t in other._tracks if t.publication.source == source), None)
            if track is not None:
                async for frame in track.frames():
                    yield frame
                return
            await asyncio.sleep(0.02)

    def _open_stream(
        self,
        name: str,
        topic: str,
        attributes: dict[str, str],
        destinations: list[str] | None,
        stream_id: str | None,
        mime_type: str,
    ) -> MemoryByteStreamWriter:
        info_kwargs = {
            "stream_id": stream_id or str(uuid.uuid4()),
            "mime_type": mime_type,
            "topic": topic,
            "timestamp": int(time.time() * 1000),
            "size": None,
            "attributes": dict(attributes),
            "name": name,
        }
        readers = []
        for identity, room in list(self._server.rooms.items()):
            if room is self or (destinations and identity not in destinations):
                continue
            handler = room._byte_handlers.get(topic)
            if handler is None:  # the SDK drops streams of topics nobody handles
                continue
            reader = MemoryByteStreamReader(rtc.ByteStreamInfo(**info_kwargs))
            reader._sender = self._identity  # type: ignore[attr-defined]
            room._open_readers.append(reader)
            readers.append(reader)
            handler(reader, self._identity)
        writer = MemoryByteStreamWriter(self, rtc.ByteStreamInfo(**info_kwargs), readers)
        self._open_writers.add(writer)
        return writer

    async def _server_rpc(self, destination: str, method: str, payload: str, timeout: float) -> str:
        if not self._connected:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RECIPIENT_DISCONNECTED, "not connected")
        room = self._server.rooms.get(destination)
        if room is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RECIPIENT_DISCONNECTED, "Recipient disconnected")
        handler = room.local_participant._rpc_handlers.get(method)
        await asyncio.sleep(0)  # the request's data packet
        if handler is None:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.UNSUPPORTED_METHOD, "Method not supported at destination")
        data = rtc.RpcInvocationData(str(uuid.uuid4()), self._identity, payload, timeout)
        with contextlib.suppress(AttributeError, TypeError):
            data.method = method
        try:
            result = handler(data)
            if inspect.isawaitable(result):
                result = await asyncio.wait_for(result, timeout)
        except rtc.RpcError:
            raise
        except TimeoutError:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.RESPONSE_TIMEOUT, "Response timeout") from None
        except Exception as exc:
            raise rtc.RpcError(rtc.RpcError.ErrorCode.APPLICATION_ERROR, f"Application error: {exc}") from None
        await asyncio.sleep(0)  # the response's data packet
        return "" if result is None else str(result)


class MemoryAvatarTracks:
    """The avatar's tracks in the in-memory room: every frame and its audio is recorded with the
    loop time it was captured at (`room.published`), and fanned out to subscribers."""

    def __init__(self, room: MemoryRoom, video: MemoryTrack, audio: MemoryTrack) -> None:
        self._room = room
        self.video = video
        self.audio = audio
        self.cleared = 0

    async def capture(self, video: rtc.VideoFrame, audio: rtc.AudioFrame, timestamp_us: int) -> None:
        now = asyncio.get_running_loop().time()
        self._room.published.append((now, timestamp_us, video, audio))
        await self.video.capture_frame(video)
        await self.audio.capture_frame(audio)

    def queued_audio_s(self) -> float:
        return 0.0  # played the moment it is captured

    def clear_audio(self) -> None:
        self.cleared += 1

    async def wait_for_playout(self) -> None:
        return None

    async def aclose(self) -> None:
        for track in (self.video, self.audio):
            await self._room.unpublish(track)


def wait_until(predicate: Callable[[], bool], timeout_s: float = 10.0, step_s: float = 0.01) -> Any:
    """A coroutine that returns once `predicate()` holds (raises TimeoutError after `timeout_s`)."""

    async def wait() -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate():
                await asyncio.sleep(step_s)

    return wait()
