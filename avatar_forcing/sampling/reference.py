"""Offline motion sampler: whole condition tracks in, T motion latents out.

Follows the release's rollout (model-spec §5): the first `window` frames are
denoised together, then one block at a time with `lookahead` clean context frames
and the rolling KV cache. Conditions past the end are padded by repeating the
last frame; the output is cut to T. The streaming engine must equal this.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from avatar_forcing.sampling.block_sampler import BlockRequest, BlockSampler, Conditions, pad_frames
from avatar_forcing.sampling.euler import GuidanceScales

NoiseFn = Callable[[int], Tensor]  # number of frames -> (n, 512) noise


def torch_noise(generator: torch.Generator, dim: int = 512) -> NoiseFn:
    return lambda frames: torch.randn((frames, dim), generator=generator)


@torch.no_grad()
def sample_motion(
    block_sampler: BlockSampler,
    avatar_audio: Tensor,
    user_audio: Tensor,
    user_motion: Tensor,
    reference_motion: Tensor,
    noise: NoiseFn,
    nfe: int = 10,
    guidance: GuidanceScales | None = None,
    block: int | None = None,
) -> Tensor:
    """Condition tracks (T, 512) each + r_s (512,) -> motion latents (T, 512)."""
    cfg = block_sampler.model.config
    block = block or cfg.block
    guidance = guidance or GuidanceScales()
    lengths = {
        "avatar_audio": avatar_audio.shape[0],
        "user_audio": user_audio.shape[0],
        "user_motion": user_motion.shape[0],
    }
    if len(set(lengths.values())) != 1:
        raise ValueError(f"condition tracks: lengths differ {lengths}; expected one frame count T")
    T = avatar_audio.shape[0]
    if T == 0:
        raise ValueError("condition tracks: T = 0 frames; expected at least one frame")
    padded_len = cfg.window + max(0, -(-(T - cfg.window) // block)) * block
    tracks = [pad_frames(x, padded_len) for x in (avatar_audio, user_audio, user_motion)]

    def conditions(start: int, stop: int) -> Conditions:
        return Conditions(*(x[start:stop] for x in tracks))

    first = block_sampler.run(
        [BlockRequest(conditions(0, cfg.window), reference_motion, noise(cfg.window), 0, nfe=nfe, guidance=guidance)],
        block,
    )[0]
    outputs, tokens, cache = [first.latents], first.tokens, first.cache
    for start in range(cfg.window, T, block):
        request = BlockRequest(
            conditions(start - cfg.lookahead, start + block),
            reference_motion,
            noise(block),
            start - cfg.lookahead,
            context=tokens[-cfg.lookahead :],
            cache=cache,
            nfe=nfe,
            guidance=guidance,
        )
        result = block_sampler.run([request], block)[0]
        outputs.append(result.latents)
        tokens, cache = result.tokens, result.cache
    return torch.cat(outputs)[:T]
