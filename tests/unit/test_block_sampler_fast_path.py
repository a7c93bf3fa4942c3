"""The block sampler's fast path equals the plain computation on `paper`-shaped weights.

The fast path: a per-block plan (masks, RoPE, [cache ; new] K/V buffers, the time modulation
of every timestep), a cache-writing call that stops at the last layer's K/V, and prepacked
linears (the AVX-512 kernel or oneDNN). The reference below is the plain algorithm: every call
builds its own masks and modulation from scratch through `FlowTransformer.forward`, runs the
whole network, and the cache rolls by concatenation; linears are `F.linear`.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from avatar_forcing.config import paper, tiny
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.nn import prepacked, small_gemm
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.nn.kv_cache import FlowCache, roll_cache
from avatar_forcing.sampling.block_sampler import BlockRequest, BlockResult, BlockSampler
from avatar_forcing.sampling.euler import GUIDANCE_ROWS

ATOL = 1e-4
BLOCKS = 3  # streaming blocks after the first window, each with a cache
NFE = 4  # 2 sampler steps + the cache write per block: enough to chain caches, quick on CPU

pytestmark = pytest.mark.usefixtures("single_thread")


def backends() -> list[str]:
    found = []
    if small_gemm.available():
        found.append("avx512")
    if prepacked._onednn_available():
        found.append("onednn")
    return found


@pytest.fixture(scope="module")
def paper_flow() -> FlowTransformer:
    torch.manual_seed(0)
    return FlowTransformer(paper().flow).eval()


def reference_block(model: FlowTransformer, request: BlockRequest, block: int | None) -> tuple[torch.Tensor, FlowCache]:
    """One request, the plain way: final tokens (L, 512) and the next cache."""
    cfg, sampler = model.config, BlockSampler(model).sampler
    R, L = GUIDANCE_ROWS, request.num_tokens
    avatar, user_audio, user_motion = request.conditions.guidance_rows()
    cond_kv = model.condition_kv(model.embed_conditions(avatar, user_audio, user_motion))
    positions = torch.arange(request.start_frame, request.start_frame + L).expand(R, L)
    reference = request.reference_motion.expand(R, -1)
    x = request.noise if request.context is None else torch.cat([request.context, request.noise])
    x = x[None]  # (1, L, 512)
    is_new = torch.arange(L) >= L - request.noise.shape[0]
    call = lambda x, t: model(x.expand(R, -1, -1), t, reference, positions, cond_kv, positions, request.cache, block)
    for t_now, t_next in itertools.pairwise(sampler.timestep_list(request.nfe)):
        velocity = call(x, torch.where(is_new, t_now, 0.0).expand(R, L)).velocity
        sigma_now = torch.where(is_new, sampler.sigma(t_now), 0.0)[None, :, None]
        sigma_next = torch.where(is_new, sampler.sigma(t_next), 0.0)[None, :, None]
        x = sampler.step(x, request.guidance.combine(velocity)[None], sigma_now, sigma_next)
    out = call(x, torch.zeros(R, L))  # the cache-writing call, through the whole network
    new = roll_cache(
        request.cache,
        out.self_kv,
        cond_kv,
        positions,
        positions,
        cfg.window - (block or cfg.block) - cfg.lookahead,
        cfg.lookahead,
        cfg.cross_window,
    )
    return x[0], new


def max_cache_diff(a: FlowCache, b: FlowCache) -> float:
    assert torch.equal(a.self_positions, b.self_positions) and torch.equal(a.cross_positions, b.cross_positions)
    pairs = [(x.key, y.key) for x, y in zip(a.self_kv + a.cross_kv, b.self_kv + b.cross_kv, strict=True)]
    pairs += [(x.value, y.value) for x, y in zip(a.self_kv + a.cross_kv, b.self_kv + b.cross_kv, strict=True)]
    return max((x - y).abs().max().item() for x, y in pairs)


def run_stream(model: FlowTransformer, reference_rollout: bool) -> list[tuple[torch.Tensor, FlowCache]]:
    """The first window and BLOCKS streaming blocks of one seeded stream: (tokens, cache) each."""
    g = torch.Generator().manual_seed(3)
    frames = lambda n: torch.randn(n, 512, generator=g)
    stream = MotionStream(BlockSampler(model), 0.3 * frames(1)[0], StreamOptions(nfe=NFE), seed=5)
    stream.push(frames(50), frames(50), frames(50))
    out = []
    for _ in range(BLOCKS + 1):
        request = stream.next_request()
        assert request is not None
        if reference_rollout:
            with torch.no_grad(), prepacked.disabled():
                tokens, cache = reference_block(model, request, stream.options.block)
            result = BlockResult(tokens[tokens.shape[0] - request.noise.shape[0] :], tokens, cache)
        else:
            result = stream.sampler.run([request], stream.options.block)[0]
        stream.accept(result)
        out.append((result.tokens, result.cache))
        stream.push(frames(10), frames(10), frames(10))
    return out


@pytest.fixture(scope="module")
def expected(paper_flow) -> list[tuple[torch.Tensor, FlowCache]]:
    return run_stream(paper_flow, reference_rollout=True)


@pytest.mark.parametrize("backend", [None, *backends()])
def test_fast_path_equals_plain_computation_over_cached_blocks(paper_flow, expected, backend):
    with prepacked.using(backend):
        got = run_stream(paper_flow, reference_rollout=False)
    assert [t.shape[0] for t, _ in got] == [50] + [12] * BLOCKS
    for (tokens, cache), (want_tokens, want_cache) in zip(got, expected, strict=True):
        assert (tokens - want_tokens).abs().max().item() < ATOL
        assert max_cache_diff(cache, want_cache) < ATOL
    # The reference must be able to fail: a different seed is far away.
    assert (got[-1][0] - torch.randn_like(got[-1][0])).abs().max().item() > 1.0


def test_cache_writing_call_stops_after_the_last_layers_kv(paper_flow):
    calls = []
    hooks = [m.register_forward_hook(lambda m, i, o: calls.append(m)) for m in (paper_flow.final_layer,)]
    try:
        with torch.no_grad():
            sampler = BlockSampler(paper_flow)
            g = torch.Generator().manual_seed(0)
            stream = MotionStream(sampler, torch.zeros(512), StreamOptions(nfe=NFE), seed=0)
            stream.push(*(torch.randn(50, 512, generator=g) for _ in range(3)))
            stream.pull()
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == NFE - 2  # one per sampler step; none for the cache write


def test_time_modulation_is_reused_across_blocks_until_the_weights_change():
    torch.manual_seed(1)
    model = FlowTransformer(tiny().flow).eval()
    R, L = 3, 12
    positions = torch.arange(50, 50 + L).expand(R, L)
    cond_kv = model.condition_kv(torch.randn(R, L, model.config.hidden_dim))
    timesteps = torch.tensor([1000.0, 500.0, 0.0])
    with torch.no_grad():
        plan = lambda: model.plan(positions, cond_kv, positions, None, None, timesteps)
        first, second = plan().time, plan().time
        assert second is first  # the next block reads no adaLN weights
        model.adaLN_modulation[1].weight.mul_(0.5)
        edited = plan().time
        fresh = model.time_modulation(timesteps)
    assert edited is not first
    assert torch.equal(edited.blocks, fresh.blocks) and torch.equal(edited.final, fresh.final)
    assert (edited.blocks - first.blocks).abs().max().item() > 1e-3
