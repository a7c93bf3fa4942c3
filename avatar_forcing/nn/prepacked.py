"""Linear layers with weights prepacked once, for CPU inference at small batch.

A streaming block runs every linear at M = 36 rows (3 guidance rows x 12 tokens). At that
size the default CPU path (MKL sgemm) re-packs the whole weight matrix on every call, and the
weights of one forward pass (~450 MB in the `paper` config) come from memory each time. Two
packed backends, chosen once per process, best first:

- "avx512": `small_gemm`, a kernel that overlaps the weight stream with the arithmetic
  (1.3-1.4x faster than oneDNN at M = 36 on the development machine);
- "onednn": oneDNN's linear with the weight reordered once into its blocked layout
  (1.3-1.5x faster than MKL sgemm at M = 36, never slower at M = 12..300).

Measurements: docs/benchmarks.md. The fast path is taken only where it is exact to fp32
rounding and has its kernels: CPU, float32, no autograd (packed weights carry no gradient),
and weights with an in-place version counter (so that loading or editing weights repacks
them; weights created under `torch.inference_mode` have none and take the plain path).
Everything else (CUDA, bf16, training) runs `torch.nn.functional.linear` unchanged. The pack
is held outside the module (a weak map), so modules stay copyable and picklable; it costs one
extra copy of each weight.
"""

from __future__ import annotations

import os
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avatar_forcing.nn import small_gemm

# The row count oneDNN picks the weight layout for. It is fixed (not the first batch seen) so
# that a layer's output for given inputs never depends on which batch size came first; packed
# weights serve every batch size correctly.
PACK_ROWS_HINT = 36

BACKENDS = ("avx512", "onednn")

_enabled = os.environ.get("AVATAR_FORCING_PREPACK", "1") != "0"
_forced: str | None = None  # a backend chosen by `using` (tests, measurements)
_kernels_ok: bool | None = None  # oneDNN probe; None: not probed yet


@dataclass
class _Pack:
    source: Tensor  # a view of the weight it was packed from: keeps that memory from being reused
    version: int
    backend: str
    packed: Tensor  # the backend's layout: a flat panel tensor (avx512) or a oneDNN tensor


_packs: weakref.WeakKeyDictionary[nn.Linear, _Pack] = weakref.WeakKeyDictionary()


def backend() -> str | None:
    """The packed backend CPU float32 inference uses in this process, or None (plain F.linear)."""
    if not _enabled:
        return None
    if _forced is not None:
        return _forced
    if small_gemm.available():
        return "avx512"
    if torch.backends.mkldnn.enabled and _onednn_available():
        return "onednn"
    return None


def enabled() -> bool:
    """Whether a packed path may run (it still applies only to CPU float32 inference)."""
    return backend() is not None


@contextmanager
def using(name: str | None) -> Iterator[None]:
    """Run linears inside the block with one backend: "avx512", "onednn" or None (plain F.linear)."""
    global _enabled, _forced
    if name is not None and name not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {name!r}")
    if name == "avx512" and not small_gemm.available():
        raise RuntimeError(f"avx512 backend: {small_gemm.status()}")
    if name == "onednn" and not _onednn_available():
        raise RuntimeError("onednn backend: oneDNN's packed linear is not available")
    previous = _enabled, _forced
    _enabled, _forced = name is not None, name
    try:
        yield
    finally:
        _enabled, _forced = previous


@contextmanager
def disabled() -> Iterator[None]:
    """Run the plain `F.linear` path inside the block (reference runs, tests)."""
    with using(None):
        yield


def _onednn_available() -> bool:
    """oneDNN's packed linear exists and works here (probed once on a tiny layer)."""
    global _kernels_ok
    if _kernels_ok is None:
        try:
            w, x = torch.ones(8, 4), torch.ones(2, 4)
            packed = torch.ops.mkldnn._reorder_linear_weight(w, 2)
            y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
            _kernels_ok = bool(torch.backends.mkldnn.is_available() and torch.equal(y, x @ w.T))
        except (AttributeError, RuntimeError):
            _kernels_ok = False
    return _kernels_ok


def _weight_version(weight: Tensor) -> int | None:
    try:
        return weight._version
    except RuntimeError:  # inference tensors have no version counter: a pack could go stale unseen
        return None


def _pack(layer: nn.Linear, x: Tensor) -> _Pack | None:
    """The layer's packed weight when a fast path applies to x, else None."""
    w = layer.weight
    if not (x.device.type == "cpu" and w.device.type == "cpu" and x.dtype == w.dtype == torch.float32):
        return None
    if torch.is_grad_enabled() or x.numel() == 0:
        return None
    name = backend()
    if name == "avx512" and not small_gemm.supports(w.shape[0]):
        name = "onednn" if _forced is None and torch.backends.mkldnn.enabled and _onednn_available() else None
    version = None if name is None else _weight_version(w)
    if version is None:
        return None
    pack = _packs.get(layer)
    if pack is None or (pack.version, pack.backend) != (version, name) or pack.source.data_ptr() != w.data_ptr():
        source = w.detach()
        if name == "avx512":
            packed = small_gemm.pack(source)
        else:
            packed = torch.ops.mkldnn._reorder_linear_weight(source, PACK_ROWS_HINT)
        pack = _Pack(source, version, name, packed)
        _packs[layer] = pack
    return pack


def linear(x: Tensor, layer: nn.Linear, gelu: bool = False) -> Tensor:
    """`layer(x)` (..., in) -> (..., out), followed by GELU (tanh approximation) if asked.

    Calls the module's weights directly (no forward hooks), through the packed weight when
    a fast path applies; there GELU runs fused in the matmul's epilogue.
    """
    pack = _pack(layer, x)
    if pack is None:
        y = F.linear(x, layer.weight, layer.bias)
        return F.gelu(y, approximate="tanh") if gelu else y
    rows = x.reshape(-1, x.shape[-1])  # (M, in)
    if pack.backend == "avx512":
        y = small_gemm.matmul(rows, pack.packed, layer.bias, layer.out_features, gelu)
    else:
        attr, algorithm = ("gelu", "tanh") if gelu else ("none", "")
        y = torch.ops.mkldnn._linear_pointwise(rows, pack.packed, layer.bias, attr, [], algorithm)
    return y.view(*x.shape[:-1], y.shape[-1])
