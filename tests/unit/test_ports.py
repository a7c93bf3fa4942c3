"""Listening ports are picked where the kernel never assigns one on its own, and are really free."""

from __future__ import annotations

import socket

from services.local import ports


def test_picked_ports_lie_outside_the_ephemeral_and_ray_worker_ranges():
    start = ports.ephemeral_start()
    picked = {ports.free_port() for _ in range(50)}
    assert len(picked) == 50, "a port was handed out twice"
    if start - ports.RAY_WORKER_PORTS_END > ports.MIN_RANGE:
        assert all(ports.RAY_WORKER_PORTS_END < port < start for port in picked), sorted(picked)


def test_a_port_held_on_the_ipv6_wildcard_is_not_free():
    # Serve's gRPC proxy binds [::]: a port held there must not be reported free for 127.0.0.1.
    holder = socket.socket(socket.AF_INET6, socket.SOCK_STREAM) if socket.has_ipv6 else None
    if holder is None:
        return
    with holder:
        try:
            holder.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            holder.bind(("::", 0))
        except OSError:
            return  # IPv6 is compiled in but not configured on this host
        holder.listen()
        assert not ports.port_is_free(holder.getsockname()[1])


def test_a_port_listened_on_loopback_is_not_free():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        assert not ports.port_is_free(holder.getsockname()[1])
    assert ports.port_is_free(ports.free_port())
