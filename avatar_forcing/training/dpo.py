"""Diffusion-DPO for flow matching, in diffusion-forcing form (paper §4.2, eq. 7, appendix C).

A pair shares its conditions c, its reference r_s, its per-block timesteps and its noise ε
(eq. 11); winner w = the ground-truth motion, loser l = motion sampled with the user dropped
(`losers.py`). With targets u^k = ε - x0^k (eq. 13) and the `diffusion_forcing.per_sample_loss`
reduction (mean over loss frames and channels):

    ℓ_θ^k   = mean_{n,d} |v_θ(x_t^k, t, c) - u^k|^p         k ∈ {w, l}
    ℓ_ref^k = the same with the frozen reference (the start weights), no gradient
    z       = -(β/2) · [(ℓ_θ^w - ℓ_ref^w) - (ℓ_θ^l - ℓ_ref^l)]
    L_DPO   = mean_b softplus(-z)  (= -mean log σ(z))
    L       = L_DPO + λ · L_DF      (L_DF: the plain objective on the ground truth, with dropout)

At θ = ref: z = 0, L_DPO = log 2 and ∇L_DPO = (β/4)·∇ mean_b(ℓ_θ^w - ℓ_θ^l).

The reduction fixes β's scale: summing over the N frames and D channels instead of averaging
multiplies every ℓ by N·D, so β_sum = β_mean / (N·D) gives the same loss. The default β = 5000
is Diffusion-DPO's (SD 1.5, Salesforce form with the ½ inside, per-element mean MSE; diffusers
writes the same as β = 2500 without the ½); eq. 12's own value is lost in our copy of the paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avatar_forcing.nn import prepacked
from avatar_forcing.sampling.euler import FlowMatchEuler
from avatar_forcing.training.batch import TrainingBatch
from avatar_forcing.training.diffusion_forcing import (
    DiffusionForcingConfig,
    ModelInputs,
    draw_noise,
    drop_conditions,
    full_conditions,
    loss_weights,
    noised,
    per_sample_loss,
)

LOG_2 = math.log(2.0)


@dataclass(frozen=True)
class DPOConfig:
    beta: float = 5000.0
    df_weight: float = 1.0  # λ
    loser_weights: str | None = None  # a separate talking-only checkpoint (the paper); None: the start model
    loser_nfe: int = 10
    loser_audio_guidance: float = 2.0
    loser_batch: int = 16
    loser_device: str | None = None  # None: the training device
    loser_seed: int = 0

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ValueError(f"dpo beta: got {self.beta}; expected > 0")
        if self.df_weight < 0:
            raise ValueError(f"dpo df_weight (λ): got {self.df_weight}; expected >= 0")
        if self.loser_nfe < 2:
            raise ValueError(f"dpo loser_nfe: got {self.loser_nfe}; expected >= 2")
        if self.loser_batch < 1:
            raise ValueError(f"dpo loser_batch: got {self.loser_batch}; expected >= 1")


def dpo_objective(
    policy_win: Tensor, policy_lose: Tensor, ref_win: Tensor, ref_lose: Tensor, beta: float
) -> tuple[Tensor, Tensor]:
    """Per-example losses (B,) x4 -> (L_DPO, z (B,))."""
    z = -(beta / 2) * ((policy_win - ref_win) - (policy_lose - ref_lose))
    return F.softplus(-z).mean(), z


def dpo_stats(z: Tensor, policy_win: Tensor, policy_lose: Tensor, ref_win: Tensor, ref_lose: Tensor, beta: float):
    """Logged numbers: implicit accuracy (z > 0, ties count ½), the reward margin mean z, both rewards."""
    z = z.detach()
    reward_win = (-(beta / 2) * (policy_win - ref_win)).detach()
    reward_lose = (-(beta / 2) * (policy_lose - ref_lose)).detach()
    return {
        "implicit_acc": float((z > 0).float().mean() + 0.5 * (z == 0).float().mean()),
        "reward_margin": float(z.mean()),
        "reward_win": float(reward_win.mean()),
        "reward_lose": float(reward_lose.mean()),
    }


@dataclass
class DPOStep:
    loss: Tensor  # L = L_DPO + λ·L_DF, with gradient
    stats: dict[str, float]  # loss_dpo, loss_df, implicit_acc, reward_margin, reward_win, reward_lose
    policy_win: Tensor  # (B,) per-example ℓ
    policy_lose: Tensor
    ref_win: Tensor
    ref_lose: Tensor


def dpo_loss(
    policy: nn.Module,
    reference: nn.Module,
    batch: TrainingBatch,
    scheduler: FlowMatchEuler,
    df_config: DiffusionForcingConfig,
    config: DPOConfig,
    block: int,
    generator: torch.Generator,
) -> DPOStep:
    """L = L_DPO + λ·L_DF for one batch and the numbers to log. Both models are VelocityModels.

    The policy runs once over 3B rows ([winner; loser] with full conditions under the shared
    draw, then the ground truth with condition dropout under its own draw for L_DF), so DDP sees
    one forward per step.
    """
    if batch.loser_motion is None:
        raise ValueError("dpo: the batch has no loser_motion; expected losers attached by the trainer")
    pair = draw_noise(batch, block, scheduler, generator, df_config.clean_context_prob)
    df_draw = draw_noise(batch, block, scheduler, generator, df_config.clean_context_prob)
    df_inputs = drop_conditions(batch, df_config, generator)
    inputs = full_conditions(batch)
    power = df_config.loss_power

    xw, uw = noised(batch.avatar_motion, pair, scheduler)
    xl, ul = noised(batch.loser_motion, pair, scheduler)
    xd, ud = noised(batch.avatar_motion, df_draw, scheduler)
    x = torch.cat([xw, xl, xd])
    timesteps = torch.cat([pair.timesteps, pair.timesteps, df_draw.timesteps])
    rows = ModelInputs.cat([inputs, inputs, df_inputs])
    weights = loss_weights(batch.mask, pair.sigmas)

    vw, vl, vd = policy(x, timesteps, rows).chunk(3)
    policy_win, policy_lose = per_sample_loss(vw, uw, weights, power), per_sample_loss(vl, ul, weights, power)
    df = per_sample_loss(vd, ud, loss_weights(batch.mask, df_draw.sigmas), power).mean()
    # The reference runs on the very same rows (its L_DF third is discarded) and the plain linear
    # path, so that with θ = ref its numbers are the policy's bit for bit and z = 0 exactly.
    with torch.no_grad(), prepacked.disabled():
        rw, rl, _ = reference(x, timesteps, rows).chunk(3)
        ref_win, ref_lose = per_sample_loss(rw, uw, weights, power), per_sample_loss(rl, ul, weights, power)
    loss_dpo, z = dpo_objective(policy_win, policy_lose, ref_win, ref_lose, config.beta)
    stats = dpo_stats(z, policy_win, policy_lose, ref_win, ref_lose, config.beta)
    stats.update(loss_dpo=float(loss_dpo.detach()), loss_df=float(df.detach()))
    return DPOStep(loss_dpo + config.df_weight * df, stats, policy_win, policy_lose, ref_win, ref_lose)
