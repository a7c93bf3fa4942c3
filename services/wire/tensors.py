"""numpy arrays (and torch tensors, sent) <-> `avatar_forcing.v1.Tensor`, validated. numpy only:

    msg = encode(latents)                                     # (n, 512) float32 -> Tensor
    features = decode(msg, "avatar_audio", shape=(None, 512))  # Tensor -> np.ndarray float32

`encode` also takes a torch tensor (anything with `.detach().cpu().numpy()`) without importing
torch; a torch tensor on the receiving side is `services.common.torch_tensors.decode_torch`,
which validates with `validate` here.

Wire format (tensor.proto): row-major, little-endian, no padding. Every failure raises
`ValidationError` (INVALID_ARGUMENT) naming the field: the dtype is allowed, the rank and
each dimension match, len(data) == prod(shape) * itemsize, the size is within the limit and
floating-point values are finite. `encode` checks the same so that no service sends what it
would reject.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from typing import Any

import numpy as np

from services.wire.errors import ValidationError
from services.wire.protos import Limit, pb

__all__ = ["DTYPE_NAMES", "FLOAT_DTYPES", "ValidationError", "decode", "encode", "validate"]

_DType = pb.Tensor.DType
DTYPE_NAMES = ("FLOAT32", "FLOAT16", "BFLOAT16", "UINT8")
FLOAT_DTYPES = frozenset({"FLOAT32", "FLOAT16", "BFLOAT16"})
_ITEMSIZE = {"FLOAT32": 4, "FLOAT16": 2, "BFLOAT16": 2, "UINT8": 1}
_NUMPY = {"FLOAT32": np.dtype("<f4"), "FLOAT16": np.dtype("<f2"), "BFLOAT16": np.dtype("<u2"), "UINT8": np.dtype("u1")}
# The wire dtype an array is sent as by default, by the name of its own dtype (numpy's or torch's).
_DEFAULT_NAME = {"float32": "FLOAT32", "float64": "FLOAT32", "float16": "FLOAT16", "uint8": "UINT8"}
_DEFAULT_NAME |= {f"torch.{source}": name for source, name in _DEFAULT_NAME.items()} | {"torch.bfloat16": "BFLOAT16"}

Shape = Sequence[int | None]  # None: any size in that dimension


# -- encode ------------------------------------------------------------------------------------


def encode(
    value: Any,
    field: str = "tensor",
    dtype: str | None = None,
    max_bytes: int = Limit.MAX_TENSOR_BYTES,
) -> pb.Tensor:
    """A numpy array or torch tensor as a Tensor message. dtype: one of DTYPE_NAMES; default from
    the array (float64 is sent as FLOAT32). Raises ValidationError for what `decode` would reject."""
    array, source = _as_numpy(value, field)
    name = dtype or _DEFAULT_NAME.get(source)
    if name not in _ITEMSIZE:
        expected = ", ".join(DTYPE_NAMES)
        raise ValidationError(f"{field}.dtype", f"cannot send {source} as {name or '?'}; expected one of {expected}")
    if name == "UINT8" and array.dtype != np.uint8:
        raise ValidationError(f"{field}.dtype", f"cannot send {source} as UINT8 without a cast; expected uint8")
    shape = tuple(int(d) for d in array.shape)
    _check_shape(field, shape, None, max_bytes, name)
    if name in FLOAT_DTYPES and array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValidationError(field, "contains NaN or infinite values; expected finite values")
    return pb.Tensor(shape=shape, dtype=_DType.Value(name), data=_to_bytes(array, name))


def _as_numpy(value: Any, field: str) -> tuple[np.ndarray, str]:
    """(the values as a numpy array, the name of the value's own dtype, e.g. "float32", "torch.bfloat16")."""
    if isinstance(value, np.ndarray):
        return value, str(value.dtype)
    if callable(getattr(value, "detach", None)) and hasattr(value, "dtype"):  # a torch.Tensor; torch not imported
        source = str(value.dtype)
        tensor = value.detach().cpu()
        if source == "torch.bfloat16":
            # numpy has no bfloat16: widen to float32 (exact); `_to_bytes` rounds back to the same bits.
            tensor = tensor.float()
        return tensor.numpy(), source
    raise ValidationError(field, f"expected a numpy array or torch tensor, got {type(value).__name__}")


def _to_bytes(array: np.ndarray, name: str) -> bytes:
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
    name, dims = validate(message, field, shape, dtypes, max_bytes)
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


def validate(
    message: pb.Tensor,
    field: str,
    shape: Shape | None = None,
    dtypes: Collection[str] = DTYPE_NAMES,
    max_bytes: int = Limit.MAX_TENSOR_BYTES,
) -> tuple[str, tuple[int, ...]]:
    """(dtype name, shape) of a Tensor whose dtype, shape, size and byte count are valid; the
    values are not looked at (each decoder checks they are finite)."""
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
