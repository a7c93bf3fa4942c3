"""Which generator replica owns a session: claim, release, and a replica's owned sessions.

Ownership. `claim` is a compare-and-set (one Lua script, `scripts._CLAIM`): it succeeds when the
session is unowned, already ours, its owner is dead, or its owner is the one named in `steal_from`
(a handoff when the replica set changes). Each successful transfer bumps `owner_epoch`;
`append_block` and `put_state` succeed only with the current owner and epoch, so a replica that
was presumed dead cannot write after another took over (it gets OwnershipLostError).

When a replica dies its sessions are not reaped but claimed by another replica, which rebuilds
them from history and `state` and continues at `frame_cursor` (services.store.history).
"""

from __future__ import annotations

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.records import Claim
from services.store.scripts import raise_for_session
from services.store.validation import check_ids
from services.wire.errors import (
    CapacityExceededError,
    FailedPreconditionError,
    OwnershipConflictError,
    OwnershipLostError,
)
from services.wire.ids import check_id


class OwnershipOps:
    """The ownership operations of SessionStore."""

    client: StoreClient
    keys: KeySchema

    async def claim(
        self,
        session_id: str,
        tenant_id: str,
        replica_id: str,
        steal_from: str = "",
        max_sessions: int = 0,
    ) -> Claim:
        """Own the session if it is unowned, ours, its owner is dead, or its owner is `steal_from`.

        Raises OwnershipConflictError (another live replica owns it), CapacityExceededError (this replica
        owns max_sessions > 0 already), FailedPreconditionError (this replica is not registered alive).
        """
        check_ids(session_id, tenant_id)
        check_id("replica_id", replica_id)
        if steal_from:
            check_id("steal_from", steal_from)
        args = [self.keys.prefix, session_id, tenant_id, replica_id, steal_from, max_sessions]
        reply = await self.client.script("claim", [self.keys.session(session_id)], args)
        raise_for_session(reply, session_id, tenant_id)
        status, epoch, owner = reply[0], int(reply[1]), reply[2]
        if status == "not_registered":
            raise FailedPreconditionError(
                f"replica_id: replica {replica_id!r} is not alive in the store; call replica_heartbeat first"
            )
        if status == "conflict":
            raise OwnershipConflictError(f"session_id: {session_id!r} is owned by live replica {owner!r}")
        if status == "full":
            raise CapacityExceededError(f"replica_id: replica {replica_id!r} already owns {max_sessions} sessions")
        return Claim(session_id, replica_id, epoch, owner, transferred=status == "claimed")

    async def release(self, session_id: str, tenant_id: str, replica_id: str, epoch: int) -> None:
        """Give up ownership (drain, close): the next claim by anyone succeeds at once."""
        check_ids(session_id, tenant_id)
        args = [self.keys.prefix, session_id, tenant_id, replica_id, epoch]
        reply = await self.client.script("release", [self.keys.session(session_id)], args)
        raise_for_session(reply, session_id, tenant_id)
        if reply[0] == "not_owner":
            raise OwnershipLostError(f"session_id: {session_id!r} is owned by {reply[1]!r} (epoch {reply[2]})")

    async def owned_sessions(self, replica_id: str) -> set[str]:
        check_id("replica_id", replica_id)
        key = self.keys.replica_sessions(replica_id)
        members = await self.client.run("owned_sessions", lambda: self.client.redis.smembers(key))
        return {m.decode() for m in members}
