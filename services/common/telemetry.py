"""Tracing and metrics of the services, in one place (docs/observability.md).

Traces (OpenTelemetry): one trace per block. The ingress opens a root span `block` per
block (`BlockTrace`) and a child span per stage call (`BlockTrace.stage`); the call carries
the stage span's W3C `traceparent` in its request message (the `traceparent` field of the
four stage requests), and the servicer continues the trace with a span named after its RPC
(`rpc_span`), so the trace of a block reads

    block
    ├── audio_features (x2)  └── avatar_forcing.v1.AudioFeatures/Extract
    ├── motion_encoder       └── avatar_forcing.v1.MotionEncoder/EncodeUserMotion
    ├── generate             └── avatar_forcing.v1.MotionGenerator/GenerateBlock
    └── decode (per chunk)   └── avatar_forcing.v1.FrameDecoder/Decode

The tracer is set up once per process from the environment, on first use:

    OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT)  OTLP export (batched), over gRPC, or
        HTTP when OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf; needs the package
        opentelemetry-exporter-otlp-proto-grpc (-http): without it a warning says so and
        nothing is exported
    AF_TRACE_CONSOLE=1                                    spans printed to stdout
    neither                                               the OpenTelemetry API's no-op tracer
                                                          (or a provider the process set up itself)

OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES and OTEL_TRACES_SAMPLER are honoured as usual.

Metrics (`metrics()`): block latency per stage and end to end, real-time factor, degraded and
dropped frames, sessions and cache bytes per generator replica. Inside Ray they are
`ray.serve.metrics` objects, exported on Ray's Prometheus endpoint (prefixed `ray_`, tagged
with the deployment and replica); outside Ray (unit tests, the in-process pipeline) they are
prometheus_client objects in a private registry (`Metrics.registry`), or nothing without
prometheus_client.

Attributes are the ids and counts of the work (session, tenant, frames): never credentials;
`_attributes` drops any key that looks like one.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import Any, TypeVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.wire.protos import Limit, pb

log = logging.getLogger(__name__)

TRACER_NAME = "avatar_forcing.services"
DEFAULT_SERVICE_NAME = "avatar-forcing"
END_TO_END = "end_to_end"  # the `stage` of a block's whole latency in block_latency_seconds
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)
REALTIME_FACTOR_BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0)
_SECRET_WORDS = ("token", "secret", "password", "authorization", "credential", "api_key")

_PROPAGATOR = TraceContextTextMapPropagator()
_lock = threading.RLock()
_tracer: trace.Tracer | None = None
_metrics: Metrics | None = None


# -- tracing ---------------------------------------------------------------------------------


def tracer() -> trace.Tracer:
    """This process's tracer (set up from the environment on first use)."""
    if _tracer is None:
        setup_tracing()
    return _tracer


def setup_tracing() -> trace.Tracer:
    """Install the tracer provider the environment asks for (once per process; see the module doc)."""
    global _tracer
    with _lock:
        if _tracer is None:
            configured = not isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
            provider = None if configured else _provider_from_env()
            if provider is not None:
                trace.set_tracer_provider(provider)
            _tracer = trace.get_tracer(TRACER_NAME)
        return _tracer


def set_tracer_provider(provider: trace.TracerProvider | None) -> None:
    """Use `provider` for this module's spans (tests, embedding); None: set up from the environment again.

    Unlike `opentelemetry.trace.set_tracer_provider` this can be called any number of times.
    """
    global _tracer
    with _lock:
        _tracer = provider.get_tracer(TRACER_NAME) if provider is not None else None


def _provider_from_env() -> trace.TracerProvider | None:
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporters = []
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if endpoint:
        otlp = _otlp_exporter(endpoint)
        if otlp is not None:
            exporters.append(otlp)
    console = os.environ.get("AF_TRACE_CONSOLE", "").strip() == "1"
    if not exporters and not console:
        return None

    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SimpleSpanProcessor

    # Resource.create reads OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES; explicit attributes would override them.
    named = os.environ.get("OTEL_SERVICE_NAME") or "service.name=" in os.environ.get("OTEL_RESOURCE_ATTRIBUTES", "")
    provider = TracerProvider(resource=Resource.create({} if named else {SERVICE_NAME: DEFAULT_SERVICE_NAME}))
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if console:
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    log.info("tracing: OTLP export to %s: %s; console: %s", endpoint or "-", bool(exporters), console)
    return provider


