"""Session-affinity request routing for the generator (a Ray Serve `RequestRouter`).

Every request of a session must reach the replica that holds its KV cache. Callers
set the session id on the handle (`handle.options(session_id=...)`); this router
places a session by rendezvous (highest-random-weight) hashing of the session id
over the live replicas, skipping replicas that report themselves full through
`record_routing_stats` when placing a *new* session, and remembers each placement.
A session therefore stays on its replica while that replica lives; when it dies,
the next request goes to the next replica in the session's rendezvous order, which
rebuilds the cache from the Redis history. Ownership itself is recorded in Redis by
the replica that serves the session (`services.store.ownership`).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

from ray.serve.request_router import FIFOMixin, PendingRequest, RequestRouter, RunningReplica

FULL_STAT = "full"  # routing-stats key a generator replica sets when it admits no new session
MAX_REMEMBERED = 100_000  # placements kept per router (an LRU: forgotten ones re-hash identically)


def rendezvous_order(session_id: str, replica_ids: list[str]) -> list[str]:
    """Replica ids in the session's preference order (stable under changes to other replicas)."""

    def score(replica_id: str) -> bytes:
        return hashlib.blake2b(f"{session_id}/{replica_id}".encode(), digest_size=8).digest()

    return sorted(replica_ids, key=score, reverse=True)


def place(session_id: str, replicas: dict[str, bool], remembered: str | None) -> list[str]:
    """Preference order for one request. `replicas`: replica id -> full?

    A remembered live owner comes first whatever its fullness (it already holds the session);
    otherwise replicas with room come first, in rendezvous order, then full ones (they will
    refuse with RESOURCE_EXHAUSTED, which is the clear answer when every replica is full).
    """
    order = rendezvous_order(session_id, list(replicas))
    if remembered in replicas:
        return [remembered] + [r for r in order if r != remembered]
    return [r for r in order if not replicas[r]] + [r for r in order if replicas[r]]


class SessionAffinityRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, **kwargs) -> None:
        self._owners: OrderedDict[str, str] = OrderedDict()

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        session_id = pending_request.metadata.session_id if pending_request is not None else ""
        if not session_id:  # not a session call (health checks): any replica
            return [candidate_replicas]
        by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
        full = {rid: bool((r.routing_stats or {}).get(FULL_STAT, False)) for rid, r in by_id.items()}
        order = place(session_id, full, self._owners.get(session_id))
        return [[by_id[rid]] for rid in order]

    def on_request_routed(self, pending_request: PendingRequest, replica_id, result) -> None:
        session_id = pending_request.metadata.session_id
        if session_id:
            self._owners[session_id] = replica_id.unique_id
            self._owners.move_to_end(session_id)
            while len(self._owners) > MAX_REMEMBERED:
                self._owners.popitem(last=False)
