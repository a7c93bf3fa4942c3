"""Generator replica liveness: heartbeats, the alive check, and deregistration.

Liveness. A replica is alive while its P:replica:{rid}:alive key exists; each generator replica
refreshes its own. This is separate from session liveness (services.store.sessions) on purpose:
when a replica dies its sessions are not reaped but claimed by another replica (ownership), and a
dead replica is forgotten by the reaper only once it owns nothing.
"""

from __future__ import annotations

import time

from services.store.client import StoreClient
from services.store.keys import KeySchema
from services.store.validation import ttl_ms
from services.wire.ids import check_id


class ReplicaOps:
    """The replica-liveness operations of SessionStore."""

    client: StoreClient
    keys: KeySchema
    replica_ttl_s: float

    async def replica_heartbeat(self, replica_id: str) -> None:
        """Mark the replica alive for another replica TTL (call every TTL/3 or so)."""
        check_id("replica_id", replica_id)

        async def beat() -> None:
            async with self.client.redis.pipeline(transaction=True) as pipe:
                # The value (wall-clock ms of the beat) is informational; only the key's existence counts.
                pipe.set(self.keys.replica_alive(replica_id), int(time.time() * 1000), px=ttl_ms(self.replica_ttl_s))
                pipe.sadd(self.keys.replicas, replica_id)
                await pipe.execute()

        await self.client.run("replica_heartbeat", beat)

    async def replica_alive(self, replica_id: str) -> bool:
        check_id("replica_id", replica_id)
        key = self.keys.replica_alive(replica_id)
        return bool(await self.client.run("replica_alive", lambda: self.client.redis.exists(key)))

    async def deregister_replica(self, replica_id: str) -> None:
        """The replica is going away: its sessions become claimable now (not after the TTL)."""
        check_id("replica_id", replica_id)
        key = self.keys.replica_alive(replica_id)
        await self.client.run("deregister_replica", lambda: self.client.redis.delete(key))
