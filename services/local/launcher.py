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

From Python (integration tests, the client smoke test):

    with start_local(grpc_port=0) as service:         # 0: a free port
        AvatarClient(service.grpc_target, service.token)
        other = service.mint_token("globex")
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.common import auth
from services.common.config import PRESETS, Settings

DEFAULT_REDIS_URL = Settings.__dataclass_fields__["redis_url"].default  # redis://127.0.0.1:6379/0
DEFAULT_REDIS_PORT = 6379
APP_NAME = "avatar-forcing"
DEV_TENANT = "dev"
DEV_TOKEN_TTL_S = 24 * 3600.0
# Ray CPUs are scheduling units: the local app's five deployments ask for 0.5 each, so small
# machines get at least this many (the replicas share the real cores).
MIN_LOCAL_CPUS = 4
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
REPO_ROOT = Path(__file__).resolve().parents[2]  # the repository root (holds `services/`)

Log = Callable[[str], None]


class LauncherError(Exception):
    """A start-up problem the user can fix; `exit_code` is what `main` returns."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def _print(message: str) -> None:
    print(message, flush=True)


# --- Redis ----------------------------------------------------------------------------------------


def redact_url(url: str) -> str:
    """The URL with its password replaced by ***, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def is_default_local_url(url: str) -> bool:
    """True for the default local Redis (redis://127.0.0.1:6379 or localhost, any db, no credentials):
    the only URL the launcher may replace with a Redis of its own."""
    parts = urllib.parse.urlsplit(url)
    try:
        port = parts.port or DEFAULT_REDIS_PORT
    except ValueError:
        return False
    return (
        parts.scheme == "redis"
        and parts.hostname in LOCAL_HOSTS
        and port == DEFAULT_REDIS_PORT
        and parts.username is None
        and parts.password is None
    )


def redis_answers(url: str, timeout_s: float = 1.0) -> bool:
    """Whether a Redis answers PING at `url`. Wrong credentials are an error, not "no answer"."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
    except ValueError as exc:
        raise LauncherError(f"--redis-url {redact_url(url)}: {exc}", exit_code=2) from None
    try:
        return bool(client.ping())
    except redis.AuthenticationError as exc:
        raise LauncherError(f"Redis at {redact_url(url)} refused the credentials ({exc})", exit_code=2) from None
    except redis.ResponseError as exc:  # e.g. NOAUTH: it answers, but wants a password
        raise LauncherError(f"Redis at {redact_url(url)} answered with an error: {exc}", exit_code=2) from None
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the child gets SIGTERM when the launcher dies, even by SIGKILL (no orphaned Redis)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class LocalRedis:
    """A redis-server this process started: no persistence, bound to 127.0.0.1."""

    process: subprocess.Popen[bytes]
    port: int
    url: str
    data_dir: Path

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_redis_server(port: int | None = None, *, db: int = 0, timeout_s: float = 10.0) -> LocalRedis:
    """Start `redis-server` on 127.0.0.1:`port` (None: a free port) and wait until it answers."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise LauncherError(
            "no Redis answers and `redis-server` is not installed; install Redis "
            "(e.g. `apt-get install redis-server`) or pass --redis-url",
            exit_code=2,
        )
    port = free_port() if port is None else port
    data_dir = Path(tempfile.mkdtemp(prefix="avatar-forcing-redis-"))
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(data_dir), "--daemonize", "no"]
    log_path = data_dir / "redis.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the terminal reaches the launcher, which stops it in order
            preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
        )
    server = LocalRedis(process, port, f"redis://127.0.0.1:{port}/{db}", data_dir)
    deadline = time.monotonic() + timeout_s
    while not redis_answers(server.url, timeout_s=0.2):
        if process.poll() is not None or time.monotonic() > deadline:
            log = log_path.read_text(errors="replace")[-2000:] if log_path.exists() else ""
            server.stop()
            raise LauncherError(f"redis-server on port {port} did not start:\n{log}")
        time.sleep(0.05)
    return server


def ensure_redis(url: str, *, start_if_down: bool | None = None, log: Log = _print) -> tuple[str, LocalRedis | None]:
    """(the Redis URL to use, the LocalRedis started for it or None).

    A Redis answering at `url` is used as it is. Otherwise, when `start_if_down` (default: `url`
    is the default local URL), a redis-server is started on the URL's port if it is free, else on
    a free port; when not, LauncherError (exit status 2).
    """
    if redis_answers(url):
        return url, None
    if start_if_down is None:
        start_if_down = is_default_local_url(url)
    if not start_if_down:
        raise LauncherError(
            f"no Redis answers at {redact_url(url)} (from --redis-url or $REDIS_URL); start it, fix the URL, "
            f"or leave both unset to let the launcher start a local Redis",
            exit_code=2,
        )
    parts = urllib.parse.urlsplit(url)
    db = int(parts.path.strip("/") or 0) if parts.path.strip("/").isdigit() else 0
    wanted = parts.port or DEFAULT_REDIS_PORT
    port = wanted if port_is_free(wanted) else None
    server = start_redis_server(port, db=db)
    log(f"redis: nothing answered at {redact_url(url)}; started redis-server at {server.url} (no persistence)")
    return server.url, server


