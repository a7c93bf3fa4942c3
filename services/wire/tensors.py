"""numpy / torch arrays <-> `avatar_forcing.v1.Tensor`, validated.

    msg = encode(latents)                                     # (n, 512) float32 -> Tensor
    features = decode(msg, "avatar_audio", shape=(None, 512))  # Tensor -> np.ndarray float32
    crops = decode_torch(msg, "crops", shape=(None, None, None, 3), dtypes={"UINT8"},
                         max_bytes=Limit.MAX_CROPS_TENSOR_BYTES)

Wire format (tensor.proto): row-major, little-endian, no padding. Every failure raises
`ValidationError` (INVALID_ARGUMENT) naming the field: the dtype is allowed, the rank and
each dimension match, len(data) == prod(shape) * itemsize, the size is within the limit and
floating-point values are finite. `encode` checks the same so that no service sends what it
would reject.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

import numpy as np
import torch

from services.wire.errors import ValidationError
from services.wire.protos import Limit, pb

__all__ = ["DTYPE_NAMES", "ValidationError", "decode", "decode_torch", "encode"]

_DType = pb.Tensor.DType
DTYPE_NAMES = ("FLOAT32", "FLOAT16", "BFLOAT16", "UINT8")
FLOAT_DTYPES = frozenset({"FLOAT32", "FLOAT16", "BFLOAT16"})
_ITEMSIZE = {"FLOAT32": 4, "FLOAT16": 2, "BFLOAT16": 2, "UINT8": 1}
_NUMPY = {"FLOAT32": np.dtype("<f4"), "FLOAT16": np.dtype("<f2"), "BFLOAT16": np.dtype("<u2"), "UINT8": np.dtype("u1")}
_TORCH = {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "UINT8": torch.uint8}
_FROM_NUMPY = {np.dtype("float32"): "FLOAT32", np.dtype("float64"): "FLOAT32", np.dtype("float16"): "FLOAT16"}
_FROM_NUMPY[np.dtype("uint8")] = "UINT8"
_FROM_TORCH = {torch.float32: "FLOAT32", torch.float64: "FLOAT32", torch.float16: "FLOAT16"}
_FROM_TORCH |= {torch.bfloat16: "BFLOAT16", torch.uint8: "UINT8"}

Shape = Sequence[int | None]  # None: any size in that dimension


# -- encode ------------------------------------------------------------------------------------


def encode(
    value: np.ndarray | torch.Tensor,
    field: str = "tensor",
    dtype: str | None = None,
    max_bytes: int = Limit.MAX_TENSOR_BYTES,
) -> pb.Tensor:
    """An array as a Tensor message. dtype: one of DTYPE_NAMES; default from the array
    (float64 is sent as FLOAT32). Raises ValidationError for what `decode` would reject."""
    if isinstance(value, torch.Tensor):
        array, source = value.detach().cpu(), value.dtype
        name = dtype or _FROM_TORCH.get(source)
    elif isinstance(value, np.ndarray):
        array, source = value, value.dtype
        name = dtype or _FROM_NUMPY.get(np.dtype(source))
    else:
        raise ValidationError(field, f"expected a numpy array or torch tensor, got {type(value).__name__}")
    if name not in _ITEMSIZE:
        expected = ", ".join(DTYPE_NAMES)
        raise ValidationError(f"{field}.dtype", f"cannot send {source} as {name or '?'}; expected one of {expected}")
    if name == "UINT8" and source not in (torch.uint8, np.dtype("uint8")):
        raise ValidationError(f"{field}.dtype", f"cannot send {source} as UINT8 without a cast; expected uint8")
    shape = tuple(int(d) for d in array.shape)
    _check_shape(field, shape, None, max_bytes, name)
    if name in FLOAT_DTYPES:
        if isinstance(array, torch.Tensor):
            finite = bool(torch.isfinite(array).all()) if array.is_floating_point() else True
        else:
            finite = bool(np.isfinite(array).all()) if array.dtype.kind == "f" else True
        if not finite:
            raise ValidationError(field, "contains NaN or infinite values; expected finite values")
    return pb.Tensor(shape=shape, dtype=_DType.Value(name), data=_to_bytes(array, name))


def _to_bytes(array: np.ndarray | torch.Tensor, name: str) -> bytes:
    if isinstance(array, torch.Tensor):
        if name == "BFLOAT16":
            return array.to(torch.bfloat16).contiguous().view(torch.int16).numpy().astype("<i2").tobytes()
        array = array.to(_TORCH[name]).contiguous().numpy()
    if name == "BFLOAT16":
        return _float32_to_bf16_bits(np.asarray(array, dtype=np.float32)).astype("<u2").tobytes()
    return np.ascontiguousarray(array, dtype=_NUMPY[name]).tobytes()


def _float32_to_bf16_bits(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest even), as the upper 16 bits. Finite input only."""
    bits = array.view(np.uint32).astype(np.uint64)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


