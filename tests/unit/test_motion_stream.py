"""The streaming engine: equal to the offline sampler, causal, resumable, unbounded in length."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.sampling.block_sampler import BlockSampler
from avatar_forcing.sampling.euler import GuidanceScales
from avatar_forcing.sampling.reference import sample_motion, torch_noise

DIM = 512
STREAMS = ("avatar_audio", "user_audio", "user_motion")


def tracks(frames: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: torch.randn(frames, DIM, generator=g) for name in STREAMS}


def reference(seed: int = 1) -> torch.Tensor:
    return 0.3 * torch.randn(DIM, generator=torch.Generator().manual_seed(seed))


def feed_randomly(stream: MotionStream, inputs: dict[str, torch.Tensor], seed: int = 0, max_chunk: int = 13):
    """Push each stream in random chunk sizes and interleavings, pulling as it goes."""
    rnd = random.Random(seed)
    cursor = dict.fromkeys(STREAMS, 0)
    total = inputs["avatar_audio"].shape[0]
    blocks = []
    while min(cursor.values()) < total:
        name = rnd.choice([n for n in STREAMS if cursor[n] < total])
        size = rnd.randint(1, max_chunk)
        stream.push(**{name: inputs[name][cursor[name] : cursor[name] + size]})
        cursor[name] = min(total, cursor[name] + size)
        blocks += stream.pull()
    stream.finish()
    return blocks + stream.pull()


def concat(blocks) -> torch.Tensor:
    frame = 0
    for block in blocks:
        assert block.frame_index == frame, "blocks are contiguous and in order"
        frame += block.latents.shape[0]
    return torch.cat([b.latents for b in blocks])


@pytest.mark.parametrize("frames", [37, 75, 123])
def test_streaming_equals_offline_for_any_chunking(parity_flow, frames):
    inputs, ref = tracks(frames), reference()
    sampler = BlockSampler(parity_flow)
    expected = sample_motion(sampler, *inputs.values(), ref, torch_noise(torch.Generator().manual_seed(7)))
    for chunk_seed in range(2):
        stream = MotionStream(sampler, ref, seed=7)
        got = concat(feed_randomly(stream, inputs, seed=chunk_seed))
        assert got.shape == (frames, DIM)
        assert torch.equal(got, expected)


def test_blocks_are_emitted_as_soon_as_their_inputs_are_complete(parity_flow):
    stream = MotionStream(BlockSampler(parity_flow), reference())
    inputs = tracks(70)
    stream.push(*(x[:49] for x in inputs.values()))
    assert stream.pull() == []  # the first window needs 50 frames
    stream.push(*(x[49:50] for x in inputs.values()))
    assert [b.latents.shape[0] for b in stream.pull()] == [50]
    stream.push(*(x[50:59] for x in inputs.values()))
    assert stream.pull() == []  # the block [50, 60) needs frame 59
    stream.push(avatar_audio=inputs["avatar_audio"][59:60], user_audio=inputs["user_audio"][59:60])
    assert stream.pull() == []  # ...from every stream
    stream.push(user_motion=inputs["user_motion"][59:60])
    [block] = stream.pull()
    assert (block.frame_index, block.latents.shape[0]) == (50, 10)


def test_outputs_are_causal(parity_flow):
    """Changing inputs after frame t changes no output block that ended before t - lookahead."""
    sampler = BlockSampler(parity_flow)
    ref = reference()
    base = tracks(90)
    changed = {k: v.clone() for k, v in base.items()}
    for v in changed.values():
        v[72:] = torch.randn(18, DIM)  # inputs of frames >= 72 differ
    a = concat(feed_randomly(MotionStream(sampler, ref, seed=3), base))
    b = concat(feed_randomly(MotionStream(sampler, ref, seed=3), changed))
    # Block [60, 70) reads conditions up to frame 69 (plus look-ahead into frames < 72 only via
    # the next block's context, which does not alter emitted frames): identical.
    assert torch.equal(a[:70], b[:70])
    assert not torch.allclose(a[70:], b[70:])


def test_state_restored_mid_session_in_a_new_process_continues_identically(tmp_path):
    # Both halves run in fresh processes with one thread each: bitwise equality needs the same
    # reduction order on both sides, and nothing an earlier test cached in this process.
    prelude = textwrap.dedent(
        """
        import torch
        torch.set_num_threads(1)
        from avatar_forcing.config import tiny
        from avatar_forcing.engine.motion_stream import MotionStream
        from avatar_forcing.nn.flow_transformer import FlowTransformer
        from avatar_forcing.sampling.block_sampler import BlockSampler
        from tests.parity_weights import fill_module
        model = FlowTransformer(tiny().flow).eval()
        fill_module(model, "flow_transformer.", "flow_transformer")
        sampler = BlockSampler(model)
        """
    )
    first_half = textwrap.dedent(
        f"""
        inputs = torch.load(r"{tmp_path / "inputs.pt"}")
        ref = torch.load(r"{tmp_path / "ref.pt"}")
        whole = MotionStream(sampler, ref, seed=11)
        whole.push(**inputs)
        whole.finish()
        uninterrupted = torch.cat([b.latents for b in whole.pull()])
        stream = MotionStream(sampler, ref, seed=11)
        stream.push(**{{k: v[:63] for k, v in inputs.items()}})  # mid-block: 3 frames of the next block buffered
        first = [b.latents for b in stream.pull()]
        open(r"{tmp_path / "state.bin"}", "wb").write(stream.to_bytes())
        torch.save((uninterrupted, first), r"{tmp_path / "first.pt"}")
        """
    )
    second_half = textwrap.dedent(
        f"""
        inputs = torch.load(r"{tmp_path / "inputs.pt"}")
        stream = MotionStream.from_bytes(sampler, open(r"{tmp_path / "state.bin"}", "rb").read())
        stream.push(**{{k: v[63:] for k, v in inputs.items()}})
        stream.finish()
        torch.save([b.latents for b in stream.pull()], r"{tmp_path / "rest.pt"}")
        """
    )
    torch.save(tracks(95), tmp_path / "inputs.pt")
    torch.save(reference(), tmp_path / "ref.pt")
    root = str(Path(__file__).resolve().parents[2])
    for script in (first_half, second_half):
        subprocess.run([sys.executable, "-c", prelude + script], check=True, cwd=root)
    uninterrupted, first = torch.load(tmp_path / "first.pt")
    rest = torch.load(tmp_path / "rest.pt")
    assert first and rest, "the state was taken mid-session: blocks on both sides of it"
    assert torch.equal(torch.cat(first + rest), uninterrupted)


def test_long_session_beyond_1024_frames(parity_flow):
    """A session past the release's 1024-frame RoPE table keeps going and stays well-formed."""
    stream = MotionStream(BlockSampler(parity_flow, sampler=None), reference(), StreamOptions(nfe=3), seed=0)
    frames = 1200
    chunk = tracks(frames, seed=5)
    norms = []
    for start in range(0, frames, 100):
        stream.push(*(x[start : start + 100] for x in chunk.values()))
        for block in stream.pull():
            norms.append(block.latents.norm(dim=-1).mean().item())
    assert stream.frames_emitted == frames
    assert stream.cache.self_positions.max().item() > 1024
    assert all(torch.isfinite(torch.tensor(norms)))
    early, late = sum(norms[:10]) / 10, sum(norms[-10:]) / 10
    assert 0.5 < late / early < 2.0, "no blow-up or collapse late in the session"


