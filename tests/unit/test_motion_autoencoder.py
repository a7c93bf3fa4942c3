"""Motion auto-encoder against the official-parity fixture (README §2) and keys_full.json."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from avatar_forcing.config import MotionAutoEncoderConfig, paper
from avatar_forcing.nn.motion_autoencoder import MotionAutoEncoder
from tests.parity_weights import FIXTURE_DIR, fill_module

# README "Tolerances seen": 1e-5 encoder outputs, 1e-3 dec_img (bilinear grid_sample with ~26% of
# the points outside [-1, 1] makes it touchy), 1e-4 dec_flow.
TOLERANCES = {
    "s_r": 1e-5,
    "alpha": 1e-5,
    "enc_motion": 1e-5,
    "r_s": 1e-5,
    "direction_Q": 1e-5,
    "r_d": 1e-5,
    "feat0": 1e-5,
    "feat1": 1e-5,
    "feat2_img0": 1e-5,
    "feat3_img0": 1e-5,
    "feat2_img1_sub4": 1e-5,
    "feat3_img1_sub4": 1e-5,
    "dec_img": 1e-3,
    "dec_flow": 1e-4,
}


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE_DIR / "motion_autoencoder.safetensors")


@pytest.fixture(scope="module")
def model() -> MotionAutoEncoder:
    m = MotionAutoEncoder(MotionAutoEncoderConfig(image_size=64)).eval()
    fill_module(m, "motion_autoencoder.", "motion_autoencoder")
    return m


@pytest.fixture(scope="module")
def outputs(model: MotionAutoEncoder, fixture: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the fixture was generated with one thread
    try:
        with torch.no_grad():
            portrait = model.encode(fixture["in_img"])
            r_d = model.motion_latent(fixture["in_alpha_d"])
            image, grid = model.decode(portrait.identity + r_d, portrait.feature_maps, return_flow=True)
            f = portrait.feature_maps
            return {
                "s_r": portrait.identity,
                "alpha": portrait.alpha,
                "enc_motion": model.motion_coefficients(fixture["in_img"]),
                "encode_motion": model.encode_motion(fixture["in_img"]),
                "r_s": portrait.reference_motion,
                "direction_Q": model.dec.direction.basis(),
                "r_d": r_d,
                "dec_img": image,
                "dec_flow": grid,
                "feat0": f[0],
                "feat1": f[1],
                "feat2_img0": f[2][:1],
                "feat3_img0": f[3][:1],
                "feat2_img1_sub4": f[2][1:, :, ::4, ::4],
                "feat3_img1_sub4": f[3][1:, :, ::4, ::4],
                "feature_maps": f,
            }
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", sorted(TOLERANCES))
def test_matches_official_fixture(name: str, outputs: dict, fixture: dict) -> None:
    got, want = outputs[name], fixture[name]
    assert got.shape == want.shape, f"{name}: {tuple(got.shape)} != {tuple(want.shape)}"
    diff = (got - want).abs().max().item()
    print(f"{name}: max abs diff {diff:.3g} (tolerance {TOLERANCES[name]:g})")
    assert diff <= TOLERANCES[name], f"{name}: max abs diff {diff:.3g} > {TOLERANCES[name]:g}"


def test_encode_motion_is_reference_motion(outputs: dict, fixture: dict) -> None:
    # the user-motion entry point is the portrait's r_s computed without its feature maps
    assert (outputs["encode_motion"] - fixture["r_s"]).abs().max().item() <= 1e-5


def test_feature_map_statistics(outputs: dict) -> None:
    # config.json -> notes.mae_feats: per-image statistics of the full maps (image 1's large maps are
    # only stored subsampled)
    notes = json.loads((FIXTURE_DIR / "config.json").read_text())["notes"]["mae_feats"]
    assert len(notes) == len(outputs["feature_maps"])
    for entry, fmap in zip(notes, outputs["feature_maps"], strict=True):
        assert list(fmap.shape) == entry["shape"]
        for i, stats in enumerate(entry["per_image"]):
            x = fmap[i].double()
            assert abs(x.sum().item() - stats["sum"]) <= 1e-6 * stats["abs_sum"]
            assert abs(x.abs().sum().item() - stats["abs_sum"]) <= 1e-6 * stats["abs_sum"]
            assert abs(x.square().sum().item() - stats["sq_sum"]) <= 1e-6 * stats["sq_sum"]
            assert abs(x.min().item() - stats["min"]) <= 1e-5
            assert abs(x.max().item() - stats["max"]) <= 1e-5


def test_shared_portrait_feature_maps(model: MotionAutoEncoder, fixture: dict) -> None:
    # one portrait, several frames: batch-1 feature maps broadcast over the latents
    with torch.no_grad():
        portrait = model.encode(fixture["in_img"][:1])
        latents = portrait.identity + model.motion_latent(
            torch.randn(3, 20, generator=torch.Generator().manual_seed(0))
        )
        shared = model.decode(latents, portrait.feature_maps)
        repeated = model.decode(latents, [f.expand(3, -1, -1, -1).contiguous() for f in portrait.feature_maps])
        single = model.decode(latents[1:2], portrait.feature_maps)
    assert shared.shape == (3, 3, 64, 64)
    assert (shared - repeated).abs().max().item() <= 1e-5
    assert (shared[1:2] - single).abs().max().item() <= 1e-4


def test_direction_cache_follows_weight_changes() -> None:
    m = MotionAutoEncoder(MotionAutoEncoderConfig(image_size=64)).eval()
    direction = m.dec.direction
    alpha = torch.randn(2, 20)
    with torch.no_grad():
        q1 = direction.basis()
        assert direction.basis() is q1  # cached in eval mode without autograd
        direction.weight.add_(torch.randn(512, 20, generator=torch.Generator().manual_seed(1)))  # bumps version
        q2 = direction.basis()
        assert torch.allclose(q2, torch.linalg.qr(direction.weight + 1e-8)[0])
        assert not torch.allclose(q1, q2)
        state = {k: v.clone() for k, v in m.state_dict().items()}
        state["dec.direction.weight"] = torch.randn(512, 20)
        m.load_state_dict(state)
        assert torch.allclose(direction.basis(), torch.linalg.qr(state["dec.direction.weight"] + 1e-8)[0])
    # train mode: no cache, gradients reach the basis weight
    m.train()
    direction(alpha).sum().backward()
    assert direction.weight.grad is not None and direction.weight.grad.abs().sum() > 0


def test_paper_config_names_and_shapes() -> None:
    expected = json.loads((FIXTURE_DIR / "keys_full.json").read_text())["groups"]["motion_autoencoder"]
    prefix = expected["prefix"]
    with torch.device("meta"):
        m = MotionAutoEncoder(paper().motion_autoencoder)
    params = {prefix + n: list(p.shape) for n, p in m.named_parameters()}
    own = dict(m.named_parameters())
    buffers = {prefix + n: list(t.shape) for n, t in m.state_dict().items() if n not in own}
    assert params == expected["parameters"], sorted(set(params) ^ set(expected["parameters"]))[:10]
    assert buffers == expected["persistent_buffers"], sorted(set(buffers) ^ set(expected["persistent_buffers"]))
    assert sum(p.numel() for p in m.parameters()) == expected["num_elements"]


@pytest.mark.parametrize(
    "image, match",
    [
        (torch.zeros(1, 3, 32, 32), r"image: expected size 64x64 .* got 32x32"),
        (torch.zeros(1, 4, 64, 64), r"image: expected shape \(B, 3, 64, 64\), got \(1, 4, 64, 64\)"),
        (torch.zeros(3, 64, 64), r"image: expected shape \(B, 3, 64, 64\), got \(3, 64, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), r"image: expected a floating-point tensor"),
        (torch.full((1, 3, 64, 64), float("nan")), r"image: expected finite values"),
    ],
)
def test_bad_images(model: MotionAutoEncoder, image: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        model.encode(image)
    with pytest.raises(ValueError, match=match):
        model.encode_motion(image)


def test_bad_latents(model: MotionAutoEncoder, fixture: dict) -> None:
    with torch.no_grad():
        feats = model.encode(fixture["in_img"]).feature_maps
    with pytest.raises(ValueError, match=r"latent: expected shape \(B, 512\), got \(2, 256\)"):
        model.decode(torch.zeros(2, 256), feats)
    with pytest.raises(ValueError, match=r"latent: expected finite values"):
        model.decode(torch.full((2, 512), float("nan")), feats)
    with pytest.raises(ValueError, match=r"alpha: expected shape \(B, 20\), got \(2, 512\)"):
        model.motion_latent(torch.zeros(2, 512))
    with pytest.raises(ValueError, match=r"feature_maps: expected 4 maps .* got 3"):
        model.decode(torch.zeros(2, 512), feats[:3])
    with pytest.raises(ValueError, match=r"feature_maps\[0\]: expected shape \(1 or 3, 512, 8, 8\), got \(2, "):
        model.decode(torch.zeros(3, 512), feats)


def test_bad_config() -> None:
    with pytest.raises(ValueError, match="image_size: expected a power of two in \\[64, 1024\\], got 32"):
        MotionAutoEncoder(MotionAutoEncoderConfig(image_size=32))


def test_forward_reconstructs_with_driving_motion(model: MotionAutoEncoder, fixture: dict) -> None:
    # driving = source: w = s_r + r_s, rendered with the source's own feature maps
    image = fixture["in_img"][:1]
    with torch.no_grad():
        portrait = model.encode(image)
        want = model.decode(portrait.identity + portrait.reference_motion, portrait.feature_maps)
        got = model(image, image)
    assert got.shape == (1, 3, 64, 64)
    assert (got - want).abs().max().item() <= 1e-5
