"""When will a queued job start? A pure estimate from the queue ahead of it, the capacity serving it and run times.

No I/O and no clock: the caller passes ``now`` and what it observed (the server gathers it from the store:
:mod:`scaleq.server.estimates`; the benchmark from the simulator: ``bench/eta.py``). Same inputs, same answer.

The model is the queue draining through slots:

* **Slots open** at known times: an idle slot now; a busy slot when its run ends (its expected remaining time: the
  typical run minus what it has run, or half a typical run more for one already past it); each slot of a worker
  that is booting when its boot ends (a typical boot minus how far into it the worker is); each slot of a worker
  the group is yet to start one typical boot from now.
* **How many workers** a group will have is not guessed here: it is the scaling policy's own answer, the
  ``desired`` the controller last recorded (:func:`scaleq.scaling.policy.decide`, the one policy), capped at
  ``max_workers``. The single addition: a group at zero with a job of its queue waiting is counted as starting one
  worker, which is what the policy does on the first runnable job (its status may not say so yet).
* **Jobs ahead** (by priority, then submission) take the slots as they open, each for a typical run (the median of
  the queue's recent successful runs) or for the durations given; the job starts at the next opening after theirs.
  Every slot reopens one run after it was taken, so the answer for ``ahead`` alike jobs is found by counting
  openings (:func:`nth_opening`), not by stepping through a long queue: an array of 100,000 costs no more than one.

What it does not know it says: ``at`` is None when nothing can run the job (no group or worker serves it, or none of
them fits) or when the job must wait for runs nobody has timed yet; ``basis`` says which, in words, and otherwise the
numbers the estimate rests on ("12 ahead, 3 workers x 1 slot, median run 40 s, 2 workers starting").
"""

from __future__ import annotations

import heapq
import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["DEFAULT_BOOT", "Estimate", "GroupCapacity", "estimate", "in_words", "nth_opening", "run_in_turn"]

#: Seconds a boot is assumed to take for a group whose workers were never seen booting.
DEFAULT_BOOT = 30.0


@dataclass(frozen=True, slots=True)
class GroupCapacity:
    """One group (or the workers started by hand, ``name`` "workers") able to run the job, as last observed."""

    name: str
    slots: int  # per worker
    workers: int  # registered and taking jobs (not draining)
    max_workers: int | None = None  # None: not autoscaled (workers started by hand)
    desired: int | None = None  # the policy's last decision; None: no controller said
    starting: Sequence[float] = ()  # per worker asked for and not registered yet: seconds into its boot
    boot_seconds: float | None = None  # a typical boot of this group's workers; None: never observed


