"""Liveness and readiness: /healthz (the process answers), /readyz (Redis and the Serve app answer)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from services.gateway.deps import GatewayDep
from services.gateway.schemas import Health
from services.wire.errors import ServiceError

router = APIRouter(tags=["health"])
READY_TIMEOUT_S = 3.0


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}})
async def readyz(gateway: GatewayDep) -> JSONResponse:
    async def check(probe) -> str:
        try:
            async with asyncio.timeout(READY_TIMEOUT_S):
                await probe()
            return "ok"
        except ServiceError as exc:
            return str(exc)[:300]
        except Exception as exc:
            return f"{type(exc).__name__}"

    async def redis_probe() -> None:
        await gateway.store.client.run("ping", gateway.store.client.redis.ping)

    redis_state, serve_state = await asyncio.gather(check(redis_probe), check(gateway.encoder.ready))
    checks = {"redis": redis_state, "serve": serve_state}
    ok = all(v == "ok" for v in checks.values())
    body = Health(status="ok" if ok else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
