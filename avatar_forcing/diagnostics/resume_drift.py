"""`avatar-forcing resume-drift`: how far a session rebuilt from its history departs.

A session is generated uninterrupted; then, at several points, a fresh stream is
rebuilt from the last K history blocks (what a replica reads from Redis after the
owner died) and continues with the same inputs and noise. Printed per K: the mean
and max relative distance ||resumed - uninterrupted|| / ||uninterrupted|| of the
motion latents over the next blocks, and the rebuild cost in forward passes. A
ring that still reaches the session's first window rebuilds exactly.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from avatar_forcing.config import PRESET_NAMES, preset
from avatar_forcing.engine.history import HistoryBlock
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.nn.model import random_model


def run(config_name: str, frames: int, keeps: list[int], resume_points: int, follow_blocks: int, seed: int) -> None:
    config = preset(config_name)
    model = random_model(config, seed=seed)
    sampler = model.block_sampler()
    g = torch.Generator().manual_seed(seed)
    dim = config.flow.motion_dim
    inputs = [torch.randn(frames, dim, generator=g) for _ in range(3)]
    reference = 0.3 * torch.randn(dim, generator=g)
    options = StreamOptions()

    stream = MotionStream(sampler, reference, options, seed=seed)
    stream.push(*inputs)
    stream.finish()
    outputs, history = [], []
    while (request := stream.next_request()) is not None:
        outputs.append(stream.accept(sampler.run([request], options.block)[0]).latents)
        history.append(stream.last_history)
    truth = torch.cat(outputs)
    blocks = len(history)
    points = [blocks - 1 - follow_blocks - i * 2 for i in range(resume_points)]
    points = [p for p in points if p >= 1]
    print(f"config {config_name} (random weights), {frames} frames, {blocks} blocks, resume after blocks {points}")
    print("| history blocks K | exact? | mean rel. drift | max rel. drift | rebuild ms |")
    print("|---:|---|---:|---:|---:|")
    for keep in keeps:
        drifts, costs, exact = [], [], True
        for k in points:
            ring: list[HistoryBlock] = history[max(0, k + 1 - keep) : k + 1]
            exact = exact and ring[0].start_frame == 0
            start = time.perf_counter()
            try:
                resumed = MotionStream.rebuild(sampler, reference, options, ring, ring[-1].rng_state)
            except ValueError:
                break
            costs.append(time.perf_counter() - start)
            begin = resumed.next_frame
            resumed.push(*(x[begin : begin + follow_blocks * options.block] for x in inputs))
            resumed.finish()
            got = torch.cat([b.latents for b in resumed.pull()])
            want = truth[begin : begin + got.shape[0]]
            drifts.append(((got - want).norm(dim=-1) / want.norm(dim=-1)).tolist())
        if not drifts:
            print(f"| {keep} | - | too little history (< window) | | |")
            continue
        flat = [d for run_ in drifts for d in run_]
        label = "yes" if exact else "no"
        cost_ms = 1e3 * statistics.median(costs)
        print(f"| {keep} | {label} | {statistics.mean(flat):.4f} | {max(flat):.4f} | {cost_ms:.1f} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="avatar-forcing resume-drift", description=__doc__)
    parser.add_argument("--config", default="tiny", choices=PRESET_NAMES)
    parser.add_argument("--frames", type=int, default=400)
    parser.add_argument("--keeps", default="5,6,8,12,16,64", help="history ring sizes (blocks) to try")
    parser.add_argument("--resume-points", type=int, default=4)
    parser.add_argument("--follow-blocks", type=int, default=10, help="blocks compared after each resume")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run(
        args.config,
        args.frames,
        [int(k) for k in args.keeps.split(",")],
        args.resume_points,
        args.follow_blocks,
        args.seed,
    )
    return 0
