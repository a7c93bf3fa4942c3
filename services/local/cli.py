"""What `avatar-forcing serve` shows: its options and the banner printed once the service is up
(endpoints, where Redis is, how tokens are signed, a dev token when there is one). Running the
command - start, wait for Ctrl-C, stop - is `launcher.main`."""

from __future__ import annotations

import argparse
from pathlib import Path

from services.common import auth
from services.common.config import PRESETS
from services.local.defaults import (
    DEFAULT_GATEWAY_PORT,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEV_TENANT,
    DEV_TOKEN_TTL_S,
    MIN_LOCAL_CPUS,
)
from services.local.gateway import DEMO_TENANT
from services.local.redis_process import DEFAULT_REDIS_URL, redact_url
from services.local.service import LocalService


def build_parser() -> argparse.ArgumentParser:
    """The options of `avatar-forcing serve`; ports left None here get the defaults in `main`."""
    parser = argparse.ArgumentParser(
        prog="avatar-forcing serve",
        description="start Redis, a local Ray and the services; print the gRPC endpoint and a dev token",
    )
    parser.add_argument("--config", choices=PRESETS, help="model preset (default: tiny on CPU, paper with a GPU)")
    parser.add_argument(
        "--weights", type=Path, help="weights folder (default: tiny: an installed demo model; else random)"
    )
    parser.add_argument("--random-init", action="store_true", help="random weights (smoke runs only)")
    parser.add_argument(
        "--grpc-port", type=int, default=None, help=f"Serve gRPC proxy port (default {DEFAULT_GRPC_PORT})"
    )
    parser.add_argument(
        "--http-port", type=int, default=None, help=f"Serve HTTP proxy port (default {DEFAULT_HTTP_PORT})"
    )
    parser.add_argument("--redis-url", help=f"Redis (default: $REDIS_URL, else {DEFAULT_REDIS_URL})")
    parser.add_argument(
        "--num-cpus", type=int, help=f"CPUs Ray schedules with (default: the cores, at least {MIN_LOCAL_CPUS})"
    )
    parser.add_argument(
        "--serve-config", type=Path, help="apply this Serve config file instead (its ports, unless given)"
    )
    parser.add_argument(
        "--no-warm-up",
        action="store_true",
        help="say ready without running the warm-up sessions first (the first session then pays first-call costs)",
    )
    parser.add_argument(
        "--gateway-port",
        type=int,
        default=DEFAULT_GATEWAY_PORT,
        help=f"the gateway's HTTP port (default {DEFAULT_GATEWAY_PORT}; 0: a free port)",
    )
    parser.add_argument("--no-gateway", action="store_true", help="run the serving stack without the gateway")
    parser.add_argument(
        "--print-token", action="store_true", help=f"print a `{DEV_TENANT}` token with a set secret too"
    )
    return parser


def banner(service: LocalService, print_token: bool) -> str:
    """The ready message; it shows the dev token (never the secret) and hides Redis passwords."""
    lines = [
        f"avatar-forcing serve: ready (model {service.config}, weights: {service.weights})",
        f"  gRPC    {service.grpc_target}   (AvatarSession.Stream and the stage services)",
        f"  health  {service.health_url}",
        f"  redis   {redact_url(service.redis_url)}"
        + ("   (started by this launcher, no persistence)" if service.started_redis else ""),
    ]
    if service.dev_secret:
        lines.append(
            f"  auth    {auth.SECRET_ENV} is not set: using a random DEVELOPMENT secret for this run "
            "(local use only; its tokens end with the run)"
        )
    else:
        lines.append(f"  auth    tokens signed with {auth.SECRET_ENV}")
    if service.dev_secret or print_token:
        lines.append(f"  token   {service.token}")
        lines.append(f"          (tenant {DEV_TENANT!r}, valid {DEV_TOKEN_TTL_S / 3600:.0f} h)")
        lines.append(
            f"  try     avatar-forcing client --target {service.grpc_target} --token <token> "
            "--portrait samples/portrait.png --avatar-audio samples/avatar_speech.wav "
            "--user-video samples/user.mp4 --out out/live.mp4 --realtime"
        )
    else:
        lines.append("  token   mint one: python -m services.common.auth --tenant dev (or pass --print-token)")
    gateway = service.gateway
    if gateway is not None:
        lines.append(f"  gateway {gateway.url}   (API: {gateway.url}/docs, {gateway.url}/openapi.json)")
        if gateway.admin_token_generated:
            lines.append(f"  admin   {gateway.admin_token}")
            lines.append("          (random for this run; set AF_GATEWAY_ADMIN_TOKEN to keep one)")
        else:
            lines.append("  admin   the token in AF_GATEWAY_ADMIN_TOKEN")
        lines.append(f"  demo    tenant {DEMO_TENANT!r}, API key {gateway.demo_api_key}")
        lines.append(
            f"  upload  curl -H 'Authorization: Bearer <API key>' -F portrait=@samples/portrait.png "
            f"{gateway.url}/v1/avatars"
        )
    lines.append("Ctrl-C stops the service.")
    return "\n".join(lines)
