"""How a long-running server collects its garbage: the young generations as Python does, the whole heap on a timer.

A large fleet makes CPython's own rule for full collections the server's worst latency. Every idle worker keeps a
long-poll claim parked on the server, and a parked claim held about 250 objects the collector tracks (the request's
coroutines, tasks, cells and frames; about 80 since :mod:`scaleq.server.fastlane`); at 5,000 workers that was over a
million. The claims are re-polled every 20 s, so a quarter of that heap is renewed every 5 s — exactly CPython's
trigger for a full collection (gen 2 runs once the objects promoted since the last one exceed a quarter of the
long-lived heap). Measured on the 2-core bench machine: a full collection every ~5 s, 0.85 to 0.9 s each (up to 1.6 s
while a fleet leaves), the event loop stopped meanwhile — heartbeat and claim p99 near a second, with every worker's
lease a pause closer to expiring.

So a server started by ``scaleq server`` / ``scaleq up`` (:meth:`GcPolicy.install`):

- freezes what start-up built (modules, the app, the routes: :func:`gc.freeze`), which no collection need scan again;
- leaves generations 0 and 1 to CPython — they scan only young objects and collect the cycles that die young;
- turns off the automatic full collection, and runs it itself (:meth:`GcPolicy.run`), its length in
  ``scaleq_gc_full_seconds`` on ``/metrics``: after ``every`` seconds (a minute) at first, and as seldom as the heap
  lets it. A full collection that finds little cyclic garbage (under :data:`LITTLE` objects) doubles the wait for
  the next, up to ``longest`` (16 minutes); one that finds more puts it back to ``every``; and the heap growing by
  a quarter since the last (the process's peak resident memory, checked every ``every`` seconds) collects at once,
  whatever the wait.

Why the wait grows: a server's garbage is almost all freed by reference counting. Measured at 10,000 idle workers
(800,000 objects in the old generation): a full collection paused the event loop 0.6 to 0.66 s and found **0**
unreachable objects, once a minute — a pause every minute bought nothing. What it trades: cyclic garbage that
outlived the young generations waits for its collection up to ``longest`` while there is little of it, and is
bounded by the quarter's growth when there is more; memory rises between collections by at most that.
Only the server process is tuned; tests, the CLI and the workers keep CPython's defaults.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import resource
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger(__name__)

FULL_EVERY_SECONDS = 60.0
LONGEST_SECONDS = 960.0
#: A full collection that finds fewer unreachable objects than this found "little": the next may wait longer.
LITTLE = 10_000
#: The heap growing by this share of itself since the last full collection collects at once.
GROWTH = 0.25
NEVER = 2**31 - 1  # a gen-2 threshold no count of gen-1 collections reaches: no automatic full collection


def peak_memory() -> int:
    """The process's peak resident memory (the unit is the platform's; only ratios of it are used)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


class GcPolicy:
    """The server's collection schedule; ``observe`` receives each full collection's pause, in seconds."""

    def __init__(
        self,
        every: float = FULL_EVERY_SECONDS,
        *,
        longest: float = LONGEST_SECONDS,
        observe: Callable[[float], None] = lambda _: None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        timer: Callable[[], float] = time.perf_counter,
        clock: Callable[[], float] = time.monotonic,
        memory: Callable[[], int] = peak_memory,
        collect: Callable[[], int] = gc.collect,
    ) -> None:
        if every <= 0:
            raise ValueError(f"every: must be positive, not {every}")
        if longest < every:
            raise ValueError(f"longest: must be at least every ({every}), not {longest}")
        self.every = every
        self.longest = longest
        self.observe = observe
        self.sleep = sleep
        self.timer = timer
        self.clock = clock
        self.memory = memory
        self._collect = collect
        self.wait = every  # how long after the last full collection the next one is due
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
        """One full collection now; returns (and observes) its pause, and sets the wait for the next from what it
        found."""
        started = self.timer()
        found = self._collect()
        pause = self.timer() - started
        self.observe(pause)
        self.wait = min(self.wait * 2, self.longest) if found < LITTLE else self.every
        if pause > 0.25:
            log.info(
                "full garbage collection: %.0f ms, %d unreachable objects; the next in %.0f s at the latest",
                pause * 1000,
                found,
                self.wait,
            )
        return pause

    async def run(self) -> None:
        """Collect the whole heap when it is due (see the module's docstring), until cancelled."""
        last, baseline = self.clock(), self.memory()
        while True:
            await self.sleep(self.every)
            grown = self.memory() >= baseline * (1 + GROWTH)
            if grown or self.clock() - last >= self.wait:
                if grown:
                    self.wait = self.every
                self.collect()
                last, baseline = self.clock(), self.memory()
