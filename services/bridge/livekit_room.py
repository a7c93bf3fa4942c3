"""The bridge's `Room` over a real `livekit.rtc.Room` (rtc 1.1.21, which livekit-agents 1.8.9
pins, and 1.2.x: only APIs present in both are used).

The avatar's tracks are published as soon as the session starts, video first and without
waiting for anyone to subscribe to the audio (the stock AvatarRunner waits, which holds the
agent's `wait_remote_track=KIND_VIDEO` until a human subscribes). The human's microphone is
subscribed at 16 kHz mono (the SDK resamples), the camera at its native rate.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from livekit import rtc

from services.bridge.room import ByteStreamHandler, Participant, RpcHandler

AUDIO_QUEUE_MS = 100  # the AudioSource's queue: what a clear drops, and the audio's lead over video


def _participant(p: Any) -> Participant:
    return Participant(p.identity, int(p.kind), dict(p.attributes or {}))


class LiveKitRoom(rtc.EventEmitter):
    def __init__(self, url: str, token: str, *, connect_timeout_s: float = 20.0) -> None:
        super().__init__()
        self.url = url
        self._token = token
        self.connect_timeout_s = connect_timeout_s
        self._room = rtc.Room()
        self._left: dict[str, asyncio.Event] = {}
        self._room.on("participant_connected", self._on_connected)
        self._room.on("participant_disconnected", self._on_disconnected)
        self._room.on("disconnected", lambda reason=None: self.emit("disconnected", str(reason)))

    def _on_connected(self, p: rtc.RemoteParticipant) -> None:
        self._left.pop(p.identity, None)
        self.emit("participant_joined", _participant(p))

    def _on_disconnected(self, p: rtc.RemoteParticipant) -> None:
        self._left.setdefault(p.identity, asyncio.Event()).set()
        self.emit("participant_left", p.identity)

    @property
    def identity(self) -> str:
        return self._room.local_participant.identity if self._room.isconnected() else ""

    @property
    def rtc_room(self) -> rtc.Room:
        return self._room

    async def connect(self) -> None:
        options = rtc.RoomOptions(auto_subscribe=True)
        await asyncio.wait_for(self._room.connect(self.url, self._token, options), self.connect_timeout_s)

    async def disconnect(self) -> None:
        if self._room.isconnected():
            await self._room.disconnect()

    def participants(self) -> list[Participant]:
        return [_participant(p) for p in self._room.remote_participants.values()]

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None:
        self._room.register_byte_stream_handler(topic, handler)

    def unregister_byte_stream_handler(self, topic: str) -> None:
        self._room.unregister_byte_stream_handler(topic)

    def register_rpc_method(self, method: str, handler: RpcHandler) -> None:
        self._room.local_participant.register_rpc_method(method, handler)

    def unregister_rpc_method(self, method: str) -> None:
        self._room.local_participant.unregister_rpc_method(method)

    async def perform_rpc(
        self, destination_identity: str, method: str, payload: str, response_timeout: float = 5.0
    ) -> str:
        return await self._room.local_participant.perform_rpc(
            destination_identity=destination_identity, method=method, payload=payload, response_timeout=response_timeout
        )

    async def _until_left(self, identity: str, stream: Any, frames: Callable[[Any], Any]) -> AsyncIterator[Any]:
        """Events of `stream` until it ends or the participant leaves (the SDK stream may not end then)."""
        left = self._left.setdefault(identity, asyncio.Event())
        gone = asyncio.ensure_future(left.wait())
        try:
            iterator = stream.__aiter__()
            while True:
                nxt = asyncio.ensure_future(iterator.__anext__())
                done, _ = await asyncio.wait({nxt, gone}, return_when=asyncio.FIRST_COMPLETED)
                if nxt not in done:
                    nxt.cancel()
                    with contextlib.suppress(BaseException):
                        await nxt
                    return
                try:
                    event = nxt.result()
                except StopAsyncIteration:
                    return
                yield frames(event)
        finally:
            gone.cancel()
            with contextlib.suppress(Exception):
                await stream.aclose()

    async def audio_frames(self, identity: str) -> AsyncIterator[rtc.AudioFrame]:
        participant = self._room.remote_participants.get(identity)
        if participant is None:
            return
        stream = rtc.AudioStream.from_participant(
            participant=participant, track_source=rtc.TrackSource.SOURCE_MICROPHONE, sample_rate=16000, num_channels=1
        )
        async for frame in self._until_left(identity, stream, lambda event: event.frame):
            yield frame

    async def video_frames(self, identity: str) -> AsyncIterator[rtc.VideoFrame]:
        participant = self._room.remote_participants.get(identity)
        if participant is None:
            return
        stream = rtc.VideoStream.from_participant(participant=participant, track_source=rtc.TrackSource.SOURCE_CAMERA)
        async for frame in self._until_left(identity, stream, lambda event: event.frame):
            yield frame

    async def publish_avatar(self, width: int, height: int, sample_rate: int) -> LiveKitAvatarTracks:
        tracks = LiveKitAvatarTracks(width, height, sample_rate)
        await tracks.publish(self._room.local_participant)
        return tracks


class LiveKitAvatarTracks:
    """The avatar's camera and microphone: `rtc.VideoSource` and `rtc.AudioSource` tracks."""

    def __init__(self, width: int, height: int, sample_rate: int) -> None:
        self.audio_source = rtc.AudioSource(sample_rate, 1, queue_size_ms=AUDIO_QUEUE_MS)
        self.video_source = rtc.VideoSource(width, height)
        self.video_track = rtc.LocalVideoTrack.create_video_track("avatar_video", self.video_source)
        self.audio_track = rtc.LocalAudioTrack.create_audio_track("avatar_audio", self.audio_source)
        self._participant: Any = None
        self._sids: list[str] = []

    async def publish(self, participant: Any) -> None:
        self._participant = participant
        video = await participant.publish_track(
            self.video_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
        )
        audio = await participant.publish_track(
            self.audio_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        )
        self._sids = [video.sid, audio.sid]

    async def capture(self, video: rtc.VideoFrame, audio: rtc.AudioFrame, timestamp_us: int) -> None:
        self.video_source.capture_frame(video, timestamp_us=timestamp_us)
        await self.audio_source.capture_frame(audio)

    def queued_audio_s(self) -> float:
        return float(self.audio_source.queued_duration)

    def clear_audio(self) -> None:
        self.audio_source.clear_queue()

    async def wait_for_playout(self) -> None:
        await self.audio_source.wait_for_playout()

    async def aclose(self) -> None:
        if self._participant is not None:
            for sid in self._sids:
                with contextlib.suppress(Exception):
                    await self._participant.unpublish_track(sid)
        with contextlib.suppress(Exception):
            await self.audio_source.aclose()
        with contextlib.suppress(Exception):
            await self.video_source.aclose()
