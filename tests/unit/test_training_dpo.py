"""Diffusion-DPO for flow matching: the loss and gradient at θ = ref, and the cached, batched losers."""

import copy
import math

import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.nn.model import random_model
from avatar_forcing.sampling.block_sampler import BlockSampler
from avatar_forcing.sampling.euler import FlowMatchEuler, GuidanceScales
from avatar_forcing.sampling.reference import sample_motion, torch_noise
from avatar_forcing.training import losers as losers_module
from avatar_forcing.training.batch import SyntheticDataset, collate
from avatar_forcing.training.diffusion_forcing import DiffusionForcingConfig, VelocityModel
from avatar_forcing.training.dpo import LOG_2, DPOConfig, dpo_loss, dpo_objective, dpo_stats
from avatar_forcing.training.losers import ensure_losers, noise_generator, sample_talking_only


@pytest.fixture(scope="module")
def flow():
    return random_model(tiny(), seed=0).flow_transformer


def pair_batch(seed=0):
    data = SyntheticDataset(3, frames=50, seed=seed)
    examples = [data[i] for i in range(3)]
    g = torch.Generator().manual_seed(seed + 10)
    losers = [e.avatar_motion + 0.5 * torch.randn(e.avatar_motion.shape, generator=g) for e in examples]
    return collate(examples, losers)


@pytest.mark.parametrize("power", [1, 2])
def test_policy_equal_to_reference_gives_log2_and_the_predicted_gradient(flow, power):
    policy = copy.deepcopy(flow).train()
    reference = copy.deepcopy(flow).eval().requires_grad_(False)
    beta = 500.0
    out = dpo_loss(
        VelocityModel(policy), VelocityModel(reference), pair_batch(), FlowMatchEuler(),
        DiffusionForcingConfig(loss_power=power), DPOConfig(beta=beta, df_weight=0.0), 10,
        torch.Generator().manual_seed(3),
    )  # fmt: skip
    assert float(out.loss.detach()) == pytest.approx(0.6931472, abs=1e-7)
    assert out.stats["reward_margin"] == 0.0 and out.stats["implicit_acc"] == 0.5
    params = [p for p in policy.parameters()]
    got = torch.autograd.grad(out.loss, params, retain_graph=True)
    expected = torch.autograd.grad((beta / 4) * (out.policy_win - out.policy_lose).mean(), params)
    assert any(e.abs().max() > 0 for e in expected)
    for g, e in zip(got, expected, strict=True):
        assert torch.allclose(g, e, rtol=1e-5, atol=1e-9 * beta)


def test_objective_algebra():
    g = torch.Generator().manual_seed(0)
    w, lose, rw, rl = (torch.rand(16, generator=g) for _ in range(4))
    loss, z = dpo_objective(w, lose, rw, rl, beta=10.0)
    _, z_swapped = dpo_objective(lose, w, rl, rw, beta=10.0)
    assert torch.allclose(z_swapped, -z)
    assert torch.allclose(torch.nn.functional.softplus(-z) - torch.nn.functional.softplus(z), -z, atol=1e-6)
    assert float(loss) == pytest.approx(float(-torch.nn.functional.logsigmoid(z).mean()), rel=1e-6)
    stats = dpo_stats(z, w, lose, rw, rl, 10.0)
    assert stats["implicit_acc"] == pytest.approx(float((z > 0).float().mean()))
    assert stats["reward_margin"] == pytest.approx(stats["reward_win"] - stats["reward_lose"], abs=1e-5)
    assert pytest.approx(math.log(2)) == LOG_2


def test_a_lower_winner_loss_raises_the_implicit_accuracy():
    z_good = dpo_objective(torch.tensor([0.1]), torch.tensor([0.5]), torch.tensor([0.3]), torch.tensor([0.3]), 1.0)
    assert float(z_good[1][0]) > 0 and float(z_good[0]) < LOG_2


def test_batched_losers_equal_the_reference_rollout_with_the_user_dropped(flow):
    data = SyntheticDataset(3, frames=63, seed=2)  # first window + 2 blocks (the last one padded)
    examples = [data[i] for i in range(3)]
    made = sample_talking_only(flow, examples, nfe=3, audio_guidance=2.0, seed=5, batch_size=2)
    for e, got in zip(examples, made, strict=True):
        zeros = torch.zeros_like(e.avatar_audio)
        want = sample_motion(
            BlockSampler(flow), e.avatar_audio, zeros, zeros, e.reference_motion,
            torch_noise(noise_generator(5, e.key)), nfe=3, guidance=GuidanceScales(2.0, 0.0),
        )  # fmt: skip
        assert got.shape == (63, 512)
        assert torch.allclose(got, want, atol=1e-4)


def test_loser_cache_is_reused_and_invalidated(flow, tmp_path, monkeypatch):
    data = SyntheticDataset(2, frames=50, seed=4)
    examples = [data[0], data[1]]
    path = tmp_path / "losers.safetensors"
    first = ensure_losers(flow, examples, path, nfe=2)
    assert set(first) == {e.key for e in examples}

    def fail(*args, **kwargs):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(losers_module, "sample_talking_only", fail)
    again = ensure_losers(flow, examples, path, nfe=2)
    assert all(torch.equal(first[k], again[k]) for k in first)
    with pytest.raises(AssertionError, match="regenerated"):
        ensure_losers(flow, examples, path, nfe=3)  # other options: the cache does not apply
