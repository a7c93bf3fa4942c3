"""Between pixels and motion latents: portrait encoding, user motion, frame decoding.

These are the per-frame image steps around the motion generator, shared by the
offline CLI, the in-process live session and the motion-encoder / decoder services.
Images are uint8 RGB face crops of the model's image size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.media.io import from_uint8, to_uint8
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder


@dataclass
class PortraitEncoding:
    """What the decoder and the generator need of one avatar portrait."""

    identity: Tensor  # (1, 512) s_r
    feature_maps: list[Tensor]  # the encoder's warp sources, deepest first
    reference_motion: Tensor  # (512,) r_s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.identity, *self.feature_maps])


def _images_to_tensor(mae: MotionAutoEncoder, crops: np.ndarray, name: str) -> Tensor:
    size = mae.config.image_size
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        got = f"{crops.dtype} {crops.shape}" if isinstance(crops, np.ndarray) else type(crops).__name__
        raise ValueError(f"{name}: expected uint8 face crops of shape (n, S, S, 3), got {got}")
    if crops.shape[1:3] != (size, size):
        raise ValueError(f"{name}: crops are {crops.shape[1]}x{crops.shape[2]}; expected {size}x{size}")
    param = next(mae.parameters())
    return torch.stack([from_uint8(c) for c in crops]).to(param.device, param.dtype)


@torch.no_grad()
def encode_portrait(mae: MotionAutoEncoder, crop: np.ndarray) -> PortraitEncoding:
    """A portrait face crop (S, S, 3) -> identity latent, feature maps and reference motion."""
    encoded = mae.encode(_images_to_tensor(mae, crop[None], "portrait"))
    return PortraitEncoding(encoded.identity, encoded.feature_maps, encoded.reference_motion[0].float().cpu())


def encode_portrait_photo(
    mae: MotionAutoEncoder, cropper: FaceCropper, image: np.ndarray, source: str
) -> PortraitEncoding:
    """A portrait photo, uint8 RGB (H, W, 3) of any size -> its encoding: the largest face is
    cropped (`cropper`, of the model's image size) and encoded.

    Raises NoFaceError (avatar_forcing.media.face_crop) naming `source` when there is no face.
    The services rebuild an avatar with this too, so a rebuilt encoding equals the original.
    """
    return encode_portrait(mae, cropper.crop_portrait(image, source))


@torch.no_grad()
def encode_user_motion(mae: MotionAutoEncoder, crops: np.ndarray, batch_size: int = 16) -> Tensor:
    """User face crops (n, S, S, 3) -> user motion latents (n, 512)."""
    out = [
        mae.encode_motion(_images_to_tensor(mae, crops[i : i + batch_size], "user_frames")).float().cpu()
        for i in range(0, len(crops), batch_size)
    ]
    return torch.cat(out) if out else torch.zeros(0, mae.config.style_dim)


@torch.no_grad()
def decode_frames(
    mae: MotionAutoEncoder, portrait: PortraitEncoding, latents: Tensor, batch_size: int = 8
) -> np.ndarray:
    """Motion latents (n, 512) -> uint8 frames (n, S, S, 3): image_i = dec(s_r + r_i)."""
    param = next(mae.parameters())
    frames = []
    for i in range(0, latents.shape[0], batch_size):
        chunk = latents[i : i + batch_size].to(param.device, param.dtype)
        # Batch-1 feature maps are shared by every frame of the chunk.
        frames.append(to_uint8(mae.decode(portrait.identity + chunk, portrait.feature_maps).float().cpu()))
    return np.concatenate(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
