"""Flow-matching Euler sampler, classifier-free guidance and forward noising (model-spec §5).

The sampler owns the timestep grid, the update and, for training, the forward process
(`add_noise`, `velocity_target`): the network only predicts velocities. Nothing here
knows about caches or sessions.

Convention (one for sampling and training): x_t = (1 - σ)·x0 + σ·ε, velocity v = ε - x0,
so x0 = x_t - σ·v, which is exactly what `step` uses. σ = 1 is pure noise, σ = 0 clean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class GuidanceScales:
    audio: float = 2.0  # a_cfg: avatar audio
    user: float = 1.0  # u_cfg: user audio + user motion

    def combine(self, velocity: Tensor) -> Tensor:
        """Rows [uncond, audio, user] (3, ...) -> guided velocity (...)."""
        v_uncond, v_audio, v_user = velocity.unbind(0)
        return v_uncond + self.audio * (v_audio - v_uncond) + self.user * (v_user - v_uncond)


GUIDANCE_ROWS = 3  # [unconditional, avatar audio only, user audio + user motion only]


class FlowMatchEuler:
    """Euler solver on the release's 1000-point sigma grid.

    A requested timestep uses the sigma of the nearest grid timestep (ties to the
    first), not t/1000: the two differ by up to 5e-4 and that shows in the output.
    """

    def __init__(self, num_train_timesteps: int = 1000) -> None:
        self.num_train_timesteps = num_train_timesteps
        self.sigmas = torch.linspace(1.0, 0.0, num_train_timesteps, dtype=torch.float32)
        self.timesteps = self.sigmas * num_train_timesteps
        self._grid = self.timesteps.double().numpy()

    def timestep_list(self, nfe: int) -> list[float]:
        """`nfe - 1` timesteps from T down to 0 (the release's count; the last is t = 0)."""
        if nfe < 2:
            raise ValueError(f"nfe: expected >= 2, got {nfe}")
        return [float(t) for t in np.linspace(self.num_train_timesteps, 0, nfe - 1)]

    def sigma(self, t: float) -> float:
        if t == 0:
            return 0.0
        index = int(np.argmin(np.abs(self._grid - float(np.float32(t)))))
        return float(self.sigmas[index])

    def step(self, x: Tensor, velocity: Tensor, sigma_now: Tensor, sigma_next: Tensor) -> Tensor:
        """x_t -> x_next per token, in float64. sigma_* broadcast against x (e.g. (B, L, 1)).

        x0 = x - s*v; x' = (s'/s)*x + ((1-s') - (s'/s)(1-s))*x0, with s'/s := 0 where s = 0,
        which leaves a token at s = s' = 0 (clean context) exactly unchanged.
        """
        x64, v64 = x.double(), velocity.double()
        s, s_next = sigma_now.double(), sigma_next.double()
        x0 = x64 - s * v64
        ratio = torch.where(s > 0, s_next / torch.where(s > 0, s, torch.ones_like(s)), torch.zeros_like(s))
        out = ratio * x64 + ((1 - s_next) - ratio * (1 - s)) * x0
        frozen = (s == 0) & (s_next == 0)
        return torch.where(frozen, x64, out).to(x.dtype)

    # Forward noising (training). Grid index i in [0, num_train_timesteps) has sigma 1 - i/(N-1)
    # and raw timestep N * sigma: index 0 is pure noise, index N - 1 is clean (t = 0).

    def grid_point(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Grid indices (any shape, int64) -> (raw timesteps, sigmas) of the same shape, float32."""
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_train_timesteps):
            raise ValueError(f"grid index: expected values in [0, {self.num_train_timesteps}), got {index}")
        index = index.cpu()
        return self.timesteps[index], self.sigmas[index]

    @staticmethod
    def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
        """x_t = (1 - σ)·x0 + σ·ε; sigma broadcasts against x0 (e.g. (B, L, 1) per token)."""
        return (1 - sigma) * x0 + sigma * noise

    @staticmethod
    def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
        """The flow-matching target the network regresses: v = ε - x0 (d x_t / d σ)."""
        return noise - x0
