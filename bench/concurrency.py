"""Concurrent real-time sessions: N paced sessions at once (block edges staggered), what each
delivered, and whether the step sustained real time - every frame continuous, p95 block latency
within the policy's budget, and under `SUSTAINED_MAX_DEGRADED` of the frames degraded."""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

from bench.media import Media
from bench.sessions import SessionResult, paced_session
from bench.stack import BenchStack
from bench.stats import fmt, p50_p95, percentile, table

SUSTAINED_MAX_DEGRADED = 0.05  # "real-time sustained": p95 < budget and < 5 % degraded frames


@dataclass
class ConcurrencyStep:
    """One step: N sessions run together and how long the step took."""

    sessions: int
    results: list[SessionResult]
    wall_s: float

    def ok(self) -> bool:
        return all(r.started and not r.error and r.continuous for r in self.results)

    def latencies(self) -> list[float]:
        return [latency for r in self.results for latency in r.block_latencies()]

    def degraded_fraction(self) -> float:
        frames = sum(len(r.indices) for r in self.results)
        return sum(r.degraded_frames() for r in self.results) / frames if frames else float("nan")

    def sustained(self, budget_s: float) -> bool:
        """Real time held: all sessions complete, p95 block latency under the budget, few degraded frames."""
        p95 = percentile(self.latencies(), 95)
        return self.ok() and p95 < budget_s * 1000.0 and self.degraded_fraction() < SUSTAINED_MAX_DEGRADED


async def run_concurrent(
    stack: BenchStack, media: Media, sessions: int, frames: int, *, tenant: str = "bench", stagger_s: float = 0.4
) -> ConcurrencyStep:
    """`sessions` paced sessions at once, started `stagger_s / sessions` apart (block edges not aligned)."""

    async def one(k: int) -> SessionResult:
        await asyncio.sleep(k * stagger_s / sessions)
        return await paced_session(
            stack.target, stack.token(tenant), media, frames, name=f"s{k}", media_offset=37 * k, seed=k + 1
        )

    start = time.monotonic()
    results = await asyncio.gather(*(one(k) for k in range(sessions)))
    return ConcurrencyStep(sessions, list(results), time.monotonic() - start)


def concurrency_table(steps: list[ConcurrencyStep], budget_s: float) -> str:
    """One row per step: delivery rate, block latency (server and client side), degradation."""
    rows = []
    for step in steps:
        p50, p95 = p50_p95(step.latencies())
        rates = [r.frames_per_s() for r in step.results]
        held = sum(r.degradation.count("HELD_FRAME") for r in step.results)
        reduced = sum(r.degradation.count("REDUCED_NFE") for r in step.results)
        frames = sum(len(r.indices) for r in step.results)
        client50, client95 = p50_p95([x for r in step.results for x in r.client_block_latencies()])
        errors = sum(1 for r in step.results if r.error or not r.continuous)
        rows.append(
            [
                step.sessions,
                fmt(max(r.first_frame_ms for r in step.results), 0),
                f"{min(rates):.1f} / {statistics.mean(rates):.1f}" if rates else "n/a",
                fmt(p50, 0),
                fmt(p95, 0),
                f"{100 * step.degraded_fraction():.1f} % ({reduced} R, {held} H)",
                f"{fmt(client50, 0)} / {fmt(client95, 0)}",
                f"{frames}" + (f" ({errors} failed)" if errors else ""),
                "yes" if step.sustained(budget_s) else "no",
            ]
        )
    return table(
        [
            "sessions N",
            "first frame ms (slowest session)",
            "frames/s per session (min / mean)",
            "block p50 ms (FrameTiming)",
            "block p95 ms (FrameTiming)",
            "degraded frames (R reduced-NFE, H held)",
            "client-side block latency p50 / p95 ms",
            "frames",
            "real time sustained",
        ],
        rows,
    )


# --- 3. cross-session batching --------------------------------------------------------------------------
