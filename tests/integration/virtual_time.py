"""An asyncio event loop on virtual time: timing tests that do not depend on the machine's speed.

The loop's clock (`loop.time()`, so `asyncio.sleep` and every timer) is a `VirtualClock`. When
the loop has nothing to do but wait for a timer, the clock jumps to it at once: a 0.4 s sleep
takes no real time. While real work is in flight (a stage call computing in a thread, inside
`clock.working()`), the clock stands still and the loop waits for it for real. So real work
takes zero virtual time, and a stage's cost in virtual time is whatever the test says it is:

    clock = VirtualClock()
    with asyncio.Runner(loop_factory=clock.loop) as runner:
        runner.run(main())   # a stage wrapper: with clock.working(): r = await call(q); await asyncio.sleep(cost)

I/O outside `working()` lets the clock jump to the next timer while it waits (a Redis call's own
timeout, say), so wrap what does I/O (`clock.wrap(store)`). Work inside `working()` must not wait
for a timer itself: the clock stands still until it is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import selectors
from collections.abc import Iterator
from typing import Any


class VirtualClock:
    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.busy = 0  # real work in flight: the clock must not jump meanwhile

    def time(self) -> float:
        return self.now

    @contextlib.contextmanager
    def working(self) -> Iterator[None]:
        """Real work (threads, I/O) that takes no virtual time: the clock waits for it."""
        self.busy += 1
        try:
            yield
        finally:
            self.busy -= 1

    def wrap(self, target: Any) -> Any:
        """`target` with each of its coroutine methods run as real work (e.g. a store's Redis calls)."""
        return _Working(target, self)

    def loop(self) -> asyncio.AbstractEventLoop:
        """A new event loop on this clock (for `asyncio.Runner(loop_factory=...)`)."""
        return _VirtualTimeLoop(self)


class _Working:
    def __init__(self, target: Any, clock: VirtualClock) -> None:
        self._target = target
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._target, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute

        @functools.wraps(attribute)
        async def working(*args: Any, **kwargs: Any) -> Any:
            with self._clock.working():
                return await attribute(*args, **kwargs)

        return working


class _JumpingSelector(selectors.DefaultSelector):
    """Waits for real only while work is in flight (or when no timer is due); else jumps the clock."""

    def __init__(self, clock: VirtualClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None):
        if timeout is None or timeout <= 0 or self._clock.busy:
            return super().select(timeout)
        events = super().select(0)
        if not events:  # idle until the next timer: it is due now
            self._clock.now += timeout
        return events


class _VirtualTimeLoop(asyncio.SelectorEventLoop):
    def __init__(self, clock: VirtualClock) -> None:
        self._virtual_clock = clock
        super().__init__(_JumpingSelector(clock))

    def time(self) -> float:
        return self._virtual_clock.now
