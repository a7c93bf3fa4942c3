"""`avatar_forcing.v1.Tensor` -> torch tensor, for the services that compute with torch.

    crops = decode_torch(msg, "crops", shape=(None, None, None, 3), dtypes={"UINT8"},
                         max_bytes=Limit.MAX_CROPS_TENSOR_BYTES)

The checks are `services.wire.tensors.validate`, the same as numpy's `decode`; this module lives
outside the wire floor so that the client and the bridge load without torch. Sending a torch
tensor needs nothing here: `services.wire.tensors.encode` takes one.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from services.wire.errors import ValidationError
from services.wire.protos import Limit, pb
from services.wire.tensors import DTYPE_NAMES, FLOAT_DTYPES, Shape, validate

__all__ = ["decode_torch"]

_TORCH = {"FLOAT32": torch.float32, "FLOAT16": torch.float16, "BFLOAT16": torch.bfloat16, "UINT8": torch.uint8}


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
    name, dims = validate(message, field, shape, dtypes, max_bytes)
    # bytearray: torch.frombuffer needs a writable buffer, and the message's bytes stay immutable.
    flat = torch.frombuffer(bytearray(message.data), dtype=_TORCH[name]) if message.data else None
    tensor = flat.reshape(dims) if flat is not None else torch.zeros(dims, dtype=_TORCH[name])
    if name in FLOAT_DTYPES and not bool(torch.isfinite(tensor).all()):
        bad = int(torch.nonzero(~torch.isfinite(tensor.reshape(-1)))[0])
        raise ValidationError(field, f"contains NaN or infinite values (first at flat index {bad}); expected finite")
    return tensor if dtype is None else tensor.to(dtype)
