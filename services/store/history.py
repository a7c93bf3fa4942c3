"""A session's generated frames: the history ring, the latest_state slot, and the resume snapshot.

Frames. `append_block` requires the block's first frame to equal `frame_cursor` and advances it;
a retry of the last block is recognised and ignored, anything else is FrameConflictError. So frame
numbers are never skipped or repeated across a resume. Writes are fenced by the owner's claim
(services.store.ownership); a new owner rebuilds from `snapshot` and continues at `frame_cursor`.
"""

from __future__ import annotations

from typing import Any

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.records import Claim, HistoryEntry, ResumeSnapshot, StateSnapshot
from services.store.scripts import raise_for_session
from services.store.sessions import session_record
from services.store.validation import check_blob, check_ids, ttl_ms
from services.wire.errors import FrameConflictError, OwnershipLostError, ValidationError


class HistoryOps:
    """The history and state operations of SessionStore."""

    client: StoreClient
    keys: KeySchema
    heartbeat_ttl_s: float
    history_blocks: int
    max_entry_bytes: int
    max_state_bytes: int

    async def append_block(
        self,
        session_id: str,
        tenant_id: str,
        claim: Claim,
        first_frame: int,
        num_frames: int,
        blob: bytes,
        latest_state: bytes | None = None,
    ) -> int:
        """Record a generated block (and optionally the latest state) and advance the frame cursor.

        Requires first_frame == the session's frame_cursor and the current owner and epoch.
        A retry of the block just recorded is a no-op. Returns the new frame cursor.
        Also refreshes the session heartbeat.
        """
        check_ids(session_id, tenant_id)
        if not isinstance(first_frame, int) or first_frame < 0:
            raise ValidationError("first_frame", f"got {first_frame!r}; expected an integer >= 0")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValidationError("num_frames", f"got {num_frames!r}; expected an integer >= 1")
        entry = HistoryEntry(first_frame, num_frames, check_blob("blob", blob, self.max_entry_bytes))
        state = b"" if latest_state is None else check_blob("latest_state", latest_state, self.max_state_bytes)
        keys = [
            self.keys.session(session_id),
            self.keys.history(session_id),
            self.keys.state(session_id),
            self.keys.heartbeat(session_id),
            self.keys.deadlines,
        ]
        args = [session_id, tenant_id, claim.replica_id, claim.epoch, first_frame, num_frames, entry.to_bytes()]
        args += [self.history_blocks, "0" if latest_state is None else "1", state, ttl_ms(self.heartbeat_ttl_s)]
        reply = await self.client.script("append", keys, args)
        raise_for_session(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(
                f"session_id: {session_id!r} is now owned by {reply[1]!r} (epoch {reply[2]}), "
                f"not {claim.replica_id!r} (epoch {claim.epoch}); drop its cache"
            )
        if reply[0] == "frame_conflict":
            cursor = int(reply[1])
            raise FrameConflictError(f"first_frame: got {first_frame}; expected the session's frame cursor {cursor}")
        return int(reply[1])  # 'ok' and 'duplicate' both carry the cursor

    async def put_state(self, session_id: str, tenant_id: str, claim: Claim, blob: bytes) -> int:
        """Overwrite the latest_state slot (owner only); returns the frame cursor it is tagged with."""
        check_ids(session_id, tenant_id)
        blob = check_blob("latest_state", blob, self.max_state_bytes)
        keys = [self.keys.session(session_id), self.keys.state(session_id)]
        reply = await self.client.script("put_state", keys, [tenant_id, claim.replica_id, claim.epoch, blob])
        raise_for_session(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(f"session_id: {session_id!r} is now owned by {reply[1]!r} (epoch {reply[2]})")
        return int(reply[1])

    async def history(self, session_id: str, tenant_id: str) -> list[HistoryEntry]:
        return (await self.snapshot(session_id, tenant_id)).history

    async def snapshot(self, session_id: str, tenant_id: str) -> ResumeSnapshot:
        """Record, history (oldest first) and latest state, read in one transaction."""
        check_ids(session_id, tenant_id)

        async def read() -> list[Any]:
            # MULTI/EXEC: the three reads see one point in time, between two appends.
            async with self.client.redis.pipeline(transaction=True) as pipe:
                pipe.hgetall(self.keys.session(session_id))
                pipe.lrange(self.keys.history(session_id), 0, -1)
                pipe.hgetall(self.keys.state(session_id))
                return await pipe.execute()

        data, entries, state = await self.client.run("snapshot", read)
        record = session_record(data, session_id, tenant_id)
        snapshot_state = StateSnapshot.from_hash(state) if state else None
        return ResumeSnapshot(record, [HistoryEntry.from_bytes(e) for e in entries], snapshot_state)
