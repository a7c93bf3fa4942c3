"""Interleaved speed and output comparison of two checkouts' streaming engines.

    git worktree add --detach /tmp/prev <commit>
    python -m avatar_forcing.diagnostics.compare_engines --previous /tmp/prev

Each checkout's engine runs in its own worker process (its `avatar_forcing` imported from that
checkout's path), with the same flow-transformer weights (one state dict, made here), the same
reference motion and per-block inputs, and the same stream seed. The workers take turns block
by block, alternating which goes first, so that drift in the machine's speed (other users,
clocks, caches) hits both alike; the figures are ratios of times taken side by side. Every
block's latents come back and are compared. The square-matmul rate is measured in the same
run, before and after, by the current checkout's worker.

Only API that both checkouts have is used: `preset`, `FlowTransformer`, `BlockSampler`,
`MotionStream` (push / pull / checkpoint / restore) and `StreamOptions`.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, BinaryIO

import torch

# Runs inside each worker; argv: checkout path. Requests and replies are length-prefixed pickles.
WORKER = r"""
import pickle, struct, sys, time
sys.path.insert(0, sys.argv[1])
import torch
from torch.utils.flop_counter import FlopCounterMode
from avatar_forcing.config import preset
from avatar_forcing.engine.motion_stream import MotionStream, StreamOptions
from avatar_forcing.nn.flow_transformer import FlowTransformer
from avatar_forcing.sampling.block_sampler import BlockSampler
import avatar_forcing

def receive():
    (size,) = struct.unpack("<Q", sys.stdin.buffer.read(8))
    return pickle.loads(sys.stdin.buffer.read(size))

def send(obj):
    data = pickle.dumps(obj)
    sys.stdout.buffer.write(struct.pack("<Q", len(data)) + data)
    sys.stdout.buffer.flush()

def matmul_rate(n=2048, repeats=5):
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9

def flops_of_next_block(stream, inputs):
    # Counted on the plain linear path where there is one: FlopCounterMode does not see oneDNN's
    # packed linears, and the arithmetic is the same.
    try:
        from avatar_forcing.nn.prepacked import disabled
    except ImportError:
        from contextlib import nullcontext as disabled
    snapshot = stream.checkpoint()
    stream.push(*inputs)
    with disabled(), FlopCounterMode(display=False) as counter:
        stream.pull()
    stream.restore(snapshot)
    return counter.get_total_flops()

setup = receive()
torch.set_num_threads(setup["threads"])
config = preset(setup["config"]).flow
model = FlowTransformer(config).eval()
model.load_state_dict(torch.load(setup["weights"]))
options = StreamOptions(block=setup["block"], nfe=setup["nfe"])
stream = MotionStream(BlockSampler(model), setup["reference"], options, seed=0)
stream.push(*setup["window"])
first = torch.cat([b.latents for b in stream.pull()])
send({"package": avatar_forcing.__file__, "first": first})
while (message := receive()) is not None:
    if message == "rate":
        send(matmul_rate())
    elif message[0] == "flops":
        send(flops_of_next_block(stream, message[1]))
    else:
        stream.push(*message[1])
        start = time.perf_counter()
        blocks = stream.pull()
        seconds = time.perf_counter() - start
        send((seconds, torch.cat([b.latents for b in blocks])))
