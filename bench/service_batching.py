"""The generator's cross-session batching gain at the service level: B sessions' GenerateBlock
calls at once against one at a time, through Serve's gRPC proxy and through deployment handles
(the deployed generator against a max_batch_size=1 variant of it, deployed for the run)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from bench.batching import BatchFigure
from bench.media import BLOCK
from bench.stack import BenchStack
from services.local.defaults import APP_NAME

UNBATCHED_APP = "avatar_forcing_bench_unbatched"


async def _open_sessions(stack: BenchStack, count: int, tenant: str) -> list[str]:
    """Open `count` generator sessions through the proxy (warm start, a flat reference motion)."""
    import grpc
    import torch

    from services.wire.protos import grpc_options, pb, pb_grpc
    from services.wire.tensors import encode

    ids = [f"batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
        stub = pb_grpc.MotionGeneratorStub(channel)
        for i, sid in enumerate(ids):
            await stub.OpenSession(
                pb.OpenSessionRequest(
                    session_id=sid,
                    tenant_id=tenant,
                    avatar_id="bench",
                    options=pb.SessionOptions(warm_start=True, seed=i),
                    reference_motion=encode(0.3 * torch.ones(512), "reference_motion"),
                ),
                metadata=stack.metadata(tenant),
                timeout=60,
            )
    return ids


def _block_request(sid: str, tenant: str, first: int, seed: int) -> Any:
    """A GenerateBlockRequest of one block with random (seeded) 512-wide conditions."""
    import torch

    from services.wire.protos import pb
    from services.wire.tensors import encode

    g = torch.Generator().manual_seed(seed)
    features = {
        n: encode(torch.randn(BLOCK, 512, generator=g), n) for n in ("avatar_audio", "user_audio", "user_motion")
    }
    return pb.GenerateBlockRequest(session_id=sid, tenant_id=tenant, first_frame=first, **features)


async def _rounds(
    cursors: dict[str, int], call: Callable[[Any], Awaitable[Any]], tenant: str, rounds: int, concurrent: bool
) -> float:
    """Blocks per second of `rounds` rounds, each one block of every session (session id -> its next
    input frame, updated): all at once or in turn."""
    ids = list(cursors)

    async def block(sid: str, r: int) -> None:
        response = await call(_block_request(sid, tenant, cursors[sid], r))
        cursors[sid] = response.next_input_frame

    async def one_round(r: int) -> None:
        if concurrent:
            await asyncio.gather(*(block(sid, r) for sid in ids))
        else:
            for sid in ids:
                await block(sid, r)

    await one_round(0)  # warm-up
    start = time.perf_counter()
    for r in range(1, rounds + 1):
        await one_round(r)
    return len(ids) * rounds / (time.perf_counter() - start)


async def service_batching_proxy(stack: BenchStack, batch: int, rounds: int, repeats: int = 3) -> BatchFigure:
    """Through the gRPC proxy: B sessions' GenerateBlock calls at once (batched by serve.batch on
    the one generator replica) against the same calls one after the other; the two alternate
    `repeats` times, best of each."""
    import grpc

    from services.wire.protos import grpc_options, pb_grpc

    tenant = "bench"
    ids = await _open_sessions(stack, batch, tenant)
    md = stack.metadata(tenant)
    concurrent, sequential = [], []
    try:
        async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
            stub = pb_grpc.MotionGeneratorStub(channel)

            async def call(request):
                return await stub.GenerateBlock(request, metadata=md, timeout=60)

            cursors = dict.fromkeys(ids, 0)
            for _ in range(repeats):
                concurrent.append(await _rounds(cursors, call, tenant, rounds, True))
                sequential.append(await _rounds(cursors, call, tenant, rounds, False))
    finally:
        await _close_sessions(stack, ids, tenant)
    return BatchFigure(
        "service (gRPC proxy)",
        stack.config,
        batch,
        f"the same {batch} calls one after another, best of {repeats}",
        max(concurrent),
        max(sequential),
    )


async def _close_sessions(stack: BenchStack, ids: list[str], tenant: str) -> None:
    """Close the sessions through the proxy; one already gone is not an error."""
    import grpc

    from services.wire.protos import grpc_options, pb, pb_grpc

    async with grpc.aio.insecure_channel(stack.target, options=grpc_options()) as channel:
        stub = pb_grpc.MotionGeneratorStub(channel)
        for sid in ids:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await stub.CloseSession(
                    pb.CloseSessionRequest(session_id=sid, tenant_id=tenant),
                    metadata=stack.metadata(tenant),
                    timeout=30,
                )


def unbatched_generator_class() -> type:
    """The deployed Generator with serve.batch's max_batch_size set to 1 (one session per forward)."""
    from services.generator.deployment import Generator

    base = Generator.func_or_class

    class UnbatchedGenerator(base):  # type: ignore[misc, valid-type]
        def __init__(self, overrides: dict | None = None) -> None:
            super().__init__(overrides)
            self._batched.set_max_batch_size(1)

    UnbatchedGenerator.__qualname__ = UnbatchedGenerator.__name__ = "UnbatchedGenerator"
    return UnbatchedGenerator


