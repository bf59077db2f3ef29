"""How often workers beat, and how long a lease lasts: the settings' while the fleet is small, longer as it grows.

A busy worker (one holding a lease, or a result not yet delivered) beats to renew its leases and to hear of cancels;
an idle one parked in a claim needs no beat (:mod:`scaleq.server.liveness`). At the settings' 2 s, 5,000 busy
workers are 2,500 requests a second, and every one is a write: past what a server short of CPU, or its database,
answers next to the claims, the beats wait in line until leases expire and jobs run again (docs/benchmarks.md,
"Fleet scale"). So the grid asks for at most ``heartbeat_budget`` beats a second. With B busy workers the interval
is B / budget, never shorter than the settings' ``heartbeat_seconds`` and never longer than a third of
``worker_gone_after`` (a busy worker is still heard from three times before it could be marked gone); a lease lasts
three intervals, never less than the settings' ``lease_seconds``, so it still outlives two missed beats. This is the
rule Nomad applies to its clients' heartbeat TTL (``max_heartbeats_per_second``). What it costs, at a size past the
budget only: a cancel reaches a quiet job within the interval, and a worker that dies silently gives its jobs back
after the longer lease (45 s at most with the default settings) instead of 15 s, and a silent worker is marked gone
after three of those leases instead of 45 s.

Every server counts the same thing — the workers running a job, from the store — so all of them ask for the same
cadence. A registration answers the settings' beat (a worker from before the cadence keeps it for good); a worker
takes the cadence from its claims' and heartbeats' answers, and only a heartbeat's, which renewed every lease it
holds at the new term, may slow it. A lease's term is written when it is granted or renewed; the longer terms of
before a quickening are remembered while they may stand (:class:`Cadence`).
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scaleq.server.settings import ServerSettings


def interval(settings: ServerSettings, busy: int) -> float:
    """Seconds between a worker's beats when ``busy`` workers beat (see the module's docstring)."""
    fastest = settings.heartbeat_seconds
    slowest = max(fastest, settings.worker_gone_after / 3)
    return min(max(fastest, busy / settings.heartbeat_budget), slowest)


def lease(settings: ServerSettings, beat: float) -> float:
    """A lease's term when workers beat every ``beat`` seconds: three beats, at least the settings' lease."""
    return max(settings.lease_seconds, 3 * beat)


class Cadence:
    """The beat and lease this server grants now. Housekeeping sets them from the busy workers it counts every
    round; claims granted in between count at once (a grid handed thousands of jobs in a second must not grant them
    all the idle grid's short lease). When they shorten, the longer beat and term are remembered for as long as a
    lease granted with them may stand: what the checks and the gone-marks must still allow."""

    def __init__(self, settings: ServerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.busy = 0
        self.heartbeat_seconds = settings.heartbeat_seconds
        self.lease_seconds = settings.lease_seconds
        self._held = (0.0, 0.0, 0.0)  # (beat, term, until): the slowest granted before a quickening, while it lasts

    def count(self, busy: int) -> None:
        """The busy workers counted now (housekeeping)."""
        beat = interval(self.settings, busy)
        term = lease(self.settings, beat)
        if term < self.lease_seconds:
            held_beat, held_term, until = self._held
            now = self.clock()
            if now >= until:
                held_beat = held_term = 0.0
            self._held = (
                max(held_beat, self.heartbeat_seconds),
                max(held_term, self.lease_seconds),
                max(until, now + self.lease_seconds),
            )
        self.busy, self.heartbeat_seconds, self.lease_seconds = busy, beat, term

    def claimed(self, n: int) -> None:
        """``n`` jobs were just claimed: counted as that many busy workers (at most) until the next round counts them
        with the rest (only ever slower)."""
        if n > 0 and interval(self.settings, self.busy + n) > self.heartbeat_seconds:
            self.count(self.busy + n)
        else:
            self.busy += n

    def _held_over(self) -> tuple[float, float]:
        beat, term, until = self._held
        return (beat, term) if self.clock() < until else (0.0, 0.0)

    def slowest_beat(self) -> float:
        """The slowest beat a worker may still be keeping: the one asked for now, or a slower one asked for before
        the beat quickened, while a lease granted with it may stand (what "stopped heartbeating" must allow)."""
        return max(self.heartbeat_seconds, self._held_over()[0])

    def longest_term(self) -> float:
        """The longest lease term that may still be live: the one granted now, or a longer one granted before the
        cadence quickened, while such a lease may stand (what a check that a lease should have expired must
        allow)."""
        return max(self.lease_seconds, self._held_over()[1])

    def gone_after(self) -> float:
        """How long a worker may be silent before it is marked gone: the settings' ``worker_gone_after`` while
        leases keep the settings' term; once a longer term may be live, three of it if that is longer (45 s is
        three 15 s leases: three 45 s ones, 135 s). A busy worker beating every 15 s on an overloaded server, its
        beats seconds late, must not be given up on while its leases still stand."""
        term = self.longest_term()
        if term <= self.settings.lease_seconds:
            return self.settings.worker_gone_after
        return max(self.settings.worker_gone_after, 3 * term)
