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

Every server counts the same thing — running jobs, from the store's queue counts, an upper bound of the busy workers
— so all of them ask for the same cadence; a worker takes it from its registration's answer and from each beat's.
A lease's term is written with it when granted or renewed, so a change of cadence never shortens one.
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
    """The interval and lease this server grants now; housekeeping updates them from the running jobs it counts."""

    def __init__(self, settings: ServerSettings, clock: Callable[[], float] = time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.lease_seconds = settings.lease_seconds
        self._longer = (0.0, 0.0)  # a longer term granted before the last change, and until when one may be live
        self.count(0)

    def count(self, busy: int) -> None:
        term = lease(self.settings, interval(self.settings, busy))
        if term < self.lease_seconds:
            self._longer = (self.lease_seconds, self.clock() + self.lease_seconds)
        self.busy = busy
        self.heartbeat_seconds = interval(self.settings, busy)
        self.lease_seconds = term

    def gone_after(self) -> float:
        """How long a worker may be silent before it is marked gone: the settings' ``worker_gone_after``, or three
        of the longest lease terms that may be live, whichever is longer (the settings' ratio: 45 s is three 15 s
        leases). A busy worker that beats every 15 s on an overloaded server, its beats seconds late, must not be
        given up on while its leases still stand."""
        return max(self.settings.worker_gone_after, 3 * self.longest_term())

    def longest_term(self) -> float:
        """The longest lease term that may still be live: the one granted now, or a longer one granted before the
        cadence quickened, for as long as such a lease can last (what a check that a lease should have expired
        must allow)."""
        longer, until = self._longer
        return max(self.lease_seconds, longer) if self.clock() < until else self.lease_seconds
