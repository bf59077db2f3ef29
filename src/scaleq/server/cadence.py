"""How often workers beat: every ``heartbeat_seconds`` of the settings while the fleet is small, less often as it grows.

A busy worker (one holding a lease, or a result not yet delivered) beats to renew its leases and to hear of cancels;
an idle one parked in a claim needs no beat (:mod:`scaleq.server.liveness`). At the settings' 2 s, 2,000 busy
workers are 1,000 requests a second: past what a server short of CPU answers next to its claims, and then the beats
wait in line until leases expire and jobs run again (docs/benchmarks.md, "Fleet scale"). So the grid asks for at
most ``heartbeat_budget`` beats a second: with B busy workers the interval is B / budget — never shorter than the
settings' interval, and never longer than a third of the lease, so that a lease still outlives two missed beats.
This is the rule Nomad applies to its clients' heartbeat TTL (``max_heartbeats_per_second``). It costs a cancel's
reach to a quiet job (up to the interval) and nothing else: leases and gone-marks keep their terms.

Every server counts the same thing — running jobs, from the store's queue counts, an upper bound of the busy workers
— so all of them ask for the same cadence; a worker takes it from its registration's answer and from each beat's.
"""

from __future__ import annotations

from scaleq.server.settings import ServerSettings


def interval(settings: ServerSettings, busy: int) -> float:
    """Seconds between a worker's beats when ``busy`` workers beat (see the module's docstring)."""
    fastest = settings.heartbeat_seconds
    slowest = max(fastest, settings.lease_seconds / 3)
    return min(max(fastest, busy / settings.heartbeat_budget), slowest)


class Cadence:
    """The interval this server asks for now; housekeeping updates it from the running jobs it counts."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self.busy = 0
        self.heartbeat_seconds = interval(settings, 0)

    def count(self, busy: int) -> None:
        self.busy = busy
        self.heartbeat_seconds = interval(self.settings, busy)
