"""Ray Serve deployment of the motion generator: a thin adapter over `GeneratorServicer`.

Requests are routed by session id to the replica holding the session's KV cache
(`SessionAffinityRouter`). Concurrent sessions' block requests are collected by
`serve.batch` and denoised together: one forward pass per sampler step for all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ray import serve
from ray.serve.config import RequestRouterConfig

from avatar_forcing.sampling.block_sampler import BlockRequest, BlockResult
from services.common.config import Settings
from services.common.model_loader import load_model
from services.common.servicer_call import call_servicer
from services.generator.router import SessionAffinityRouter
from services.generator.servicer import GeneratorServicer
from services.store import SessionStore
from services.wire.protos import generator_pb2

log = logging.getLogger(__name__)
MAX_BATCH = 8  # sessions per forward pass
BATCH_WAIT_S = 0.004  # how long a request waits for others to share its forward pass


@serve.deployment(
    name="generator",
    max_ongoing_requests=32,
    ray_actor_options={"num_cpus": 0.5},
    request_router_config=RequestRouterConfig(
        request_router_class=SessionAffinityRouter, request_routing_stats_period_s=1.0
    ),
)
class Generator:
    def __init__(self, overrides: dict | None = None) -> None:
        self.settings = Settings.from_env(overrides=overrides)
        model = load_model(self.settings)
        replica_id = serve.get_replica_context().replica_id.unique_id
        self.store = SessionStore.from_settings(self.settings)
        self.servicer = GeneratorServicer(
            model.block_sampler(),
            self.store,
            replica_id,
            max_sessions=self.settings.max_sessions_per_replica,
            budget_bytes=self.settings.cache_budget_bytes,
            run_blocks=self._run_blocks,
        )
        self._upkeep: asyncio.Task | None = None

    async def OpenSession(self, request, grpc_context=None):
        self._start_upkeep()
        return await call_servicer(self.servicer.OpenSession, request, grpc_context, generator_pb2.OpenSessionResponse)

    async def GenerateBlock(self, request, grpc_context=None):
        self._start_upkeep()
        return await call_servicer(
            self.servicer.GenerateBlock, request, grpc_context, generator_pb2.GenerateBlockResponse
        )

    async def CloseSession(self, request, grpc_context=None):
        return await call_servicer(
            self.servicer.CloseSession, request, grpc_context, generator_pb2.CloseSessionResponse
        )

    def record_routing_stats(self) -> dict:
        return self.servicer.routing_stats()

    async def check_health(self) -> None:
        self._start_upkeep()

    async def _run_blocks(self, requests: list[BlockRequest]) -> list[BlockResult]:
        return list(await asyncio.gather(*(self._batched(r) for r in requests)))

    @serve.batch(max_batch_size=MAX_BATCH, batch_wait_timeout_s=BATCH_WAIT_S)
    async def _batched(self, requests: list[BlockRequest]) -> list[BlockResult]:
        # One forward pass per sampler step for every session in the batch (grouped by shape).
        return await asyncio.to_thread(self.servicer.sampler.run, requests)

    def _start_upkeep(self) -> None:
        if self._upkeep is None or self._upkeep.done():
            self._upkeep = asyncio.get_running_loop().create_task(self._upkeep_loop())

    async def _upkeep_loop(self) -> None:
        """Keep this replica alive in Redis, reap dead sessions, free the caches of gone ones."""
        period = max(0.5, self.settings.replica_ttl_s / 3)
        while True:
            with contextlib.suppress(Exception):
                await self.store.replica_heartbeat(self.servicer.replica_id)
                await self.store.reap()
                dropped = await self.servicer.drop_missing()
                if dropped:
                    log.info("freed the caches of %d reaped sessions", len(dropped))
            await asyncio.sleep(period)
