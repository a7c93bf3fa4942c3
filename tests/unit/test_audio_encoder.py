"""Audio encoder: parity with the official fixture (tiny wav2vec2), names/shapes, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

from avatar_forcing.config import paper, tiny
from avatar_forcing.nn.audio_encoder import (
    AudioEncoder,
    make_audio_projection,
    normalize_waveform,
    num_frames_for,
    validate_waveform,
)
from tests.parity_weights import FIXTURE_DIR, fill_module

ATOL = 1e-5  # fixture README, "Tolerances seen"


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_encoder() -> AudioEncoder:
    torch.manual_seed(0)
    encoder = AudioEncoder(tiny().audio)
    fill_module(encoder.wav2vec2, "", "wav2vec2_tiny")  # bare transformers names seed the fill
    return encoder


@pytest.fixture(scope="module")
def fixture() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE_DIR / "audio_wav2vec2_tiny.safetensors")


# -----------------------------------------------------------------------------
# parity


@pytest.mark.parametrize("case", ["a", "b"])
@pytest.mark.parametrize("normalize", [False, True])
@torch.no_grad()
def test_tiny_wav2vec2_matches_fixture(tiny_encoder, fixture, case, normalize):
    """Every stored intermediate, case a (no padding) and b (replicate padding).

    The fixture's waves are already normalised (with an unbiased variance: 0.99995), so
    normalize=False is the exact comparison; normalising them again moves samples by
    ~7e-5 and the features by ~3e-6, inside the tolerance.
    """
    wav = fixture[f"{case}_wav"]
    T = int(fixture[f"{case}_seq_len"][0])
    trace = tiny_encoder.trace(wav, T, normalize=normalize)
    stacked = tiny_encoder.layer_features(wav, T, normalize=normalize)
    ours = {
        "conv_features": trace.conv_features,
        "projected_features": trace.projected_features,
        "hidden_state_0": trace.hidden_states[0],
        "last_hidden_state": trace.hidden_states[-1],
        "stacked_hidden": stacked,
    }
    for name, value in ours.items():
        expected = fixture[f"{case}_{name}"]
        assert value.shape == expected.shape, name
        diff = (value - expected).abs().max().item()
        assert diff <= ATOL, f"{case}_{name}: max abs diff {diff:.3g}"


@torch.no_grad()
def test_audio_projection_matches_fixture():
    data = load_file(FIXTURE_DIR / "audio_projection.safetensors")
    projection = make_audio_projection(9216, 512)
    fill_module(projection, "audio_encoder.audio_projection.", "audio_projection")
    diff = (projection(data["in_x"]) - data["out"]).abs().max().item()
    assert diff <= ATOL, f"audio_projection: max abs diff {diff:.3g}"


@torch.no_grad()
def test_interpolation_picks_every_other_conv_frame(tiny_encoder, fixture):
    """With T*640 samples the conv stack gives 2T-1 frames and frame t lands on conv frame 2t."""
    wav = fixture["a_wav"]  # 19200 = 30 * 640 samples
    trace = tiny_encoder.trace(wav, 30, normalize=False)
    assert trace.conv_features.shape[-1] == 2 * 30 - 1
    picked = trace.conv_features[:, :, ::2].transpose(1, 2)
    projected, _ = tiny_encoder.wav2vec2.feature_projection(picked)
    torch.testing.assert_close(projected, trace.projected_features, atol=1e-6, rtol=0)


@torch.no_grad()
def test_forward_and_encode_clip(tiny_encoder, fixture):
    wav = fixture["b_wav"]
    out = tiny_encoder(wav, 31)
    assert out.shape == (1, 31, 512)
    assert (out >= -0.2785).all()  # SiLU's minimum
    clip = tiny_encoder.encode_clip(wav[0].numpy())
    assert clip.shape == (num_frames_for(wav.shape[-1]), 512)
    torch.testing.assert_close(clip, out[0], atol=0, rtol=0)
    # a batch is the same as its rows one by one
    batch = tiny_encoder(torch.cat([wav, -wav]), 31)
    torch.testing.assert_close(batch[1:], tiny_encoder(-wav, 31), atol=1e-5, rtol=0)


# -----------------------------------------------------------------------------
# names and shapes of the paper configuration


def test_paper_names_and_shapes_match_keys_full():
    groups = json.loads((FIXTURE_DIR / "keys_full.json").read_text())["groups"]
    expected = {}
    for group in ("audio_projection", "wav2vec2_base"):
        expected.update(groups[group]["parameters"])
    with torch.device("meta"):
        encoder = AudioEncoder(paper().audio)
    ours = {"audio_encoder." + n: list(p.shape) for n, p in encoder.named_parameters()}
    assert sorted(set(expected) - set(ours)) == []
    assert sorted(set(ours) - set(expected)) == []
    assert ours == expected
    assert encoder.layer_dim == 9216


def test_wav2vec2_is_frozen_and_stays_in_eval(tiny_encoder):
    tiny_encoder.train()
    try:
        assert not tiny_encoder.wav2vec2.training
        assert tiny_encoder.audio_projection.training
        assert not any(p.requires_grad for p in tiny_encoder.wav2vec2.parameters())
        assert all(p.requires_grad for p in tiny_encoder.audio_projection.parameters())
    finally:
        tiny_encoder.eval()


# -----------------------------------------------------------------------------
# loading a local wav2vec2 folder


def _save_ctc(folder: Path, legacy_weight_norm: bool) -> Wav2Vec2ForCTC:
    """A tiny wav2vec2 CTC checkpoint as transformers writes it (optionally with weight_g/weight_v)."""
    torch.manual_seed(1)
    ctc = Wav2Vec2ForCTC(Wav2Vec2Config(**tiny().audio.wav2vec2))
    ctc.save_pretrained(folder)
    if legacy_weight_norm:  # wav2vec2-base-960h predates torch's parametrization naming
        state = {
            k.replace("parametrizations.weight.original0", "weight_g").replace(
                "parametrizations.weight.original1", "weight_v"
            ): v.contiguous()
            for k, v in ctc.state_dict().items()
        }
        assert "wav2vec2.encoder.pos_conv_embed.conv.weight_g" in state
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    return ctc


@pytest.mark.parametrize("legacy_weight_norm", [False, True])
def test_from_pretrained_dir_loads_ctc_checkpoint(tmp_path, legacy_weight_norm):
    ctc = _save_ctc(tmp_path, legacy_weight_norm)
    encoder = AudioEncoder.from_pretrained_dir(tmp_path, tiny().audio)
    expected = ctc.wav2vec2.state_dict()
    loaded = encoder.wav2vec2.state_dict()
    assert set(loaded) == set(expected)
    for name, value in loaded.items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
    assert not encoder.wav2vec2.training


def test_from_pretrained_dir_missing_folder(tmp_path):
    missing = tmp_path / "wav2vec2-base-960h"
    with pytest.raises(FileNotFoundError, match="wav2vec2-base-960h"):
        AudioEncoder.from_pretrained_dir(missing, tiny().audio)
    missing.mkdir()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        AudioEncoder.from_pretrained_dir(missing, tiny().audio)


def test_from_pretrained_dir_missing_keys_and_wrong_config(tmp_path):
    ctc = _save_ctc(tmp_path, legacy_weight_norm=False)
    state = {k: v.contiguous() for k, v in ctc.state_dict().items() if "layers.1.attention.q_proj" not in k}
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="missing keys"):
        AudioEncoder.from_pretrained_dir(tmp_path, tiny().audio)
    _save_ctc(tmp_path, legacy_weight_norm=False)
    with pytest.raises(ValueError, match="hidden_size"):
        AudioEncoder.from_pretrained_dir(tmp_path, paper().audio)


# -----------------------------------------------------------------------------
# helpers and validation


def test_num_frames_for():
    assert num_frames_for(19200) == 30
    assert num_frames_for(19680) == 31
    assert [num_frames_for(n) for n in (1, 639, 640, 641)] == [1, 1, 1, 2]


def test_normalize_waveform_is_idempotent_enough(fixture):
    wav = fixture["a_wav"]
    once = normalize_waveform(wav * 0.1 + 0.3)
    assert abs(once.mean().item()) < 1e-6
    assert abs(once.var(unbiased=False).item() - 1) < 2e-5  # var / (var + 1e-7) with var ~ 0.01
    # a second pass only undoes the eps shrink of the first (1 / sqrt(1 - 1e-5) on |x| <= 3)
    assert (normalize_waveform(once) - once).abs().max().item() < 5e-5


@pytest.mark.parametrize(
    ("wave", "sample_rate", "match"),
    [
        (np.zeros(100, np.float32), 44100, "sample rate"),
        (np.zeros(0, np.float32), 16000, "empty"),
        (np.array([0.0, np.nan], np.float32), 16000, "NaN"),
        (torch.tensor([0.0, float("inf")]), 16000, "NaN or inf"),
        (np.zeros((2, 100), np.float32), 16000, "shape"),
        (np.zeros(100, np.int16), 16000, "dtype"),
        (torch.zeros(100, dtype=torch.int32), 16000, "dtype"),
        ([0.0, 0.1], 16000, "list"),
    ],
)
def test_validate_waveform_names_the_field(wave, sample_rate, match):
    with pytest.raises(ValueError, match=match) as info:
        validate_waveform(wave, sample_rate=sample_rate, name="avatar_audio")
    assert str(info.value).startswith("avatar_audio:")


def test_validate_waveform_accepts_good_input():
    validate_waveform(np.zeros(10, np.float32), sample_rate=16000, name="x")
    validate_waveform(torch.zeros(2, 10), sample_rate=16000, name="x", ndim=2)
    validate_waveform(torch.zeros(10, dtype=torch.float64), sample_rate=16000, name="x", ndim=(1, 2))


def test_forward_rejects_bad_inputs(tiny_encoder):
    with pytest.raises(ValueError, match="waveform"):
        tiny_encoder(torch.zeros(640), 1)  # (N,) instead of (B, N)
    with pytest.raises(ValueError, match="num_frames"):
        tiny_encoder(torch.zeros(1, 1300), 2)  # 1300 samples need 3 frames
    with pytest.raises(ValueError, match="num_frames"):
        tiny_encoder(torch.zeros(1, 640), 0)
    with pytest.raises(ValueError, match="waveform"):
        tiny_encoder(torch.full((1, 640), float("nan")), 1)
