"""Tenant quotas on the serving side, against a real Redis: concurrent sessions (atomic, however many
Starts race), session minutes (at Start and while a session runs), and a stop the gateway requests.

The quotas are written into the tenant record as the gateway's admin API writes them
(`TenantQuotas.to_fields` into P:tenant:{tid}); sessions run through the real `SessionPipeline`
(the ingress) with the real servicers, without Ray.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from services.ingress.config import IngressSettings
from services.ingress.pipeline import SessionPipeline
from services.store import SessionStore
from services.store.quotas import TenantQuotas
from services.wire.errors import QuotaExceededError, status_of
from tests.integration.test_session_pipeline import client_messages, stages_for
from tests.integration.test_tenant_isolation import start_messages, stream
from tests.redis_support import keys_with

pytestmark = pytest.mark.integration


async def set_quotas(store: SessionStore, tenant: str, **quotas: Any) -> TenantQuotas:
    value = TenantQuotas(**quotas)
    await store.redis.hset(store.keys.tenant(tenant), mapping=value.to_fields())
    return value


def frames_of(out) -> list[int]:
    return [m.frame.frame_index for m in out if m.WhichOneof("message") == "frame"]


def test_concurrent_creates_never_exceed_the_session_limit(redis_url, prefix):
    async def main():
        stores = [SessionStore(redis_url, prefix=prefix) for _ in range(8)]  # one connection each
        try:
            await set_quotas(stores[0], "t1", max_concurrent_sessions=3)
            results = await asyncio.gather(
                *(s.create(f"s{i}", "t1", "av") for i, s in enumerate(stores)), return_exceptions=True
            )
            created = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, BaseException)]
            assert len(created) == 3 and len(refused) == 5, results
            for error in refused:
                assert isinstance(error, QuotaExceededError) and error.limit == "max_concurrent_sessions"
                assert status_of(error)[0].name == "RESOURCE_EXHAUSTED"
                assert "max_concurrent_sessions" in str(error) and "3 sessions open" in str(error)
                assert "limit of 3" in str(error)
            # Closing one frees its slot: the next passes, the one after fails again.
            await stores[0].close(created[0].session_id, "t1")
            await stores[0].create("again", "t1", "av")
            with pytest.raises(QuotaExceededError):
                await stores[0].create("over", "t1", "av")
            await stores[0].create("other-tenant", "t2", "av")  # quotas are per tenant
            # A limit of 0: the tenant may open no session at all.
            await set_quotas(stores[0], "t3", max_concurrent_sessions=0)
            with pytest.raises(QuotaExceededError, match="limit of 0"):
                await stores[0].create("none", "t3", "av")
        finally:
            for s in stores:
                await s.aclose()

    asyncio.run(main())


def test_stream_starts_at_and_over_the_session_limit(model, media, redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            await set_quotas(s, "acme", max_concurrent_sessions=2)
            stages = stages_for(model, s)
            await s.create("gw-1", "acme", "ava", status="pending")  # created by the gateway
            await s.put_avatar("acme", "ava", media[0])

            # Concurrent Starts of new sessions, one slot left: exactly one streams, the other is refused.
            results = await asyncio.gather(
                stream(stages, s, "acme", list(client_messages(*media))),
                stream(stages, s, "acme", list(client_messages(*media))),
            )
            errors = [error for _, error in results if error is not None]
            ok = [out for out, error in results if error is None]
            assert len(ok) == 1 and frames_of(ok[0]) == list(range(40)), results
            assert len(errors) == 1 and isinstance(errors[0], QuotaExceededError)
            assert errors[0].limit == "max_concurrent_sessions" and "limit of 2" in str(errors[0])

            # Joining the gateway's session counts once: with gw-1 and one more open (2 of 2), it streams.
            await s.create("gw-2", "acme", "ava", status="pending")
            out, error = await stream(stages, s, "acme", start_messages(media, session_id="gw-1", no_avatar=True))
            assert error is None and frames_of(out) == list(range(40)), error
            assert [r.session_id for r in await s.list_sessions("acme")] == ["gw-2"]

    asyncio.run(main())


def test_session_minutes_at_start_and_while_running(model, media, redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            stages = stages_for(model, s)
            # 1.0 s of session time: blocks of 10 frames are 0.4 s, so the third block crosses it.
            await set_quotas(s, "acme", max_session_minutes=1.0 / 60)
            out, error = await stream(stages, s, "acme", list(client_messages(*media)))
            assert frames_of(out) == list(range(30))  # the crossing block is delivered, then the end
            assert isinstance(error, QuotaExceededError) and error.limit == "max_session_minutes"
            assert status_of(error)[0].name == "RESOURCE_EXHAUSTED"
            assert "max_session_minutes" in str(error) and "used 0.02 of its 0.0166667 session minutes" in str(error)
            assert (await s.tenant_usage("acme")).session_seconds == pytest.approx(1.2)
            assert keys_with(redis_url, f"{prefix}:session:*") == []  # the session was closed

            # Exhausted: a new Start is refused before any work.
            out, error = await stream(stages, s, "acme", list(client_messages(*media)))
            assert out == [] and isinstance(error, QuotaExceededError) and error.limit == "max_session_minutes"
            assert error.retry_after_s is not None and error.retry_after_s > 0
            # A raised quota lets it stream again.
            await set_quotas(s, "acme", max_session_minutes=10.0)
            out, error = await stream(stages, s, "acme", list(client_messages(*media)))
            assert error is None and frames_of(out) == list(range(40))

    asyncio.run(main())


def test_request_stop_ends_a_running_stream_cleanly_and_figures_are_written(model, media, redis_url, prefix):
    async def main():
        async with SessionStore(redis_url, prefix=prefix) as s:
            stages = stages_for(model, s)
            await s.put_avatar("acme", "ava", media[0])
            await s.create("gw-1", "acme", "ava", status="pending")
            generate, calls = stages.generate_block, []

            async def stop_on_second_block(request):
                calls.append(request.first_frame)
                if len(calls) == 2:
                    record = await s.get("gw-1", "acme")
                    assert record.status == "active"  # the stream set it
                    await s.request_stop("gw-1", "acme")  # what the gateway's stop does
                return await generate(request)

            stages.generate_block = stop_on_second_block
            written: list[dict[str, float]] = []
            set_figures = s.set_figures

            async def recording(session_id, tenant_id, figures):
                written.append(dict(figures))
                await set_figures(session_id, tenant_id, figures)
                assert (await s.get(session_id, tenant_id)).figures == figures  # readable on the record

            s.set_figures = recording  # type: ignore[method-assign]
            pipeline = SessionPipeline(stages, s, IngressSettings(image_size=64, degrade=False), "acme")
            out = [m async for m in pipeline.run(_iterate(start_messages(media, session_id="gw-1", no_avatar=True)))]
            frames = frames_of(out)
            # The stop was requested while block 2 generated: noticed after block 1 or block 2, then OK.
            assert frames in (list(range(10)), list(range(20))), frames
            assert keys_with(redis_url, f"{prefix}:session:*") == [] and await s.list_sessions("acme") == []
            assert [w["frames"] for w in written] == [10 * (i + 1) for i in range(len(written))]
            last = written[-1]
            assert set(last) == {
                "frames",
                "degraded_frames",
                "session_seconds",
                "block_latency_p50_ms",
                "block_latency_p95_ms",
                "realtime_factor",
            }
            assert last["degraded_frames"] == 0 and last["session_seconds"] == pytest.approx(len(frames) / 25)
            assert 0 < last["block_latency_p50_ms"] <= last["block_latency_p95_ms"] and last["realtime_factor"] > 0

    asyncio.run(main())


async def _iterate(messages):
    for message in messages:
        yield message
        await asyncio.sleep(0)
