"""The bridge worker: consumes the gateway's dispatch orders and holds many sessions.

Orders come from the Redis stream P:bridge:dispatch through the consumer group "bridges"
(`SessionStore.read_dispatch` / `ack_dispatch`; the contract is services.gateway.livekit's):
- join: a session not yet held and not expired (`expires_ms`) starts a `BridgeSession` in its
  own task; the order is acked once the room join has been tried (joined or failed: an order
  that cannot be carried out is not handed to another worker forever). A join for a session
  already held is acked and ignored (orders are idempotent).
- leave: the session, if held, is stopped; acked either way.
The worker reads only as many orders as it has free session slots (`max_sessions`), so a full
worker leaves orders to the others of the group. Orders a worker read but never acked (it died)
stay pending in the group: every `claim_interval_s`, a worker with free slots claims those idle
for `claim_idle_ms` (`SessionStore.claim_dispatch`, XAUTOCLAIM) and carries them out like new
ones (an expired join is dropped and acked). `claim_idle_ms` is longer than a live worker can hold
an order unacked (`JOIN_ACK_TIMEOUT_S`), so only orders of dead workers are taken over.
Each session is independent: one failing does not touch the others; its room, tasks and buffers are freed when it ends.

`/healthz` (and `/metrics`, Prometheus text) on `port` for probes.

SIGTERM (`__main__`): the worker stops reading, ends every session it holds (`worker_stopped`:
playback reports, end of input, tracks unpublished, room left; a few seconds each, in parallel)
and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.bridge.backend import GrpcBackend, JoinOrder, SessionBackend
from services.bridge.room import Room
from services.bridge.runner import BridgeSession, BridgeSettings

log = logging.getLogger("services.bridge")
JOIN_ACK_TIMEOUT_S = 30.0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise ValueError(f"{name}: got {value!r}; expected an integer") from None


@dataclass
class WorkerSettings:
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "af"
    bridge_id: str = field(default_factory=lambda: f"bridge-{socket.gethostname()}-{os.getpid()}")
    max_sessions: int = 8
    port: int = 8095
    host: str = "0.0.0.0"
    block_ms: int = 1000  # a blocking read of orders; 0: poll every 0.2 s
    claim_idle_ms: int = 60_000  # take over orders pending this long (a dead worker's); 0: never
    claim_interval_s: float = 5.0
    grpc_target: str = ""  # where sessions stream (Serve's gRPC proxy); "": the order's grpc_target

    @classmethod
    def from_env(cls) -> WorkerSettings:
        default = cls()
        return cls(
            redis_url=os.environ.get("REDIS_URL", default.redis_url),
            redis_prefix=os.environ.get("AF_REDIS_PREFIX", default.redis_prefix),
            bridge_id=os.environ.get("AF_BRIDGE_ID", "") or default.bridge_id,
            max_sessions=_env_int("AF_BRIDGE_MAX_SESSIONS", default.max_sessions),
            port=_env_int("AF_BRIDGE_PORT", default.port),
            host=os.environ.get("AF_BRIDGE_HOST", default.host),
            claim_idle_ms=_claim_idle_ms(),
            grpc_target=os.environ.get("AF_BRIDGE_GRPC_TARGET", "").strip(),
        )


def _claim_idle_ms() -> int:
    value = _env_int("AF_BRIDGE_CLAIM_IDLE_MS", WorkerSettings.claim_idle_ms)
    if 0 < value <= JOIN_ACK_TIMEOUT_S * 1000:  # a live worker's order in its join would be taken
        least = int(JOIN_ACK_TIMEOUT_S * 1000)
        raise ValueError(f"AF_BRIDGE_CLAIM_IDLE_MS: got {value}; expected 0 (never) or more than {least}")
    return value


def livekit_room(order: JoinOrder) -> Room:
    from services.bridge.livekit_room import LiveKitRoom

    return LiveKitRoom(order.livekit_url, order.bridge_token)


class BridgeWorker:
    def __init__(
        self,
        store: Any,
        settings: WorkerSettings,
        *,
        room_factory: Callable[[JoinOrder], Room] = livekit_room,
        backend: SessionBackend | None = None,
        session_settings: BridgeSettings | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.room_factory = room_factory
        self.backend = backend or GrpcBackend()
        self.session_settings = session_settings or BridgeSettings()
        self.sessions: dict[str, tuple[BridgeSession, asyncio.Task[str]]] = {}
        self.counters: Counter[str] = Counter()
        self.ended: Counter[str] = Counter()
        self._stopping = asyncio.Event()
        self.ready = False

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.max_sessions - len(self.sessions))

    async def run(self) -> None:
        await self.store.ensure_dispatch_group()
        self.ready = True
        loop = asyncio.get_running_loop()
        next_claim = loop.time()  # at start too: a restarted worker takes over what its old self held
        try:
            while not self._stopping.is_set():
                if not self.free_slots:
                    await asyncio.sleep(0.2)
                    continue
                try:
                    orders = []
                    if self.settings.claim_idle_ms > 0 and loop.time() >= next_claim:
                        next_claim = loop.time() + self.settings.claim_interval_s
                        orders = await self.store.claim_dispatch(
                            self.settings.bridge_id, self.settings.claim_idle_ms, count=self.free_slots
                        )
                        self.counters["orders_claimed"] += len(orders)
                    if not orders:
                        orders = await self.store.read_dispatch(
                            self.settings.bridge_id, count=self.free_slots, block_ms=self.settings.block_ms or None
                        )
                except Exception as exc:  # Redis down: retry, keep the sessions running
                    self.counters["dispatch_errors"] += 1
                    log.warning("bridge %s: reading dispatch failed: %r", self.settings.bridge_id, exc)
                    await asyncio.sleep(1.0)
                    with contextlib.suppress(Exception):  # the stream or group may be gone (Redis flushed)
                        await self.store.ensure_dispatch_group()
                    continue
                for entry_id, action, order in orders:
                    await self.handle(entry_id, action, order)
                if not orders and not self.settings.block_ms:  # polling (no blocking read)
                    await asyncio.sleep(0.2)
        finally:
            self.ready = False

    async def handle(self, entry_id: str, action: str, order: dict[str, Any]) -> None:
        self.counters[f"orders_{action}"] += 1
        try:
            if action == "join":
                await self._join(order)
            elif action == "leave":
                held = self.sessions.get(str(order.get("session_id", "")))
                if held is not None:
                    held[0].stop(f"left: {order.get('reason', 'stopped')}")
        except Exception as exc:
            self.counters["order_errors"] += 1
            log.warning("bridge %s: order %s failed: %r", self.settings.bridge_id, entry_id, exc)
        finally:
            with contextlib.suppress(Exception):
                await self.store.ack_dispatch(entry_id)

    async def _join(self, raw: dict[str, Any]) -> None:
        if self.settings.grpc_target:
            raw = {**raw, "grpc_target": self.settings.grpc_target}
        order = JoinOrder.from_order(raw)
        if order.session_id in self.sessions:
            return
        if order.expired():
            self.counters["joins_expired"] += 1
            return
        session = BridgeSession(self.room_factory(order), self.backend, order, self.session_settings)
        task = asyncio.create_task(session.run(), name=f"bridge-session-{order.session_id}")
        self.sessions[order.session_id] = (session, task)
        self.counters["sessions_started"] += 1
        task.add_done_callback(lambda t, sid=order.session_id: self._session_done(sid, t))
        joined = asyncio.ensure_future(session.joined.wait())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.wait({joined, task}, return_when=asyncio.FIRST_COMPLETED), JOIN_ACK_TIMEOUT_S
            )
        joined.cancel()

    def _session_done(self, session_id: str, task: asyncio.Task[str]) -> None:
        self.sessions.pop(session_id, None)
        if task.cancelled():
            reason = "cancelled"
        elif task.exception() is not None:
            reason = f"error: {type(task.exception()).__name__}"
            log.warning("bridge session %s failed: %r", session_id, task.exception())
        else:
            reason = task.result()
        self.ended[reason.split(":")[0]] += 1

    async def aclose(self) -> None:
        """Stop reading orders, end every session, wait for them."""
        self._stopping.set()
        held = list(self.sessions.values())
        for session, _ in held:
            session.stop("worker_stopped")
        for _, task in held:
            with contextlib.suppress(BaseException):
                await task

    # --- probes ---------------------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ready else "starting",
            "bridge_id": self.settings.bridge_id,
            "sessions": len(self.sessions),
            "max_sessions": self.settings.max_sessions,
        }

    def metrics_text(self) -> str:
        lines = [
            "# TYPE af_bridge_sessions gauge",
            f"af_bridge_sessions {len(self.sessions)}",
            "# TYPE af_bridge_max_sessions gauge",
            f"af_bridge_max_sessions {self.settings.max_sessions}",
            "# TYPE af_bridge_events_total counter",
        ]
        lines += [f'af_bridge_events_total{{event="{k}"}} {v}' for k, v in sorted(self.counters.items())]
        lines.append("# TYPE af_bridge_sessions_ended_total counter")
        lines += [f'af_bridge_sessions_ended_total{{reason="{k}"}} {v}' for k, v in sorted(self.ended.items())]
        published = sum(s.publisher.stats.published for s, _ in self.sessions.values() if s.publisher is not None)
        lines += ["# TYPE af_bridge_frames_published gauge", f"af_bridge_frames_published {published}"]
        return "\n".join(lines) + "\n"

    async def serve_probes(self, host: str | None = None, port: int | None = None) -> Any:
        """/healthz and /metrics (aiohttp, which livekit-api already brings). Returns the runner."""
        from aiohttp import web

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response(self.health(), status=200 if self.ready else 503)

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(text=self.metrics_text(), content_type="text/plain")

        app = web.Application()
        app.router.add_get("/healthz", healthz)
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host or self.settings.host, self.settings.port if port is None else port)
        await site.start()
        return runner
