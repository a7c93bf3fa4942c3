"""Training throughput of the `tiny` model on CPU: one process, and Ray Train with 2 workers.

    python -m avatar_forcing.diagnostics.train_bench [--steps 20] [--batch-size 4] [--skip-ray]
    avatar-forcing train --bench

Prints steps/s and frames/s (steps x batch x window; Ray: x workers) after warm-up steps. The
figures depend on the machine and on what else runs on it; no test asserts them.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

import torch


def _spec(out: str, steps: int, batch: int, log_every: int, threads: int):
    from avatar_forcing.training.run import RunSpec
    from avatar_forcing.training.trainer import TrainConfig

    train = TrainConfig(steps=steps, batch_size=batch, lr=1e-4, warmup_steps=0, log_every=log_every, val_every=0,
                        checkpoint_every=steps, ema_decay=0.999)  # fmt: skip
    return RunSpec(train=train, out_dir=out, data=f"synthetic:{max(64, 4 * batch)}", preset="tiny", threads=threads,
                   progress=False)  # fmt: skip


def one_process(steps: int, batch: int, warmup: int, threads: int) -> float:
    from avatar_forcing.training.run import build_trainer

    with tempfile.TemporaryDirectory() as out:
        trainer = build_trainer(_spec(out, steps + warmup, batch, 1, threads))
        for _ in range(warmup):
            trainer.train_step()
        start = time.perf_counter()
        for _ in range(steps):
            trainer.train_step()
        return steps / (time.perf_counter() - start)


def ray_workers(workers: int, steps: int, batch: int, warmup: int) -> tuple[float, float]:
    """(steps/s after warm-up from rank 0's log, wall seconds of the whole fit)."""
    import ray

    from avatar_forcing.training.ray_train import train_ray

    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as out:
            spec = _spec(out, warmup + steps, batch, warmup, threads=1)
            start = time.perf_counter()
            train_ray(spec, workers, Path(out) / "ray", "bench")
            wall = time.perf_counter() - start
            with (Path(out) / "metrics.csv").open() as f:
                rows = list(csv.DictReader(f))
            # Row 1 covers the warm-up steps; the rest is the steady state.
            rates = [float(r["steps_per_s"]) for r in rows[1:]]
            return sum(rates) / len(rates), wall
    finally:
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="train_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="per worker")
    parser.add_argument(
        "--threads", type=int, default=1, help="one-process torch threads (default 1, as each Ray worker)"
    )
    parser.add_argument("--skip-ray", action="store_true")
    args = parser.parse_args(argv)
    window = 50
    threads = args.threads or torch.get_num_threads()  # 0: torch's default
    rate = one_process(args.steps, args.batch_size, args.warmup, threads)
    print(f"tiny, one process ({threads} threads), batch {args.batch_size}x{window} frames: "
          f"{rate:.2f} steps/s, {rate * args.batch_size * window:.0f} frames/s")  # fmt: skip
    if not args.skip_ray:
        rate, wall = ray_workers(2, args.steps, args.batch_size, args.warmup)
        frames = rate * 2 * args.batch_size * window
        print(f"tiny, Ray Train 2 CPU workers (1 thread each), batch {args.batch_size}x{window} per worker: "
              f"{rate:.2f} steps/s, {frames:.0f} frames/s (fit wall {wall:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