"""


class Worker:
    """One checkout's engine in a child process."""

    def __init__(self, checkout: Path, setup: dict[str, Any], env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", WORKER, str(checkout)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )
        self.ask_nothing(setup)

    def ask_nothing(self, obj: object) -> None:
        _send(self.process.stdin, obj)

    def ask(self, obj: object) -> Any:
        _send(self.process.stdin, obj)
        return _receive(self.process.stdout)

    def reply(self) -> Any:
        return _receive(self.process.stdout)

    def close(self) -> None:
        _send(self.process.stdin, None)
        self.process.wait(timeout=60)


def _send(stream: BinaryIO | None, obj: object) -> None:
    assert stream is not None
    data = pickle.dumps(obj)
    stream.write(struct.pack("<Q", len(data)) + data)
    stream.flush()


def _receive(stream: BinaryIO | None) -> Any:
    assert stream is not None
    header = stream.read(8)
    if len(header) < 8:
        raise RuntimeError("worker exited (see its error above)")
    (size,) = struct.unpack("<Q", header)
    return pickle.loads(stream.read(size))


def _env(assignments: list[str]) -> dict[str, str] | None:
    """KEY=VALUE settings on top of this process's environment (None: inherit it unchanged)."""
    if not assignments:
        return None
    return {**os.environ, **dict(a.split("=", 1) for a in assignments)}


def compare(args: argparse.Namespace) -> dict[str, float]:
    from avatar_forcing.config import preset
    from avatar_forcing.nn.flow_transformer import FlowTransformer

    config = preset(args.config).flow
    generator = torch.Generator().manual_seed(args.seed)
    noise = lambda *shape: torch.randn(*shape, generator=generator)
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "flow_transformer.pt"
        torch.manual_seed(args.seed)
        torch.save(FlowTransformer(config).state_dict(), weights)
        setup = {
            "config": args.config,
            "threads": args.threads,
            "weights": str(weights),
            "block": args.block,
            "nfe": args.nfe,
            "reference": noise(config.motion_dim) * 0.3,
            "window": [noise(config.window, config.motion_dim) for _ in range(3)],
        }
        names = ("previous", "current")
        paths = (args.previous, args.current)
        envs = (_env(args.previous_env), _env(args.current_env))
        workers = {name: Worker(path, setup, env) for name, path, env in zip(names, paths, envs, strict=True)}
        try:
            ready = {name: w.reply() for name, w in workers.items()}
        except RuntimeError:
            for w in workers.values():
                w.process.kill()
            raise
        for name in names:
            print(f"{name}: {ready[name]['package']}")
        first_diff = (ready["previous"]["first"] - ready["current"]["first"]).abs().max().item()

        blocks = [[noise(args.block, config.motion_dim) for _ in range(3)] for _ in range(args.blocks + 1)]
        flops = {name: w.ask(("flops", blocks[0])) for name, w in workers.items()}
        rates = [workers["current"].ask("rate")]
        times: dict[str, list[float]] = {name: [] for name in names}
        diffs = []
        for i, inputs in enumerate(blocks):  # block 0: warm-up, not timed
            order = names if i % 2 == 0 else names[::-1]
            latents = {}
            for name in order:
                time.sleep(args.pause)  # let the other worker's threads stop spinning
                seconds, latents[name] = workers[name].ask(("block", inputs))
                if i > 0:
                    times[name].append(seconds)
            diffs.append((latents["previous"] - latents["current"]).abs().max().item())
        rates.append(workers["current"].ask("rate"))
        for w in workers.values():
            w.close()

    per_block = [c / p for p, c in zip(times["previous"], times["current"], strict=True)]
    rate = max(rates)
    median = {name: statistics.median(times[name]) for name in names}
    return {
        "blocks_timed": len(per_block),
        "previous_ms_median": median["previous"] * 1e3,
        "current_ms_median": median["current"] * 1e3,
        "ratio_median_of_block_ratios": statistics.median(per_block),
        "ratio_of_medians": median["current"] / median["previous"],
        "ratio_min": min(per_block),
        "ratio_max": max(per_block),
        "max_abs_diff_first_window": first_diff,
        "max_abs_diff_blocks": max(diffs),
        "matmul_rate_gflops": rate,
        "previous_gflop_per_block": flops["previous"] / 1e9,
        "current_gflop_per_block": flops["current"] / 1e9,
        "previous_fraction_of_matmul": flops["previous"] / median["previous"] / 1e9 / rate,
        "current_fraction_of_matmul": flops["current"] / median["current"] / 1e9 / rate,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compare_engines", description=__doc__.split("\n\n")[0])
    parser.add_argument("--previous", type=Path, required=True, help="checkout of the engine to compare against")
    parser.add_argument("--current", type=Path, default=Path(__file__).resolve().parents[2], help="default: this one")
    parser.add_argument("--config", default="paper")
    parser.add_argument("--blocks", type=int, default=20, help="timed blocks per engine")
    parser.add_argument("--block", type=int, default=10)
    parser.add_argument("--nfe", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    for side in ("previous", "current"):
        parser.add_argument(
            f"--{side}-env", action="append", default=[], metavar="KEY=VALUE", help=f"environment of the {side} worker"
        )
    parser.add_argument("--pause", type=float, default=0.02, help="seconds between turns")
    args = parser.parse_args(argv)
    print(
        f"config {args.config}, block {args.block}, nfe {args.nfe}, threads {args.threads}, fp32, cpu, "
        f"{args.blocks} timed blocks each, alternating"
    )
    for key, value in compare(args).items():
        print(f"  {key:34s} {value:12.6g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
