"""What sessions leave behind once they end: Redis session keys (read through the store's
inspection; only the store knows its key layout) and generator replicas still holding caches."""

from __future__ import annotations

import time

from bench.stack import BenchStack
from services.store.inspection import leaked_session_keys


def generator_replica_stats(timeout_s: float = 10.0) -> dict[str, dict]:
    """`record_routing_stats()` of every live generator replica actor: sessions, cache_bytes, full."""
    import ray

    stats = {}
    for actor in ray.util.list_named_actors(all_namespaces=True):
        name = actor["name"]
        if "generator" not in name or "SERVE_REPLICA" not in name:
            continue
        handle = ray.get_actor(name, namespace=actor["namespace"])
        stats[name] = ray.get(handle.record_routing_stats.remote(), timeout=timeout_s)
    return stats


def wait_idle(timeout_s: float = 20.0) -> None:
    """Until every generator replica holds no session (closed sessions free their caches)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = generator_replica_stats()
        if all(not s.get("sessions") for s in stats.values()):
            return
        time.sleep(0.5)


def leaked_keys(stack: BenchStack, settle_s: float = 10.0) -> dict[str, list[str]]:
    """The stack's session keys still present after `settle_s`, by kind (empty: nothing leaked)."""
    deadline = time.monotonic() + settle_s
    while True:  # closing sessions delete their keys right after their last frame
        leaks = {kind: keys for kind, keys in leaked_session_keys(stack.redis_url, stack.prefix).items() if keys}
        if not leaks or time.monotonic() > deadline:
            return leaks
        time.sleep(0.5)


def after_run_report(stack: BenchStack) -> str:
    """One line: leaked Redis session keys and generator replicas still holding caches."""
    wait_idle()
    leaks = leaked_keys(stack)
    caches = generator_replica_stats()
    busy = {name: s for name, s in caches.items() if s.get("sessions") or s.get("cache_bytes")}
    return (
        f"after the run: leaked Redis session keys {sum(len(v) for v in leaks.values())}, "
        f"generator replicas holding caches {len(busy)} of {len(caches)}"
    )
