"""Exponential moving average of the trained weights (what inference and export use).

    ema ← d·ema + (1 - d)·θ   after every optimiser step, d = min(decay, (1 + k) / (10 + k))

k counts the updates: the warm-up keeps the average from being dominated by the random start
in short fine-tunes. Buffers (none in the flow transformer) are copied as they are.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class EMA:
    def __init__(self, module: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay: got {decay}; expected 0 < decay < 1 (or disable EMA)")
        self.decay = decay
        self.updates = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}

    @torch.no_grad()
    def update(self, module: nn.Module) -> None:
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        shadows, values = [], []
        for name, value in module.state_dict().items():
            if value.dtype.is_floating_point:
                shadows.append(self.shadow[name])
                values.append(value.detach().float())
            else:
                self.shadow[name].copy_(value)
        torch._foreach_lerp_(shadows, values, 1 - d)  # ema + (1 - d)(θ - ema), all tensors at once
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise ValueError(f"ema state: missing {sorted(missing)[:5]}; expected the trained module's keys")
        self.decay, self.updates = float(state["decay"]), int(state["updates"])
        self.shadow = {k: v.float().to(self.shadow[k].device, copy=True) for k, v in state["shadow"].items()}

    def weights(self, like: nn.Module) -> dict[str, Tensor]:
        """The averaged weights in `like`'s dtypes and devices (for load_state_dict)."""
        ref = like.state_dict()
        return {k: v.to(ref[k].dtype).to(ref[k].device) for k, v in self.shadow.items()}
