"""Session placement of the generator's request router."""

from __future__ import annotations

from services.generator.router import place, rendezvous_order


def test_a_session_always_maps_to_the_same_replica_and_sessions_spread():
    replicas = [f"replica-{i}" for i in range(4)]
    owners = {f"s{i}": rendezvous_order(f"s{i}", replicas)[0] for i in range(400)}
    assert all(rendezvous_order(s, list(reversed(replicas)))[0] == owner for s, owner in owners.items())
    counts = {r: list(owners.values()).count(r) for r in replicas}
    assert min(counts.values()) > 60  # roughly even: 100 each


def test_removing_a_replica_moves_only_its_sessions():
    replicas = [f"replica-{i}" for i in range(4)]
    before = {f"s{i}": rendezvous_order(f"s{i}", replicas)[0] for i in range(400)}
    after = {s: rendezvous_order(s, replicas[1:])[0] for s in before}
    moved = {s for s in before if before[s] != after[s]}
    assert moved == {s for s in before if before[s] == "replica-0"}


def test_new_sessions_avoid_full_replicas_but_owners_keep_theirs():
    full = {"a": True, "b": False, "c": False}
    order = place("s1", full, remembered=None)
    assert order[-1] == "a" and set(order) == {"a", "b", "c"}
    assert place("s1", full, remembered="a")[0] == "a"  # it already holds the session's cache
    assert place("s1", {"b": False, "c": False}, remembered="a")[0] in {"b", "c"}  # owner gone
