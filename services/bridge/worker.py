"""The bridge worker: consumes the gateway's dispatch orders and holds many sessions.

Orders come from the Redis stream P:bridge:dispatch through the consumer group "bridges"
(`SessionStore.read_dispatch` / `ack_dispatch`; the contract is services.gateway.livekit's):
- join: a session not yet held and not expired (`expires_ms`) starts a `BridgeSession` in its
  own task; the order is acked once the room join has been tried (joined or failed: an order
  that cannot be carried out is not handed to another worker forever). A join for a session
  already held is acked and ignored (orders are idempotent).
- leave: the session, if held, is stopped; acked either way. A leave goes to any worker of the
  group, so a worker that does not hold the session forwards it to the one that does: each
  worker records the sessions it holds (`SessionStore.set_bridge_owner`, refreshed every
  `owner_refresh_s`, expiring after `owner_ttl_s` when the worker is gone), and polls its own
  inbox (`read_bridge_inbox`) on every turn of its loop, full or not. Without that, the
  session would only end once the gateway's stop ended its stream.
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
    owner_refresh_s: float = 10.0  # how often the records of the sessions held are refreshed
    owner_ttl_s: float = 60.0  # a record not refreshed this long is gone (its worker died)

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
        self._disowning: set[asyncio.Future[None]] = set()  # owner records being deleted (kept referenced)
        self.ready = False

    @property
    def free_slots(self) -> int:
        return max(0, self.settings.max_sessions - len(self.sessions))

    async def run(self) -> None:
        await self.store.ensure_dispatch_group()
        self.ready = True
        loop = asyncio.get_running_loop()
        next_claim = loop.time()  # at start too: a restarted worker takes over what its old self held
        next_refresh = loop.time() + self.settings.owner_refresh_s
        try:
            while not self._stopping.is_set():
                await self._forwarded()  # first: a full worker still hears the leaves of its sessions
                if loop.time() >= next_refresh:
                    next_refresh = loop.time() + self.settings.owner_refresh_s
                    await self._refresh_owners()
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
                await self._leave(order)
        except Exception as exc:
            self.counters["order_errors"] += 1
            log.warning("bridge %s: order %s failed: %r", self.settings.bridge_id, entry_id, exc)
        finally:
            with contextlib.suppress(Exception):
                await self.store.ack_dispatch(entry_id)

    async def _leave(self, order: dict[str, Any], forwarded: bool = False) -> None:
        """Stop the session if held here; else hand the order to the worker that holds it."""
        session_id = str(order.get("session_id", ""))
        held = self.sessions.get(session_id)
        if held is not None:
            held[0].stop(f"left: {order.get('reason', 'stopped')}")
            return
        if forwarded or not session_id:  # forwarded once: never bounced on (the owner moved or is gone)
            return
        owner = await self.store.bridge_owner(session_id)
        if owner and owner != self.settings.bridge_id:
            await self.store.forward_to_bridge(owner, "leave", order)
            self.counters["leaves_forwarded"] += 1

    async def _forwarded(self) -> None:
        """Carry out the orders other workers forwarded here (leaves of sessions held here)."""
        try:
            orders = await self.store.read_bridge_inbox(self.settings.bridge_id)
        except Exception as exc:  # Redis down: the dispatch read reports it and retries
            log.debug("bridge %s: reading the inbox failed: %r", self.settings.bridge_id, exc)
            return
        for _entry_id, action, order in orders:
            self.counters[f"forwarded_{action}"] += 1
            if action == "leave":
                await self._leave(order, forwarded=True)

    async def _own(self, session_id: str) -> None:
        with contextlib.suppress(Exception):  # without the record, a leave read elsewhere is not forwarded
            await self.store.set_bridge_owner(session_id, self.settings.bridge_id, self.settings.owner_ttl_s)

    async def _refresh_owners(self) -> None:
        for session_id in list(self.sessions):
            await self._own(session_id)

    async def _disown(self, session_id: str) -> None:
        with contextlib.suppress(Exception):  # the record expires anyway
            await self.store.clear_bridge_owner(session_id, self.settings.bridge_id)

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
        await self._own(order.session_id)
        joined = asyncio.ensure_future(session.joined.wait())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(
                asyncio.wait({joined, task}, return_when=asyncio.FIRST_COMPLETED), JOIN_ACK_TIMEOUT_S
            )
        joined.cancel()

    def _session_done(self, session_id: str, task: asyncio.Task[str]) -> None:
        self.sessions.pop(session_id, None)
        disown = asyncio.ensure_future(self._disown(session_id))
        self._disowning.add(disown)
        disown.add_done_callback(self._disowning.discard)
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
        if self._disowning:
            await asyncio.gather(*self._disowning, return_exceptions=True)

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
