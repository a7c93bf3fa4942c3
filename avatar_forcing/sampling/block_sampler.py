"""Denoise one block (or the first window) for one or many sessions at once.

This is the model runner: it composes the flow transformer, the Euler sampler and
the rolling KV cache. Requests of the same shape (token count, cache present, NFE)
run as one batched forward per sampler step, each with its own guidance scales,
positions and cache; that is what the generator service batches across sessions.

Per request, the tokens are [lookahead clean context frames (t = 0)] + [new noise
frames]; the first window has no context. After the last step one more call at
t = 0 on the final latents writes the KV cache (the release's cache update); the
sampler's own final call at t = 0 is skipped because its update is the identity.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from avatar_forcing.nn.flow_transformer import BlockPlan, FlowTransformer
from avatar_forcing.nn.kv_cache import FlowCache
from avatar_forcing.sampling.euler import GUIDANCE_ROWS, FlowMatchEuler, GuidanceScales


@dataclass
class Conditions:
    """Per-frame condition features of one chunk, each (Lc, 512)."""

    avatar_audio: Tensor
    user_audio: Tensor
    user_motion: Tensor

    def __len__(self) -> int:
        return self.avatar_audio.shape[0]

    def guidance_rows(self) -> tuple[Tensor, Tensor, Tensor]:
        """Rows [uncond, audio, user]: absent conditions are zeros (they still pass the encoder)."""
        zeros = torch.zeros_like(self.avatar_audio)
        avatar = torch.stack([zeros, self.avatar_audio, zeros])
        user_audio = torch.stack([zeros, zeros, self.user_audio])
        user_motion = torch.stack([zeros, zeros, self.user_motion])
        return avatar, user_audio, user_motion  # each (3, Lc, 512)


def pad_frames(track: Tensor, length: int) -> Tensor:
    """(T, D) -> (length, D), repeating the last frame (never truncating): conditions past the end."""
    missing = length - track.shape[0]
    if missing <= 0:
        return track
    return torch.cat([track, track[-1:].expand(missing, -1)])


@dataclass
class BlockRequest:
    conditions: Conditions  # frames [start_frame, start_frame + L)
    reference_motion: Tensor  # (512,) r_s of the portrait
    noise: Tensor  # (n_new, 512) initial noise of the new frames
    start_frame: int  # absolute frame index of the first token (context included)
    context: Tensor | None = None  # (lookahead, 512) clean latents; None for the first window
    cache: FlowCache | None = None  # 3 guidance rows
    guidance: GuidanceScales = field(default_factory=GuidanceScales)
    nfe: int = 10
    block: int | None = None  # the session's block size (the mask's block structure); None: the config's

    @property
    def num_tokens(self) -> int:
        return self.noise.shape[0] + (0 if self.context is None else self.context.shape[0])

    def batch_key(self) -> tuple[int, bool, int, int, int | None]:
        cache_len = -1 if self.cache is None else self.cache.self_positions.shape[1]
        return (self.num_tokens, self.cache is not None, cache_len, self.nfe, self.block)


@dataclass
class BlockResult:
    latents: Tensor  # (n_new, 512) the block's new motion latents
    tokens: Tensor  # (L, 512) all final tokens (context included)
    cache: FlowCache  # the cache for the next block


class BlockSampler:
    def __init__(
        self,
        model: FlowTransformer,
        sampler: FlowMatchEuler | None = None,
        skip_final_noop: bool = True,
        on_step: Callable[[Tensor], None] | None = None,
    ) -> None:
        """`skip_final_noop=False` makes the release's last call at t = 0 too (it changes nothing).
        `on_step` sees the (n, L, 512) latents after every sampler step (diagnostics, parity tests)."""
        self.model = model
        self.sampler = sampler or FlowMatchEuler(model.config.num_train_timesteps)
        self.skip_final_noop = skip_final_noop
        self.on_step = on_step

    @torch.no_grad()
    def run(self, requests: list[BlockRequest], block: int | None = None) -> list[BlockResult]:
        """Denoise every request; requests of equal shape share each forward pass."""
        results: list[BlockResult | None] = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(request.batch_key(), []).append(i)
        for indices in groups.values():
            group = [requests[i] for i in indices]
            group_block = group[0].block if group[0].block is not None else block
            for i, result in zip(indices, self._run_group(group, group_block), strict=True):
                results[i] = result
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def replay(
        self,
        conditions: Conditions,
        tokens: Tensor,
        start_frame: int,
        reference_motion: Tensor,
        cache: FlowCache | None,
        block: int | None = None,
    ) -> FlowCache:
        """The cache after a block whose final tokens are known: only the cache-writing call.

        Used to rebuild a session's cache from its history on another replica, and to keep the
        cache rolling when a late block is dropped. Costs one forward pass instead of NFE.
        """
        request = BlockRequest(conditions, reference_motion, tokens, start_frame, cache=cache)
        batch = self._prepare([request], block, timesteps=[0.0])
        x = tokens[None].to(batch.device, batch.dtype)
        return self._write_cache(x, batch, block)[0]

    def _prepare(self, requests: list[BlockRequest], block: int | None, timesteps: list[float]) -> _Batch:
        """What the calls of one group share; `timesteps` are the raw values the calls will use."""
        model = self.model
        device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        L = requests[0].num_tokens
        # Conditions and their cross-attention K/V are fixed for the whole block: compute once.
        rows = [r.conditions.guidance_rows() for r in requests]
        avatar, user_audio, user_motion = (torch.cat([row[k] for row in rows]).to(device, dtype) for k in range(3))
        cond_kv = model.condition_kv(model.embed_conditions(avatar, user_audio, user_motion))
        positions = torch.stack(
            [torch.arange(r.start_frame, r.start_frame + L, device=device) for r in requests]
        ).repeat_interleave(GUIDANCE_ROWS, dim=0)  # (R, L)
        reference = torch.stack([r.reference_motion for r in requests]).to(device, dtype)
        caches = [r.cache for r in requests]
        cache = None if caches[0] is None else caches[0] if len(caches) == 1 else FlowCache.concat(caches)
        # Masks, RoPE, the [cache ; new] K/V buffers and the time modulation of every timestep
        # (context tokens sit at t = 0): built here once instead of in each of the block's calls.
        plan = model.plan(positions, cond_kv, positions, cache, block, torch.tensor([*timesteps, 0.0]))
        return _Batch(device, dtype, len(requests), L, plan, reference.repeat_interleave(GUIDANCE_ROWS, dim=0))

    def _write_cache(self, x: Tensor, batch: _Batch, block: int | None) -> list[FlowCache]:
        """One call at t = 0 on the final tokens x (n, L, 512); its K/V roll into the cache."""
        cfg = self.model.config
        R = GUIDANCE_ROWS * batch.n
        self.model(
            x.repeat_interleave(GUIDANCE_ROWS, dim=0),
            torch.zeros(R, batch.L, device=batch.device),
            batch.reference,
            plan=batch.plan,
            kv_only=True,  # the cache needs the K/V of every layer, not the velocity
        )
        new_cache = batch.plan.kv.roll(
            self_len=cfg.window - (block or cfg.block) - cfg.lookahead,
            lookahead=cfg.lookahead,
            cross_len=cfg.cross_window,
        )
        return new_cache.split([GUIDANCE_ROWS] * batch.n)

    def _run_group(self, requests: list[BlockRequest], block: int | None) -> list[BlockResult]:
        timesteps = self.sampler.timestep_list(requests[0].nfe)
        batch = self._prepare(requests, block, timesteps)
        n, L, device = batch.n, batch.L, batch.device
        R = GUIDANCE_ROWS * n
        x = torch.stack([r.noise if r.context is None else torch.cat([r.context, r.noise]) for r in requests]).to(
            device, batch.dtype
        )  # (n, L, 512)
        num_context = L - requests[0].noise.shape[0]
        is_new = torch.arange(L, device=device) >= num_context  # (L,)
        scales = [r.guidance for r in requests]

        steps = list(itertools.pairwise(timesteps))
        if not self.skip_final_noop:
            steps.append((timesteps[-1], timesteps[-1]))  # t = 0 -> 0: the identity update
        for t_now, t_next in steps:
            t_tokens = torch.where(is_new, t_now, 0.0).expand(R, L).to(device)
            out = self.model(x.repeat_interleave(GUIDANCE_ROWS, dim=0), t_tokens, batch.reference, plan=batch.plan)
            velocity = out.velocity.view(n, GUIDANCE_ROWS, L, -1)
            guided = torch.stack([s.combine(velocity[i]) for i, s in enumerate(scales)])  # (n, L, 512)
            sigma_now = torch.where(is_new, self.sampler.sigma(t_now), 0.0)[None, :, None]
            sigma_next = torch.where(is_new, self.sampler.sigma(t_next), 0.0)[None, :, None]
            x = self.sampler.step(x, guided, sigma_now.to(device), sigma_next.to(device))
            if self.on_step is not None:
                self.on_step(x)
        # The list's last call (t = 0) leaves x unchanged and the cache-writing call sees exactly
        # the same inputs, so by default only the latter runs.
        caches = self._write_cache(x, batch, block)
        return [BlockResult(latents=x[i, num_context:], tokens=x[i], cache=caches[i]) for i in range(n)]


@dataclass
class _Batch:
    """What a group of same-shape requests shares across the steps of a block."""

    device: torch.device
    dtype: torch.dtype
    n: int
    L: int
    plan: BlockPlan  # masks, RoPE, attention K/V buffers, time modulation
    reference: Tensor  # (R, 512)