# -- decode ------------------------------------------------------------------------------------


def decode(
    message: pb.Tensor,
    field: str,
    shape: Shape | None = None,
    dtypes: Collection[str] = DTYPE_NAMES,
    max_bytes: int = Limit.MAX_TENSOR_BYTES,
) -> np.ndarray:
    """A validated Tensor as a writable numpy array: float32 for every float dtype, uint8 as is."""
    name, dims = _validate(message, field, shape, dtypes, max_bytes)
    raw = np.frombuffer(message.data, dtype=_NUMPY[name]).reshape(dims)
    if name == "BFLOAT16":
        array = (raw.astype(np.uint32) << 16).view(np.float32)
    elif name == "UINT8":
        array = raw.copy()
    else:
        array = raw.astype(np.float32)  # copies: the message's bytes stay immutable
    if name in FLOAT_DTYPES:
        _check_finite(field, array)
    return array


def decode_torch(
    message: pb.Tensor,
    field: str,
    shape: Shape | None = None,
    dtypes: Collection[str] = DTYPE_NAMES,
    max_bytes: int = Limit.MAX_TENSOR_BYTES,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """A validated Tensor as a CPU torch tensor of its own dtype (bfloat16 stays bfloat16),
    or cast to `dtype`."""
    name, dims = _validate(message, field, shape, dtypes, max_bytes)
    flat = torch.frombuffer(bytearray(message.data), dtype=_TORCH[name]) if message.data else None
    tensor = flat.reshape(dims) if flat is not None else torch.zeros(dims, dtype=_TORCH[name])
    if name in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
        bad = int(torch.nonzero(~torch.isfinite(tensor.reshape(-1)))[0])
        raise ValidationError(field, f"contains NaN or infinite values (first at flat index {bad}); expected finite")
    return tensor if dtype is None else tensor.to(dtype)


def _validate(
    message: pb.Tensor, field: str, shape: Shape | None, dtypes: Collection[str], max_bytes: int
) -> tuple[str, tuple[int, ...]]:
    if not isinstance(message, pb.Tensor):
        raise ValidationError(field, f"expected an avatar_forcing.v1.Tensor, got {type(message).__name__}")
    code = message.dtype
    name = _DType.Name(code) if code in _DType.values() else f"unknown ({code})"
    if name not in dtypes:
        allowed = ", ".join(d for d in DTYPE_NAMES if d in dtypes)
        raise ValidationError(f"{field}.dtype", f"{name} is not allowed; expected one of {allowed}")
    dims = tuple(int(d) for d in message.shape)
    _check_shape(field, dims, shape, max_bytes, name)
    expected = math.prod(dims) * _ITEMSIZE[name]
    if len(message.data) != expected:
        raise ValidationError(
            f"{field}.data",
            f"{len(message.data)} bytes; expected {expected} (shape {dims} x {_ITEMSIZE[name]}-byte {name})",
        )
    return name, dims


def _check_shape(field: str, dims: tuple[int, ...], shape: Shape | None, max_bytes: int, name: str) -> None:
    if len(dims) > Limit.MAX_TENSOR_RANK:
        raise ValidationError(f"{field}.shape", f"rank {len(dims)} exceeds MAX_TENSOR_RANK = {Limit.MAX_TENSOR_RANK}")
    if shape is not None:
        pattern = "(" + ", ".join("n" if d is None else str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"
        pairs = zip(dims, shape, strict=False)  # equal lengths are checked first
        if len(dims) != len(shape) or any(want is not None and got != want for got, want in pairs):
            raise ValidationError(f"{field}.shape", f"got {dims}; expected {pattern}")
    nbytes = math.prod(dims) * _ITEMSIZE[name]
    if nbytes > max_bytes:
        raise ValidationError(field, f"{nbytes} bytes (shape {dims} {name}) exceeds the limit of {max_bytes} bytes")


def _check_finite(field: str, array: np.ndarray) -> None:
    finite = np.isfinite(array)
    if not finite.all():
        bad = int(np.flatnonzero(~finite)[0])
        raise ValidationError(field, f"contains NaN or infinite values (first at flat index {bad}); expected finite")


def check_rows(field: str, array: np.ndarray | torch.Tensor, low: int, high: int) -> int:
    """The first dimension of an array, checked against [low, high] (e.g. frames per request)."""
    rows = int(array.shape[0]) if len(array.shape) else 1
    if not low <= rows <= high:
        raise ValidationError(f"{field}.shape", f"{rows} rows; expected {low} to {high}")
    return rows
