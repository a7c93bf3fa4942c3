"""int8 storage of large weight matrices: a checkpoint format, not an inference mode.

A 2-D floating-point tensor `w` (out, in) is stored as `round(w / s)` in int8 with one float16
scale per output row, `s = max|w_row| / 127`, under the key `<name>` + `SCALE_SUFFIX`. Loading
multiplies back to float32 before the model sees the weights, so the network computes in its
usual precision; what changes is the weights, by at most half a step each. The shipped
demo model uses it for the flow transformer's matrices to stay within its size budget.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCALE_SUFFIX = ".int8_row_scale"


def quantize_int8(state: dict[str, Tensor], prefixes: tuple[str, ...], min_numel: int = 4096) -> dict[str, Tensor]:
    """The state dict with each 2-D float tensor under `prefixes` (at least `min_numel` values) in int8."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if value.is_floating_point() and value.dim() == 2 and value.numel() >= min_numel and key.startswith(prefixes):
            exact = value.float().abs().amax(dim=1).clamp(min=1e-6) / 127.0
            # the scale is stored in float16: rounded up (float16's relative step is 2^-11), so no
            # row's largest value leaves the int8 range, and the values are rounded with that scale
            scale = (exact * (1 + 2**-10)).half()
            out[key] = torch.round(value.float() / scale.float()[:, None]).clamp(-127, 127).to(torch.int8)
            out[key + SCALE_SUFFIX] = scale
        else:
            out[key] = value
    return out


def dequantize(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Undo `quantize_int8`: int8 tensors with a row scale -> float32; other tensors unchanged."""
    out = {k: v for k, v in state.items() if not k.endswith(SCALE_SUFFIX)}
    for key, scale in state.items():
        if key.endswith(SCALE_SUFFIX):
            name = key[: -len(SCALE_SUFFIX)]
            if name not in state or state[name].dtype != torch.int8 or state[name].shape[0] != scale.shape[0]:
                raise ValueError(f"{key}: a row scale without its int8 matrix {name!r} of {scale.shape[0]} rows")
            out[name] = state[name].float() * scale.float()[:, None]
    return out