def _otlp_exporter(endpoint: str):
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    ).strip()
    http = protocol.startswith("http")
    package = "opentelemetry-exporter-otlp-proto-" + ("http" if http else "grpc")
    try:
        if http:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    except ImportError:
        log.warning(
            "tracing: OTEL_EXPORTER_OTLP_ENDPOINT=%s is set but %s is not installed; traces are NOT exported "
            "(pip install %s)",
            endpoint,
            package,
            package,
        )
        return None
    return OTLPSpanExporter()  # endpoint, headers, TLS: from the OTEL_EXPORTER_OTLP_* environment


def traceparent(span: Span) -> str:
    """The W3C traceparent of `span` ("00-<trace id>-<span id>-<flags>"); "" for a no-op span."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent", "")


def remote_context(value: str) -> Context:
    """The trace context a request's `traceparent` carries; an empty (root) context when it is empty or invalid."""
    return _PROPAGATOR.extract({"traceparent": value}) if value else Context()


def _attributes(values: Mapping[str, Any]) -> dict[str, Any]:
    """Span attributes: None values left out, and nothing named like a credential."""
    out = {}
    for key, value in values.items():
        if value is None:
            continue
        if any(word in key.lower() for word in _SECRET_WORDS):
            log.debug("telemetry: attribute %r left out (looks like a credential)", key)
            continue
        out[key] = value
    return out


def _end_with(span: Span, error: BaseException | None) -> None:
    if error is not None:
        if isinstance(error, BaseException) and not isinstance(error, Exception):  # cancelled, exiting
            span.set_attribute("cancelled", True)
        else:
            span.record_exception(error)
            span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
    span.end()


R = TypeVar("R")


