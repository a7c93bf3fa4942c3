"""`avatar-forcing serve`: the whole service on one machine - Redis, a local Ray, Serve's gRPC and
HTTP proxies and the application - started with one command and stopped with Ctrl-C.

    avatar-forcing serve                          # tiny model on CPU, paper with a GPU
    avatar-forcing serve --config paper --weights weights/
    avatar-forcing serve --serve-config deploy/serve/config.cpu.yaml

Redis: --redis-url, else $REDIS_URL, else redis://127.0.0.1:6379/0. When the default local URL
does not answer, the launcher starts its own `redis-server` (no persistence) on 6379 when that
port is free, else on a free port, and stops it on exit. Any other URL must answer, or the
launcher stops with exit status 2: it never hides a misconfigured Redis behind a private one.

Auth: tokens are signed with $AVATAR_FORCING_AUTH_SECRET. Without it the launcher uses a random
development secret for this run (printed as such; its tokens die with the run) and prints a
token for the tenant `dev`.

Ready means real time from the first session: before it returns, `start_local` streams the sample
media through the proxy (`warmup`; `--no-warm-up` skips it), and Ray's workers run at niceness 0
rather than Ray's 15, so the replicas are not starved by the client or any other nice-0 process.

This module starts things in order (`start_local`) and runs the command (`main`). The parts:
`redis_process` (which Redis, a private redis-server), `serve_deploy` (Serve configs, readiness),
`warmup` (the warm-up sessions),
`service` (LocalService and stopping it), `cli` (options and banner), `defaults`, `errors`.

From Python (integration tests, the client smoke test):

    with start_local(grpc_port=0) as service:         # 0: a free port
        AvatarClient(service.grpc_target, service.token)
        other = service.mint_token("globex")
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from services.common import auth
from services.common.config import PRESETS
from services.local.cli import banner, build_parser
from services.local.defaults import (
    APP_NAME,
    DEFAULT_GRPC_PORT,
    DEFAULT_HTTP_PORT,
    DEV_TENANT,
    DEV_TOKEN_TTL_S,
    MIN_LOCAL_CPUS,
    REPO_ROOT,
)
from services.local.errors import LauncherError, Log, print_progress
from services.local.gateway import LocalGateway, start_gateway
from services.local.ports import free_port
from services.local.ray_start import init_local_ray
from services.local.redis_process import DEFAULT_REDIS_URL, ensure_redis
from services.local.serve_deploy import deploy_config, load_serve_config, servicer_functions, wait_ready
from services.local.service import LocalService, set_env, shutdown
from services.local.warmup import WARMUP_TENANT, warm_up


def default_preset(environ: Mapping[str, str] | None = None) -> str:
    """$AF_MODEL_PRESET, else `paper` with a CUDA GPU and `tiny` without."""
    env = os.environ if environ is None else environ
    preset = env.get("AF_MODEL_PRESET", "").strip()
    if preset:
        return preset
    try:
        import torch

        return "paper" if torch.cuda.is_available() else "tiny"
    except ImportError:  # pragma: no cover - torch is a dependency
        return "tiny"


def _build_app(app_args: dict[str, Any]) -> Any:
    # Imported on use: the application pulls in the models, which a failed start never needs.
    try:
        from services.serve_app import build_app
    except ImportError as exc:
        raise LauncherError(f"services.app.build_app cannot be imported ({exc})") from None
    return build_app(app_args)


class _Terminated(BaseException):
    """SIGTERM while starting: unwinds start_local, which stops what it started."""


def _keep_signal_handlers() -> dict[int, Any]:
    """The Python signal handlers of the main thread (ray.init installs its own; see _restore_handlers)."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


def _restore_handlers(handlers: Mapping[int, Any]) -> None:
    for sig, handler in handlers.items():
        if handler is not None:
            signal.signal(sig, handler)


