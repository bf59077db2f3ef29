"""How a long-running server collects its garbage: the young generations as Python does, the whole heap on a timer.

A large fleet makes CPython's own rule for full collections the server's worst latency. Every idle worker keeps a
long-poll claim parked on the server, and a parked claim holds about 250 objects the collector tracks (the request's
coroutines, tasks, cells and frames); at 5,000 workers that is over a million. The claims are re-polled every 20 s,
so a quarter of that heap is renewed every 5 s — exactly CPython's trigger for a full collection (gen 2 runs once the
objects promoted since the last one exceed a quarter of the long-lived heap). Measured on the 2-core bench machine: a
full collection every ~5 s, 0.85 to 0.9 s each (up to 1.6 s while a fleet leaves), the event loop stopped meanwhile —
heartbeat and claim p99 near a second, with every worker's lease a pause closer to expiring.

So a server started by ``scaleq server`` / ``scaleq up`` (:meth:`GcPolicy.install`):

- freezes what start-up built (modules, the app, the routes: :func:`gc.freeze`), which no collection need scan again;
- leaves generations 0 and 1 to CPython — they scan only young objects and collect the cycles that die young;
- turns off the automatic full collection, and runs it itself every ``every`` seconds (:meth:`GcPolicy.run`):
  one pause per minute instead of twelve, its length in ``scaleq_gc_full_seconds`` on ``/metrics``.

What that trades: cyclic garbage that outlived the young generations waits up to ``every`` seconds for its
collection, so memory rises between collections by what a minute leaves behind (bounded; see docs/benchmarks.md,
"Fleet scale"). Only the server process is tuned; tests, the CLI and the workers keep CPython's defaults.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

FULL_EVERY_SECONDS = 60.0
NEVER = 2**31 - 1  # a gen-2 threshold no count of gen-1 collections reaches: no automatic full collection


class GcPolicy:
    """The server's collection schedule; ``observe`` receives each full collection's pause, in seconds."""

    def __init__(
        self,
        every: float = FULL_EVERY_SECONDS,
        *,
        observe: Callable[[float], None] = lambda _: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        if every <= 0:
            raise ValueError(f"every: must be positive, not {every}")
        self.every = every
        self.observe = observe
        self.sleep = sleep
        self.timer = timer
        self.saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Freeze the start-up heap and take full collections off CPython's trigger (undone by :meth:`uninstall`)."""
        gc.collect()
        gc.freeze()
        self.saved = gc.get_threshold()
        gen0, gen1, _ = self.saved
        gc.set_threshold(gen0, gen1, NEVER)

    def uninstall(self) -> None:
        if self.saved is not None:
            gc.set_threshold(*self.saved)
            gc.unfreeze()
            self.saved = None

    def collect(self) -> float:
        """One full collection now; returns (and observes) its pause."""
        started = self.timer()
        found = gc.collect()
        pause = self.timer() - started
        self.observe(pause)
        if pause > 0.25:
            log.info("full garbage collection: %.0f ms, %d unreachable objects", pause * 1000, found)
        return pause

    async def run(self) -> None:
        """Collect the whole heap every ``every`` seconds, until cancelled."""
        while True:
            await self.sleep(self.every)
            self.collect()
