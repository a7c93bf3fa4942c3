"""The image steps around the generator (`avatar_forcing.engine.portrait`): one conversion for all
crops, one auto-encoder pass per block of frames, the same values as image-by-image work."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.engine.portrait import (
    _chunks,
    decode_frames,
    encode_portrait,
    encode_user_motion,
    images_to_tensor,
)
from avatar_forcing.media.io import from_uint8
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder


@pytest.fixture(scope="module")
def mae() -> MotionAutoEncoder:
    torch.manual_seed(0)
    return MotionAutoEncoder(tiny().motion_autoencoder).eval()


def crops(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_chunks_are_the_fewest_and_even() -> None:
    assert _chunks(10, 16) == [slice(0, 10)]  # a block is one pass (it was 8 + 2)
    assert _chunks(16, 16) == [slice(0, 16)]
    assert [s.stop - s.start for s in _chunks(50, 16)] == [12, 13, 12, 13]
    assert [s.stop - s.start for s in _chunks(17, 16)] == [8, 9]
    for n in (1, 7, 33, 50):
        chunks = _chunks(n, 16)
        assert chunks[0].start == 0 and chunks[-1].stop == n
        assert all(a.stop == b.start for a, b in itertools.pairwise(chunks))


def testimages_to_tensor_equals_from_uint8_per_image(mae: MotionAutoEncoder) -> None:
    images = crops(5)
    batched = images_to_tensor(mae, images, "crops")
    assert torch.equal(batched, torch.stack([from_uint8(image) for image in images]))
    assert batched.is_contiguous()  # NCHW, the layout the numerics are pinned in


def test_decode_frames_one_pass_per_block(mae: MotionAutoEncoder, monkeypatch: pytest.MonkeyPatch) -> None:
    portrait = encode_portrait(mae, crops(1)[0])
    latents = torch.randn(10, 512, generator=torch.Generator().manual_seed(1))
    want = decode_frames(mae, portrait, latents)
    batches = []
    decode = mae.decode

    def recording(latent, feature_maps, **kwargs):
        batches.append(latent.shape[0])
        return decode(latent, feature_maps, **kwargs)

    monkeypatch.setattr(mae, "decode", recording)
    got = decode_frames(mae, portrait, latents)
    assert batches == [10]
    assert np.array_equal(got, want)
    batches.clear()
    small = decode_frames(mae, portrait, latents, batch_size=4)  # 10 frames -> 3 + 3 + 4 frames
    assert batches == [3, 3, 4]
    assert small.shape == (10, 64, 64, 3)
    # a frame's pixels do not depend on the pass it was decoded in, but for rounding
    assert np.abs(small.astype(int) - want.astype(int)).max() <= 1


def test_encode_user_motion_batches_equal_single_crops(mae: MotionAutoEncoder) -> None:
    images = crops(6, seed=2)
    together = encode_user_motion(mae, images)
    alone = torch.cat([encode_user_motion(mae, images[i : i + 1]) for i in range(len(images))])
    assert together.shape == (6, 512)
    assert (together - alone).abs().max().item() <= 1e-5
    assert encode_user_motion(mae, images[:0]).shape == (0, 512)
