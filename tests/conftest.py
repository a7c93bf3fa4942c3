"""Shared fixtures: the parity fixture's tensors and the tiny model with the fixture's weights."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from avatar_forcing.config import tiny
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.sampling.block_sampler import BlockSampler
from tests.parity_weights import FIXTURE_DIR, fill_module
from tests.redis_support import prefix, redis_url  # noqa: F401 (fixtures: real Redis, one key prefix per test)


@pytest.fixture(scope="session")
def fixture_tensors():
    """name -> tensors of one fixture file, e.g. fixture_tensors("flow_sample")."""
    cache: dict[str, dict[str, torch.Tensor]] = {}

    def load(name: str) -> dict[str, torch.Tensor]:
        if name not in cache:
            cache[name] = load_file(FIXTURE_DIR / f"{name}.safetensors")
        return cache[name]

    return load


@pytest.fixture(scope="session")
def parity_flow() -> FlowTransformer:
    """The fixture's reduced flow transformer (the `tiny` config) with the fill-rule weights."""
    model = FlowTransformer(tiny().flow).eval()
    fill_module(model, "flow_transformer.", "flow_transformer")
    return model


@pytest.fixture()
def parity_sampler(parity_flow) -> BlockSampler:
    return BlockSampler(parity_flow)


@pytest.fixture()
def single_thread():
    """The fixture was produced with one thread; parity tests compare under the same setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture()
def spans():
    """Finished spans of the code under test, in memory (OpenTelemetry SDK exporter)."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from services.common import telemetry

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.set_tracer_provider(provider)
    yield exporter
    telemetry.set_tracer_provider(None)
    provider.shutdown()
