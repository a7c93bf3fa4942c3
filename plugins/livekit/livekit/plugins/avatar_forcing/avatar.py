"""`AvatarSession`: asks the Avatar Forcing gateway for an avatar in the agent's room and sends the
agent's speech to it.

`start(agent_session, room)`:
1. reads the agent's participant identity (the job context's, else `room.local_participant`);
2. `POST /v1/sessions {avatar_id, room: room.name, agent_identity, options}` with the tenant's API
   key; the gateway dispatches a bridge that joins the room as `livekit.avatar_identity` (kind
   agent, `lk.publish_on_behalf` = the agent), and plays the avatar's video and speech;
3. replaces the session's audio sink with `DataStreamAudioOutput(room, destination_identity=
   <avatar identity>, wait_remote_track=KIND_VIDEO, sample_rate=16000)` — the agent's TTS audio
   then goes to the bridge over LiveKit data streams instead of being published by the agent.

Call it before `agent_session.start(...)`: the session then sees its audio output taken and
publishes no audio track of its own. `aclose()` stops the gateway session (its bridge leaves the
room); it is registered as a job shutdown callback, so a job that ends stops its avatar.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import aiohttp
from livekit import rtc
from livekit.agents import get_job_context
from livekit.agents.voice.avatar import AvatarSession as _BaseAvatarSession
from livekit.agents.voice.avatar import DataStreamAudioOutput

from ._gateway import GatewayClient
from .errors import AvatarForcingError
from .log import logger

if TYPE_CHECKING:
    from livekit.agents import AgentSession

DEFAULT_API_URL_ENV = "AVATAR_FORCING_API_URL"
DEFAULT_API_KEY_ENV = "AVATAR_FORCING_API_KEY"
SAMPLE_RATE = 16000  # what the bridge feeds the model: the agent resamples its TTS audio to it
PROVIDER = "avatar-forcing"


def _api_url(value: str | None) -> str:
    url = (value if value is not None else os.environ.get(DEFAULT_API_URL_ENV, "")).strip()
    if not url:
        raise ValueError(
            f"avatar-forcing: no gateway URL: pass api_url= or set {DEFAULT_API_URL_ENV} (e.g. http://127.0.0.1:8080)"
        )
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"avatar-forcing: {DEFAULT_API_URL_ENV} / api_url must be an http(s) URL; got {url!r}")
    url = url.rstrip("/")
    return url.removesuffix("/v1")


def _api_key(value: str | None) -> str:
    key = (value if value is not None else os.environ.get(DEFAULT_API_KEY_ENV, "")).strip()
    if not key:
        raise ValueError(f"avatar-forcing: no API key: pass api_key= or set {DEFAULT_API_KEY_ENV} (afk_...)")
    return key


def agent_identity_of(room: rtc.Room) -> str:
    """The agent's participant identity: the job's (from its token, known before the room is
    connected), else the connected room's local participant."""
    job_ctx = get_job_context(required=False)
    if job_ctx is not None:
        return job_ctx.local_participant_identity
    try:
        identity = room.local_participant.identity
    except Exception as exc:  # rtc.Room before connect: "cannot access local participant before connecting"
        raise RuntimeError(
            "avatar-forcing: cannot read the agent's identity (no job context and the room is not "
            "connected); connect the room first or pass agent_identity="
        ) from exc
    if not identity:
        raise RuntimeError("avatar-forcing: the room's local participant has no identity; pass agent_identity=")
    return identity