async def service_batching_handles(stack: BenchStack, batch: int, rounds: int, repeats: int = 3) -> BatchFigure:
    """Deployment handles from the driver, B calls at once: the deployed generator (serve.batch,
    MAX_BATCH sessions per forward) against a variant deployment with max_batch_size 1; the two
    alternate `repeats` times, best of each."""
    from ray import serve

    from services.generator.deployment import Generator
    from services.wire.protos import pb
    from services.wire.tensors import encode

    overrides = {"model_preset": stack.config, "redis_url": stack.redis_url, "redis_prefix": stack.prefix}
    variant = Generator.options(name="generator_unbatched", num_replicas=1, func_or_class=unbatched_generator_class())
    serve.run(variant.bind(overrides), name=UNBATCHED_APP, route_prefix=None)
    tenant = "bench"
    targets = {
        "batched": serve.get_deployment_handle("generator", app_name=APP_NAME),
        "unbatched": serve.get_deployment_handle("generator_unbatched", app_name=UNBATCHED_APP),
    }
    sessions = {label: [f"h{label}-{uuid.uuid4().hex[:8]}-{i}" for i in range(batch)] for label in targets}
    figures: dict[str, list[float]] = {label: [] for label in targets}
    try:
        for label, handle in targets.items():
            for i, sid in enumerate(sessions[label]):
                await handle.options(method_name="OpenSession", session_id=sid).remote(
                    pb.OpenSessionRequest(
                        session_id=sid,
                        tenant_id=tenant,
                        avatar_id="bench",
                        options=pb.SessionOptions(warm_start=True, seed=i),
                        reference_motion=encode(np.full(512, 0.3, np.float32), "reference_motion"),
                    )
                )
        cursors = {label: dict.fromkeys(ids, 0) for label, ids in sessions.items()}
        for _ in range(repeats):
            for label, handle in targets.items():

                async def call(request, handle=handle):
                    options = handle.options(method_name="GenerateBlock", session_id=request.session_id)
                    return await options.remote(request)

                figures[label].append(await _rounds(cursors[label], call, tenant, rounds, True))
    finally:
        for label, handle in targets.items():
            for sid in sessions[label]:
                with contextlib.suppress(Exception):
                    await handle.options(method_name="CloseSession", session_id=sid).remote(
                        pb.CloseSessionRequest(session_id=sid, tenant_id=tenant)
                    )
        with contextlib.suppress(Exception):
            serve.delete(UNBATCHED_APP)
    return BatchFigure(
        "service (handles)",
        stack.config,
        batch,
        f"{batch} calls at once to a max_batch_size=1 variant, best of {repeats}",
        max(figures["batched"]),
        max(figures["unbatched"]),
    )
