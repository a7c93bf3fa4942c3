"""The trainer's conditions for a window equal the streaming engine's, chunk for chunk."""

import pytest
import torch

from avatar_forcing.config import tiny
from avatar_forcing.engine.chunks import ChunkSchedule
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.nn.model import random_model
from avatar_forcing.sampling.block_sampler import BlockSampler
from avatar_forcing.training.conditioning import clip_context, encode_window_conditions
from avatar_forcing.training.diffusion_forcing import ModelInputs, VelocityModel

SESSION = 90  # the first window (50) and 4 blocks of 10


@pytest.fixture(scope="module")
def setup():
    flow = random_model(tiny(), seed=3).flow_transformer.eval()
    g = torch.Generator().manual_seed(5)
    D = flow.config.motion_dim
    tracks = tuple(torch.randn(SESSION, D, generator=g) for _ in range(3))  # avatar audio, user audio, user motion
    reference = torch.randn(D, generator=g)

    # The engine: stream the session and record each block's cross-attention keys.
    records, plan = [], flow.plan
    flow.plan = lambda *a, **k: records.append(plan(*a, **k)) or records[-1]
    try:
        sampler = BlockSampler(flow)
        stream = MotionStream(sampler, reference, StreamOptions(nfe=2), seed=0)
        stream.push(*tracks)
        stream.finish()
        blocks = []
        while (request := stream.next_request()) is not None:
            result = sampler.run([request], stream.options.block)[0]
            stream.accept(result)
            p = records[-1]
            new = p.positions[0, (0 if request.context is None else request.context.shape[0]) :]
            blocks.append((p, set(new.tolist()), set(result.cache.self_positions[0].tolist())))
    finally:
        del flow.plan
    return flow, tracks, reference, blocks


def engine_keys(blocks, frame, clean, row):
    """The engine's cross-attention entries visible from `frame`: positions and per-layer K/V."""
    if clean:  # its K/V come from the block after which it first sits in the self-attention cache
        cached = [p for p, _, cache in blocks if frame in cache]
        # (frames 0-9 leave the 38-frame cache at once: the first window is the only pass over them)
        plan = cached[0] if cached else next(p for p in (b[0] for b in blocks) if frame in p.positions[0].tolist())
    else:  # denoised in the block that generates it
        plan = next(p for p, new, _ in blocks if frame in new)
    pos = plan.kv.cross_positions[row]
    keep = (pos - frame).abs() <= 2
    return pos[keep], [(kv.key[row][:, keep], kv.value[row][:, keep]) for kv in plan.kv.cross_kv]


def guidance_rows(tracks, reference, context):
    """The trainer's ModelInputs of the sampler's three guidance rows [uncond, avatar audio, user]."""
    zeros = torch.zeros_like(context.avatar_audio[0])
    a, ua, um = context.avatar_audio[0], context.user_audio[0], context.user_motion[0]
    return ModelInputs(
        torch.stack([zeros, a, zeros]),
        torch.stack([zeros, zeros, ua]),
        torch.stack([zeros, zeros, um]),
        reference.expand(3, -1),
        context.start.expand(3),
        context.origin.expand(3),
    )


@pytest.mark.parametrize(
    ("start", "clean_blocks"),
    [(0, 0), (0, 2), (30, 1), (30, 4)],  # from the session's start, and mid-session across the first window's end
)
def test_window_conditions_equal_the_engines(setup, start, clean_blocks):
    flow, tracks, reference, blocks = setup
    T = 50
    schedule = ChunkSchedule.of(flow.config)
    context = clip_context([tracks], [SESSION], [start], T, schedule)  # the trainer's way (Trainer._windows)
    inputs = guidance_rows(tracks, reference, context)
    timesteps = torch.full((3, T), 500.0)
    timesteps[:, : 10 * clean_blocks] = 0.0
    with torch.no_grad():
        cond = encode_window_conditions(
            flow, inputs.avatar_audio, inputs.user_audio, inputs.user_motion, inputs.start, inputs.origin, timesteps
        )
    assert torch.equal(cond.positions[0], torch.arange(start, start + T))
    for n in range(T):
        frame, clean = start + n, n < 10 * clean_blocks
        for row in range(3):
            want_pos, want_kv = engine_keys(blocks, frame, clean, row)
            seen = cond.visible[row, n]
            got_pos = cond.frames[row, seen]
            order = torch.argsort(got_pos)
            assert torch.equal(got_pos[order], torch.sort(want_pos).values), (frame, clean, row)
            want_order = torch.argsort(want_pos)
            for layer, (k, v) in enumerate(want_kv):
                got_k = cond.kv[layer].key[row][:, seen][:, order]
                got_v = cond.kv[layer].value[row][:, seen][:, order]
                assert (got_k - k[:, want_order]).abs().max() <= 1e-6, (frame, layer)
                assert (got_v - v[:, want_order]).abs().max() <= 1e-6, (frame, layer)


def test_the_old_single_chunk_differs_mid_session(setup):
    """Encoding the window [30, 80) as one chunk (the old way) does not give the engine's conditions."""
    flow, tracks, _, blocks = setup
    # Row 2, the user row: the chunk matters where attention has keys that vary (the avatar-audio
    # row's key/value side is the absent user, the same in every frame, so there it does not).
    pos, want = engine_keys(blocks, 75, False, 2)
    zeros = torch.zeros_like(tracks[0][None, 30:80])
    with torch.no_grad():
        whole = flow.condition_kv(flow.embed_conditions(zeros, tracks[1][None, 30:80], tracks[2][None, 30:80]))
    got = whole[0].key[0][:, pos - 30]
    assert (got - want[0][0]).abs().max() > 1e-3


def test_a_first_window_forward_equals_the_plain_call(setup):
    """Window at 0, one timestep: the engine's first window is one chunk, so the trainer's chunked
    forward equals `FlowTransformer.velocity` (the engine's uncached first-window call)."""
    flow, tracks, reference, _ = setup
    T = 50
    context = clip_context([tracks], [SESSION], [0], T, ChunkSchedule.of(flow.config))
    inputs = guidance_rows(tracks, reference, context)
    x = torch.randn(3, T, flow.config.motion_dim, generator=torch.Generator().manual_seed(1))
    t = torch.full((3, T), 700.0)
    with torch.no_grad():
        got = VelocityModel(flow)(x, t, inputs)
        tracks = (inputs.avatar_audio[:, :T], inputs.user_audio[:, :T], inputs.user_motion[:, :T])
        want = flow.velocity(x, t, inputs.reference_motion, *tracks)
    assert (got - want).abs().max() <= 1e-5
