"""The generator servicer over real Redis: equal to the in-process engine, isolated, bounded, resumable."""

from __future__ import annotations

import asyncio

import pytest
import torch

from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.sampling.block_sampler import BlockSampler
from services.common.torch_tensors import decode_torch
from services.generator.servicer import GeneratorServicer
from services.store import SessionStore
from services.wire.errors import CapacityExceededError, FrameConflictError, SessionNotFoundError, ValidationError
from services.wire.protos import pb
from services.wire.tensors import encode
from tests.unit.test_motion_stream import reference, tracks

pytestmark = pytest.mark.integration
BLOCK = 10


def servicer(parity_flow, redis_url, prefix, replica, **kwargs) -> GeneratorServicer:
    store = SessionStore(redis_url, prefix=prefix, history_blocks=8)
    return GeneratorServicer(BlockSampler(parity_flow), store, replica, **kwargs)


def open_request(sid, tenant="acme", ref=None, **options) -> pb.OpenSessionRequest:
    return pb.OpenSessionRequest(
        session_id=sid,
        tenant_id=tenant,
        avatar_id="ava",
        options=pb.SessionOptions(seed=4, **options),
        reference_motion=encode(reference() if ref is None else ref, "reference_motion"),
    )


def block_request(sid, inputs, start, stop, tenant="acme", **kwargs) -> pb.GenerateBlockRequest:
    return pb.GenerateBlockRequest(
        session_id=sid,
        tenant_id=tenant,
        first_frame=start,
        **{name: encode(x[start:stop], name) for name, x in inputs.items()},
        **kwargs,
    )


async def drive(svc, sid, inputs, frames, start=0, tenant="acme"):
    """Send inputs block by block (the first window at once); returns {frame_index: latent}."""
    out, first = {}, True
    while start < frames:
        stop = min(frames, start + (50 if first and start == 0 else BLOCK))
        response = await svc.GenerateBlock(block_request(sid, inputs, start, stop, tenant, end_of_input=stop == frames))
        latents = decode_torch(response.latents, "latents")
        out.update({response.first_frame + i: latents[i] for i in range(latents.shape[0])})
        start, first = response.next_input_frame, False
    return out


async def create(store: SessionStore, sid: str, tenant: str = "acme") -> None:
    await store.create(sid, tenant, "ava")


def in_process(parity_flow, inputs, frames, **options) -> torch.Tensor:
    stream = MotionStream(BlockSampler(parity_flow), reference(), StreamOptions(**options), seed=4)
    stream.push(*(x[:frames] for x in inputs.values()))
    stream.finish()
    return torch.cat([b.latents for b in stream.pull()])


def as_tensor(frames: dict[int, torch.Tensor], count: int) -> torch.Tensor:
    assert sorted(frames) == list(range(count)), "every frame index once, no gaps"
    return torch.stack([frames[i] for i in range(count)])


def test_generation_equals_the_in_process_engine_and_sessions_do_not_interfere(parity_flow, redis_url, prefix):
    async def main():
        svc = servicer(parity_flow, redis_url, prefix, "replica-a")
        a, b = tracks(80, seed=1), tracks(80, seed=2)
        for sid in ("s-a", "s-b"):
            await create(svc.store, sid)
            await svc.OpenSession(open_request(sid))
        got_a, got_b = await asyncio.gather(drive(svc, "s-a", a, 80), drive(svc, "s-b", b, 80))
        return as_tensor(got_a, 80), as_tensor(got_b, 80)

    got_a, got_b = asyncio.run(main())
    assert torch.equal(got_a, in_process(parity_flow, tracks(80, seed=1), 80))
    assert torch.equal(got_b, in_process(parity_flow, tracks(80, seed=2), 80))


