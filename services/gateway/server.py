"""Running the gateway: `python -m services.gateway` (uvicorn), or `serve_gateway` from Python.

    handle = serve_gateway(GatewaySettings.from_env(), host="127.0.0.1", port=0)   # 0: a free port
    print(handle.url)                                                              # http://127.0.0.1:PORT
    handle.stop()

`serve_gateway` runs uvicorn in a thread of this process and returns once it listens; the local
launcher (`services/local/launcher.py`) can start the gateway beside the Serve application with it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import uvicorn

from services.gateway.app import create_app
from services.gateway.logs import configure_logging
from services.gateway.settings import GatewaySettings

START_TIMEOUT_S = 30.0


@dataclass
class GatewayHandle:
    """A gateway running in a thread: its URL, and `stop()`."""

    host: str
    port: int
    server: uvicorn.Server = field(repr=False)
    thread: threading.Thread = field(repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self, timeout_s: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout_s)

    def __enter__(self) -> GatewayHandle:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def serve_gateway(settings: GatewaySettings, host: str = "127.0.0.1", port: int = 0, **app_parts: Any) -> GatewayHandle:
    """Start the gateway (uvicorn, one worker) in a daemon thread on host:port (0: a free port);
    returns when it accepts connections. `app_parts` go to `create_app` (encoder=..., ...)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(
        create_app(settings, **app_parts), log_config=None, access_log=False, lifespan="on", timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve(sockets=[sock])), name="gateway", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"gateway: uvicorn did not start on {host}:{bound_port}")
        time.sleep(0.02)
    return GatewayHandle(host, bound_port, server, thread)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.gateway", description="the gateway (FastAPI, uvicorn)")
    parser.add_argument("--host", help="default $AF_GATEWAY_HOST or 127.0.0.1")
    parser.add_argument("--port", type=int, help="default $AF_GATEWAY_PORT or 8080")
    args = parser.parse_args(argv)
    configure_logging()
    try:
        settings = GatewaySettings.from_env()
    except (ValueError, RuntimeError) as exc:  # AuthConfigError is a RuntimeError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    host = args.host or settings.host
    port = settings.port if args.port is None else args.port
    logging.getLogger("services.gateway").info("gateway starting", extra={"event": "start", "host": host, "port": port})
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)
    return 0
