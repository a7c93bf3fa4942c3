"""The values the session store hands out, and their encodings in Redis.

`SessionRecord` is the P:session:{sid} hash (its `status` runs pending -> active -> stopping ->
closed, see `validation.STATUSES`; its `figures` are the live numbers the ingress writes per block,
names in `SESSION_FIGURES`); `AvatarInfo` is one entry of P:tenant:{tid}:avatars; `HistoryEntry` is
one element of the history ring, with its own byte codec; `StateSnapshot` is the latest_state slot;
`ResumeSnapshot` is all three read at once; `Claim` is the proof of ownership writers present;
`ReapedSession`/`ReapResult` describe what the reaper (or a close) removed, as published on the
reaped channel.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from typing import Any

# The figures the ingress writes per block (SessionStore.set_figures), readable as SessionRecord.figures:
SESSION_FIGURES = {
    "frames": "frames sent to the client so far",
    "degraded_frames": "of those, frames below full quality (reduced sampler steps or held)",
    "block_latency_p50_ms": "median end-to-end block latency over the recent blocks (input complete -> frames out)",
    "block_latency_p95_ms": "95th percentile of the same",
    "realtime_factor": "median over the recent blocks of block media seconds / block latency (>= 1: real time)",
    "session_seconds": "generated session time so far (what the tenant's max_session_minutes counts)",
}


@dataclass(frozen=True)
class SessionRecord:
    session_id: str
    tenant_id: str
    avatar_id: str
    room: str
    status: str
    options: dict[str, Any]
    created_ms: int
    updated_ms: int
    frame_cursor: int  # session frames generated so far = the first frame of the next block
    owner: str  # replica id, "" when unowned
    owner_epoch: int
    figures: dict[str, float] = field(default_factory=dict)  # SESSION_FIGURES, as last written

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> SessionRecord:
        # options and figures are JSON (possibly non-ASCII), the rest plain text fields of the hash.
        text = {k.decode(): v.decode() for k, v in data.items() if k not in (b"options", b"figures")}
        return cls(
            session_id=text["session_id"],
            tenant_id=text["tenant_id"],
            avatar_id=text["avatar_id"],
            room=text["room"],
            status=text["status"],
            options=json.loads(data[b"options"]),
            created_ms=int(text["created_ms"]),
            updated_ms=int(text["updated_ms"]),
            frame_cursor=int(text["frame_cursor"]),
            owner=text["owner"],
            owner_epoch=int(text["owner_epoch"]),
            figures=json.loads(data[b"figures"]) if b"figures" in data else {},
        )


@dataclass(frozen=True)
class AvatarInfo:
    """The metadata of one avatar's portrait (P:tenant:{tid}:avatars[avatar_id], JSON)."""

    tenant_id: str
    avatar_id: str
    created_ms: int  # when this portrait was stored (a replacement with other bytes resets it)
    bytes: int
    format: str  # "PNG", "JPEG", or "unknown" (bytes whose header could not be read)
    width: int  # 0 when unknown
    height: int
    sha256: str  # hex digest of the portrait bytes: caches of its encoding are keyed by it

    def to_json(self) -> str:
        fields_ = {k: v for k, v in self.__dict__.items() if k not in ("tenant_id", "avatar_id")}
        return json.dumps(fields_, sort_keys=True)

    @classmethod
    def from_json(cls, tenant_id: str, avatar_id: str, text: str | bytes) -> AvatarInfo:
        data = json.loads(text)
        return cls(
            tenant_id,
            avatar_id,
            int(data["created_ms"]),
            int(data["bytes"]),
            str(data["format"]),
            int(data["width"]),
            int(data["height"]),
            str(data["sha256"]),
        )


_ENTRY_HEADER = struct.Struct(">4sqI")  # magic, first frame (int64), frame count (uint32)
_ENTRY_MAGIC = b"AFH1"


@dataclass(frozen=True)
class HistoryEntry:
    """One block of a session's history: frames [first_frame, first_frame + num_frames)."""

    first_frame: int
    num_frames: int
    blob: bytes  # what the generator needs to rebuild from (its format is the generator's)

    def to_bytes(self) -> bytes:
        return _ENTRY_HEADER.pack(_ENTRY_MAGIC, self.first_frame, self.num_frames) + self.blob

    @classmethod
    def from_bytes(cls, data: bytes) -> HistoryEntry:
        if len(data) < _ENTRY_HEADER.size or data[:4] != _ENTRY_MAGIC:
            raise ValueError("history entry: not a HistoryEntry (bad header)")
        _, first, count = _ENTRY_HEADER.unpack_from(data)
        return cls(first, count, data[_ENTRY_HEADER.size :])


@dataclass(frozen=True)
class StateSnapshot:
    frame_cursor: int  # the session's frame cursor when the blob was written
    blob: bytes
    updated_ms: int

    @classmethod
    def from_hash(cls, data: dict[bytes, bytes]) -> StateSnapshot:
        return cls(int(data[b"frame_cursor"]), data[b"blob"], int(data[b"updated_ms"]))


@dataclass(frozen=True)
class ResumeSnapshot:
    """Everything a replica needs to take a session over, read atomically."""

    record: SessionRecord
    history: list[HistoryEntry]  # oldest first
    state: StateSnapshot | None


@dataclass(frozen=True)
class Claim:
    session_id: str
    replica_id: str
    epoch: int  # present it to append_block / put_state / release
    previous_owner: str  # "" when the session was unowned
    transferred: bool  # ownership moved here now (False: we already owned it)

    @property
    def resumed(self) -> bool:
        """Another replica owned the session: rebuild the cache from history before generating.

        Advisory: a replica that does not hold the session's cache rebuilds it regardless (a
        claim whose reply was lost and retried reads as already owned)."""
        return self.transferred and self.previous_owner != ""


@dataclass(frozen=True)
class ReapedSession:
    session_id: str
    tenant_id: str
    owner: str
    avatar_id: str
    frame_cursor: int
    reason: str  # "expired" or "closed"

    @classmethod
    def from_json(cls, text: str | bytes) -> ReapedSession:
        """Decode the JSON the Lua `purge` publishes on the reaped channel and returns."""
        data = json.loads(text)
        return cls(
            data["session_id"],
            data["tenant_id"],
            data["owner"],
            data["avatar_id"],
            int(data["frame_cursor"]),
            data["reason"],
        )


@dataclass(frozen=True)
class ReapResult:
    sessions: list[ReapedSession] = field(default_factory=list)
    dead_replicas: list[str] = field(default_factory=list)
