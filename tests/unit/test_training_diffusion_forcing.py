"""The diffusion-forcing objective and a few real optimisation steps of the tiny model."""

import dataclasses

import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.nn.model import random_model
from avatar_forcing.sampling.block_sampler import Conditions
from avatar_forcing.sampling.euler import FlowMatchEuler
from avatar_forcing.training.batch import SyntheticDataset, TrainingExample, collate
from avatar_forcing.training.diffusion_forcing import (
    DiffusionForcingConfig,
    VelocityModel,
    diffusion_forcing_loss,
    drop_conditions,
    loss_weights,
    per_sample_loss,
    sample_block_timesteps,
)
from avatar_forcing.training.trainer import TrainConfig, Trainer


def test_one_timestep_per_block_and_clean_prefixes():
    sampler = FlowMatchEuler()
    g = torch.Generator().manual_seed(0)
    t, sigma = sample_block_timesteps(64, 50, 10, sampler, g, clean_context_prob=0.5)
    assert t.shape == (64, 50)
    blocks = t.view(64, 5, 10)
    assert (blocks == blocks[:, :, :1]).all()  # shared within a block
    assert (blocks[:, :, 0] != blocks[:, :1, 0]).any()  # independent across blocks
    clean = sigma.view(64, 5, 10)[:, :, 0] == 0
    assert clean.any(dim=1).float().mean().item() == pytest.approx(0.5, abs=0.2)
    # Clean blocks form a prefix and never cover the whole window.
    for row in clean:
        k = int(row.sum())
        assert row[:k].all() and not row[k:].any() and k < 5
    assert torch.allclose(t, sigma * 1000)


def test_dropout_zeroes_conditions_as_the_guidance_rows_do():
    data = SyntheticDataset(4, frames=20, motion_dim=16, audio_dim=16)
    batch = collate([data[i] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    none = drop_conditions(batch, DiffusionForcingConfig(drop_avatar_audio=1, drop_user=1, drop_reference=0), g)
    uncond = Conditions(batch.avatar_audio[0], batch.user_audio[0], batch.user_motion[0]).guidance_rows()
    assert torch.equal(none.avatar_audio[0], uncond[0][0]) and torch.equal(none.user_motion[0], uncond[2][0])
    assert torch.equal(none.user_audio, torch.zeros_like(batch.user_audio))
    assert torch.equal(none.reference_motion, batch.reference_motion)  # present, as at inference
    kept = drop_conditions(batch, DiffusionForcingConfig(drop_avatar_audio=0, drop_user=0, drop_reference=0), g)
    assert torch.equal(kept.avatar_audio, batch.avatar_audio) and torch.equal(kept.user_motion, batch.user_motion)


def test_loss_ignores_padding_and_clean_frames():
    v, u = torch.zeros(2, 4, 3), torch.ones(2, 4, 3)
    v[:, 2:] = 100.0  # frames that must not count
    mask = torch.tensor([[True, True, False, False], [True, True, True, True]])
    sigma = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.5, 0.5, 0.0, 0.0]])
    weights = loss_weights(mask, sigma)
    assert per_sample_loss(v, u, weights, 1).tolist() == [1.0, 1.0]
    assert per_sample_loss(v * 0 + 3, u, weights, 2).tolist() == [4.0, 4.0]


def test_bad_options_name_the_field():
    with pytest.raises(ValueError, match="loss_power"):
        DiffusionForcingConfig(loss_power=3)
    with pytest.raises(ValueError, match="drop_user"):
        DiffusionForcingConfig(drop_user=1.5)
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="user_audio"):
        TrainingExample(torch.zeros(5, 4), torch.zeros(5, 4), torch.zeros(5, 4), torch.zeros(4, 4), torch.zeros(4))


def test_gradients_reach_every_flow_parameter():
    model = random_model(tiny(), seed=0)
    flow = model.flow_transformer.train()
    data = SyntheticDataset(2, frames=50)
    batch = collate([data[0], data[1]])
    loss, per = diffusion_forcing_loss(
        VelocityModel(flow), batch, FlowMatchEuler(), DiffusionForcingConfig(), 10, torch.Generator().manual_seed(1)
    )
    loss.backward()
    assert per.shape == (2,)
    missing = [n for n, p in flow.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing
    assert all(p.grad.abs().sum() > 0 for n, p in flow.named_parameters() if "c_embedder" not in n)


def test_a_few_tiny_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = random_model(tiny(), seed=0)
    data = SyntheticDataset(8, frames=50, seed=1)
    config = TrainConfig(steps=12, batch_size=4, lr=1e-3, warmup_steps=0, ema_decay=0, val_batches=2)
    trainer = Trainer(config, model, data, val_data=data, progress=False)
    before = trainer.validate()  # the same fixed draws every time
    losses = [trainer.train_step()["loss"] for _ in range(12)]
    after = trainer.validate()
    assert after < before - 0.05, (before, after)
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4


def test_validation_reports_the_ema_weights_loss_besides_the_raw_one(tmp_path):
    import csv

    from avatar_forcing.training.trainer import LocalSink

    config = TrainConfig(steps=2, batch_size=2, lr=1e-3, warmup_steps=0, ema_decay=0.9, val_every=2, val_batches=1,
                         log_every=1, checkpoint_every=2)  # fmt: skip
    val = SyntheticDataset(2, frames=50, seed=5)
    trainer = Trainer(config, random_model(tiny(), seed=0), SyntheticDataset(4, frames=50, seed=1), val_data=val,
                      log_dir=tmp_path, progress=False)  # fmt: skip
    start = trainer.validation()  # the EMA starts as a copy of the weights: the same loss, exactly
    assert start["val_loss"] is not None and start["val_loss_ema"] == start["val_loss"]

    trainer.run(LocalSink(tmp_path / "checkpoints"))
    raw = {k: v.clone() for k, v in trainer.flow.state_dict().items()}
    got = trainer.validation()
    assert all(torch.equal(v, raw[k]) for k, v in trainer.flow.state_dict().items())  # raw weights back
    assert got["val_loss_ema"] != got["val_loss"]  # decay < 1: the average lags the weights
    assert got["val_loss"] == trainer.validate()
    # It is the loss of the EMA weights: a model holding them (and no EMA) gets the same number.
    holder = Trainer(dataclasses.replace(config, ema_decay=0), random_model(tiny(), seed=0),
                     SyntheticDataset(4, frames=50, seed=1), val_data=val, progress=False)  # fmt: skip
    holder.flow.load_state_dict(trainer.ema.weights(holder.flow))
    assert holder.validate() == got["val_loss_ema"] and holder.validate(ema=True) is None
    with (tmp_path / "metrics.csv").open() as f:
        last = list(csv.DictReader(f))[-1]
    assert float(last["val_loss"]) == got["val_loss"] and float(last["val_loss_ema"]) == got["val_loss_ema"]

    trainer.ema.shadow = {k: v.float().clone() for k, v in trainer.flow.state_dict().items()}  # EMA = weights
    same = trainer.validation()
    assert same["val_loss_ema"] == same["val_loss"] == got["val_loss"]
