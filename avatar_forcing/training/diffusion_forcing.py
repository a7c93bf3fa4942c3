"""The diffusion-forcing objective of the flow transformer (paper §4.1 eq. 6, model-spec §6).

For a window of T frames split into blocks of `block` frames (the mask's blocks):

    grid index i_b ~ U{0 .. N-2} per block b (N = 1000 grid points; N-1 would be clean)
    σ_n = σ(i_b), t_n = N·σ_n for every frame n of block b     (one timestep per block)
    x_t = (1 - σ)·x0 + σ·ε,  target u = ε - x0                 (`FlowMatchEuler.add_noise`)
    ℓ = Σ_n w_n · mean_d |v_θ(x_t, t, c, r_s)_n,d - u_n,d|^p / Σ_n w_n      (p = 1 paper, or 2)

w_n is 1 on real (unpadded) frames with σ_n > 0 and 0 elsewhere; the batch loss is the mean
of ℓ over examples.

Clean context: at inference every block after the first window is denoised next to clean
frames (the cached K/V and 2 context frames, all written at t = 0). So with probability
`clean_context_prob` a window's first k blocks (k ~ U{1 .. blocks-1}) are set to t = 0 (x_t = x0)
and carry no loss; the forward pass then has exactly the inference structure: clean frames
whose last `lookahead` frames look ahead into a noisy block.

Condition dropout, so the three guidance rows of the sampler are trained (`Conditions.guidance_rows`:
an absent condition is zeros, the reference is always present at inference): independently per
example, avatar audio -> 0 with `drop_avatar_audio`, user audio and user motion -> 0 together with
`drop_user`, and the reference r_s -> 0 with `drop_reference` (the release config's 0.1 each).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from avatar_forcing.nn.flow_transformer import FlowTransformer, additive_mask
from avatar_forcing.sampling.euler import FlowMatchEuler
from avatar_forcing.training.batch import TrainingBatch
from avatar_forcing.training.conditioning import ConditionContext, encode_window_conditions


@dataclass(frozen=True)
class DiffusionForcingConfig:
    loss_power: int = 1  # 1: L1 as in the paper (App. D.1); 2: the canonical flow-matching L2
    drop_avatar_audio: float = 0.1
    drop_user: float = 0.1  # user audio and user motion together (the sampler's user row)
    drop_reference: float = 0.1
    clean_context_prob: float = 0.5  # windows with a clean (t = 0) prefix of blocks
    # user motion alone (user audio kept); 1.0 trains the paper's "w/o user motion" ablation.
    # 0 and 1 draw nothing, so the default run's random stream is unchanged.
    drop_user_motion: float = 0.0

    def __post_init__(self) -> None:
        if self.loss_power not in (1, 2):
            raise ValueError(f"loss_power: got {self.loss_power}; expected 1 (L1) or 2 (L2)")
        for name in ("drop_avatar_audio", "drop_user", "drop_reference", "clean_context_prob", "drop_user_motion"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: got {value}; expected a probability in [0, 1]")


@dataclass
class NoiseDraw:
    """One draw of the forward process for a batch; DPO shares it between winner and loser."""

    noise: Tensor  # (B, T, D) ε
    timesteps: Tensor  # (B, T) raw model timesteps, constant within a block
    sigmas: Tensor  # (B, T)


def sample_block_timesteps(
    batch_size: int,
    frames: int,
    block: int,
    scheduler: FlowMatchEuler,
    generator: torch.Generator,
    clean_context_prob: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """(raw timesteps, sigmas), each (B, T): one grid point per block, optional clean prefix."""
    blocks = -(-frames // block)
    index = torch.randint(0, scheduler.num_train_timesteps - 1, (batch_size, blocks), generator=generator)
    if clean_context_prob > 0 and blocks > 1:
        with_context = torch.rand(batch_size, generator=generator) < clean_context_prob
        prefix = torch.randint(1, blocks, (batch_size,), generator=generator)  # blocks of clean context
        clean = with_context[:, None] & (torch.arange(blocks)[None, :] < prefix[:, None])
        index = torch.where(clean, scheduler.num_train_timesteps - 1, index)  # the last grid point: σ = 0
    frame_index = index.repeat_interleave(block, dim=1)[:, :frames]  # (B, T)
    return scheduler.grid_point(frame_index)


def draw_noise(
    batch: TrainingBatch, block: int, scheduler: FlowMatchEuler, generator: torch.Generator, clean_context_prob: float
) -> NoiseDraw:
    B, T, D = batch.avatar_motion.shape
    timesteps, sigmas = sample_block_timesteps(B, T, block, scheduler, generator, clean_context_prob)
    noise = torch.randn(B, T, D, generator=generator)
    device = batch.avatar_motion.device
    return NoiseDraw(noise.to(device), timesteps.to(device), sigmas.to(device))


@dataclass
class ModelInputs:
    """Conditions as the network takes them (absent ones zeroed, as in the guidance rows).

    The tracks hold each session's condition frames around its window, from session frame
    `origin` (`conditioning.ConditionContext`): the network encodes them chunk by chunk as the
    engine does (`conditioning.encode_window_conditions`).
    """

    avatar_audio: Tensor  # (B, Lc, A)
    user_audio: Tensor  # (B, Lc, A)
    user_motion: Tensor  # (B, Lc, D)
    reference_motion: Tensor  # (B, D)
    start: Tensor  # (B,) long: session frame of window frame 0
    origin: Tensor  # (B,) long: session frame of track frame 0

    @staticmethod
    def cat(parts: list[ModelInputs]) -> ModelInputs:
        return ModelInputs(*(torch.cat([getattr(p, n) for p in parts]) for n in ModelInputs.__dataclass_fields__))


def batch_context(batch: TrainingBatch) -> ConditionContext:
    """The batch's condition context; without one, each window begins its session (start 0).

    Then the frames past an example's length repeat its last real frame, as the engine pads.
    """
    if batch.context is not None:
        return batch.context
    B, T = batch.mask.shape
    last = (batch.mask.sum(dim=1).clamp(min=1) - 1)[:, None]  # (B, 1)
    index = torch.minimum(torch.arange(T, device=batch.mask.device)[None, :], last)  # (B, T)
    pad = lambda x: x.gather(1, index[:, :, None].expand(-1, -1, x.shape[-1]))
    zeros = torch.zeros(B, dtype=torch.long, device=batch.mask.device)
    return ConditionContext(pad(batch.avatar_audio), pad(batch.user_audio), pad(batch.user_motion), zeros, zeros)


def full_conditions(batch: TrainingBatch) -> ModelInputs:
    c = batch_context(batch)
    return ModelInputs(c.avatar_audio, c.user_audio, c.user_motion, batch.reference_motion, c.start, c.origin)


def drop_conditions(batch: TrainingBatch, config: DiffusionForcingConfig, generator: torch.Generator) -> ModelInputs:
    """Per example, zero the avatar audio / the user (audio + motion) / the reference independently,
    and the user motion alone with `drop_user_motion`."""
    B = len(batch)
    keep = lambda p: (torch.rand(B, generator=generator) >= p).to(batch.avatar_audio.device)
    keep_audio, keep_user, keep_ref = (
        keep(config.drop_avatar_audio),
        keep(config.drop_user),
        keep(config.drop_reference),
    )
    keep_motion = keep_user
    if config.drop_user_motion >= 1.0:
        keep_motion = torch.zeros_like(keep_user)
    elif config.drop_user_motion > 0.0:
        keep_motion = keep_user & keep(config.drop_user_motion)
    frame = lambda k, x: x * k[:, None, None].to(x.dtype)
    c = batch_context(batch)
    return ModelInputs(
        frame(keep_audio, c.avatar_audio),
        frame(keep_user, c.user_audio),
        frame(keep_motion, c.user_motion),
        batch.reference_motion * keep_ref[:, None].to(batch.reference_motion.dtype),
        c.start,
        c.origin,
    )


class VelocityModel(nn.Module):
    """The flow transformer as one `forward` (what DDP wraps): one uncached call over whole windows.

    The conditions are encoded chunk by chunk as the streaming engine encodes them, and each
    frame's cross-attention sees the chunk that the engine computes it with
    (`training/conditioning.py`). Frames sit at their absolute session positions.
    """

    def __init__(self, flow: FlowTransformer) -> None:
        super().__init__()
        self.flow = flow

    def forward(self, x: Tensor, timesteps: Tensor, inputs: ModelInputs) -> Tensor:
        """x (B, T, D) noisy latents, timesteps (B, T) (0 = clean) -> velocity (B, T, D)."""
        flow = self.flow
        cond = encode_window_conditions(
            flow,
            inputs.avatar_audio,
            inputs.user_audio,
            inputs.user_motion,
            inputs.start,
            inputs.origin,
            timesteps,
        )
        plan = flow.plan(cond.positions, cond.kv, cond.frames)
        plan.cross_mask = additive_mask(cond.visible[:, None], plan.cross_mask.dtype)
        return flow(x, timesteps, inputs.reference_motion, plan=plan).velocity


def loss_weights(mask: Tensor, sigmas: Tensor) -> Tensor:
    """(B, T) 1.0 on frames that carry loss: real frames that are noisy (σ > 0)."""
    return (mask & (sigmas > 0)).float()


def per_sample_loss(velocity: Tensor, target: Tensor, weights: Tensor, power: int) -> Tensor:
    """ℓ_b = Σ_n w_bn · mean_d |v - u|^p / Σ_n w_bn: (B, T, D) x2, (B, T) -> (B,), in float32.

    A mean over frames and channels: the DPO β is calibrated for this reduction.
    """
    err = (velocity.float() - target.float()).abs()
    if power == 2:
        err = err.square()
    per_frame = err.mean(dim=-1)  # (B, T)
    return (per_frame * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def noised(x0: Tensor, draw: NoiseDraw, scheduler: FlowMatchEuler) -> tuple[Tensor, Tensor]:
    """(x_t, target ε - x0) of clean latents x0 (B, T, D) under a draw."""
    return scheduler.add_noise(x0, draw.noise, draw.sigmas[..., None]), scheduler.velocity_target(x0, draw.noise)


def diffusion_forcing_loss(
    model: nn.Module,
    batch: TrainingBatch,
    scheduler: FlowMatchEuler,
    config: DiffusionForcingConfig,
    block: int,
    generator: torch.Generator,
) -> tuple[Tensor, Tensor]:
    """(batch loss, per-example ℓ (B,)) of the ground-truth avatar motion; `model` is a VelocityModel."""
    draw = draw_noise(batch, block, scheduler, generator, config.clean_context_prob)
    inputs = drop_conditions(batch, config, generator)
    x_t, target = noised(batch.avatar_motion, draw, scheduler)
    velocity = model(x_t, draw.timesteps, inputs)
    losses = per_sample_loss(velocity, target, loss_weights(batch.mask, draw.sigmas), config.loss_power)
    return losses.mean(), losses