class AvatarSession(_BaseAvatarSession):
    """An Avatar Forcing avatar in the agent's room.

    avatar_id       the avatar (uploaded portrait) of the tenant, POST /v1/avatars
    api_url         the gateway, default $AVATAR_FORCING_API_URL
    api_key         the tenant's API key (afk_...), default $AVATAR_FORCING_API_KEY
    agent_identity  override the agent's participant identity (default: the job's)
    block, nfe, audio_guidance, user_guidance, warm_start, seed
                    session options (the gateway's SessionOptions); left out: the service's defaults
    timeout_s, max_retries, retry_interval
                    each gateway request's time bound; retries of 5xx / connection errors
    http_session    an aiohttp session to use (default: one of its own, closed by aclose)
    """

    def __init__(
        self,
        *,
        avatar_id: str,
        api_url: str | None = None,
        api_key: str | None = None,
        agent_identity: str | None = None,
        block: int | None = None,
        nfe: int | None = None,
        audio_guidance: float | None = None,
        user_guidance: float | None = None,
        warm_start: bool | None = None,
        seed: int | None = None,
        timeout_s: float = 10.0,
        max_retries: int = 3,
        retry_interval: float = 0.5,
        http_session: aiohttp.ClientSession | None = None,
    ) -> None:
        super().__init__()
        if not avatar_id:
            raise ValueError("avatar-forcing: avatar_id is required")
        self.avatar_id = avatar_id
        self._agent_identity = agent_identity
        options = {
            "block": block,
            "nfe": nfe,
            "audio_guidance": audio_guidance,
            "user_guidance": user_guidance,
            "warm_start": warm_start,
            "seed": seed,
        }
        self.options: dict[str, Any] = {k: v for k, v in options.items() if v is not None}
        self._gateway = GatewayClient(
            _api_url(api_url),
            _api_key(api_key),
            http_session=http_session,
            timeout_s=timeout_s,
            max_retries=max_retries,
            retry_interval=retry_interval,
        )
        self.session_id: str | None = None
        self.room_name: str | None = None
        self.dispatch_id: str | None = None
        self.audio_output: DataStreamAudioOutput | None = None
        self._avatar_identity: str | None = None
        self.stop_status: str | None = None  # what the gateway said on stop: "closed", "stopping", "gone"
        self._stopped = False

    @property
    def api_url(self) -> str:
        return self._gateway.api_url

    @property
    def avatar_identity(self) -> str:
        """The bridge's participant identity (the gateway's `livekit.avatar_identity`); known after start()."""
        if self._avatar_identity is None:
            raise RuntimeError("avatar-forcing: the avatar's identity is known once start() has run")
        return self._avatar_identity

    @property
    def provider(self) -> str:
        return PROVIDER

    async def start(self, agent_session: AgentSession, room: rtc.Room) -> None:
        if self.session_id is not None:
            raise RuntimeError("avatar-forcing: this AvatarSession was already started; make a new one")
        room_name = room.name
        if not room_name:
            raise RuntimeError("avatar-forcing: the room has no name (is it the job's room?)")
        agent_identity = self._agent_identity or agent_identity_of(room)
        body: dict[str, Any] = {
            "avatar_id": self.avatar_id,
            "room": room_name,
            "agent_identity": agent_identity,
            "options": self.options,
        }
        _, created = await self._gateway.request("POST", "/v1/sessions", body)
        self.session_id = created["session_id"]
        self.room_name = room_name
        try:
            livekit = created.get("livekit")
            if not livekit or not livekit.get("avatar_identity"):
                raise AvatarForcingError(
                    "the gateway has no LiveKit configured (set LIVEKIT_URL, LIVEKIT_API_KEY and "
                    "LIVEKIT_API_SECRET where the gateway runs): no bridge can join the room",
                    status_code=201,
                    code="livekit_not_configured",
                    retryable=False,
                    body={"session_id": self.session_id},
                )
            self._avatar_identity = str(livekit["avatar_identity"])
            self.dispatch_id = livekit.get("dispatch_id")
            logger.info(
                "avatar-forcing session created",
                extra={"session_id": self.session_id, "room": room_name, "avatar_identity": self._avatar_identity},
            )
            # The base class registers aclose as a job shutdown callback and reports when the
            # avatar has joined and published its video (AvatarMetrics, wait_for_join()).
            await super().start(agent_session, room)
            self.audio_output = DataStreamAudioOutput(
                room,
                destination_identity=self._avatar_identity,
                wait_remote_track=rtc.TrackKind.KIND_VIDEO,
                sample_rate=SAMPLE_RATE,
            )
            # Swap the sink under the session's wrappers (transcript sync, recorder) when they
            # exist; before session.start() there are none and this sets output.audio.
            agent_session.output.replace_audio_tail(self.audio_output)
        except BaseException:
            await self._stop_gateway_session()
            raise

    async def _stop_gateway_session(self) -> str | None:
        """DELETE /v1/sessions/{id}: the gateway closes it and recalls its bridge. Returns the
        status the gateway gave ("closed", "stopping"), or "gone" when it had no such session."""
        if self.session_id is None or self._stopped:
            return None
        self._stopped = True
        try:
            _, stopped = await self._gateway.request("DELETE", f"/v1/sessions/{self.session_id}")
        except AvatarForcingError as exc:
            if exc.status_code == 404:
                return "gone"
            logger.warning("avatar-forcing: stopping session %s failed: %s", self.session_id, exc)
            return None
        except Exception as exc:  # unreachable after the retries: the session's quota frees on its own
            logger.warning("avatar-forcing: stopping session %s failed: %s", self.session_id, exc)
            return None
        status = stopped.get("status") if isinstance(stopped, dict) else None
        logger.info("avatar-forcing session stopped", extra={"session_id": self.session_id, "status": status})
        return status

    async def aclose(self) -> None:
        """Stop the gateway session (its bridge leaves the room), then the base class's cleanup
        (remove the avatar participant through the job's RoomService). Idempotent; never raises
        for a gateway failure (it is logged), so it is safe as a shutdown callback."""
        status = await self._stop_gateway_session()
        if status is not None:
            self.stop_status = status
        if self._room is not None:
            await super().aclose()
        await self._gateway.aclose()