def rpc_span(name: str) -> Callable[[Callable[..., Awaitable[R]]], Callable[..., Awaitable[R]]]:
    """Decorate a servicer RPC `async def Method(self, request, context=None)`: a SERVER span `name`
    (e.g. "avatar_forcing.v1.FrameDecoder/Decode") continuing the trace of `request.traceparent`.
    """
    service, _, method_name = name.rpartition("/")

    def decorate(method: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
        @functools.wraps(method)
        async def traced(self, request, *args, **kwargs) -> R:
            attributes = _attributes(
                {
                    "rpc.service": service,
                    "rpc.method": method_name,
                    "session_id": getattr(request, "session_id", None) or None,
                    "tenant_id": getattr(request, "tenant_id", None) or None,
                    "first_frame": getattr(request, "first_frame", None),
                    "replica_id": getattr(self, "replica_id", None),
                }
            )
            context = remote_context(getattr(request, "traceparent", ""))
            with tracer().start_as_current_span(name, context=context, kind=SpanKind.SERVER, attributes=attributes):
                return await method(self, request, *args, **kwargs)

        return traced

    return decorate


class BlockTrace:
    """The trace of one block in the ingress: its root span `block`, a child span per stage call,
    and the block's metrics once its frames are ready. `end` is idempotent.
    """

    def __init__(self, session_id: str, tenant_id: str, first_frame: int, frames: int, last: bool = False) -> None:
        self.session_id = session_id
        attributes = {
            "session_id": session_id,
            "tenant_id": tenant_id,
            "block.first_frame": first_frame,
            "block.frames": frames,
            "block.last": last,
        }
        # An empty parent context: every block is the root of its own trace.
        self.span = tracer().start_span("block", context=Context(), attributes=_attributes(attributes))
        self._context = trace.set_span_in_context(self.span)
        self.ended = False

    @contextlib.contextmanager
    def stage(self, name: str, **attributes: Any) -> Iterator[str]:
        """A child span for one call of stage `name`; yields the traceparent to send with the request.

        The call's duration goes to block_latency_seconds{stage=name}; a failed call ends the block.
        """
        start = time.perf_counter()
        try:
            with tracer().start_as_current_span(
                name, context=self._context, kind=SpanKind.CLIENT, attributes=_attributes(attributes)
            ) as span:
                yield traceparent(span)
        except BaseException as exc:
            self.end(exc)
            raise
        metrics().observe_latency(name, time.perf_counter() - start)

    def generated(self, *, nfe_used: int, level: int, output_first_frame: int, output_frames: int) -> None:
        """What the generator returned for the block's input (its frames may be an earlier block's)."""
        self.span.set_attributes(
            {
                "block.nfe_used": nfe_used,
                "block.degradation": level,
                "block.output_first_frame": output_first_frame,
                "block.output_frames": output_frames,
            }
        )

    def frames_ready(self, frames: int, level: int, latency_s: float) -> None:
        """The block's frames are decoded, `latency_s` after its input was complete: metrics, then the end."""
        media_s = frames / Limit.FPS
        factor = media_s / latency_s if latency_s > 0 else float("inf")
        self.span.set_attributes({"block.latency_ms": latency_s * 1000, "block.realtime_factor": factor})
        m = metrics()
        m.observe_latency(END_TO_END, latency_s)
        if latency_s > 0:
            m.observe_realtime_factor(factor)
        if level:
            m.count_degraded(level_name(level), frames)
        if level == pb.HELD_FRAME:
            m.count_dropped("held_frame", frames)
        self.end()

    def end(self, error: BaseException | None = None) -> None:
        if not self.ended:
            self.ended = True
            _end_with(self.span, error)


def level_name(level: int) -> str:
    """A DegradationLevel as a metric tag: "none", "reduced_nfe", "held_frame"."""
    return "none" if level == 0 else pb.DegradationLevel.Name(level).lower()


# -- metrics ---------------------------------------------------------------------------------


class _Metric:
    """One metric of any backend: `record(value, **tags)` is inc / set / observe by kind."""

    def __init__(self, record: Callable[[float, dict[str, str]], None] | None = None) -> None:
        self._record = record

    def record(self, value: float, **tags: str) -> None:
        if self._record is not None:
            self._record(value, tags)


class Metrics:
    """The services' metrics over one backend: "ray" (ray.serve.metrics), "prometheus" (prometheus_client,
    private registry) or "none".

        block_latency_seconds{stage}   histogram: per stage call (audio_features, motion_encoder, generate,
                                       decode; seen from the ingress) and end_to_end (input complete ->
                                       frames ready)
        realtime_factor                histogram: block media seconds / end-to-end seconds (>= 1: real time)
        frames_degraded_total{level}   counter: frames delivered below full quality (reduced_nfe, held_frame)
        frames_dropped_total{reason}   counter: held_frame (generated block dropped, last frame repeated),
                                       late_video (camera frames behind the generation cursor)
        generator_sessions             gauge per generator replica: sessions held
        generator_cache_bytes          gauge per generator replica: cache bytes of those sessions
    """

    def __init__(self, backend: str) -> None:
        if backend not in ("ray", "prometheus", "none"):
            raise ValueError(f"backend: got {backend!r}; expected 'ray', 'prometheus' or 'none'")
        self.backend = backend
        self.registry = None
        if backend == "prometheus":
            import prometheus_client

            self.registry = prometheus_client.CollectorRegistry(auto_describe=True)
        make = {"ray": self._ray, "prometheus": self._prometheus, "none": lambda *a, **k: _Metric()}[backend]
        self.block_latency = make(
            "histogram", "block_latency_seconds", "Block latency per stage and end to end (s)", ("stage",),
            LATENCY_BUCKETS_S,
        )  # fmt: skip
        self.realtime_factor = make(
            "histogram", "realtime_factor", "Block media duration / end-to-end block latency", (),
            REALTIME_FACTOR_BUCKETS,
        )  # fmt: skip
        self.frames_degraded = make("counter", "frames_degraded_total", "Frames below full quality", ("level",))
        self.frames_dropped = make("counter", "frames_dropped_total", "Frames dropped", ("reason",))
        self.generator_sessions = make("gauge", "generator_sessions", "Sessions held by the replica", ("replica",))
        self.generator_cache_bytes = make(
            "gauge", "generator_cache_bytes", "Cache bytes of the sessions held by the replica", ("replica",)
        )

    # -- recording ----------------------------------------------------------------------------

    def observe_latency(self, stage: str, seconds: float) -> None:
        self.block_latency.record(seconds, stage=stage)

    def observe_realtime_factor(self, factor: float) -> None:
        self.realtime_factor.record(factor)

    def count_degraded(self, level: str, frames: int = 1) -> None:
        if frames > 0:
            self.frames_degraded.record(frames, level=level)

    def count_dropped(self, reason: str, frames: int = 1) -> None:
        if frames > 0:
            self.frames_dropped.record(frames, reason=reason)

    def set_generator_load(self, replica_id: str, sessions: int, cache_bytes: int) -> None:
        self.generator_sessions.record(sessions, replica=replica_id)
        self.generator_cache_bytes.record(cache_bytes, replica=replica_id)

    # -- backends -----------------------------------------------------------------------------

    @staticmethod
    def _ray(kind: str, name: str, doc: str, tags: tuple[str, ...], buckets=None) -> _Metric:
        from ray.serve import metrics as serve_metrics

        # Serve tags every metric with its deployment and replica (and reserves those names).
        tags = tuple(t for t in tags if t != "replica")
        if kind == "histogram":
            metric = serve_metrics.Histogram(name, doc, boundaries=list(buckets), tag_keys=tags)
            record = metric.observe
        elif kind == "counter":
            metric = serve_metrics.Counter(name, doc, tag_keys=tags)
            record = metric.inc
        else:
            metric = serve_metrics.Gauge(name, doc, tag_keys=tags)
            record = metric.set
        return _Metric(lambda value, values: record(value, tags={k: str(v) for k, v in values.items() if k in tags}))

    def _prometheus(self, kind: str, name: str, doc: str, tags: tuple[str, ...], buckets=None) -> _Metric:
        import prometheus_client

        if kind == "histogram":
            metric = prometheus_client.Histogram(name, doc, tags, registry=self.registry, buckets=buckets)
            method = "observe"
        elif kind == "counter":
            metric = prometheus_client.Counter(name, doc, tags, registry=self.registry)
            method = "inc"
        else:
            metric = prometheus_client.Gauge(name, doc, tags, registry=self.registry)
            method = "set"

        def record(value: float, values: dict[str, str]) -> None:
            target = metric.labels(**{k: str(values[k]) for k in tags}) if tags else metric
            getattr(target, method)(value)

        return _Metric(record)

    def value(self, name: str, **labels: str) -> float | None:
        """A sample's current value (prometheus backend; e.g. "frames_dropped_total", reason="late_video")."""
        return None if self.registry is None else self.registry.get_sample_value(name, labels)


def metrics() -> Metrics:
    """This process's metrics: Ray Serve's inside Ray, else prometheus_client's, else none (chosen on first use)."""
    global _metrics
    if _metrics is None:
        with _lock:
            if _metrics is None:
                _metrics = _create(_default_backend())
    return _metrics


def use_metrics(backend: str) -> Metrics:
    """Replace this process's metrics with fresh ones of `backend` (tests: "prometheus")."""
    global _metrics
    with _lock:
        _metrics = _create(backend)
        return _metrics


def _default_backend() -> str:
    ray = sys.modules.get("ray")  # never imported here: the pipeline and the servicers stay Ray-free
    if ray is not None and ray.is_initialized():
        return "ray"
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        return "none"
    return "prometheus"


def _create(backend: str) -> Metrics:
    try:
        return Metrics(backend)
    except Exception:
        log.exception("metrics: the %s backend failed to start; metrics are not recorded", backend)
        return Metrics("none")
