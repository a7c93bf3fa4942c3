"""Fixed values of the local launcher shared by start-up and the command line: the application's
name, the proxies' default ports, the development tenant and its token lifetime, the CPU floor of a
local Ray, the repository root."""

from __future__ import annotations

from pathlib import Path

APP_NAME = "avatar-forcing"
DEFAULT_GRPC_PORT = 9000  # Serve's gRPC proxy, as in deploy/serve/config.yaml
DEFAULT_HTTP_PORT = 8000
DEFAULT_GATEWAY_PORT = 8080  # the gateway (services.gateway), beside Serve's HTTP proxy
DEV_TENANT = "dev"
DEV_TOKEN_TTL_S = 24 * 3600.0
# Ray CPUs are scheduling units: the local app's five deployments ask for 0.5 each, so small
# machines get at least this many (the replicas share the real cores).
MIN_LOCAL_CPUS = 4
REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository root (holds `services/`)
