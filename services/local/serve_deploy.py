"""Ray Serve's side of the launcher: the gRPC servicer functions its proxy serves, loading and
applying a Serve config file (as `serve run config.yaml` does), and waiting until the gRPC and
HTTP proxies answer. Ray itself is started (or not) by `launcher.start_local`."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from services.local.errors import LauncherError


def servicer_functions() -> list[str]:
    """Import paths of the five add_*Servicer_to_server functions, for Serve's gRPC proxy."""
    from services.wire.protos import SERVICES, servicer_function

    return [servicer_function(service) for service in SERVICES]


def load_serve_config(path: Path, grpc_port: int | None, http_port: int | None) -> Any:
    """The Serve config at `path` (a ServeDeploySchema), its ports replaced by those given (None: the
    file's), and the five servicer functions when it names none."""
    import yaml
    from ray.serve.schema import ServeDeploySchema

    if not path.is_file():
        raise LauncherError(f"--serve-config {path}: file not found", exit_code=2)
    try:
        config = ServeDeploySchema.model_validate(yaml.safe_load(path.read_text()))
    except Exception as exc:  # yaml and pydantic errors name the line / field
        raise LauncherError(f"--serve-config {path}: not a Serve config ({exc})", exit_code=2) from None
    if grpc_port is not None:
        config.grpc_options.port = grpc_port
    if http_port is not None:
        config.http_options.port = http_port
    if not config.grpc_options.grpc_servicer_functions:
        config.grpc_options.grpc_servicer_functions = servicer_functions()
    return config


def deploy_config(config: Any, timeout_s: float) -> None:
    """Apply a Serve config (as `serve run config.yaml` does) and wait for its applications."""
    from ray import serve
    from ray.serve._private import api as serve_api
    from ray.serve.config import gRPCOptions
    from ray.serve.schema import ApplicationStatus

    client = serve_api.serve_start(
        http_options=config.http_options.model_dump(),
        grpc_options=gRPCOptions(**config.grpc_options.model_dump()),
        proxy_location=config.proxy_location,
    )
    client.deploy_apps(config, _blocking=False)
    names = {app.name for app in config.applications}
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        statuses = {name: apps[name] for name in names if name in apps}
        failed = {n: s for n, s in statuses.items() if s.status == ApplicationStatus.DEPLOY_FAILED}
        if failed:
            detail = "; ".join(f"{name}: {s.message}" for name, s in failed.items())
            raise LauncherError(f"deploying the Serve config failed: {detail}")
        if len(statuses) == len(names) and all(s.status == ApplicationStatus.RUNNING for s in statuses.values()):
            return
        if time.monotonic() > deadline:
            raise LauncherError(f"the Serve applications {sorted(names)} were not running after {timeout_s:.0f} s")
        time.sleep(0.5)


def wait_ready(grpc_target: str, health_url: str, timeout_s: float = 60.0) -> None:
    """Until Serve's gRPC proxy accepts connections and its HTTP health route answers 200."""
    _wait_grpc(grpc_target, timeout_s)
    _wait_http(health_url, timeout_s)


def _wait_http(url: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise LauncherError(f"Serve's HTTP proxy did not answer at {url} within {timeout_s:.0f} s")
        time.sleep(0.2)


def _wait_grpc(target: str, timeout_s: float) -> None:
    import grpc

    with grpc.insecure_channel(target) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise LauncherError(f"Serve's gRPC proxy did not answer at {target} within {timeout_s:.0f} s") from None