def replica_environment(
    redis_url: str, secret: str, preset: str, weights_dir: Path | None, environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment the launcher sets before starting Ray: inherited by the raylet and every
    replica, which read the same values from it that the Serve config files set (both names of
    the model settings are in use)."""
    environ = os.environ if environ is None else environ
    values = {
        "REDIS_URL": redis_url,
        auth.SECRET_ENV: secret,
        "AF_MODEL_PRESET": preset,
        "AVATAR_FORCING_CONFIG": preset,
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), environ.get("PYTHONPATH", "")) if p),
    }
    # Ray starts its workers - every replica and the proxies - at niceness 15 by default, so that
    # they yield to Ray's own processes. On a shared machine that starved the replicas: any nice-0
    # process (the client itself, a test run) got ~30x their CPU share and blocks ran 2-3x late.
    # A local service is the foreground work: its replicas run at the default priority.
    if "RAY_worker_niceness" not in environ:
        values["RAY_worker_niceness"] = "0"
    if weights_dir is not None:
        weights = str(weights_dir.resolve())
        values |= {"AF_WEIGHTS_DIR": weights, "AVATAR_FORCING_WEIGHTS": weights}
    return values


def choose_weights(preset: str, weights: str | Path | None, random_init: bool) -> Path | None:
    """The folder the replicas load, or None for random weights: `weights` when given; else, for
    the tiny preset, an installed demo model (`build-demo --install`) unless `random_init`."""
    if weights is not None:
        return Path(weights)
    from avatar_forcing.synthetic.demo_model import weights_dir as demo_weights

    if preset == "tiny" and not random_init and (demo_weights() / "model.safetensors").is_file():
        return demo_weights()
    return None


def describe_weights(weights_dir: Path | None) -> str:
    """For the ready banner: "demo model", the folder, or "random"."""
    from avatar_forcing.synthetic.demo_model import weights_dir as demo_weights

    if weights_dir is None:
        return "random"
    return "demo model" if weights_dir.resolve() == demo_weights().resolve() else str(weights_dir)


def start_local(
    config: str | None = None,
    weights: str | Path | None = None,
    grpc_port: int | None = DEFAULT_GRPC_PORT,
    http_port: int | None = DEFAULT_HTTP_PORT,
    redis_url: str | None = None,
    num_cpus: int | None = None,
    serve_config: str | Path | None = None,
    *,
    auth_secret: str | None = None,
    token_ttl_s: float = DEV_TOKEN_TTL_S,
    ready_timeout_s: float = 600.0,
    gateway_port: int | None = None,
    gateway_admin_token: str | None = None,
    warm: bool = True,
    app_args: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    start_redis_if_down: bool | None = None,
    random_init: bool = False,
    log: Log = print_progress,
) -> LocalService:
    """Start Redis (if needed), a local Ray, Serve's proxies and the application; returns when the
    gRPC and HTTP proxies answer. Ports of 0 pick free ones; with `serve_config`, None keeps the
    file's ports. `warm`: run the warm-up sessions (`services.local.warmup`) before returning.
    `app_args` are further `services.app.build_app` arguments, `env` further
    environment for the replicas. `gateway_port` (0: a free one): also run the gateway there, with
    a demo tenant (`services.local.gateway`); `gateway_admin_token` None: AF_GATEWAY_ADMIN_TOKEN, else
    a random one. Without `weights`, the tiny preset serves an installed demo model
    (`avatar_forcing.synthetic.demo_model`) unless `random_init`; other presets random weights.
    On any failure what was started is stopped again."""
    preset = config or default_preset()
    if preset not in PRESETS:
        raise LauncherError(f"--config: got {preset!r}; expected one of {PRESETS}", exit_code=2)
    weights_dir = choose_weights(preset, weights, random_init)
    if weights_dir is not None and not weights_dir.is_dir():
        raise LauncherError(f"--weights {weights_dir}: no such directory", exit_code=2)
    try:
        secret = auth.check_secret(auth_secret).decode() if auth_secret else auth.auth_secret(allow_dev=True)
    except auth.AuthConfigError as exc:
        raise LauncherError(str(exc), exit_code=2) from None
    deploy = load_serve_config(Path(serve_config), grpc_port, http_port) if serve_config is not None else None
    if deploy is None:
        grpc_port = grpc_port or free_port()
        http_port = http_port or free_port()

    url = redis_url or os.environ.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL
    url, redis_server = ensure_redis(url, start_if_down=start_redis_if_down, log=log)
    restore_env: dict[str, str | None] = {}
    own_ray = False
    gateway: LocalGateway | None = None
    try:
        replica_env = replica_environment(url, secret, preset, weights_dir)
        restore_env = set_env(replica_env | dict(env or {}))

        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions

        if not ray.is_initialized():
            cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)
            log(f"ray: starting a local cluster ({cpus} CPUs)")
            handlers = _keep_signal_handlers()
            init_local_ray(address="local", num_cpus=cpus, include_dashboard=False)
            own_ray = True
            _restore_handlers(handlers)  # Ctrl-C / SIGTERM keep unwinding this function, which cleans up
        if deploy is not None:
            log(f"serve: applying {serve_config}")
            deploy_config(deploy, ready_timeout_s)
            grpc_port, http_port = deploy.grpc_options.port, deploy.http_options.port
        else:
            serve.start(
                http_options=HTTPOptions(host="127.0.0.1", port=http_port),
                grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=servicer_functions()),
            )
            args = {
                "config": preset,
                "weights": str(weights_dir.resolve()) if weights_dir is not None else None,
                "redis_url": url,
                **(app_args or {}),
            }  # the secret reaches the replicas through the environment, never as a deployment argument
            log(f"serve: deploying {APP_NAME} (model {preset}; this loads the models)")
            serve.run(_build_app(args), name=APP_NAME, route_prefix="/")
        grpc_target = f"127.0.0.1:{grpc_port}"
        http_url = f"http://127.0.0.1:{http_port}"
        wait_ready(grpc_target, f"{http_url}/-/healthz", 60.0)
        if warm:
            # Ready means a session meets real time from its first block: run real ones first.
            warm_up(grpc_target, auth.mint_token(WARMUP_TENANT, secret, 600.0), log)
        if gateway_port is not None:
            log("gateway: starting")
            prefix = (app_args or {}).get("redis_prefix")
            gateway = start_gateway(
                secret, grpc_target, url, prefix, port=gateway_port, admin_token=gateway_admin_token
            )
        return LocalService(
            grpc_target=grpc_target,
            http_url=http_url,
            health_url=f"{http_url}/-/healthz",
            token=auth.mint_token(DEV_TENANT, secret, token_ttl_s),
            redis_url=url,
            config=preset,
            dev_secret=auth.is_dev_secret(secret),
            weights=describe_weights(weights_dir),
            _secret=secret,
            _redis=redis_server,
            _own_ray=own_ray,
            _restore_env=restore_env,
            _gateway=gateway,
        )
    except BaseException:
        if gateway is not None:
            gateway.stop()
        shutdown(own_ray, redis_server, restore_env)
        raise


def main(argv: list[str] | None = None) -> int:
    """`avatar-forcing serve`: start the service, print the banner, run until Ctrl-C / SIGTERM (or
    until the Redis it started dies), then stop everything; returns the exit status."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    using_file = args.serve_config is not None

    def terminate(*_: object) -> None:
        raise _Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    try:
        service = start_local(
            config=args.config,
            weights=args.weights,
            random_init=args.random_init,
            grpc_port=args.grpc_port if args.grpc_port is not None or using_file else DEFAULT_GRPC_PORT,
            http_port=args.http_port if args.http_port is not None or using_file else DEFAULT_HTTP_PORT,
            redis_url=args.redis_url,
            num_cpus=args.num_cpus,
            serve_config=args.serve_config,
            warm=not args.no_warm_up,
            gateway_port=None if args.no_gateway else args.gateway_port,
        )
    except LauncherError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _Terminated:
        print("terminated", file=sys.stderr)
        return 143
    finally:
        _restore_handlers(previous)

    exit_code = 0
    stop = threading.Event()
    handlers = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        print(banner(service, args.print_token), flush=True)
        while not stop.wait(1.0):
            if not service.redis_alive():
                print("error: the redis-server started by the launcher exited; stopping", file=sys.stderr)
                exit_code = 1
                break
    finally:
        print("stopping ...", file=sys.stderr, flush=True)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        service.stop()
    print("stopped", file=sys.stderr)
    return exit_code


if __name__ == "__main__":
    raise SystemExit(main())
