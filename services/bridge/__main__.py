"""`python -m services.bridge`: a bridge worker (settings from the environment).

REDIS_URL               redis://127.0.0.1:6379/0
AF_REDIS_PREFIX         af (the gateway's prefix: the dispatch stream is <prefix>:bridge:dispatch)
AF_BRIDGE_ID            bridge-<host>-<pid> (the consumer name in the group "bridges")
AF_BRIDGE_MAX_SESSIONS  8
AF_BRIDGE_PORT          8095 (/healthz, /metrics)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from services.bridge.worker import BridgeWorker, WorkerSettings


async def main() -> None:
    from services.store import SessionStore

    settings = WorkerSettings.from_env()
    store = SessionStore(settings.redis_url, settings.redis_prefix, timeout_s=settings.block_ms / 1000 + 5)
    worker = BridgeWorker(store, settings)
    probes = await worker.serve_probes()
    logging.getLogger("services.bridge").info(
        "bridge %s: up to %d sessions, probes on :%d", settings.bridge_id, settings.max_sessions, settings.port
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    run = asyncio.create_task(worker.run())
    await asyncio.wait({run, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    run.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await run
    await worker.aclose()
    await probes.cleanup()
    logging.getLogger("services.bridge").info("bridge %s: stopped", settings.bridge_id)
    with contextlib.suppress(Exception):
        await store.client.close()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    asyncio.run(main())
