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
from avatar_forcing.media.io import to_uint8
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder


@dataclass
class PortraitEncoding:
    """What the decoder and the generator need of one avatar portrait."""

    identity: Tensor  # (1, 512) s_r
    feature_maps: list[Tensor]  # the encoder's warp sources, deepest first
    reference_motion: Tensor  # (512,) r_s

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in [self.identity, *self.feature_maps])


def images_to_tensor(mae: MotionAutoEncoder, crops: np.ndarray, name: str) -> Tensor:
    """(n, S, S, 3) uint8 face crops -> (n, 3, S, S) in [-1, 1] on `mae`'s device and dtype; NAME in errors."""
    size = mae.config.image_size
    if not isinstance(crops, np.ndarray) or crops.dtype != np.uint8 or crops.ndim != 4 or crops.shape[-1] != 3:
        got = f"{crops.dtype} {crops.shape}" if isinstance(crops, np.ndarray) else type(crops).__name__
        raise ValueError(f"{name}: expected uint8 face crops of shape (n, S, S, 3), got {got}")
    if crops.shape[1:3] != (size, size):
        raise ValueError(f"{name}: crops are {crops.shape[1]}x{crops.shape[2]}; expected {size}x{size}")
    param = next(mae.parameters())
    # (n, S, S, 3) uint8 -> (n, 3, S, S) in [-1, 1] in one step, as `from_uint8` maps one image;
    # contiguous NCHW: the layout the auto-encoder's numerics are pinned in (a channels-last input
    # rounds differently, which grid_sample amplifies)
    pixels = torch.from_numpy(np.ascontiguousarray(crops)).permute(0, 3, 1, 2).contiguous()
    return (pixels.to(param.device).float() / 127.5 - 1.0).to(param.dtype)


def _chunks(n: int, max_batch: int) -> list[slice]:
    """0..n in the fewest chunks of at most `max_batch`, of equal size (+-1): 10 -> one of 10, not 8 + 2."""
    count = -(-n // max_batch)
    return [slice(n * i // count, n * (i + 1) // count) for i in range(count)]


@torch.no_grad()
def encode_portrait(mae: MotionAutoEncoder, crop: np.ndarray) -> PortraitEncoding:
    """A portrait face crop (S, S, 3) -> identity latent, feature maps and reference motion."""
    encoded = mae.encode(images_to_tensor(mae, crop[None], "portrait"))
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
    """User face crops (n, S, S, 3) -> user motion latents (n, 512), at most `batch_size` crops a pass."""
    if len(crops) == 0:
        return torch.zeros(0, mae.config.style_dim)
    images = images_to_tensor(mae, crops, "user_frames")  # checked and converted once, all crops
    return torch.cat([mae.encode_motion(images[chunk]).float().cpu() for chunk in _chunks(len(crops), batch_size)])


@torch.no_grad()
def decode_frames(
    mae: MotionAutoEncoder, portrait: PortraitEncoding, latents: Tensor, batch_size: int = 16
) -> np.ndarray:
    """Motion latents (n, 512) -> uint8 frames (n, S, S, 3): image_i = dec(s_r + r_i).

    At most `batch_size` frames a pass (a 10-frame block is one pass); the portrait's batch-1
    feature maps are shared by every frame of a pass.
    """
    if latents.shape[0] == 0:
        return np.zeros((0, 0, 0, 3), np.uint8)
    param = next(mae.parameters())
    latents = portrait.identity + latents.to(param.device, param.dtype)  # w = s_r + r_d: (n, 512)
    chunks = _chunks(len(latents), batch_size)
    return np.concatenate([to_uint8(mae.decode(latents[chunk], portrait.feature_maps)) for chunk in chunks])
