"""The whole Avatar Forcing network: its four parts under the release's names.

`state_dict()` keys are those of the released checkpoints: `flow_transformer.*`,
`motion_autoencoder.*`, `audio_encoder.audio_projection.*` and
`audio_encoder.wav2vec2.*` (transformers' names).
"""

from __future__ import annotations

import torch
from torch import nn

from avatar_forcing.config import ModelConfig
from avatar_forcing.nn.audio_encoder import AudioEncoder
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from avatar_forcing.sampling.block_sampler import BlockSampler


class AvatarForcing(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.flow_transformer = FlowTransformer(config.flow)
        self.motion_autoencoder = MotionAutoEncoder(config.motion_autoencoder)
        self.audio_encoder = AudioEncoder(config.audio)

    def block_sampler(self) -> BlockSampler:
        return BlockSampler(self.flow_transformer)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


def random_model(config: ModelConfig, seed: int = 0) -> AvatarForcing:
    """Randomly initialised weights (smoke runs and tests only: the output is not a face)."""
    torch.manual_seed(seed)
    return AvatarForcing(config).eval()
