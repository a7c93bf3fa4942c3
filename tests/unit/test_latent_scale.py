"""Latent standardisation (training/latent_scale.py): the latents change scale, the auto-encoder's
output does not, and `train-autoencoder --latent-std` records what it did."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.media.face_crop import FaceCropper
from avatar_forcing.nn.checkpoints import load_pretrained
from avatar_forcing.nn.model import random_model
from avatar_forcing.synthetic.world import generate_conversation
from avatar_forcing.training.latent_scale import motion_spread, scale_latents, standardise_latents


@pytest.fixture(scope="module")
def clips() -> list[np.ndarray]:
    cropper = FaceCropper(64, detect_every=5)
    conv = generate_conversation(11, 2.0)
    return [cropper.crop_video(conv.frames(side), "synth-11") for side in (0, 1)]


def _images(clips: list[np.ndarray]) -> torch.Tensor:
    crops = np.concatenate(clips)[::10]
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


def test_scaling_keeps_every_decoded_pixel_and_scales_both_latents():
    torch.manual_seed(0)
    mae = random_model(tiny(), seed=3).motion_autoencoder.eval()
    images = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        before = mae(images[:2], images[2:])
        portrait = mae.encode(images[:1])
    scale_latents(mae, 40.0)
    with torch.no_grad():
        after = mae(images[:2], images[2:])
        scaled = mae.encode(images[:1])
    # the same function: a scale of 40 moved no pixel by more than float rounding
    assert (after - before).abs().max() < 1e-4 * before.abs().max()
    torch.testing.assert_close(scaled.identity, 40.0 * portrait.identity, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled.alpha, 40.0 * portrait.alpha, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled.reference_motion, 40.0 * portrait.reference_motion, rtol=1e-4, atol=1e-4)


def test_standardising_reaches_the_target_spread_on_the_measured_crops(clips):
    mae = random_model(tiny(), seed=4).motion_autoencoder.eval()
    images = _images(clips)
    with torch.no_grad():
        before = mae(images[:3], images[3:6])
    info = standardise_latents(mae, clips, target=1.0)
    assert info["factor"] == pytest.approx(1.0 / info["spread_before"])
    assert info["spread_after"] == pytest.approx(1.0, rel=1e-4)
    assert motion_spread(mae, clips) == pytest.approx(1.0, rel=1e-4)
    with torch.no_grad():
        assert (mae(images[:3], images[3:6]) - before).abs().max() < 1e-4 * before.abs().max()


def test_bad_arguments_are_named(clips):
    mae = random_model(tiny()).motion_autoencoder
    for factor in (0.0, -2.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="factor: got"):
            scale_latents(mae, factor)
    with pytest.raises(ValueError, match="target: got"):
        standardise_latents(mae, clips, target=0.0)
    with pytest.raises(ValueError, match="clips: 1 face crops"):
        motion_spread(mae, [clips[0][:1]])


def test_cli_latent_std_rescales_the_written_weights_and_records_it(tmp_path):
    from avatar_forcing.apps.cli import main

    assert main(["synth", "--out", str(tmp_path / "synth"), "--conversations", "1", "--seconds", "2", "--quiet"]) == 0
    manifest = tmp_path / "synth" / "manifest.jsonl"
    common = ["train-autoencoder", "--manifest", str(manifest), "--random-init", "--steps", "2", "--batch-size", "2",
              "--quiet"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "plain")]) == 0
    assert main([*common, "--out", str(tmp_path / "scaled"), "--latent-std", "2.5"]) == 0
    record = json.loads((tmp_path / "scaled" / "autoencoder_record.json").read_text())
    assert record["options"]["latent_std"] == 2.5
    assert record["latent_scale"]["spread_after"] == pytest.approx(2.5, rel=1e-3)
    assert "latent_scale" not in json.loads((tmp_path / "plain" / "autoencoder_record.json").read_text())
    # the same training run, only rescaled: the written weights give latents `factor` times larger
    plain, scaled = (load_pretrained(tmp_path / name).motion_autoencoder for name in ("plain", "scaled"))
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        ratio = scaled.motion_coefficients(image) / plain.motion_coefficients(image)
    assert torch.allclose(ratio, torch.full_like(ratio, record["latent_scale"]["factor"]), rtol=1e-3)
    assert main([*common, "--out", str(tmp_path / "bad"), "--latent-std", "-1"]) == 2
