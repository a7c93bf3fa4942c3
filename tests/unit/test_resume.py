"""Rebuilding a session on another replica from its bounded history; dropping late blocks."""

from __future__ import annotations

import pytest
import torch

from avatar_forcing.engine.history import HistoryBlock
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.sampling.block_sampler import BlockSampler
from tests.unit.test_motion_stream import concat, reference, tracks

FRAMES = 130


def run_recording(sampler, ref, inputs, options=None):
    """Uninterrupted run; returns the output, every history entry and the RNG state after each block."""
    options = options or StreamOptions()
    stream = MotionStream(sampler, ref, options, seed=4)
    stream.push(*inputs.values())
    stream.finish()
    blocks, history, rng = [], [], []
    while (request := stream.next_request()) is not None:
        blocks.append(stream.accept(sampler.run([request], options.block)[0]))
        history.append(HistoryBlock.from_bytes(stream.last_history.to_bytes()))  # as stored in Redis
        rng.append(stream.generator.get_state())
    return concat(blocks), history, rng


def resume_after(sampler, ref, inputs, history, rng, k: int, keep: int):
    """Continue after block k on a fresh stream rebuilt from the last `keep` history entries."""
    stream = MotionStream.rebuild(sampler, ref, StreamOptions(), history[max(0, k + 1 - keep) : k + 1], rng[k])
    start = stream.next_frame
    stream.push(*(x[start:] for x in inputs.values()))
    stream.finish()
    return start, torch.cat([b.latents for b in stream.pull()])


def test_rebuild_from_a_ring_that_reaches_the_first_window_is_exact(parity_flow):
    sampler, ref, inputs = BlockSampler(parity_flow), reference(), tracks(FRAMES)
    expected, history, rng = run_recording(sampler, ref, inputs)
    for k in (0, 3):
        start, tail = resume_after(sampler, ref, inputs, history, rng, k, keep=k + 1)
        assert start == history[k].end_frame  # frame indices continue where the block ended
        assert (tail - expected[start:]).abs().max().item() < 1e-5


def test_rebuild_from_recent_blocks_only_stays_close(parity_flow):
    sampler, ref, inputs = BlockSampler(parity_flow), reference(), tracks(FRAMES)
    expected, history, rng = run_recording(sampler, ref, inputs)
    k = len(history) - 4
    start, tail = resume_after(sampler, ref, inputs, history, rng, k, keep=6)
    assert start == history[k].end_frame
    drift = (tail - expected[start:]).norm(dim=-1) / expected[start:].norm(dim=-1)
    assert drift.mean().item() < 0.5  # departs, but stays near the uninterrupted motion


def test_rebuild_rejects_gaps_and_too_little_history(parity_flow):
    sampler, ref, inputs = BlockSampler(parity_flow), reference(), tracks(FRAMES)
    _, history, rng = run_recording(sampler, ref, inputs)
    with pytest.raises(ValueError, match="does not follow"):
        MotionStream.rebuild(sampler, ref, StreamOptions(), [history[1], history[3]], rng[3])
    with pytest.raises(ValueError, match="expected at least the window"):
        MotionStream.rebuild(sampler, ref, StreamOptions(), history[-2:], rng[-1])
    with pytest.raises(ValueError, match="history entry"):
        HistoryBlock.from_bytes(b"nope")


def test_hold_block_repeats_the_last_frame_and_the_session_goes_on(parity_flow):
    sampler, ref, inputs = BlockSampler(parity_flow), reference(), tracks(80)
    stream = MotionStream(sampler, ref, seed=4)
    stream.push(*inputs.values())
    stream.finish()
    first = [stream.accept(sampler.run([stream.next_request()])[0])]
    held = stream.hold_block()
    assert held.frame_index == 50 and torch.equal(held.latents, first[0].latents[-1:].expand(10, -1))
    rest = stream.pull()
    assert [b.frame_index for b in rest] == [60, 70]
    assert all(torch.isfinite(b.latents).all() for b in rest)


def test_every_session_blob_is_one_format_and_a_blob_of_another_kind_is_refused():
    from avatar_forcing.engine import session_state
    from avatar_forcing.engine.history import HistoryBlock
    from avatar_forcing.engine.motion_stream import SessionSetup, StreamOptions

    block = HistoryBlock(40, torch.randn(12, 512), torch.randn(12, 3, 512), torch.zeros(16, dtype=torch.uint8))
    setup = SessionSetup(torch.randn(512), StreamOptions(block=5, warm_start=True), seed=7, frame_offset=50)
    blobs = {"history-block": block.to_bytes(), "setup": setup.to_bytes()}
    for kind, blob in blobs.items():
        header = session_state.read_header(blob)
        assert header["format"] == session_state.FORMAT and header["kind"] == kind
    again = SessionSetup.from_bytes(blobs["setup"])
    assert torch.equal(again.reference_motion, setup.reference_motion)
    assert (again.options, again.seed, again.frame_offset) == (setup.options, 7, 50)
    assert torch.equal(HistoryBlock.from_bytes(blobs["history-block"]).conditions, block.conditions)
    with pytest.raises(ValueError, match="a 'setup' blob; expected a 'history-block' blob"):
        HistoryBlock.from_bytes(blobs["setup"])
    with pytest.raises(ValueError, match="a 'history-block' blob; expected a 'setup' blob"):
        SessionSetup.from_bytes(blobs["history-block"])
    with pytest.raises(ValueError, match="shorter than its 8-byte header"):
        SessionSetup.from_bytes(b"xy")
