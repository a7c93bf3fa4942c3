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
from avatar_forcing.nn.kv_cache import BlockKV, FlowCache, LayerKV
from avatar_forcing.nn.prepacked import linear

TIME_FREQUENCIES = 256
ROPE_BASE = 10000.0
# Which adaLN chunks are scales: [shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp], [shift, scale].
SCALE_SLOTS_BLOCK = (0.0, 1.0, 0.0, 0.0, 1.0, 0.0)
SCALE_SLOTS_FINAL = (0.0, 1.0)


def modulate(x: Tensor, shift: Tensor, scale_plus_one: Tensor) -> Tensor:
    """x * (1 + scale) + shift, with (1 + scale) formed once per timestep (see TimeModulation)."""
    return torch.addcmul(shift, x, scale_plus_one)


def timestep_features(t: Tensor, dim: int = TIME_FREQUENCIES, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of raw timesteps (0..1000), cos first: (...,) -> (..., dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def rope_rotation(positions: Tensor, head_dim: int) -> Tensor:
    """Unit complex numbers e^(i pos theta_k), theta_k = 10000^(-2k/d): (R, L) -> (R, L, 1, 1, d/2) complex64.

    Angles are formed in float64 so that positions far beyond the release's 1024-frame
    table (a 10-minute session is 15000 frames) lose no precision.
    """
    k = torch.arange(head_dim // 2, dtype=torch.float64, device=positions.device)
    theta = ROPE_BASE ** (-2.0 * k / head_dim)
    angles = positions.to(torch.float64)[:, :, None, None, None] * theta
    return torch.complex(torch.cos(angles).float(), torch.sin(angles).float())


def apply_rope(x: Tensor, rotation: Tensor) -> Tensor:
    """Rotate adjacent channel pairs (2k, 2k+1) of x (R, L, ..., d) by `rotation` (R, L, 1.., d/2).

    A pair (even, odd) read as the complex number even + i*odd times e^(i angle) is exactly
    (even cos - odd sin, even sin + odd cos): one complex multiply instead of six real ops.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (R, L, ..., d/2); float(): no copy in fp32
    return torch.view_as_real(pairs * rotation).flatten(-2).to(x.dtype)  # (R, L, ..., d)


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


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """Boolean mask -> 0 / -inf, the form attention adds to its scores (converted once, not per call)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


@dataclass
class TimeModulation:
    """Everything that depends on a token's timestep alone, per distinct timestep value.

    The shared adaLN and the final layer's adaLN see only the timestep embedding, so a block,
    whose tokens take a handful of timestep values over all its calls, computes them once.
    """

    values: Tensor  # (n,) sorted raw timesteps
    blocks: Tensor  # (n, 6, H): shift_msa, 1 + scale_msa, gate_msa, shift_mlp, 1 + scale_mlp, gate_mlp
    final: Tensor  # (n, 2, H): shift, 1 + scale

    def lookup(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """Per token of t (R, L): (R, L, 6, H) block modulation and (R, L, 2, H) final modulation."""
        t = t.to(self.values.dtype)
        index = torch.searchsorted(self.values, t.contiguous()).clamp_(max=len(self.values) - 1)  # (R, L)
        # The check costs nothing on CPU; on an accelerator it would wait for the device, and the
        # sampler builds its tables from the very timesteps it passes.
        if t.device.type == "cpu" and not torch.equal(self.values[index], t):
            raise ValueError("timestep not in this block's time table")
        return self.blocks[index], self.final[index]


@dataclass
class BlockPlan:
    """What every forward call of one block shares: masks, rotations, attention K/V, time table.

    Built once per block (`FlowTransformer.plan`); each call then only runs the network on its
    new latents. The self-attention buffers hold the last call's K/V: the cache-writing call's
    stay there for `kv.roll`.
    """

    positions: Tensor  # (R, L) absolute frame index of each new token
    rotation: Tensor  # (R, L, 1, 1, d/2) RoPE of the new tokens
    self_mask: Tensor  # (R, 1, L, S + L) additive
    cross_mask: Tensor  # (R, 1, L, C + Lc) additive
    kv: BlockKV
    time: TimeModulation | None  # None: computed per call from its timesteps


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(TIME_FREQUENCIES, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_features(t))  # (...,) -> (..., H)


class InputEmbedder(nn.Module):
    def __init__(self, motion_dim: int, hidden_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * motion_dim, hidden_dim)

    def forward(self, x: Tensor, reference_motion: Tensor) -> Tensor:
        reference = reference_motion[:, None, :].expand(-1, x.shape[1], -1)
        return linear(torch.cat([x, reference], dim=-1), self.proj)  # (R, L, 2*512) -> (R, L, H)


class SelfAttention(nn.Module):
    def __init__(self, hidden_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_dim, 3 * hidden_dim)
        self.proj = nn.Linear(hidden_dim, hidden_dim)

    def project(self, x: Tensor, rotation: Tensor, kv: BlockKV, layer: int) -> tuple[Tensor, LayerKV]:
        """Rotated queries (R, h, L, d) of x (R, L, H); stores the new K/V in the block's buffers
        and returns this layer's whole [cache ; new] K/V."""
        R, L, H = x.shape
        qkv = linear(x, self.qkv).view(R, L, 3, self.num_heads, H // self.num_heads)
        q, k = apply_rope(qkv[:, :, :2], rotation).unbind(2)  # (R, L, h, d) each
        full = kv.write(layer, k.transpose(1, 2), qkv[:, :, 2].transpose(1, 2))
        return q.transpose(1, 2), full

    def forward(self, x: Tensor, rotation: Tensor, mask: Tensor, kv: BlockKV, layer: int) -> Tensor:
        R, L, H = x.shape
        q, full = self.project(x, rotation, kv, layer)
        out = F.scaled_dot_product_attention(q, full.key, full.value, attn_mask=mask)  # (R, h, L, d)
        return linear(out.transpose(1, 2).reshape(R, L, H), self.proj)


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
        kv = linear(cond, self.kv).view(R, Lc, 2, self.num_heads, H // self.num_heads)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        return LayerKV(k, v)

    def forward(self, x: Tensor, cond_kv: LayerKV, mask: Tensor) -> Tensor:
        R, L, H = x.shape
        q = linear(x, self.q).view(R, L, self.num_heads, H // self.num_heads).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, cond_kv.key, cond_kv.value, attn_mask=mask)
        return linear(out.transpose(1, 2).reshape(R, L, H), self.proj)


class Mlp(nn.Module):
    def __init__(self, hidden_dim: int, mlp_dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(hidden_dim, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, hidden_dim)

    def forward(self, x: Tensor) -> Tensor:
        return linear(linear(x, self.fc1, gelu=True), self.fc2)


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

    def forward(self, x: Tensor, modulation: tuple[Tensor, ...], plan: BlockPlan, layer: int) -> tuple[Tensor, LayerKV]:
        """x (R, L, H), modulation 6 x (R, L, H) -> (x, the new tokens' K/V of this layer)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        attended = self.attn(
            modulate(self.norm1(x), shift_msa, scale_msa), plan.rotation, plan.self_mask, plan.kv, layer
        )
        x = torch.addcmul(x, gate_msa, attended)
        x = x + self.cross_attn(self.norm3(x), plan.kv.cross_kv[layer], plan.cross_mask)  # no modulation, no gate
        x = torch.addcmul(x, gate_mlp, self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp)))
        return x, plan.kv.new_entries(layer)

    def write_kv(self, x: Tensor, modulation: tuple[Tensor, ...], plan: BlockPlan, layer: int) -> LayerKV:
        """Only the part of `forward` the cache needs: this layer's K/V of the new tokens."""
        shift_msa, scale_msa = modulation[:2]
        self.attn.project(modulate(self.norm1(x), shift_msa, scale_msa), plan.rotation, plan.kv, layer)
        return plan.kv.new_entries(layer)


class FinalLayer(nn.Module):
    def __init__(self, hidden_dim: int, motion_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_dim, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_dim, 2 * hidden_dim))
        self.linear = nn.Linear(hidden_dim, motion_dim)

    def forward(self, x: Tensor, modulation: Tensor) -> Tensor:
        """x (R, L, H), modulation (R, L, 2, H) from `TimeModulation` -> (R, L, motion_dim)."""
        shift, scale = modulation.unbind(2)
        return linear(modulate(self.norm_final(x), shift, scale), self.linear)


@dataclass
class FlowOutput:
    velocity: Tensor | None  # (R, L, motion_dim); None for a cache-writing call (kv_only)
    # Per layer: rotated K/V of the L new tokens, for the cache update. Views of the plan's
    # buffers: the plan's next call overwrites them.
    self_kv: list[LayerKV]


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
        self._time_cache: tuple | None = None  # (key, parameter views, TimeModulation): see _block_time_modulation

    def embed_conditions(self, avatar_audio: Tensor, user_audio: Tensor, user_motion: Tensor) -> Tensor:
        """One condition chunk (R, Lc, 512) x3 -> (R, Lc, H)."""
        return self.c_embedder(user_audio, user_motion, avatar_audio)

    def condition_kv(self, cond: Tensor) -> list[LayerKV]:
        """Per-layer cross-attention K/V of a condition chunk; reused by every step of a block."""
        return [block.cross_attn.condition_kv(cond) for block in self.blocks]

    def time_modulation(self, timesteps: Tensor) -> TimeModulation:
        """Both adaLN outputs for distinct raw timesteps (n,), in float32 like the features."""
        values = torch.unique(timesteps.float())  # sorted
        H = self.config.hidden_dim
        t_emb = self.t_embedder(values)  # (n, H)
        # The scales enter as (1 + scale): add 1 to them once here (adding 0 leaves the rest exact).
        blocks = self.adaLN_modulation(t_emb).view(-1, 6, H) + t_emb.new_tensor(SCALE_SLOTS_BLOCK)[:, None]
        final = self.final_layer.adaLN_modulation(t_emb).view(-1, 2, H) + t_emb.new_tensor(SCALE_SLOTS_FINAL)[:, None]
        return TimeModulation(values, blocks, final)

    def plan(
        self,
        positions: Tensor,
        cond_kv: list[LayerKV],
        cond_positions: Tensor,
        cache: FlowCache | None = None,
        block: int | None = None,
        timesteps: Tensor | None = None,
    ) -> BlockPlan:
        """Everything the calls of one block share (see `forward` for the arguments).

        `timesteps`: every raw timestep value the calls will use (e.g. the sampler's list and 0);
        None computes the time modulation in each call instead.
        """
        cfg = self.config
        block = cfg.block if block is None else block
        dtype = cond_kv[0].key.dtype
        kv = BlockKV.allocate(cache, cond_kv, positions, cond_positions)
        return BlockPlan(
            positions=positions,
            rotation=rope_rotation(positions, cfg.head_dim),
            self_mask=additive_mask(self_attention_mask(positions, kv.self_positions, block, cfg.lookahead), dtype),
            cross_mask=additive_mask(cross_attention_mask(positions, kv.cross_positions, cfg.cross_window), dtype),
            kv=kv,
            time=None if timesteps is None else self._block_time_modulation(timesteps, positions.device),
        )

    def _time_parameters(self) -> list[Tensor]:
        return [
            *self.t_embedder.parameters(),
            *self.adaLN_modulation.parameters(),
            *self.final_layer.adaLN_modulation.parameters(),
        ]

    def _block_time_modulation(self, timesteps: Tensor, device: torch.device) -> TimeModulation:
        """`time_modulation` of a block's timesteps, reused by later blocks with the same timesteps.

        Every block of a stream uses the same sampler timesteps, so the adaLN layers (8 M weights
        in `paper`) need not be read again per block. The entry is valid while the parameters are
        the same memory at the same in-place version (it holds views of them, so that memory
        cannot be reused); with autograd on, or weights without a version counter, no reuse.
        """
        params = self._time_parameters()
        try:
            versions = tuple((p.data_ptr(), p._version, p.dtype) for p in params)
        except RuntimeError:  # inference tensors have no version counter
            versions = None
        if versions is None or torch.is_grad_enabled():
            return self.time_modulation(timesteps.to(device))
        key = (tuple(torch.unique(timesteps.float()).tolist()), torch.device(device), versions)
        if self._time_cache is not None and self._time_cache[0] == key:
            return self._time_cache[2]
        table = self.time_modulation(timesteps.to(device))
        self._time_cache = (key, [p.detach() for p in params], table)
        return table

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        reference_motion: Tensor,
        positions: Tensor | None = None,
        cond_kv: list[LayerKV] | None = None,
        cond_positions: Tensor | None = None,
        cache: FlowCache | None = None,
        block: int | None = None,
        *,
        plan: BlockPlan | None = None,
        kv_only: bool = False,
    ) -> FlowOutput:
        """Velocity for L new tokens.

        x (R, L, 512) noisy latents; t (R, L) raw timesteps; reference_motion (R, 512);
        positions (R, L) absolute frame indices; cond_kv per-layer K/V of the condition
        chunk at cond_positions (R, Lc). With a cache, its entries precede the new keys.
        Either those or a `plan` made by `self.plan(...)` for this block (then the rest is
        ignored). `kv_only`: a cache-writing call; it stops once the last layer's K/V exist
        (no velocity).
        """
        if plan is None:
            if positions is None or cond_kv is None or cond_positions is None:
                raise ValueError("forward: pass positions, cond_kv and cond_positions, or a plan")
            plan = self.plan(positions, cond_kv, cond_positions, cache, block)
        time = plan.time if plan.time is not None else self.time_modulation(t)
        modulation, final_modulation = time.lookup(t)  # (R, L, 6, H), (R, L, 2, H)
        per_block = modulation.unbind(2)  # the same six (R, L, H) for every block

        h = self.x_embedder(x, reference_motion)  # (R, L, H)
        last = len(self.blocks) - 1
        new_self_kv = []
        for i, blk in enumerate(self.blocks):
            if kv_only and i == last:
                new_self_kv.append(blk.write_kv(h, per_block, plan, i))
                return FlowOutput(None, new_self_kv)
            h, kv = blk(h, per_block, plan, i)
            new_self_kv.append(kv)
        return FlowOutput(self.final_layer(h, final_modulation), new_self_kv)

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