@dataclass(frozen=True, slots=True)
class Estimate:
    at: float | None  # epoch seconds the job is expected to start; None: cannot be told (basis says why)
    basis: str  # what it rests on, in words
    ahead: int  # jobs ahead of it in its queue
    slots: int  # slots that can run it once the groups are at their expected size
    duration: float | None  # the typical run used, seconds (None: no run timed yet)


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def nth_opening(free_at: Sequence[float], k: int, period: float) -> float:
    """The (k+1)-th opening (k from 0) of slots that open at ``free_at`` and then every ``period`` seconds.

    Exact, in O(slots · log): write each first opening as ``base + q·period + r`` (0 ≤ r < period); slot i opens
    once in every cycle c ≥ q_i, at ``base + c·period + r_i``. Count the openings before cycle C by arithmetic, find
    the cycle holding the k-th by bisection, then order that cycle's openings by r."""
    base = min(free_at)
    if period <= 0:
        return base
    cycles = [(int((f - base) // period), (f - base) % period) for f in free_at]

    def before(c: int) -> int:  # openings in cycles < c
        return sum(max(0, c - q) for q, _ in cycles)

    lo, hi = 0, max(q for q, _ in cycles) + k + 1
    while lo < hi:  # smallest C with before(C + 1) > k
        mid = (lo + hi) // 2
        if before(mid + 1) > k:
            hi = mid
        else:
            lo = mid + 1
    in_cycle = sorted(r for q, r in cycles if q <= lo)
    return base + lo * period + in_cycle[k - before(lo)]


def run_in_turn(free_at: list[float], durations: Sequence[float]) -> float:
    """Jobs of known durations take the earliest open slot in turn; when does the next slot open after them?"""
    heap = list(free_at)
    heapq.heapify(heap)
    for d in durations:
        heapq.heappush(heap, heapq.heappop(heap) + max(0.0, d))
    return heap[0]


def estimate(
    ahead: int | Sequence[float],
    groups: Sequence[GroupCapacity],
    running: Sequence[float],
    durations: Sequence[float],
    now: float,
    *,
    unfit: str = "",
) -> Estimate:
    """When the job starts, given the jobs ahead of it (a count, or their expected durations), the capacity able to
    run it, how long each running job of the queue has run (seconds), recent run durations of the queue and now.

    ``unfit`` says in words why groups or workers of the queue were left out (they cannot run the job); it is the
    whole basis when ``groups`` is empty."""
    n_ahead = ahead if isinstance(ahead, int) else len(ahead)
    typical = statistics.median(durations) if durations else None
    if not groups:
        why = unfit or "no group and no worker serves its queue"
        return Estimate(None, f"nothing can run it: {why}", n_ahead, 0, typical)

    free_at: list[float] = []
    up_slots = 0
    words: list[str] = []
    starting_words: list[str] = []
    for g in groups:
        slots = max(1, g.slots)
        boot = g.boot_seconds if g.boot_seconds is not None else DEFAULT_BOOT
        up_slots += g.workers * slots
        for into in g.starting:
            free_at += [now + max(0.0, boot - into)] * slots
        target = g.workers + len(g.starting)
        if g.desired is not None:
            target = max(target, g.desired)
        if g.max_workers is not None:
            if target == 0 and g.max_workers > 0:
                target = 1  # the policy starts a worker on the first job it can run (its status may lag)
            target = min(target, g.max_workers)
        to_start = max(0, target - g.workers - len(g.starting))
        free_at += [now + boot] * (to_start * slots)
        capped = g.max_workers is not None and g.desired is not None and g.desired >= g.max_workers > 0
        words.append(
            f"{_n(g.workers, 'worker')} x {_n(slots, 'slot')}"
            + (f" in {g.name}" if len(groups) > 1 else "")
            + (f" (at max {g.max_workers})" if capped else "")
        )
        booting = len(g.starting) + to_start
        if booting:
            seen = f"typical boot {boot:.0f} s" if g.boot_seconds is not None else f"boot assumed {boot:.0f} s"
            far = f", {max(g.starting):.0f} s in" if g.starting else ""
            starting_words.append(f"{_n(booting, 'worker')} starting ({seen}{far})")

    # a busy slot opens when its run ends; each running job holds one
    busy = len(running)
    for ran in running:
        if typical is not None:
            left = typical - ran if ran < typical else typical / 2  # past the median: assume half a run more
            free_at.append(now + left)
        else:
            free_at.append(math.inf)
    free_at += [now] * max(0, up_slots - busy)
    total = len(free_at)
    basis_parts = [f"{n_ahead} ahead", *words]
    if typical is not None:
        basis_parts.append(f"median run {typical:.0f} s")
    basis_parts += starting_words
    if unfit:
        basis_parts.append(f"not counted: {unfit}")
    basis = ", ".join(basis_parts)
    if total == 0:
        return Estimate(None, f"nothing will run it: {basis} (no worker up or to start)", n_ahead, 0, typical)

    known = sorted(f for f in free_at if math.isfinite(f))
    if typical is None:
        # no run timed yet: only the openings that need no run to end can be told
        if isinstance(ahead, int) and n_ahead < len(known):
            at = known[n_ahead]
        elif not isinstance(ahead, int) and len(known) > 0:
            at = run_in_turn(known, ahead) if ahead else known[0]
        else:
            return Estimate(None, f"{basis}; no run of its queue finished yet to time", n_ahead, total, None)
    elif isinstance(ahead, int):
        at = nth_opening(known, n_ahead, typical)
    else:
        at = run_in_turn(known, ahead)
    return Estimate(max(now, at), basis, n_ahead, total, typical)


def in_words(est: Estimate | float | None, now: float) -> str:
    """ "now", "in ~3 min (at 14:05)", or "unknown" -- local time of day, as the user's terminal shows it. Takes an
    estimate or its ``at`` (as the API serves it)."""
    at = est.at if isinstance(est, Estimate) else est
    if at is None:
        return "unknown"
    wait = at - now
    if wait < 1:
        return "now"
    if wait < 90:
        rel = f"in ~{wait:.0f} s"
    elif wait < 90 * 60:
        rel = f"in ~{wait / 60:.0f} min"
    elif wait < 36 * 3600:
        rel = f"in ~{wait / 3600:.1f} h"
    else:
        rel = f"in ~{wait / 86400:.1f} days"
    clock = time.strftime("%H:%M" if wait < 20 * 3600 else "%a %H:%M", time.localtime(at))
    return f"{rel} (at {clock})"