def test_killed_replica_resumes_elsewhere_with_continuous_frames(parity_flow, redis_url, prefix):
    inputs = tracks(110, seed=3)

    async def main():
        first = servicer(parity_flow, redis_url, prefix, "replica-a")
        await create(first.store, "s1")
        await first.OpenSession(open_request("s1", warm_start=True))
        part = {}
        start = 0
        while start < 40:  # warm start: one block per call
            response = await first.GenerateBlock(block_request("s1", inputs, start, start + BLOCK))
            lat = decode_torch(response.latents, "latents")
            part.update({response.first_frame + i: lat[i] for i in range(lat.shape[0])})
            start = response.next_input_frame
        await first.store.deregister_replica("replica-a")  # replica-a died
        second = servicer(parity_flow, redis_url, prefix, "replica-b")
        response = await second.GenerateBlock(block_request("s1", inputs, start, start + BLOCK))
        assert response.resumed and response.replica_id == "replica-b"
        lat = decode_torch(response.latents, "latents")
        part.update({response.first_frame + i: lat[i] for i in range(lat.shape[0])})
        part.update(await drive(second, "s1", inputs, 110, start=response.next_input_frame))
        return as_tensor(part, 110)

    got = asyncio.run(main())
    # The history ring (8 blocks) still holds the warm-start window: the rebuild is exact.
    assert (got - in_process(parity_flow, inputs, 110, warm_start=True)).abs().max().item() < 1e-5


def test_a_full_replica_refuses_new_sessions_and_keeps_live_ones(parity_flow, redis_url, prefix):
    async def main():
        svc = servicer(parity_flow, redis_url, prefix, "replica-a", max_sessions=1)
        for sid in ("s1", "s2"):
            await create(svc.store, sid)
        await svc.OpenSession(open_request("s1"))
        with pytest.raises(CapacityExceededError, match="full"):
            await svc.OpenSession(open_request("s2"))
        assert svc.routing_stats()["full"] and list(svc.table.sessions) == ["s1"]
        await drive(svc, "s1", tracks(60), 60)  # the live session is untouched

    asyncio.run(main())


def test_bad_requests_get_clear_errors(parity_flow, redis_url, prefix):
    async def main():
        svc = servicer(parity_flow, redis_url, prefix, "replica-a")
        await create(svc.store, "s1")
        await svc.OpenSession(open_request("s1"))
        inputs = tracks(60)
        # Another tenant's session answers exactly as an unknown one: NOT_FOUND, the same message.
        with pytest.raises(SessionNotFoundError) as foreign:
            await svc.GenerateBlock(block_request("s1", inputs, 0, 10, tenant="other"))
        with pytest.raises(SessionNotFoundError) as unknown:
            await svc.GenerateBlock(block_request("s1-unknown", inputs, 0, 10, tenant="other"))
        assert str(foreign.value) == str(unknown.value).replace("s1-unknown", "s1")
        with pytest.raises(SessionNotFoundError) as closing:
            await svc.CloseSession(pb.CloseSessionRequest(session_id="s1", tenant_id="other"))
        assert str(closing.value) == str(foreign.value)
        with pytest.raises(FrameConflictError, match="expected 0"):
            await svc.GenerateBlock(block_request("s1", inputs, 5, 15))
        with pytest.raises(ValidationError, match=r"options\.nfe"):
            await svc.OpenSession(open_request("s1", nfe=99))
        bad = block_request("s1", inputs, 0, 10)
        bad.user_motion.CopyFrom(encode(torch.zeros(9, 512), "user_motion"))
        with pytest.raises(ValidationError, match="same number of frames"):
            await svc.GenerateBlock(bad)
        with pytest.raises(ValidationError, match=r"avatar_audio\.shape"):
            await svc.GenerateBlock(block_request("s1", {k: v[:, :256] for k, v in inputs.items()}, 0, 10))
        await drive(svc, "s1", inputs, 60)  # still serves the session afterwards

    asyncio.run(main())


def test_hold_drops_a_block_and_the_session_continues(parity_flow, redis_url, prefix):
    async def main():
        svc = servicer(parity_flow, redis_url, prefix, "replica-a")
        await create(svc.store, "s1")
        await svc.OpenSession(open_request("s1", warm_start=True))
        inputs = tracks(30)
        first = await svc.GenerateBlock(block_request("s1", inputs, 0, 10))
        held = await svc.GenerateBlock(block_request("s1", inputs, 10, 20, hold=True))
        after = await svc.GenerateBlock(block_request("s1", inputs, 20, 30, max_nfe=4))
        return [decode_torch(r.latents, "l") for r in (first, held, after)], held, after

    (first, held_latents, after_latents), held, after = asyncio.run(main())
    assert held.held and held.first_frame == 10
    assert torch.equal(held_latents, first[-1:].expand(10, -1))
    assert after.first_frame == 20 and after.nfe_used == 4 and torch.isfinite(after_latents).all()
