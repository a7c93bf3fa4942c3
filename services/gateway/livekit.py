"""LiveKit: the bridge's room token, and dispatching a bridge into (and out of) a room.

Room token (`bridge_token`). The bridge joins the room as the avatar: participant kind `agent`,
identity `avatar_identity(session_id)` ("af-avatar-<session id>"), attribute
`lk.publish_on_behalf` = the voice agent's identity (when the session names it; frontends and the
agent's RoomIO then treat the avatar's tracks as the agent's). Grants, the least it needs:

    roomJoin for that one room        join it; no roomCreate / roomList / roomAdmin / roomRecord
    canPublish, sources camera + microphone only     the avatar's video and speech
    canSubscribe                      the agent's audio stream and the human's camera and microphone
    canPublishData                    the lk.* RPCs (lk.playback_started / _finished) ride on data packets
    canUpdateOwnMetadata false, no ingress/egress/SIP/agent-dispatch grants

It lives as long as the session may (AF_GATEWAY_LIVEKIT_TOKEN_TTL_S, default 1 h); LiveKit checks
a token when it is used to join, so a bridge already in the room stays until it is removed.

Dispatch contract (the bridge, the next issue, implements the consumer). Orders go through a
`BridgeDispatcher`; the one here, `RedisStreamDispatcher`, appends them to the Redis stream
P:bridge:dispatch (services.store.dispatch), read by bridge workers through the consumer group
"bridges" (XREADGROUP; XACK once carried out; XAUTOCLAIM what a dead worker left pending). Each
entry has two fields: `action` ("join" or "leave") and `order`, a JSON object:

    join:  {"version": 1, "action": "join", "session_id", "tenant_id", "avatar_id", "room",
            "livekit_url", "bridge_token" (the room token above), "avatar_identity",
            "agent_identity" ("" when not named), "session_token" (the gRPC session token:
            AvatarSession.Stream with Start.session_id = session_id, avatar_id = avatar_id),
            "grpc_target", "options" (SessionOptions fields), "issued_ms", "expires_ms"
            (the session token's expiry: a join not started by then is dropped)}
    leave: {"version": 1, "action": "leave", "session_id", "tenant_id", "room",
            "avatar_identity", "reason" ("stopped", "tenant_deleted"), "issued_ms"}

A bridge that takes a join connects to `livekit_url` with `bridge_token`, streams the session with
`session_token`, and leaves the room when a leave for the session arrives, when the session's
stream ends (the gateway's stop sets the session "stopping"; the ingress then ends the stream with
OK), or when the agent leaves the room. Bridges must treat orders as idempotent (a join for a
session already joined, a leave for one not joined: nothing to do). Entries hold credentials, so
the stream is capped (MAXLEN ~10000) and its tokens are short-lived; nothing else reads it.

Closing a session closes the bridge's participation twice over: the leave order, and (with
AF_GATEWAY_LIVEKIT_KICK, default on) RoomService.RemoveParticipant for the avatar's identity, so a
bridge that is stuck or gone cannot linger in the room.

An HTTP dispatcher (a bridge fleet behind a launch endpoint, as in LiveKit's avatar examples) can
replace the stream: implement `BridgeDispatcher` and pass it to `create_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any, Protocol

from services.gateway.logs import log
from services.gateway.settings import LiveKitSettings
from services.store import SessionStore

PUBLISH_ON_BEHALF = "lk.publish_on_behalf"  # livekit-agents' ATTRIBUTE_PUBLISH_ON_BEHALF
CONTRACT_VERSION = 1
KICK_TIMEOUT_S = 3.0


def avatar_identity(session_id: str) -> str:
    """The bridge's participant identity in the room for one session."""
    return f"af-avatar-{session_id}"


def bridge_grants(room: str) -> Any:
    from livekit import api

    return api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_publish_sources=["camera", "microphone"],
        can_subscribe=True,
        can_publish_data=True,
        can_update_own_metadata=False,
        room_create=False,
        room_list=False,
        room_admin=False,
        room_record=False,
        hidden=False,
    )


