"""Parity of the flow transformer, the sampler and the KV cache with the released model.

Every expected value comes from the official-parity fixture (produced by the release);
tolerances are the fixture README's (atol 1e-4 for flow tensors; the smallest seeded
mistake it lists, sigma = t/1000, is 1.8e-3).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from avatar_forcing.config import paper
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.sampling.block_sampler import BlockSampler
from avatar_forcing.sampling.euler import FlowMatchEuler
from avatar_forcing.sampling.reference import sample_motion
from tests.parity_weights import FIXTURE_DIR

FLOW_ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("single_thread")


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"{tuple(a.shape)} != {tuple(b.shape)}"
    return (a.float() - b.float()).abs().max().item()


def test_forward_and_intermediates_match_release(parity_flow, fixture_tensors):
    f = fixture_tensors("flow_forward")
    captured = {}
    hooks = [
        parity_flow.x_embedder.register_forward_hook(lambda m, i, o: captured.__setitem__("x", o)),
        *[
            blk.register_forward_hook(lambda m, i, o, n=n: captured.__setitem__(f"block{n}", o[0]))
            for n, blk in enumerate(parity_flow.blocks)
        ],
    ]
    try:
        with torch.no_grad():
            out = parity_flow.velocity(
                f["in_x"], f["in_t"], f["in_wr"], f["in_wa"], f["in_wa_user"], f["in_motion_user"]
            )
            cond = parity_flow.embed_conditions(f["in_wa"], f["in_wa_user"], f["in_motion_user"])
            t_embed = parity_flow.t_embedder(f["in_t"])
    finally:
        for hook in hooks:
            hook.remove()
    assert max_diff(out, f["out"]) < FLOW_ATOL
    assert max_diff(cond, f["dbg_c"]) < 1e-5
    assert max_diff(t_embed, f["dbg_t_embed"]) < 1e-5
    assert max_diff(captured["x"], f["dbg_x_embedded"]) < 1e-5
    assert max_diff(captured["block0"], f["dbg_block0_out"]) < FLOW_ATOL
    assert max_diff(captured["block1"], f["dbg_block1_out"]) < FLOW_ATOL


def test_scheduler_tables_and_sigma_lookup_match_release(fixture_tensors):
    f = fixture_tensors("flow_sample")
    solver = FlowMatchEuler()
    assert torch.equal(solver.sigmas, f["scheduler_sigmas"])
    assert torch.equal(solver.timesteps, f["scheduler_timesteps"])
    assert solver.timestep_list(10) == f["denoising_step_list"].tolist()
    entries = json.loads((FIXTURE_DIR / "config.json").read_text())["notes"]["solver_sigma_lookup"]
    assert len(entries) == 9
    for entry in entries:
        assert solver.sigma(float(entry["t"])) == pytest.approx(float(entry["sigma"]), abs=1e-7)


def fixture_noise(f):
    draws = iter([f["noise_0"][0], f["noise_1"][0], f["noise_2"][0], f["noise_3"][0]])
    return lambda frames: next(draws)


def test_streaming_sample_trajectories_and_caches_match_release(parity_flow, fixture_tensors):
    f = fixture_tensors("flow_sample")
    trajectory: list[torch.Tensor] = []
    caches = []
    sampler = BlockSampler(parity_flow, on_step=lambda x: trajectory.append(x[0].clone()))
    original_run = sampler.run

    def recording_run(requests, block=None):
        results = original_run(requests, block)
        caches.append(results[0].cache)
        return results

    sampler.run = recording_run  # type: ignore[method-assign]
    out = sample_motion(sampler, f["avatar_wa"][0], f["user_wa"][0], f["user_r_d"][0], f["r_s"][0], fixture_noise(f))
    assert max_diff(out, f["samples"][0]) < FLOW_ATOL

    # 8 recorded steps per block: the release's 9th (t = 0) is the identity, skipped here.
    steps = 8
    for block in range(4):
        expected = f[f"traj_block{block}"][:, 0]  # (9, L, 512)
        got = torch.stack(trajectory[block * steps : (block + 1) * steps])
        assert max_diff(got, expected[:steps]) < FLOW_ATOL
        assert max_diff(got[-1], expected[-1]) < FLOW_ATOL  # the skipped step changes nothing

    for update, cache in enumerate(caches):
        for layer in range(len(parity_flow.blocks)):
            prefix = f"kv_after_update{update}_layer{layer}"
            assert max_diff(cache.self_kv[layer].key, f[f"{prefix}_self_k"]) < FLOW_ATOL
            assert max_diff(cache.self_kv[layer].value, f[f"{prefix}_self_v"]) < FLOW_ATOL
            assert max_diff(cache.cross_kv[layer].key, f[f"{prefix}_cross_k"]) < FLOW_ATOL
            assert max_diff(cache.cross_kv[layer].value, f[f"{prefix}_cross_v"]) < FLOW_ATOL


def test_skipping_the_noop_final_step_is_identical_and_saves_a_call(parity_flow, fixture_tensors):
    f = fixture_tensors("flow_sample")
    args = (f["avatar_wa"][0], f["user_wa"][0], f["user_r_d"][0], f["r_s"][0])
    calls = {"n": 0}
    hook = parity_flow.register_forward_pre_hook(lambda m, a: calls.__setitem__("n", calls["n"] + 1))
    try:
        fast = sample_motion(BlockSampler(parity_flow), *args, fixture_noise(f))
        fast_calls, calls["n"] = calls["n"], 0
        full = sample_motion(BlockSampler(parity_flow, skip_final_noop=False), *args, fixture_noise(f))
        full_calls = calls["n"]
    finally:
        hook.remove()
    assert torch.equal(fast, full)
    assert full_calls - fast_calls == 4  # one call saved per block (4 blocks for T = 75)
    assert fast_calls == 4 * 9  # 8 sampler calls + 1 cache write per block


def test_paper_config_parameter_names_and_shapes_equal_release():
    expected = json.loads((FIXTURE_DIR / "keys_full.json").read_text())["groups"]["flow_transformer"]["parameters"]
    with torch.device("meta"):
        model = FlowTransformer(paper().flow)
    got = {f"flow_transformer.{n}": list(p.shape) for n, p in model.named_parameters()}
    assert got == expected


def test_sigma_is_nearest_grid_point_not_t_over_1000():
    solver = FlowMatchEuler()
    assert solver.sigma(875) == pytest.approx(0.87487489, abs=1e-7)
    assert solver.sigma(500) == pytest.approx(0.50050050, abs=1e-7)  # exact tie -> first index
    assert solver.sigma(0) == 0.0
    assert abs(solver.sigma(875) - 0.875) > 1e-4
    assert np.isclose(solver.sigma(1000), 1.0)
