"""Request and response bodies of the gateway's API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field

from services.store.validation import MAX_PORTRAIT_BYTES, MAX_ROOM_CHARS

ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
Id = Annotated[str, Field(pattern=ID_PATTERN, min_length=1, max_length=64, examples=["acme"])]
PathId = Annotated[str, Path(pattern=ID_PATTERN, max_length=64)]
Name = Annotated[str, Field(max_length=128, pattern=r"^[^\x00-\x1f\x7f]*$")]
# LiveKit room names and participant identities: printable ASCII (LiveKit accepts more; we need less).
Room = Annotated[str, Field(max_length=MAX_ROOM_CHARS, pattern=r"^[\x20-\x7e]*$")]
Identity = Annotated[str, Field(max_length=128, pattern=r"^[\x21-\x7e]*$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- tenants ---------------------------------------------------------------------------------------


class QuotasIn(Strict):
    """Quota fields to set; the ones left out keep their values (defaults for a new tenant)."""

    max_concurrent_sessions: int | None = Field(None, ge=0, le=100_000)
    max_session_minutes: float | None = Field(None, ge=0, lt=1e9)
    max_portrait_bytes: int | None = Field(None, ge=1, le=MAX_PORTRAIT_BYTES)
    requests_per_minute: int | None = Field(None, ge=1, le=1_000_000)

    def changes(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class Quotas(BaseModel):
    max_concurrent_sessions: int
    max_session_minutes: float
    max_portrait_bytes: int
    requests_per_minute: int


class TenantCreate(Strict):
    tenant_id: Id
    name: Name = ""
    quotas: QuotasIn | None = None


class TenantUpdate(Strict):
    name: Name | None = None
    quotas: QuotasIn | None = None


class Usage(BaseModel):
    period: str = Field(description="YYYYMM (UTC)")
    session_seconds: float
    session_minutes: float
    active_sessions: int


class Tenant(BaseModel):
    tenant_id: str
    name: str
    created_ms: int
    quotas: Quotas
    usage: Usage | None = None


class TenantList(BaseModel):
    tenants: list[Tenant]


# -- API keys --------------------------------------------------------------------------------------


class ApiKeyCreate(Strict):
    name: Name = ""


class ApiKey(BaseModel):
    key_id: str
    tenant_id: str
    name: str
    created_ms: int
    last_used_ms: int | None
    revoked_ms: int | None


class ApiKeyCreated(ApiKey):
    api_key: str = Field(description="the key itself (afk_<key id>.<secret>): shown this once, never again")


class ApiKeyList(BaseModel):
    keys: list[ApiKey]


# -- avatars ---------------------------------------------------------------------------------------


class Avatar(BaseModel):
    avatar_id: str
    created_ms: int
    bytes: int
    format: str
    width: int
    height: int
    sha256: str


class AvatarList(BaseModel):
    avatars: list[Avatar]


# -- sessions --------------------------------------------------------------------------------------


class SessionOptions(Strict):
    """SessionOptions of common.proto (limits.proto bounds); left out: the service's default."""

    block: int | None = Field(None, ge=1, le=47)
    nfe: int | None = Field(None, ge=2, le=50)
    audio_guidance: float | None = Field(None, ge=0, le=10)
    user_guidance: float | None = Field(None, ge=0, le=10)
    warm_start: bool | None = None
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    def fields(self) -> dict[str, Any]:
        return {k: v for k, v in self.model_dump().items() if v is not None}


class SessionCreate(Strict):
    avatar_id: Id
    room: Room = Field("", description="LiveKit room the bridge joins; empty: no bridge (stream over gRPC)")
    agent_identity: Identity = Field(
        "", description="the voice agent's participant identity: the avatar publishes on its behalf"
    )
    options: SessionOptions = Field(default_factory=SessionOptions)


class LiveKitInfo(BaseModel):
    url: str
    room: str
    avatar_identity: str = Field(description="the bridge's participant identity (the agent sends audio to it)")
    agent_identity: str
    dispatch_id: str


class Session(BaseModel):
    session_id: str
    avatar_id: str
    room: str
    status: str = Field(description="pending, active or stopping")
    options: dict[str, Any]
    created_ms: int
    updated_ms: int
    frame_cursor: int = Field(description="frames generated so far")
    figures: dict[str, float] = Field(description="live figures the ingress writes per block")


class SessionCreated(Session):
    session_token: str = Field(description="bearer token for AvatarSession.Stream of this session only")
    token_expires_ms: int
    grpc_target: str
    livekit: LiveKitInfo | None = None


class SessionList(BaseModel):
    sessions: list[Session]


class SessionStopped(BaseModel):
    session_id: str
    status: str


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class ErrorDetail(BaseModel):
    code: str
    message: str
    field: str | None = None
    limit: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail
