"""Gateway latency under a bounded local load: p50/p95 of session create and avatar upload.

    python -m bench.gateway_load                       # 8 users for 30 s, loopback only
    python -m bench.gateway_load --users 4 --duration 20 --serve-target 127.0.0.1:9000

Starts the gateway (uvicorn on 127.0.0.1, a free port) on real Redis under a private key prefix,
seeds a tenant (quotas high enough not to limit), an API key and one avatar, then runs Locust
headless in a subprocess (`bench/gateway_locustfile.py`) against it and prints a markdown table
from Locust's statistics. Portraits are encoded by the real MotionEncoder servicer in the gateway
process (tiny preset, random weights) unless `--serve-target` names a running Serve stack's gRPC
proxy (then `AVATAR_FORCING_AUTH_SECRET` must be that stack's secret). Everything the run wrote to
Redis is deleted afterwards.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = REPO / "bench" / "gateway_locustfile.py"
PORTRAIT = REPO / "samples" / "portrait.png"
MEASURED = ("session create", "avatar upload", "session stop")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway_load", description=__doc__.split("\n")[0])
    parser.add_argument("--users", type=int, default=8, help="concurrent Locust users (default 8)")
    parser.add_argument("--duration", type=int, default=30, help="seconds of load (default 30)")
    parser.add_argument("--redis-url", default=os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
    parser.add_argument("--serve-target", help="Serve's gRPC proxy to encode with (default: in-process encoder)")
    parser.add_argument("--serve-app", default="avatar-forcing")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 1 <= args.users <= 64 or not 1 <= args.duration <= 600:
        print("error: --users in [1, 64] and --duration in [1, 600] (a bounded local load)", file=sys.stderr)
        return 2
    from services.common.config import Settings
    from services.gateway import GatewaySettings, serve_gateway
    from services.gateway.encoder import InProcessEncoder
    from services.store import SessionStore
    from services.store.inspection import delete_namespace

    prefix = f"gwload-{uuid.uuid4().hex[:8]}"
    admin = secrets.token_urlsafe(32)
    secret = os.environ.get("AVATAR_FORCING_AUTH_SECRET") or secrets.token_hex(32)
    settings = GatewaySettings(
        admin_token=admin,
        auth_secret=secret,
        service=Settings(redis_url=args.redis_url, redis_prefix=prefix, replica_id="gateway-load"),
        serve_target=args.serve_target or "127.0.0.1:1",
        serve_app=args.serve_app,
    )
    parts = {}
    if not args.serve_target:
        store = SessionStore.from_settings(settings.service)
        parts = {"store": store, "encoder": InProcessEncoder(store)}
    print(f"gateway: starting (prefix {prefix})", file=sys.stderr)
    handle = serve_gateway(settings, port=0, **parts)
    try:
        headers = {"Authorization": f"Bearer {admin}"}
        with httpx.Client(base_url=handle.url, timeout=60) as c:
            quotas = {"max_concurrent_sessions": 10_000, "requests_per_minute": 1_000_000}
            c.post("/v1/tenants", json={"tenant_id": "load", "quotas": quotas}, headers=headers).raise_for_status()
            key = c.post("/v1/tenants/load/keys", json={"name": "load"}, headers=headers).json()["api_key"]
            files = {"portrait": ("portrait.png", PORTRAIT.read_bytes(), "image/png")}
            c.post("/v1/avatars", files=files, data={"avatar_id": "load"},
                   headers={"Authorization": f"Bearer {key}"}).raise_for_status()  # fmt: skip
        with tempfile.TemporaryDirectory() as tmp:
            env = os.environ | {"AF_LOAD_API_KEY": key, "AF_LOAD_AVATAR_ID": "load", "AF_LOAD_PORTRAIT": str(PORTRAIT)}
            command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", handle.url,
                       "-u", str(args.users), "-r", str(args.users), "-t", f"{args.duration}s",
                       "--csv", f"{tmp}/load", "--only-summary", "--loglevel", "WARNING"]  # fmt: skip
            print(f"locust: {args.users} users for {args.duration} s against {handle.url}", file=sys.stderr)
            subprocess.run(command, env=env, check=False, stdout=subprocess.DEVNULL)
            with open(f"{tmp}/load_stats.csv") as stats:
                rows = {row["Name"]: row for row in csv.DictReader(stats)}
        encoder = f"Serve at {args.serve_target}" if args.serve_target else "in-process MotionEncoder (tiny)"
        print(f"\n### Gateway latency: {args.users} users, {args.duration} s, loopback; encoder: {encoder}\n")
        print("| request | count | failures | p50 ms | p95 ms | p99 ms | req/s |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name in MEASURED:
            row = rows.get(name)
            if row is None:
                print(f"| {name} | 0 | - | - | - | - | - |")
                continue
            print(f"| {name} | {row['Request Count']} | {row['Failure Count']} | {row['50%']} | {row['95%']} | "
                  f"{row['99%']} | {float(row['Requests/s']):.1f} |")  # fmt: skip
        return 0
    finally:
        handle.stop()
        delete_namespace(args.redis_url, prefix)


if __name__ == "__main__":
    raise SystemExit(main())
