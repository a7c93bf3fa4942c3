"""int8 checkpoint storage (nn/quantized.py): round trip within half a step, and loading."""

from __future__ import annotations

import pytest
import torch

from avatar_forcing.nn.quantized import SCALE_SUFFIX, dequantize, quantize_int8


def test_round_trip_is_within_half_a_step_per_row():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 128, generator=g) * torch.linspace(0.01, 3.0, 64)[:, None]  # rows of many scales
    state = {"flow_transformer.w": weight, "flow_transformer.b": torch.randn(64), "other.w": torch.randn(64, 128)}
    stored = quantize_int8(state, ("flow_transformer.",))
    assert stored["flow_transformer.w"].dtype == torch.int8
    assert stored["flow_transformer.b"].dtype == torch.float32  # 1-D: kept
    assert stored["other.w"].dtype == torch.float32  # outside the prefixes: kept
    back = dequantize(stored)
    assert set(back) == set(state)
    step = stored["flow_transformer.w" + SCALE_SUFFIX].float()[:, None]
    assert (step >= weight.abs().amax(dim=1, keepdim=True) / 127).all()  # nothing clipped
    assert (step <= weight.abs().amax(dim=1, keepdim=True) / 127 * 1.002).all()
    assert ((back["flow_transformer.w"] - weight).abs() <= step * 0.5 * (1 + 1e-6)).all()
    assert torch.equal(back["other.w"], state["other.w"])


def test_a_scale_without_its_matrix_is_an_error():
    with pytest.raises(ValueError, match="row scale without its int8 matrix"):
        dequantize({"x" + SCALE_SUFFIX: torch.ones(3, dtype=torch.float16)})


def test_quantized_checkpoint_loads_into_the_model(tmp_path):
    from safetensors.torch import load_file, save_file

    from avatar_forcing.config import tiny
    from avatar_forcing.nn.checkpoints import WEIGHTS_FILE, load_pretrained, save_pretrained
    from avatar_forcing.nn.model import random_model

    model = random_model(tiny())
    save_pretrained(model, tmp_path)
    state = load_file(tmp_path / WEIGHTS_FILE)
    save_file(quantize_int8(state, ("flow_transformer.",)), tmp_path / WEIGHTS_FILE)
    loaded = load_pretrained(tmp_path)
    for key, value in model.state_dict().items():
        got = loaded.state_dict()[key]
        assert got.dtype == value.dtype
        assert torch.allclose(got, value, atol=value.abs().max().item() / 127 + 1e-6), key
