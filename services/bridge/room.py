"""The room as the bridge sees it: a small interface (`Room`) so the bridge's logic runs against
LiveKit (`livekit_room.LiveKitRoom`) or the in-memory room (`memory_room`) alike.

Media is carried in the SDK's own frame types (`rtc.AudioFrame`, `rtc.VideoFrame`); RPC handlers
get the SDK's `rtc.RpcInvocationData` and failures are `rtc.RpcError`, as with a real room.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from livekit import rtc

from services.bridge.protocol import PUBLISH_ON_BEHALF

KIND_AGENT = rtc.ParticipantKind.PARTICIPANT_KIND_AGENT

RpcHandler = Callable[[rtc.RpcInvocationData], Awaitable[str] | str]
# (reader, sender identity): the reader iterates the stream's chunks (bytes) and has `.info`
ByteStreamHandler = Callable[["ByteStreamReader", str], None]


class ByteStreamReader(Protocol):
    @property
    def info(self) -> rtc.ByteStreamInfo: ...

    def __aiter__(self) -> AsyncIterator[bytes]: ...


@dataclass(frozen=True)
class Participant:
    """A remote participant: identity, kind (rtc.ParticipantKind) and attributes."""

    identity: str
    kind: int
    attributes: dict[str, str] = field(default_factory=dict)

    @property
    def is_agent(self) -> bool:
        return self.kind == KIND_AGENT

    @property
    def publishes_on_behalf(self) -> str:
        return self.attributes.get(PUBLISH_ON_BEHALF, "")


class AvatarTracks(Protocol):
    """The avatar's published camera and microphone tracks."""

    async def capture(self, video: rtc.VideoFrame, audio: rtc.AudioFrame, timestamp_us: int) -> None:
        """One avatar frame and its audio slice, together."""

    def queued_audio_s(self) -> float:
        """Audio captured but not yet played out (the source's queue)."""

    def clear_audio(self) -> None:
        """Drop the queued audio (an interruption)."""

    async def wait_for_playout(self) -> None: ...

    async def aclose(self) -> None: ...


class Room(Protocol):
    """The bridge's view of one room, joined as `identity`.

    Events (`on(event, callback)`): "participant_joined" (Participant), "participant_left"
    (identity), "disconnected" (reason: str).
    """

    @property
    def identity(self) -> str: ...

    async def connect(self) -> None: ...

    async def disconnect(self) -> None: ...

    def participants(self) -> list[Participant]: ...

    def on(self, event: str, callback: Callable[..., None]) -> None: ...

    def off(self, event: str, callback: Callable[..., None]) -> None: ...

    def register_byte_stream_handler(self, topic: str, handler: ByteStreamHandler) -> None: ...

    def unregister_byte_stream_handler(self, topic: str) -> None: ...

    def register_rpc_method(self, method: str, handler: RpcHandler) -> None: ...

    def unregister_rpc_method(self, method: str) -> None: ...

    async def perform_rpc(
        self, destination_identity: str, method: str, payload: str, response_timeout: float = 5.0
    ) -> str: ...

    def audio_frames(self, identity: str) -> AsyncIterator[rtc.AudioFrame]:
        """The participant's microphone until it is unpublished or the participant leaves."""

    def video_frames(self, identity: str) -> AsyncIterator[rtc.VideoFrame]:
        """The participant's camera, at its native rate, until it ends."""

    async def publish_avatar(self, width: int, height: int, sample_rate: int) -> AvatarTracks: ...
