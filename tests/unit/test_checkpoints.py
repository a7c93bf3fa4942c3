"""Checkpoint loading is strict and names every offending key; conversion round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.nn.checkpoints import (
    CheckpointError,
    convert_release,
    load_pretrained,
    load_release,
    save_pretrained,
)
from avatar_forcing.nn.model import AvatarForcing, random_model
from tests.parity_weights import FIXTURE_DIR


@pytest.fixture(scope="module")
def release_files(tmp_path_factory):
    """Release-shaped files made from a random tiny model: two .pth state dicts and a wav2vec2 folder."""
    root = tmp_path_factory.mktemp("release")
    model = random_model(tiny(), seed=3)
    state = model.state_dict()
    flow = {k: v for k, v in state.items() if k.startswith(("flow_transformer.", "audio_encoder.audio_projection."))}
    mae = {k: v for k, v in state.items() if k.startswith("motion_autoencoder.")}
    torch.save(flow, root / "flow_transformer.pth")
    torch.save(mae, root / "motion_autoencoder.pth")
    model.audio_encoder.wav2vec2.save_pretrained(root / "wav2vec2")
    return root, model


def test_convert_then_load_reproduces_every_tensor(release_files, tmp_path):
    root, original = release_files
    out = convert_release(
        root / "flow_transformer.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tmp_path / "weights", tiny()
    )
    loaded = load_pretrained(out)
    expected = original.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(expected)
    for key in expected:
        assert torch.equal(got[key], expected[key]), key
    assert json.loads((out / "config.json").read_text())["name"] == "tiny"


def test_missing_unexpected_and_misshaped_keys_are_reported_by_name(release_files, tmp_path):
    root, _ = release_files
    flow = torch.load(root / "flow_transformer.pth")
    del flow["flow_transformer.blocks.1.mlp.fc2.bias"]
    flow["flow_transformer.extra_head.weight"] = torch.zeros(3)
    flow["flow_transformer.x_embedder.proj.weight"] = torch.zeros(7, 7)
    torch.save(flow, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        load_release(tmp_path / "bad.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny())
    message = str(err.value)
    assert "missing keys: flow_transformer.blocks.1.mlp.fc2.bias" in message
    assert "unexpected keys: flow_transformer.extra_head.weight" in message
    assert "flow_transformer.x_embedder.proj.weight (checkpoint (7, 7), model (128, 1024))" in message


def test_missing_files_and_dirs_are_clear(release_files, tmp_path):
    root, _ = release_files
    with pytest.raises(FileNotFoundError, match=r"nowhere\.pth"):
        load_release(tmp_path / "nowhere.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny())
    with pytest.raises(FileNotFoundError, match="wav2vec2"):
        load_release(root / "flow_transformer.pth", root / "motion_autoencoder.pth", tmp_path / "no-wav2vec2", tiny())
    with pytest.raises(FileNotFoundError, match="avatar-forcing convert"):
        load_pretrained(tmp_path / "empty")


def test_own_format_rejects_a_checkpoint_of_another_config(tmp_path):
    model = random_model(tiny())
    save_pretrained(model, tmp_path / "w")
    config = json.loads((tmp_path / "w" / "config.json").read_text())
    config["flow"]["depth"] = 3
    (tmp_path / "w" / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"missing keys: flow_transformer\.blocks\.2\."):
        load_pretrained(tmp_path / "w")


def test_paper_model_has_exactly_the_release_parameter_names_and_shapes():
    groups = json.loads((FIXTURE_DIR / "keys_full.json").read_text())["groups"]
    expected = {}
    for group in groups.values():
        expected.update(group["parameters"])
    from avatar_forcing.config import paper

    with torch.device("meta"):
        model = AvatarForcing(paper())
    got = {name: list(p.shape) for name, p in model.named_parameters()}
    assert got == expected


def _with_release_masks(state: dict, window: int, side: int | None = None) -> dict:
    """A flow_transformer state dict as the released model's `state_dict()` writes it: with its two masks."""
    side = side or window
    allow = torch.ones(side, side, dtype=torch.bool)
    return {
        **state,
        "flow_transformer.alignment_mask": allow,
        "flow_transformer.block_bidir_causal_lookahead_mask": allow,
    }


def test_release_files_with_or_without_the_mask_buffers_load_identically(release_files, tmp_path):
    root, original = release_files
    window = tiny().flow.window
    flow = torch.load(root / "flow_transformer.pth")
    torch.save(_with_release_masks(flow, window), tmp_path / "with_masks.pth")
    ignored: list[str] = []
    plain = load_release(root / "flow_transformer.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny())
    masked = load_release(
        tmp_path / "with_masks.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny(), ignored.append
    )
    for key, value in original.state_dict().items():
        assert torch.equal(plain.state_dict()[key], value), key
        assert torch.equal(masked.state_dict()[key], value), key
    assert len(ignored) == 2
    assert any("flow_transformer.alignment_mask" in line for line in ignored)
    assert any("flow_transformer.block_bidir_causal_lookahead_mask" in line for line in ignored)


def test_a_mask_buffer_of_the_wrong_shape_and_other_buffers_stay_errors(release_files, tmp_path):
    root, _ = release_files
    window = tiny().flow.window
    flow = torch.load(root / "flow_transformer.pth")
    torch.save(_with_release_masks(flow, window, side=window + 1), tmp_path / "bad_masks.pth")
    with pytest.raises(CheckpointError, match=rf"alignment_mask \(checkpoint \({window + 1}, {window + 1}\)"):
        load_release(tmp_path / "bad_masks.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny())
    other = {**_with_release_masks(flow, window), "flow_transformer.some_other_mask": torch.ones(window, window)}
    torch.save(other, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys: flow_transformer\.some_other_mask"):
        load_release(tmp_path / "other.pth", root / "motion_autoencoder.pth", root / "wav2vec2", tiny())


def test_the_release_buffer_names_are_the_fixture_s_persistent_flow_buffers():
    groups = json.loads((FIXTURE_DIR / "keys_full.json").read_text())["groups"]
    from avatar_forcing.config import paper
    from avatar_forcing.nn.checkpoints import RELEASE_BUFFERS

    buffers = groups["flow_transformer"]["persistent_buffers"]
    assert set(buffers) == set(RELEASE_BUFFERS)
    window = paper().flow.window
    assert all(shape == [window, window] for shape in buffers.values())
