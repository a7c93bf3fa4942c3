"""The services' `avatar-forcing` commands, registered under the `avatar_forcing.commands`
entry-point group (pyproject.toml). Each wrapper imports its module only when run, so listing
the commands (`avatar-forcing --help`) does not load Ray or gRPC."""

from __future__ import annotations


def serve(argv: list[str]) -> int:
    """start Ray, Redis and the services locally; print the gRPC endpoint"""
    from services.local.launcher import main

    return main(argv)


def client(argv: list[str]) -> int:
    """stream a portrait + audio + user video through a server"""
    from services.client.cli import main

    return main(argv)