def bridge_token(
    settings: LiveKitSettings, room: str, session_id: str, agent_identity: str = "", ttl_s: float | None = None
) -> str:
    """The room token of the bridge that plays the session's avatar in `room` (least grants; see above)."""
    from livekit import api

    token = (
        api.AccessToken(settings.api_key, settings.api_secret)
        .with_kind("agent")
        .with_identity(avatar_identity(session_id))
        .with_name("avatar")
        .with_grants(bridge_grants(room))
        .with_ttl(timedelta(seconds=ttl_s or settings.token_ttl_s))
    )
    if agent_identity:
        token = token.with_attributes({PUBLISH_ON_BEHALF: agent_identity})
    return token.to_jwt()


@dataclass(frozen=True)
class BridgeJoin:
    session_id: str
    tenant_id: str
    avatar_id: str
    room: str
    livekit_url: str
    bridge_token: str = field(repr=False)
    session_token: str = field(repr=False)
    avatar_identity: str
    agent_identity: str
    grpc_target: str
    options: dict[str, Any]
    expires_ms: int
    issued_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def order(self) -> dict[str, Any]:
        return {"version": CONTRACT_VERSION, "action": "join", **asdict(self)}


@dataclass(frozen=True)
class BridgeLeave:
    session_id: str
    tenant_id: str
    room: str
    avatar_identity: str
    reason: str = "stopped"
    issued_ms: int = field(default_factory=lambda: int(time.time() * 1000))

    def order(self) -> dict[str, Any]:
        return {"version": CONTRACT_VERSION, "action": "leave", **asdict(self)}


class BridgeDispatcher(Protocol):
    """Where join/leave orders go. Returns the dispatch id of the order."""

    async def join(self, order: BridgeJoin) -> str: ...

    async def leave(self, order: BridgeLeave) -> str: ...

    async def aclose(self) -> None: ...


class RedisStreamDispatcher:
    """Orders as entries of P:bridge:dispatch (the contract above), plus RemoveParticipant on leave."""

    def __init__(self, store: SessionStore, livekit: LiveKitSettings | None = None) -> None:
        self.store = store
        self.livekit = livekit
        self._group_ready = False

    async def _ensure_group(self) -> None:
        if not self._group_ready:
            await self.store.ensure_dispatch_group()
            self._group_ready = True

    async def join(self, order: BridgeJoin) -> str:
        await self._ensure_group()
        entry = await self.store.dispatch_bridge("join", order.order())
        log.info("bridge dispatched", extra={"event": "bridge.join", "room": order.room, "dispatch_id": entry})
        return entry

    async def leave(self, order: BridgeLeave) -> str:
        await self._ensure_group()
        entry = await self.store.dispatch_bridge("leave", order.order())
        log.info("bridge recalled", extra={"event": "bridge.leave", "room": order.room, "dispatch_id": entry})
        if self.livekit is not None and self.livekit.kick_on_stop:
            await remove_participant(self.livekit, order.room, order.avatar_identity)
        return entry

    async def aclose(self) -> None:
        pass


async def remove_participant(settings: LiveKitSettings, room: str, identity: str) -> bool:
    """RoomService.RemoveParticipant, best effort (bounded; a missing participant or an unreachable
    server is logged, not raised: the leave order is already out). True when LiveKit confirmed."""
    try:
        from livekit import api
    except ImportError:  # pragma: no cover - livekit-api is a dependency of the gateway
        return False
    try:
        async with asyncio.timeout(KICK_TIMEOUT_S):
            lkapi = api.LiveKitAPI(settings.url, settings.api_key, settings.api_secret)
            try:
                await lkapi.room.remove_participant(api.RoomParticipantIdentity(room=room, identity=identity))
            finally:
                with contextlib.suppress(Exception):
                    await lkapi.aclose()
        return True
    except Exception as exc:  # not_found (already gone), connection refused, timeout
        log.info(
            "livekit remove_participant did not complete (%s)",
            type(exc).__name__,
            extra={"event": "bridge.kick", "room": room},
        )
        return False