# --- the service ----------------------------------------------------------------------------------


def servicer_functions() -> list[str]:
    """Import paths of the five add_*Servicer_to_server functions, for Serve's gRPC proxy."""
    from services.wire.protos import SERVICES, servicer_function

    return [servicer_function(service) for service in SERVICES]


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


@dataclass
class LocalService:
    """The running local service. `stop()` (or leaving a `with` block) shuts everything down."""

    grpc_target: str  # e.g. 127.0.0.1:9000
    http_url: str  # e.g. http://127.0.0.1:8000
    health_url: str  # Serve's health route on the HTTP proxy
    token: str  # a token for the tenant `dev` (a credential: kept out of repr)
    redis_url: str
    config: str
    dev_secret: bool  # True: signed with this run's development secret
    _secret: str = field(repr=False)
    _redis: LocalRedis | None = field(default=None, repr=False)
    _own_ray: bool = field(default=False, repr=False)
    _restore_env: dict[str, str | None] = field(default_factory=dict, repr=False)
    _stopped: bool = field(default=False, repr=False)

    def __repr__(self) -> str:  # no token, no secret, no Redis password
        return (
            f"LocalService(grpc_target={self.grpc_target!r}, health_url={self.health_url!r}, "
            f"redis_url={redact_url(self.redis_url)!r}, config={self.config!r}, dev_secret={self.dev_secret})"
        )

    @property
    def started_redis(self) -> bool:
        return self._redis is not None

    def redis_alive(self) -> bool:
        return self._redis is None or self._redis.alive()

    def mint_token(self, tenant_id: str, ttl_s: float = auth.DEFAULT_TTL_S, *, scope: str | None = None) -> str:
        """A token for any tenant, signed with this service's secret (tests, demos)."""
        return auth.mint_token(tenant_id, self._secret, ttl_s, scope=scope)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        _shutdown(self._own_ray, self._redis, self._restore_env)

    def __enter__(self) -> LocalService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _shutdown(own_ray: bool, redis_server: LocalRedis | None, restore_env: dict[str, str | None]) -> None:
    try:
        if own_ray:
            import ray
            from ray import serve

            with contextlib.suppress(Exception):
                serve.shutdown()
            ray.shutdown()
    finally:
        if redis_server is not None:
            redis_server.stop()
        for name, value in restore_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _set_env(values: Mapping[str, str]) -> dict[str, str | None]:
    """Set environment variables (inherited by the Ray processes started next); returns the old values."""
    previous = {}
    for name, value in values.items():
        previous[name] = os.environ.get(name)
        os.environ[name] = value
    return previous


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


def _load_serve_config(path: Path, grpc_port: int | None, http_port: int | None) -> Any:
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


def _deploy_config(config: Any, timeout_s: float) -> None:
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


def _build_app(app_args: dict[str, Any]) -> Any:
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


