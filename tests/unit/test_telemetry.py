"""services.common.telemetry without Redis or Ray: propagation, error paths, setup from the environment, metrics."""

from __future__ import annotations

import asyncio
import logging
import sys

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import SpanKind, StatusCode

from services.common import telemetry
from services.generator.servicer import SessionTable
from services.wire.errors import ValidationError
from services.wire.protos import pb


@pytest.fixture()
def m():
    return telemetry.use_metrics("prometheus")


class Servicer:
    replica_id = "replica-7"

    @telemetry.rpc_span("avatar_forcing.v1.FrameDecoder/Decode")
    async def Decode(self, request, context=None):
        if request.first_frame < 0:
            raise ValidationError("first_frame", "negative")
        return trace.get_current_span()


def test_a_stage_call_carries_its_span_to_the_servicer(spans, m):
    block = telemetry.BlockTrace("s1", "acme", first_frame=20, frames=10)

    async def call():
        with block.stage("decode", frames=10) as traceparent:
            assert traceparent.startswith("00-") and len(traceparent) == 55
            return await Servicer().Decode(pb.DecodeRequest(session_id="s1", tenant_id="acme", traceparent=traceparent))

    current = asyncio.run(call())
    block.frames_ready(10, 0, 0.2)
    stage, server = (
        next(s for s in spans.get_finished_spans() if s.name == n)
        for n in ("decode", "avatar_forcing.v1.FrameDecoder/Decode")
    )
    (root,) = [s for s in spans.get_finished_spans() if s.name == "block"]
    assert current.get_span_context().span_id == server.context.span_id  # the RPC span is current inside it
    assert server.parent.span_id == stage.context.span_id and stage.parent.span_id == root.context.span_id
    assert server.parent.is_remote and root.parent is None
    assert server.kind == SpanKind.SERVER and stage.kind == SpanKind.CLIENT
    assert dict(server.attributes) == {
        "rpc.service": "avatar_forcing.v1.FrameDecoder",
        "rpc.method": "Decode",
        "session_id": "s1",
        "tenant_id": "acme",
        "first_frame": 0,
        "replica_id": "replica-7",
    }
    assert root.attributes["block.realtime_factor"] == pytest.approx(0.4 / 0.2)
    assert m.value("block_latency_seconds_count", stage="decode") == 1
    assert m.value("block_latency_seconds_count", stage="end_to_end") == 1
    assert m.value("realtime_factor_sum") == pytest.approx(2.0)


def test_without_a_traceparent_the_rpc_span_starts_its_own_trace(spans):
    asyncio.run(Servicer().Decode(pb.DecodeRequest(session_id="s1", tenant_id="acme")))
    (span,) = spans.get_finished_spans()
    assert span.parent is None


def test_a_failed_stage_fails_its_span_and_ends_the_block(spans, m):
    block = telemetry.BlockTrace("s1", "acme", first_frame=0, frames=10)

    async def call():
        with block.stage("decode") as traceparent:
            await Servicer().Decode(pb.DecodeRequest(first_frame=-1, traceparent=traceparent))

    with pytest.raises(ValidationError):
        asyncio.run(call())
    assert block.ended
    block.end()  # idempotent
    finished = {s.name: s for s in spans.get_finished_spans()}
    assert len(spans.get_finished_spans()) == 3
    for name in ("block", "decode", "avatar_forcing.v1.FrameDecoder/Decode"):
        assert finished[name].status.status_code == StatusCode.ERROR, name
    assert m.value("block_latency_seconds_count", stage="decode") is None  # only completed calls are timed


def test_a_cancelled_block_ends_without_an_error(spans):
    block = telemetry.BlockTrace("s1", "acme", first_frame=0, frames=10)
    block.end(asyncio.CancelledError())
    (span,) = spans.get_finished_spans()
    assert span.status.status_code == StatusCode.UNSET and span.attributes["cancelled"] is True


def test_credentials_never_become_attributes(spans):
    with telemetry.BlockTrace("s1", "acme", 0, 10).stage("generate", auth_token="x", api_key="y", nfe=4):
        pass
    (stage,) = [s for s in spans.get_finished_spans() if s.name == "generate"]
    assert dict(stage.attributes) == {"nfe": 4}


def test_degraded_and_dropped_frames_are_counted_by_level(m):
    for level in (0, pb.REDUCED_NFE, pb.HELD_FRAME, pb.HELD_FRAME):
        telemetry.BlockTrace("s1", "acme", 0, 10).frames_ready(10, level, 0.5)
    assert m.value("frames_degraded_total", level="reduced_nfe") == 10
    assert m.value("frames_degraded_total", level="held_frame") == 20
    assert m.value("frames_dropped_total", reason="held_frame") == 20
    assert m.value("realtime_factor_count") == 4
    assert m.value("realtime_factor_bucket", le="0.75") == 0 and m.value("realtime_factor_bucket", le="0.9") == 4


def test_the_session_table_reports_the_replicas_load(m):
    def report(table):
        m.set_generator_load("r1", len(table.sessions), table.bytes_used)

    table = SessionTable(max_sessions=2, budget_bytes=1000, on_change=report)
    assert m.value("generator_sessions", replica="r1") == 0
    table.add("a", type("G", (), {"nbytes": 300})())
    table.add("b", type("G", (), {"nbytes": 200})())
    assert (m.value("generator_sessions", replica="r1"), m.value("generator_cache_bytes", replica="r1")) == (2, 500)
    table.drop("a")
    assert (m.value("generator_sessions", replica="r1"), m.value("generator_cache_bytes", replica="r1")) == (1, 200)


def test_metrics_without_a_backend_record_nothing():
    m = telemetry.Metrics("none")
    m.observe_latency("generate", 0.1)
    m.set_generator_load("r", 1, 2)
    assert m.value("generator_sessions", replica="r") is None
    with pytest.raises(ValueError, match="backend"):
        telemetry.Metrics("statsd")


def test_outside_ray_the_default_backend_is_prometheus_client(monkeypatch):
    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in a process that never imported Ray
    assert telemetry._default_backend() == "prometheus"


def test_the_provider_follows_the_environment(monkeypatch, caplog):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "AF_TRACE_CONSOLE"):
        monkeypatch.delenv(name, raising=False)
    assert telemetry._provider_from_env() is None  # nothing asked for: the API's no-op tracer

    monkeypatch.setenv("AF_TRACE_CONSOLE", "1")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "ingress-test")
    provider = telemetry._provider_from_env()
    assert isinstance(provider, TracerProvider)
    assert provider.resource.attributes["service.name"] == "ingress-test"
    provider.shutdown()

    monkeypatch.delenv("AF_TRACE_CONSOLE")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    try:
        import opentelemetry.exporter.otlp.proto.grpc  # noqa: F401
    except ImportError:  # the exporter is optional: a clear warning, no export
        with caplog.at_level(logging.WARNING, logger="services.common.telemetry"):
            assert telemetry._provider_from_env() is None
        assert "opentelemetry-exporter-otlp-proto-grpc is not installed" in caplog.text
    else:
        provider = telemetry._provider_from_env()
        assert isinstance(provider, TracerProvider)
        provider.shutdown()
