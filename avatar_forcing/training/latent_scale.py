"""Standardise the scale of a trained auto-encoder's latents, without changing what it computes.

The flow transformer denoises motion latents against unit-variance noise (`x_t = (1 - σ)·x0 + σ·ε`),
so the latents' scale sets at which noise levels their motion is visible and how much of the
velocity loss it is worth. An auto-encoder trained on reconstruction alone fixes no scale for its
latents; latent diffusion models rescale theirs to unit variance with a constant factor. Here the
factor is folded into the weights instead, so the network is still the one `docs/model-spec.md`
describes and nothing downstream changes:

    h     = net_app(image)            the last conv (bias-less)         weight × c  ->  c·h
    alpha = fc(h)                     4 linear layers + 512 -> 20, no activations:
                                      first layer's weight ÷ c, last layer's weight and bias × c
                                                                        ->  c·alpha, so r = c·r
    style = modulation(s_r + r_d)     every modulated conv of the decoder: weight ÷ c
                                                                        ->  the same style

Identity and motion latents both scale by c, every decoded pixel stays the same (up to float
rounding). `standardise_latents` picks c so that the motion coefficients of the given crops have
the target standard deviation (root mean square over the 20 coefficients). In the demo build the
trained coefficients already spread by 1.4 (0.4 within a clip), and rescaling them either way
changed nothing a 1200-step flow transformer learnt (docs/synthetic-world.md): the option is off
in its recipe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from avatar_forcing.engine.portrait import images_to_tensor
from avatar_forcing.nn.motion_autoencoder import ModulatedConv2d, MotionAutoEncoder


@torch.no_grad()
def scale_latents(mae: MotionAutoEncoder, factor: float) -> MotionAutoEncoder:
    """Multiply the identity and motion latents by `factor` in place; the decoded images stay the same."""
    if not (isinstance(factor, (int, float)) and math.isfinite(factor) and factor > 0):
        raise ValueError(f"factor: got {factor!r}; expected a finite number > 0")
    mae.enc.net_app.convs[-1].weight.mul_(factor)
    fc = mae.enc.fc
    fc[0].weight.div_(factor)  # fc is linear throughout: only its input and output scales move
    fc[-1].weight.mul_(factor)
    fc[-1].bias.mul_(factor)
    for module in mae.dec.modules():
        if isinstance(module, ModulatedConv2d):
            module.modulation.weight.div_(factor)
    return mae


@torch.no_grad()
def motion_spread(mae: MotionAutoEncoder, clips: Sequence[np.ndarray], frames: int = 2048, seed: int = 0) -> float:
    """Standard deviation of the motion coefficients over up to `frames` crops drawn from `clips`
    (per coefficient over the crops, then the root mean square over the coefficients)."""
    lengths = np.array([len(c) for c in clips], dtype=np.int64)
    total = int(lengths.sum())
    if total < 2:
        raise ValueError(f"clips: {total} face crops; expected at least 2 to measure a spread")
    # flat indices over all clips' crops, gathered clip by clip: no copy of every crop
    pick = np.sort(np.random.default_rng(seed).choice(total, size=min(frames, total), replace=False))
    starts = np.cumsum(lengths) - lengths
    clip_of = np.searchsorted(starts, pick, side="right") - 1
    crops = np.stack([clips[k][i] for k, i in zip(clip_of, pick - starts[clip_of], strict=True)])
    was_training = mae.training
    mae.eval()
    alpha = torch.cat(
        [
            mae.motion_coefficients(images_to_tensor(mae, crops[i : i + 256], "face crops"))
            for i in range(0, len(crops), 256)
        ]
    )
    mae.train(was_training)
    return float(alpha.double().var(dim=0).mean().sqrt())


def standardise_latents(
    mae: MotionAutoEncoder, clips: Sequence[np.ndarray], target: float = 1.0, frames: int = 2048, seed: int = 0
) -> dict[str, float]:
    """Rescale `mae`'s latents in place so the crops' motion coefficients spread by `target`;
    returns {"factor", "spread_before", "spread_after"}."""
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target: got {target!r}; expected a finite number > 0")
    before = motion_spread(mae, clips, frames, seed)
    if before <= 0:
        raise ValueError("clips: the motion coefficients do not vary over these crops; expected a trained auto-encoder")
    factor = target / before
    scale_latents(mae, factor)
    return {"factor": factor, "spread_before": before, "spread_after": motion_spread(mae, clips, frames, seed)}
