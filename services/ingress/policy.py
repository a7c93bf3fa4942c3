"""The real-time degradation policy of a session.

A block is late when it is ready later than its budget after its input completed.
The policy steps down one level per late block and back up one level after a run of
on-time blocks:

    level 0  NONE          the session's nfe
    level 1  REDUCED_NFE   half the sampler steps (at least MIN_NFE_UNDER_LOAD)
    level 2  HELD_FRAME    the block is dropped: its frames repeat the last frame and
                           only the cache-writing pass runs (a fraction of one step)

Besides lateness, a backlog (blocks whose input is complete but not yet sent to the
generator) of more than `max_backlog` forces HELD_FRAME for the oldest blocks, so the
queue, and with it the latency, can never grow without bound.
"""

from __future__ import annotations

from dataclasses import dataclass

NONE, REDUCED_NFE, HELD_FRAME = 0, 1, 2  # = DegradationLevel in session.proto
MIN_NFE_UNDER_LOAD = 4


@dataclass(frozen=True)
class Decision:
    level: int
    max_nfe: int  # 0: the session's nfe
    hold: bool


class RealtimePolicy:
    def __init__(self, nfe: int, budget_s: float, recover_after: int = 3, max_backlog: int = 1) -> None:
        self.nfe = nfe
        self.budget_s = budget_s
        self.recover_after = recover_after
        self.max_backlog = max_backlog
        self.level = NONE
        self._on_time = 0

    def decide(self, backlog: int) -> Decision:
        """For the next block, given how many complete blocks wait behind it."""
        level = HELD_FRAME if backlog > self.max_backlog else self.level
        if level == HELD_FRAME:
            return Decision(HELD_FRAME, 0, True)
        if level == REDUCED_NFE:
            return Decision(REDUCED_NFE, max(min(MIN_NFE_UNDER_LOAD, self.nfe), self.nfe // 2), False)
        return Decision(NONE, 0, False)

    def observe(self, latency_s: float) -> None:
        """A block was ready `latency_s` after its input completed."""
        if latency_s > self.budget_s:
            self.level = min(HELD_FRAME, self.level + 1)
            self._on_time = 0
            return
        self._on_time += 1
        if self._on_time >= self.recover_after and self.level > NONE:
            self.level -= 1
            self._on_time = 0
