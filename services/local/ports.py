"""Listening ports for the servers the launcher (and the tests) start: Serve's proxies, a private Redis.

A port the kernel hands out for `bind(0)` or for an outgoing connection comes from its ephemeral
range, so one picked that way can be taken again by any process (Ray's own servers and clients
among them) before our server binds it. Ports here are therefore picked above Ray's worker ports
and below the ephemeral range, where nothing is assigned automatically, and checked free on the
wildcard addresses too: Serve's gRPC proxy binds [::], not 127.0.0.1.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

RAY_WORKER_PORTS_END = 19999  # Ray's default max_worker_port
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_START = 32768  # Linux's default, also the lower end elsewhere (IANA's is 49152)
MIN_RANGE = 1000  # fewer candidates than this: let the kernel choose instead
_handed_out: set[int] = set()  # ports already returned in this process, not yet necessarily bound


def ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range."""
    try:
        return int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return DEFAULT_EPHEMERAL_START


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Whether `port` can be bound on `host` and on the IPv4 and IPv6 wildcard addresses right now."""
    probes = [(socket.AF_INET, host), (socket.AF_INET, "0.0.0.0")]
    if socket.has_ipv6:
        probes.append((socket.AF_INET6, "::"))
    for family, address in probes:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as sock:
                sock.bind((address, port))
        except OSError as exc:
            if family == socket.AF_INET6 and exc.errno in (97, 99):  # no IPv6 on this host: nothing to clash with
                continue
            return False
    return True


def free_port(host: str = "127.0.0.1", *, attempts: int = 200) -> int:
    """A port free on `host` (and the wildcards) outside the ranges the kernel and Ray assign from.

    Never the same port twice in one process. Another process that picks ports this way may still
    take the same one before it is bound; picking at random makes that unlikely.
    """
    low, high = RAY_WORKER_PORTS_END + 1, ephemeral_start() - 1
    if high - low >= MIN_RANGE:
        for _ in range(attempts):
            port = random.randint(low, high)
            if port not in _handed_out and port_is_free(port, host):
                _handed_out.add(port)
                return port
    with socket.socket() as sock:  # no room below the ephemeral range: the kernel's choice
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    _handed_out.add(port)
    return port