def start_local(
    config: str | None = None,
    weights: str | Path | None = None,
    grpc_port: int | None = 9000,
    http_port: int | None = 8000,
    redis_url: str | None = None,
    num_cpus: int | None = None,
    serve_config: str | Path | None = None,
    *,
    auth_secret: str | None = None,
    token_ttl_s: float = DEV_TOKEN_TTL_S,
    ready_timeout_s: float = 600.0,
    app_args: dict[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    start_redis_if_down: bool | None = None,
    log: Log = _print,
) -> LocalService:
    """Start Redis (if needed), a local Ray, Serve's proxies and the application; returns when the
    gRPC and HTTP proxies answer. Ports of 0 pick free ones; with `serve_config`, None keeps the
    file's ports. `app_args` are further `services.app.build_app` arguments, `env` further
    environment for the replicas. On any failure what was started is stopped again."""
    preset = config or default_preset()
    if preset not in PRESETS:
        raise LauncherError(f"--config: got {preset!r}; expected one of {PRESETS}", exit_code=2)
    weights_dir = Path(weights) if weights is not None else None
    if weights_dir is not None and not weights_dir.is_dir():
        raise LauncherError(f"--weights {weights_dir}: no such directory", exit_code=2)
    try:
        secret = auth.check_secret(auth_secret).decode() if auth_secret else auth.auth_secret(allow_dev=True)
    except auth.AuthConfigError as exc:
        raise LauncherError(str(exc), exit_code=2) from None
    deploy = _load_serve_config(Path(serve_config), grpc_port, http_port) if serve_config is not None else None
    if deploy is None:
        grpc_port = grpc_port or free_port()
        http_port = http_port or free_port()

    url = redis_url or os.environ.get("REDIS_URL", "").strip() or DEFAULT_REDIS_URL
    url, redis_server = ensure_redis(url, start_if_down=start_redis_if_down, log=log)
    restore_env: dict[str, str | None] = {}
    own_ray = False
    try:
        # Inherited by the raylet and every replica: the services read the same values from the
        # environment that the Serve config files set (both names of the model settings are in use).
        replica_env = {
            "REDIS_URL": url,
            auth.SECRET_ENV: secret,
            "AF_MODEL_PRESET": preset,
            "AVATAR_FORCING_CONFIG": preset,
            "PYTHONPATH": os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p),
        }
        if weights_dir is not None:
            weights = str(weights_dir.resolve())
            replica_env |= {"AF_WEIGHTS_DIR": weights, "AVATAR_FORCING_WEIGHTS": weights}
        restore_env = _set_env(replica_env | dict(env or {}))

        import ray
        from ray import serve
        from ray.serve.config import HTTPOptions, gRPCOptions

        if not ray.is_initialized():
            cpus = num_cpus or max(os.cpu_count() or 1, MIN_LOCAL_CPUS)
            log(f"ray: starting a local cluster ({cpus} CPUs)")
            handlers = _keep_signal_handlers()
            ray.init(address="local", num_cpus=cpus, include_dashboard=False)
            own_ray = True
            _restore_handlers(handlers)  # Ctrl-C / SIGTERM keep unwinding this function, which cleans up
        if deploy is not None:
            log(f"serve: applying {serve_config}")
            _deploy_config(deploy, ready_timeout_s)
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
        _wait_grpc(grpc_target, 60.0)
        _wait_http(f"{http_url}/-/healthz", 60.0)
        return LocalService(
            grpc_target=grpc_target,
            http_url=http_url,
            health_url=f"{http_url}/-/healthz",
            token=auth.mint_token(DEV_TENANT, secret, token_ttl_s),
            redis_url=url,
            config=preset,
            dev_secret=auth.is_dev_secret(secret),
            _secret=secret,
            _redis=redis_server,
            _own_ray=own_ray,
            _restore_env=restore_env,
        )
    except BaseException:
        _shutdown(own_ray, redis_server, restore_env)
        raise


# --- command line ---------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="avatar-forcing serve",
        description="start Redis, a local Ray and the services; print the gRPC endpoint and a dev token",
    )
    parser.add_argument("--config", choices=PRESETS, help="model preset (default: tiny on CPU, paper with a GPU)")
    parser.add_argument("--weights", type=Path, help="directory made by `avatar-forcing convert` (default: random)")
    parser.add_argument("--grpc-port", type=int, default=None, help="Serve gRPC proxy port (default 9000)")
    parser.add_argument("--http-port", type=int, default=None, help="Serve HTTP proxy port (default 8000)")
    parser.add_argument("--redis-url", help=f"Redis (default: $REDIS_URL, else {DEFAULT_REDIS_URL})")
    parser.add_argument(
        "--num-cpus", type=int, help=f"CPUs Ray schedules with (default: the cores, at least {MIN_LOCAL_CPUS})"
    )
    parser.add_argument(
        "--serve-config", type=Path, help="apply this Serve config file instead (its ports, unless given)"
    )
    parser.add_argument(
        "--print-token", action="store_true", help=f"print a `{DEV_TENANT}` token with a set secret too"
    )
    return parser


def banner(service: LocalService, print_token: bool) -> str:
    lines = [
        f"avatar-forcing serve: ready (model {service.config})",
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
    lines.append("Ctrl-C stops the service.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    using_file = args.serve_config is not None

    def terminate(*_: object) -> None:
        raise _Terminated

    previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, terminate)}
    try:
        service = start_local(
            config=args.config,
            weights=args.weights,
            grpc_port=args.grpc_port if args.grpc_port is not None or using_file else 9000,
            http_port=args.http_port if args.http_port is not None or using_file else 8000,
            redis_url=args.redis_url,
            num_cpus=args.num_cpus,
            serve_config=args.serve_config,
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