def test_attention_depends_only_on_relative_positions_far_beyond_the_release_table(parity_flow):
    """RoPE angles are formed in float64, so a block 10 minutes in equals the same block at the start."""
    g = torch.Generator().manual_seed(0)
    x, cond = torch.randn(3, 12, DIM, generator=g), torch.randn(3, 12, DIM, generator=g)
    t = torch.full((3, 12), 500.0)
    ref = torch.randn(3, DIM, generator=g)
    kv = parity_flow.condition_kv(parity_flow.embed_conditions(cond, cond, cond))
    outs = []
    with torch.no_grad():
        for start in (48, 48 + 15000):  # 10 minutes at 25 fps = 15000 frames
            pos = torch.arange(start, start + 12).expand(3, 12)
            outs.append(parity_flow(x, t, ref, pos, kv, pos).velocity)
    assert (outs[0] - outs[1]).abs().max().item() < 1e-4


def test_warm_start_emits_the_first_block_after_one_block_of_input(parity_flow):
    stream = MotionStream(BlockSampler(parity_flow), reference(), StreamOptions(warm_start=True), seed=0)
    inputs = tracks(25)
    stream.push(*(x[:9] for x in inputs.values()))
    assert stream.pull() == []
    stream.push(*(x[9:10] for x in inputs.values()))
    [block] = stream.pull()
    assert (block.frame_index, block.latents.shape[0]) == (0, 10)
    stream.push(*(x[10:25] for x in inputs.values()))
    stream.finish()
    blocks = stream.pull()
    assert [(b.frame_index, b.latents.shape[0]) for b in blocks] == [(10, 10), (20, 5)]


@pytest.mark.parametrize("block", [5, 10])
def test_block_size_option(parity_flow, block):
    inputs = tracks(80)
    stream = MotionStream(BlockSampler(parity_flow), reference(), StreamOptions(block=block), seed=0)
    blocks = feed_randomly(stream, inputs)
    assert [b.latents.shape[0] for b in blocks] == [50] + [block] * (30 // block)
    assert stream.cache.self_positions.shape[1] == 50 - block - 2


def test_nfe_and_guidance_options_change_the_output(parity_flow):
    inputs, ref = tracks(60), reference()
    sampler = BlockSampler(parity_flow)

    def run(**options):
        return concat(feed_randomly(MotionStream(sampler, ref, StreamOptions(**options), seed=2), inputs))

    base = run()
    assert not torch.allclose(base, run(nfe=4))
    assert not torch.allclose(base, run(guidance=GuidanceScales(audio=1.0, user=0.0)))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"avatar_audio": torch.randn(5, 256)}, "avatar_audio: expected shape (n, 512)"),
        ({"user_audio": torch.randn(5)}, "user_audio: expected shape (n, 512)"),
        ({"user_motion": torch.full((3, 512), float("nan"))}, "user_motion: contains NaN"),
        ({"avatar_audio": [[0.0] * 512]}, "avatar_audio: expected a torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(parity_flow, kwargs, message):
    stream = MotionStream(BlockSampler(parity_flow), reference())
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        stream.push(**kwargs)


def test_mismatched_lengths_and_misuse_raise_clear_errors(parity_flow):
    stream = MotionStream(BlockSampler(parity_flow), reference())
    stream.push(avatar_audio=torch.randn(20, DIM), user_audio=torch.randn(18, DIM), user_motion=torch.randn(20, DIM))
    with pytest.raises(ValueError, match="different lengths"):
        stream.finish()
    with pytest.raises(ValueError, match="block"):
        MotionStream(BlockSampler(parity_flow), reference(), StreamOptions(block=48))
    with pytest.raises(ValueError, match="session state"):
        MotionStream.from_bytes(BlockSampler(parity_flow), b"not a state")
    with pytest.raises(ValueError, match="lengths differ"):
        sample_motion(
            BlockSampler(parity_flow),
            torch.randn(10, DIM),
            torch.randn(9, DIM),
            torch.randn(10, DIM),
            reference(),
            torch_noise(torch.Generator()),
        )
