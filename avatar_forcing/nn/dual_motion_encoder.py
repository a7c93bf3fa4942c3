"""Dual Motion Encoder (`flow_transformer.c_embedder.*`, model-spec §3).

Fuses the user's audio, the user's motion and the avatar's audio into one
condition per frame for the flow transformer's cross-attention. Attention runs,
unmasked and without positions, over all frames of the chunk it is given, so the
condition of a frame depends on the chunk: the first window is one chunk of
`window` frames, every later block one chunk of `lookahead + block` frames.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F


class DualMotionEncoder(nn.Module):
    def __init__(self, motion_dim: int, audio_dim: int, hidden_dim: int, num_heads: int = 4) -> None:
        super().__init__()
        if motion_dim != audio_dim:
            # Both attentions add their query to a key-side stream of the other modality.
            raise ValueError(f"motion_dim ({motion_dim}) must equal audio_dim ({audio_dim})")
        self.motion_embedder = nn.Sequential(
            nn.Linear(motion_dim, motion_dim),
            nn.LayerNorm(motion_dim),
            nn.SiLU(),
            nn.Linear(motion_dim, motion_dim),
            nn.LayerNorm(motion_dim),
            nn.SiLU(),
        )
        self.dual_modal_attn = nn.MultiheadAttention(audio_dim, num_heads, batch_first=True)
        self.ln1 = nn.LayerNorm(audio_dim)
        self.user_agent_attn = nn.MultiheadAttention(audio_dim, num_heads, batch_first=True)
        self.ln2 = nn.LayerNorm(audio_dim)
        self.to_cond_user = nn.Linear(audio_dim, hidden_dim)

    def forward(self, user_audio: Tensor, user_motion: Tensor, avatar_audio: Tensor) -> Tensor:
        """(B, L, 512) x3 -> condition (B, L, hidden_dim)."""
        query = self.motion_embedder(user_motion)  # (B, L, 512)
        attended, _ = self.dual_modal_attn(query, user_audio, user_audio, need_weights=False)
        user = F.silu(self.ln1(query + attended))  # the user: motion attended to its own speech
        attended, _ = self.user_agent_attn(avatar_audio, user, user, need_weights=False)
        fused = F.silu(self.ln2(avatar_audio + attended))  # the avatar's speech attended to the user
        return self.to_cond_user(fused)
