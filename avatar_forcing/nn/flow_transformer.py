"""Flow transformer ("causal DFoT", `flow_transformer.*`, model-spec §4).

Predicts the flow-matching velocity `noise - x0` for a sequence of motion latent
tokens, each with its own timestep. Self-attention is block-causal with a small
look-ahead and rotary positions over absolute frame indices; cross-attention sees
the Dual Motion Encoder's condition within +-`cross_window` frames. Both masks are
computed from absolute frame indices, so the same code serves the first window,
cached streaming blocks, and batches of sessions at different positions.

Shapes: R rows (guidance rows x sessions), L new tokens, S cached entries,
H hidden width, h heads, d = H / h.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from avatar_forcing.config import FlowConfig
from avatar_forcing.nn.dual_motion_encoder import DualMotionEncoder
from avatar_forcing.nn.kv_cache import FlowCache, LayerKV

TIME_FREQUENCIES = 256
ROPE_BASE = 10000.0


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def timestep_features(t: Tensor, dim: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of raw timesteps (0..1000), cos first: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_tables(positions: Tensor, head_dim: int) -> tuple[Tensor, Tensor]:
    """cos/sin of angle pos * theta_k, theta_k = 10000^(-2k/d): (R, L) -> 2 x (R, 1, L, d/2).

    Angles are formed in float64 so that positions far beyond the release's 1024-frame
    table (a 10-minute session is 15000 frames) lose no precision.
    """
    k = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    theta = ROPE_BASE ** (-2.0 * k / head_dim)
    angles = positions.to(torch.float64)[:, None, :, None] * theta  # (R, 1, L, d/2)
    return torch.cos(angles).float(), torch.sin(angles).float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of (R, h, L, d)."""
    pairs = x.float().unflatten(-1, (-1, 2))  # (R, h, L, d/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def self_attention_mask(q_pos: Tensor, k_pos: Tensor, block: int, lookahead: int) -> Tensor:
    """True = may attend. Key k visible from query q iff block(k) < block(q) or k <= q + lookahead."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    return (
        (torch.div(k, block, rounding_mode="floor") < torch.div(q, block, rounding_mode="floor")) | (k <= q + lookahead)
    )[:, None]  # (R, 1, Lq, Lk)


def cross_attention_mask(q_pos: Tensor, k_pos: Tensor, cross_window: int) -> Tensor:
    """True = may attend. Condition frame k visible from motion frame q iff |k - q| <= window."""
    return ((k_pos[:, None, :] - q_pos[:, :, None]).abs() <= cross_window)[:, None]


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t))  # (R, L) -> (R, L, H)


class InputEmbedder(nn.Module):
    def __init__(self, motion_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * motion_dim, hidden_dim)

    def forward(self, x: Tensor, reference_motion: Tensor) -> Tensor:
        reference = reference_motion[:, None, :].expand(-1, x.shape[1], -1)
        return self.proj(torch.cat([x, reference], dim=-1))  # (R, L, 2*512) -> (R, L, H)


class SelfAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor, cached: LayerKV | None
    ) -> tuple[Tensor, LayerKV]:
        R, L, H = x.shape
        qkv = self.qkv(x).view(R, L, 3, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (R, h, L, d)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        new = LayerKV(k, v)
        if cached is not None:
            k = torch.cat([cached.key, k], dim=2)
            v = torch.cat([cached.value, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (R, h, L, d)
        return self.proj(out.transpose(1, 2).reshape(R, L, H)), new


class CrossAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(hidden_dim, hidden_dim)
        self.kv = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def condition_kv(self, cond: Tensor) -> LayerKV:
        """K/V of condition tokens: (R, Lc, H) -> 2 x (R, h, Lc, d). Constant over a block's steps."""
        R, Lc, H = cond.shape
        k, v = self.kv(cond).view(R, Lc, 2, self.num_heads, H // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        return LayerKV(k, v)

    def forward(self, x: Tensor, cond_kv: LayerKV, mask: Tensor) -> Tensor:
        R, L, H = x.shape
        q = self.q(x).view(R, L, self.num_heads, H // self.num_heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, cond_kv.key, cond_kv.value, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(R, L, H))


class Mlp(nn.Module):
    def __init__(self, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class DFoTBlock(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        # LayerNorms without affine parameters: the shared adaLN supplies scale and shift.
        self.norm1 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_dim, num_heads)
        self.norm3 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = CrossAttention(hidden_dim, num_heads)
        self.norm2 = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_dim, int(hidden_dim * mlp_ratio))

    def forward(
        self,
        x: Tensor,
        modulation: tuple[Tensor, ...],
        rope: tuple[Tensor, Tensor],
        self_mask: Tensor,
        cross_mask: Tensor,
        cached: LayerKV | None,
        cond_kv: LayerKV,
    ) -> tuple[Tensor, LayerKV]:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attended, new_kv = self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, self_mask, cached)
        x = x + gate_msa * attended
        x = x + self.cross_attn(self.norm3(x), cond_kv, cross_mask)  # no modulation, no gate
        x = x + gate_mlp * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x, new_kv


class FinalLayer(nn.Module):
    def __init__(self, hidden_dim: int, motion_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, motion_dim)

    def forward(self, x: Tensor, t_emb: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(t_emb).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


@dataclass
class FlowOutput:
    velocity: Tensor  # (R, L, motion_dim)
    self_kv: list[LayerKV]  # per layer: rotated K/V of the L new tokens, for the cache update


class FlowTransformer(nn.Module):
    def __init__(self, config: FlowConfig) -> None:
        super().__init__()
        self.config = config
        H = config.hidden_dim
        self.x_embedder = InputEmbedder(config.motion_dim, H)
        self.t_embedder = TimestepEmbedder(H)
        self.c_embedder = DualMotionEncoder(config.motion_dim, config.audio_dim, H, config.cond_heads)
        # One adaLN shared by every block (PixArt-style), computed per token from its timestep.
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(H, 6 * H))
        self.blocks = nn.ModuleList(DFoTBlock(H, config.num_heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = FinalLayer(H, config.motion_dim)

    def embed_conditions(self, avatar_audio: Tensor, user_audio: Tensor, user_motion: Tensor) -> Tensor:
        """One condition chunk (R, Lc, 512) x3 -> (R, Lc, H)."""
        return self.c_embedder(user_audio, user_motion, avatar_audio)

    def condition_kv(self, cond: Tensor) -> list[LayerKV]:
        """Per-layer cross-attention K/V of a condition chunk; reused by every step of a block."""
        return [block.cross_attn.condition_kv(cond) for block in self.blocks]

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        reference_motion: Tensor,
        positions: Tensor,
        cond_kv: list[LayerKV],
        cond_positions: Tensor,
        cache: FlowCache | None = None,
        block: int | None = None,
    ) -> FlowOutput:
        """Velocity for L new tokens.

        x (R, L, 512) noisy latents; t (R, L) raw timesteps; reference_motion (R, 512);
        positions (R, L) absolute frame indices; cond_kv per-layer K/V of the condition
        chunk at cond_positions (R, Lc). With a cache, its entries precede the new keys.
        """
        cfg = self.config
        block = cfg.block if block is None else block
        k_pos = positions if cache is None else torch.cat([cache.self_positions, positions], dim=1)
        c_pos = cond_positions if cache is None else torch.cat([cache.cross_positions, cond_positions], dim=1)
        self_mask = self_attention_mask(positions, k_pos, block, cfg.lookahead)
        cross_mask = cross_attention_mask(positions, c_pos, cfg.cross_window)
        rope = rope_tables(positions, cfg.head_dim)

        h = self.x_embedder(x, reference_motion)  # (R, L, H)
        t_emb = self.t_embedder(t)  # (R, L, H)
        modulation = self.adaLN_modulation(t_emb).chunk(6, dim=-1)
        new_self_kv = []
        for i, blk in enumerate(self.blocks):
            layer_cond = cond_kv[i]
            if cache is not None:
                cached_cross = cache.cross_kv[i]
                layer_cond = LayerKV(
                    torch.cat([cached_cross.key, layer_cond.key], dim=2),
                    torch.cat([cached_cross.value, layer_cond.value], dim=2),
                )
            h, kv = blk(
                h, modulation, rope, self_mask, cross_mask, None if cache is None else cache.self_kv[i], layer_cond
            )
            new_self_kv.append(kv)
        return FlowOutput(self.final_layer(h, t_emb), new_self_kv)

    def velocity(
        self,
        x: Tensor,
        t: Tensor,
        reference_motion: Tensor,
        avatar_audio: Tensor,
        user_audio: Tensor,
        user_motion: Tensor,
        start_pos: int = 0,
    ) -> Tensor:
        """One plain call without a cache (the release's `FlowTransformer.forward`, train=False)."""
        R, L, _ = x.shape
        positions = torch.arange(start_pos, start_pos + L, device=x.device).expand(R, L)
        cond = self.embed_conditions(avatar_audio, user_audio, user_motion)
        return self(x, t, reference_motion, positions, self.condition_kv(cond), positions).velocity
