"""The benchmark's `avatar-forcing serve-bench` command, registered under the
`avatar_forcing.commands` entry-point group (pyproject.toml); imported only when run."""

from __future__ import annotations


def serve_bench(argv: list[str]) -> int:
    """stage and end-to-end latency, concurrent real-time sessions, batching gain"""
    from bench.cli import main

    return main(argv)
