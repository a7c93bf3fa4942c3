"""The block sampler's linear kernels: prepacked backends and the AVX-512 small-batch kernel."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from avatar_forcing.nn import prepacked, small_gemm

needs_kernel = pytest.mark.skipif(not small_gemm.available(), reason=f"small_gemm: {small_gemm.status()}")


def backends() -> list[str]:
    return [b for b in prepacked.BACKENDS if b != "avx512" or small_gemm.available()]


def layer(in_features: int, out_features: int, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features).eval()


@needs_kernel
@pytest.mark.parametrize(
    ("M", "K", "N"), [(1, 64, 32), (12, 1024, 4096), (13, 2500, 96), (36, 4096, 1024), (150, 100, 64)]
)
def test_kernel_matches_float64_matmul(M, K, N):
    g = torch.Generator().manual_seed(M + K + N)
    x = torch.randn(M, K, generator=g)
    w = torch.randn(N, K, generator=g) / K**0.5
    b = torch.randn(N, generator=g)
    packed = small_gemm.pack(w)
    exact = F.linear(x.double(), w.double(), b.double())
    assert (small_gemm.matmul(x, packed, b, N) - exact).abs().max().item() < 3e-5
    assert (small_gemm.matmul(x, packed, None, N) - (exact - b.double())).abs().max().item() < 3e-5
    gelu = small_gemm.matmul(x, packed, b, N, gelu=True)
    assert (gelu - F.gelu(exact, approximate="tanh")).abs().max().item() < 3e-5


@needs_kernel
def test_kernel_gelu_epilogue_over_the_whole_range():
    z = torch.linspace(-60, 60, 32 * 4001).view(-1, 32)
    identity = small_gemm.pack(torch.eye(32))
    got = small_gemm.matmul(z, identity, None, 32, gelu=True)
    assert torch.isfinite(got).all()
    assert (got - F.gelu(z.double(), approximate="tanh")).abs().max().item() < 1e-6


@needs_kernel
def test_kernel_rows_do_not_depend_on_the_batch():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(36, 1024, generator=g), torch.randn(512, 1024, generator=g)
    packed = small_gemm.pack(w)
    batched = small_gemm.matmul(x, packed, None, 512)
    assert torch.equal(batched[7:8], small_gemm.matmul(x[7:8], packed, None, 512))
    assert torch.equal(batched[:13], small_gemm.matmul(x[:13], packed, None, 512))


@needs_kernel
def test_kernel_rejects_shapes_it_cannot_serve():
    with pytest.raises(ValueError, match="multiple of 32"):
        small_gemm.pack(torch.zeros(33, 8))
    with pytest.raises(ValueError, match="expected"):
        small_gemm.matmul(torch.zeros(2, 8), small_gemm.pack(torch.zeros(32, 16)), None, 32)


@pytest.mark.parametrize("backend", backends())
def test_packed_linear_equals_module_for_every_backend(backend):
    lin = layer(256, 384)
    x = torch.randn(3, 12, 256)
    with torch.no_grad(), prepacked.using(backend):
        got = prepacked.linear(x, lin)
        got_gelu = prepacked.linear(x, lin, gelu=True)
        expected = lin(x)
    assert got.shape == (3, 12, 384)
    assert (got - expected).abs().max().item() < 1e-5
    assert (got_gelu - F.gelu(expected, approximate="tanh")).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", [b for b in backends() if b != "onednn"] or ["onednn"])
def test_out_features_the_kernel_cannot_serve_still_give_the_right_answer(backend):
    lin = layer(64, 40)  # not a multiple of 32
    x = torch.randn(5, 64)
    with torch.no_grad(), prepacked.using(backend):
        assert (prepacked.linear(x, lin) - lin(x)).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", backends())
def test_weights_edited_in_place_or_replaced_are_repacked(backend):
    lin = layer(128, 128)
    x = torch.randn(4, 128)
    with torch.no_grad(), prepacked.using(backend):
        before = prepacked.linear(x, lin)
        lin.weight.mul_(2)  # in place: a new version of the same memory
        assert (prepacked.linear(x, lin) - lin(x)).abs().max().item() < 1e-5
        lin.weight = nn.Parameter(torch.randn(128, 128) / 128**0.5)  # new memory
        assert (prepacked.linear(x, lin) - lin(x)).abs().max().item() < 1e-5
    assert (before - lin(x)).abs().max().item() > 1e-2  # the check above could fail


def test_autograd_and_inference_tensors_take_the_plain_path():
    lin = layer(64, 64)
    x = torch.randn(2, 64, requires_grad=True)
    y = prepacked.linear(x, lin)  # grad enabled: F.linear, differentiable
    y.sum().backward()
    assert lin.weight.grad is not None and x.grad is not None
    with torch.inference_mode():
        inference_layer = layer(64, 64)  # weights without a version counter
        z = torch.randn(2, 64)
        assert torch.equal(
            prepacked.linear(z, inference_layer), F.linear(z, inference_layer.weight, inference_layer.bias)
        )


def test_disabled_is_plain_linear_and_unknown_backends_are_refused():
    lin = layer(64, 96)
    x = torch.randn(3, 64)
    with torch.no_grad(), prepacked.disabled():
        assert prepacked.backend() is None
        assert torch.equal(prepacked.linear(x, lin), F.linear(x, lin.weight, lin.bias))
    with pytest.raises(ValueError, match="backend"), prepacked.using("mkl"):
        pass
