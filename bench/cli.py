"""`avatar-forcing serve-bench`: the serving stack measured through Ray Serve's gRPC proxy.

Starts a local stack (Redis, a local Ray, Serve's gRPC proxy, the application with the
real-time policy ON; tiny model by default), then prints markdown tables of:

1. per-stage latency p50/p95 of one block (10 frames) with real request sizes, each RPC sent
   through the proxy to the session ingress, which forwards it to the stage's deployment;
   and the end-to-end block latency (FrameTiming.block_latency_ms) of one AvatarSession.Stream
   fed with the sample media at real time by the client CLI's own streaming function
   (`services.client.cli.run_stream`, as `avatar-forcing client --realtime` runs it), on a stack
   started as `avatar-forcing serve` starts it (`start_local`, its warm-up included);
2. concurrent real-time sessions: N = 1, 2, 3, ... sessions paced at real time for
   `--session-s` seconds each step: frames/s delivered per session, block latency p50/p95,
   fraction of degraded frames; the largest N that sustains real time on this machine;
3. the cross-session batching gain of the generator: blocks/s of B sessions' GenerateBlock
   calls at once (serve.batch) against one at a time, at the service level (tiny) and at the
   library level (`BlockSampler.run([r1..rB])` against B calls of `run([ri])`, tiny and paper).

    avatar-forcing serve-bench                      # everything, < 6 min on a 2-core CPU box
    avatar-forcing serve-bench --max-sessions 3 --session-s 10 --skip-library

Everything runs on loopback. Timings on a shared CPU are noisy: read the ratios, not the
absolute values. This module is the command (options, the report's order); the measurements are
`bench.stages`, `bench.concurrency`, `bench.batching` and `bench.service_batching`, on the stack
of `bench.stack` (which the load test, tests/integration/test_load.py, starts the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

from avatar_forcing.config import FPS
from bench.batching import batching_table, library_batching
from bench.concurrency import SUSTAINED_MAX_DEGRADED, concurrency_table, run_concurrent
from bench.leaks import after_run_report, wait_idle
from bench.media import Media, load_media
from bench.service_batching import service_batching_handles, service_batching_proxy
from bench.sessions import paced_session
from bench.stack import BenchStack, default_latency_budget_s, log_progress, start_stack
from bench.stages import measure_stages, stage_table
from bench.stats import fmt, p50_p95
from services.local.redis_process import DEFAULT_REDIS_URL

Emit = Callable[[str], None]


def machine() -> str:
    """The report's machine line: cores, CPU model, GPU, torch and Python versions."""
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def build_parser() -> argparse.ArgumentParser:
    """The options of `avatar-forcing serve-bench`."""
    parser = argparse.ArgumentParser(prog="avatar-forcing serve-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=("tiny", "paper"), default="tiny", help="model preset of the stack")
    parser.add_argument("--generator-replicas", type=int, default=1)
    parser.add_argument(
        "--latency-budget-s", type=float, help="the policy's budget (default: the ingress's, IngressSettings)"
    )
    parser.add_argument("--redis-url", help=f"Redis (default {DEFAULT_REDIS_URL}; a private one if down)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per stage")
    parser.add_argument("--e2e-s", type=float, default=7.5, help="media seconds of the end-to-end session")
    parser.add_argument("--session-s", type=float, default=20.0, help="media seconds per session per step")
    parser.add_argument("--max-sessions", type=int, default=6, help="largest N tried")
    parser.add_argument(
        "--min-sessions", type=int, default=3, help="N tried in any case; above it the steps stop at the first miss"
    )
    parser.add_argument("--batch", type=int, default=4, help="B: sessions per batch at the service level")
    parser.add_argument("--rounds", type=int, default=10, help="rounds of B blocks per timing (service level, 3 each)")
    parser.add_argument("--library-configs", default="tiny,paper", help="configs of the library-level figure")
    parser.add_argument("--library-batches", default="2,4,8", help="B values of the library-level figure (tiny)")
    parser.add_argument("--paper-batch", type=int, default=4, help="B of the library-level figure (paper)")
    parser.add_argument("--library-threads", type=int, default=1, help="torch threads (1 = as in a replica)")
    parser.add_argument("--skip-stages", action="store_true")
    parser.add_argument("--skip-concurrency", action="store_true")
    parser.add_argument("--skip-service-batching", action="store_true")
    parser.add_argument("--skip-library", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark with `argv` (default: sys.argv[1:]); the report goes to stdout, progress to
    stderr; returns the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.latency_budget_s is None:
        args.latency_budget_s = default_latency_budget_s()
    began = time.monotonic()
    out: list[str] = []

    def emit(text: str = "") -> None:
        out.append(text)
        print(text, flush=True)

    emit("# serve-bench")
    emit()
    emit(f"command: `avatar-forcing serve-bench{' ' + shlex.join(argv) if argv else ''}`  ")
    emit(f"machine: {machine()}  ")
    emit(
        f"stack: config {args.config}, real-time policy ON (degrade=True, "
        f"budget {args.latency_budget_s * 1000:.0f} ms), "
        f"{args.generator_replicas} generator replica(s), Ray Serve gRPC proxy on loopback, real Redis  "
    )
    emit("CPU timings on a shared machine are noisy: compare ratios, not absolute values.")
    media = load_media()
    needs_stack = not (args.skip_stages and args.skip_concurrency and args.skip_service_batching)
    if needs_stack:
        stack = start_stack(
            args.config,
            generator_replicas=args.generator_replicas,
            latency_budget_s=args.latency_budget_s,
            redis_url=args.redis_url,
        )
        emit(f"\nstack up after {time.monotonic() - began:.0f} s")
        try:
            _serving_sections(stack, media, args, emit)
        finally:
            stack.stop()
    if not args.skip_library:
        figures = []
        for config in (c.strip() for c in args.library_configs.split(",") if c.strip()):
            batches = [int(b) for b in args.library_batches.split(",")] if config == "tiny" else [args.paper_batch]
            for batch in batches:
                log_progress(f"library batching: {config}, B={batch}")
                repeats = 5 if config == "tiny" else 2
                figures.append(library_batching(config, batch, repeats, args.library_threads))
        emit("\n## Cross-session batching, library level (`BlockSampler.run`)\n")
        emit(batching_table(figures))
    emit(f"\ntotal {time.monotonic() - began:.0f} s")
    return 0


def _serving_sections(stack: BenchStack, media: Media, args: argparse.Namespace, emit: Emit) -> None:
    """The sections that need the stack: stages and end to end, concurrency, service batching, leaks."""
    budget = args.latency_budget_s
    if not args.skip_stages:
        # The end-to-end session first: like the user's first `client` run after `serve` is ready,
        # it finds the stack warmed by the launcher only, not by the stage calls below.
        log_progress("end-to-end session ...")
        frames = round(args.e2e_s * FPS)
        e2e = asyncio.run(paced_session(stack.target, stack.token(), media, frames, name="e2e"))
        log_progress("stages ...")
        figures = asyncio.run(measure_stages(stack, media, args.repeats))
        emit("\n## Per-stage latency, one block of 10 frames\n")
        emit(stage_table(figures, e2e))
        if e2e.error or not e2e.continuous:
            emit(f"\nend-to-end session problem: {e2e.error or 'frames missing'}")
        else:
            emit(
                f"\nend-to-end session: {len(e2e.indices)} frames, {e2e.degraded_frames()} degraded, "
                "client-side block latency p50/p95 "
                + "/".join(fmt(v, 0) for v in p50_p95(e2e.client_block_latencies()))
                + " ms (arrival of a block's last frame minus the end of its media time)"
            )
    if not args.skip_concurrency:
        steps = []
        frames = round(args.session_s * FPS)
        for n in range(1, args.max_sessions + 1):
            log_progress(f"concurrency: {n} session(s) x {args.session_s:.0f} s ...")
            step = asyncio.run(run_concurrent(stack, media, n, frames))
            steps.append(step)
            wait_idle()
            if not step.sustained(budget) and n >= args.min_sessions:
                break
        sustained = [s.sessions for s in steps if s.sustained(budget)]
        emit(f"\n## Concurrent real-time sessions ({args.session_s:.0f} s of media each, 25 fps, policy ON)\n")
        emit(concurrency_table(steps, budget))
        best = max(sustained) if sustained else 0
        emit(
            f"\nlargest N with real time sustained (p95 block latency < {budget * 1000:.0f} ms and "
            f"< {SUSTAINED_MAX_DEGRADED:.0%} degraded frames): **{best}**"
            + ("" if best < args.max_sessions else " (the largest tried; raise --max-sessions)")
        )
        problems = [f"N={s.sessions} {r.name}: {r.error}" for s in steps for r in s.results if r.error]
        for problem in problems:
            emit(f"- {problem}")
    if not args.skip_service_batching:
        log_progress("service batching ...")
        figures = [asyncio.run(service_batching_proxy(stack, args.batch, args.rounds))]
        figures.append(asyncio.run(service_batching_handles(stack, args.batch, args.rounds)))
        replicas = f"{stack.generator_replicas} generator replica" + ("s" if stack.generator_replicas > 1 else "")
        emit(f"\n## Cross-session batching, service level ({stack.config}, {replicas})\n")
        emit(batching_table(figures))
    emit(f"\n{after_run_report(stack)}")


if __name__ == "__main__":
    raise SystemExit(main())
