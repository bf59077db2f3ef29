"""scaleq's scaling policy: a pure function from what a group sees to what it should do.

The same :func:`decide` runs in the live controller, in ``scaleq plan`` and in the simulator (``scaleq.sim``), so it
does no I/O and never reads a clock: the caller passes ``now`` and the :class:`PolicyState` returned by the previous
decision (the policy's whole memory), and stores the new one. Same inputs, same :class:`Decision`. The workers it
sees are :class:`WorkerView` s, which :func:`worker_views` builds (pure, too) from the provider's list and the
server's registrations, for the controller and ``plan`` alike. Its settings (:class:`scaleq.grid.PolicySettings`)
are part of the grid file's schema.

How a decision is made:

* **Size by slots.** ``need = ceil((queued + running) / slots)``, clamped to ``[min_workers, max_workers]``.
  Running jobs count, so a group never shrinks under the work it is doing.
* **A spare for the noise** (:mod:`scaleq.scaling.forecast`). A job that arrives when no worker is free waits for a
  boot, so the policy provisions ``lookahead`` seconds ahead (about a worker's start-up time): it adds
  ``headroom · √(changes of queued + running expected within lookahead)`` jobs -- the demand's recent activity,
  arrivals and completions, decayed with ``demand_halflife`` -- before dividing by ``slots``. A quiet group keeps no
  spare, nor does one with nothing queued or running (scale-to-zero is unchanged); a busy, noisy one keeps a few
  workers ready, started before the jobs that will need them.
* **Up at once.** The controller wakes on every submit, and an increase is acted on in the same call -- including
  from zero on the first runnable job. The only brake is ``max_step_up`` workers per ``step_period``.
* **Down soon, and only idle.** The desired size is the highest ``need`` seen in the last ``scale_down_window``
  seconds (a sliding-window maximum, like the HPA's stabilisation window), or ``need`` plus the spare if that is
  more. The extra workers are drained only if they are *idle* and have been idle for ``idle_timeout`` seconds.
  Busy workers are never chosen, so scale-in never interrupts a job; starting workers are never chosen either. The
  spare is what absorbs the noise, so both holds can be short (20 s by default).
* **Drain the longest-idle worker first** (ties: the most recently started). Its idle timeout ran out first, so the
  drain order follows the clock the user configured. The workers kept are the ones that ran a job most recently
  (warm image layers and caches).
* **Above max** (max lowered): idle workers are drained at once, without waiting for the idle timeout. Busy ones
  are left to finish and go on a later decision, once idle.
* **Capacity** is starting + idle + busy workers. Draining workers do not count (they are leaving). A starting
  worker counts for ``startup_grace`` seconds, so a worker that is still booting is not started twice; after that it
  has *lapsed*: the decision names it (``lapsed``) and the caller stops it and deletes its machine, saying why.
* **Never more machines than max.** Every machine the provider lists -- starting, lapsed, idle, busy, draining or
  stopping -- counts toward ``max_workers`` until it is gone: a machine costs whether or not its worker registered,
  and a draining worker still runs. So a busy worker told to drain is replaced only once it has left, and workers
  that never come up (a broken image, a quota, a stock-out) are replaced only as their machines go, never piled up.

The ``reason`` of every decision -- "no change" too -- says in words what was seen and why that follows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from scaleq.grid import PolicySettings
from scaleq.scaling.forecast import Activity, observe, rate, spare_jobs

if TYPE_CHECKING:  # the join below reads their fields; the policy itself never needs them
    from scaleq.jobs import Worker
    from scaleq.providers.base import ProviderWorker

__all__ = ["Decision", "Demand", "PolicyState", "WorkerView", "decide", "worker_views"]

WorkerState = Literal["starting", "idle", "busy", "draining"]


@dataclass(frozen=True, slots=True)
class Demand:
    """One observation of the signal."""

    at: float
    queued: int  # runnable jobs waiting that this group can run
    running: int  # jobs of this group's queue currently running
    capped: bool = False  # queued was counted only this far (there may be more): see scaling.observe.demand_limit


@dataclass(frozen=True, slots=True)
class WorkerView:
    id: str
    started_at: float
    state: WorkerState  # starting = asked of the provider, not registered yet
    busy_slots: int = 0
    idle_since: float | None = None  # None for an idle worker = idle since it started


def worker_views(provider_workers: list[ProviderWorker], registered: list[Worker]) -> list[WorkerView]:
    """Join what the provider runs with what the server knows: registration decides idle / busy / draining."""
    by_id = {w.id: w for w in registered if w.state != "gone"}
    views = []
    for pw in provider_workers:
        w = by_id.get(pw.id)
        if pw.status == "stopping" or (w is not None and w.state == "draining"):
            views.append(WorkerView(pw.id, pw.started_at, "draining"))
        elif w is None:
            views.append(WorkerView(pw.id, pw.started_at, "starting"))
        elif w.busy > 0:
            views.append(WorkerView(pw.id, pw.started_at, "busy", busy_slots=w.busy))
        else:
            views.append(WorkerView(pw.id, pw.started_at, "idle", idle_since=w.idle_since))
    return views


@dataclass(frozen=True, slots=True)
class PolicyState:
    """What the policy remembers between decisions; the caller stores it and passes it back."""

    # (at, need) within scale_down_window, as a sliding-window maximum: needs strictly decreasing with time
    recommendations: tuple[tuple[float, int], ...] = ()
    recent_starts: tuple[tuple[float, int], ...] = ()  # (at, workers started) within step_period
    activity: Activity | None = None  # how much the demand has been moving (see scaleq.scaling.forecast)


@dataclass(frozen=True, slots=True)
class Decision:
    desired: int
    start: int  # workers to ask the provider for now
    drain: tuple[str, ...]  # ids of IDLE workers to drain (never busy or starting ones)
    reason: str
    state: PolicyState
    lapsed: tuple[str, ...] = ()  # ids of workers not registered within startup_grace: stop them, delete machines


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _secs(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds >= 1 or seconds == 0 else f"{seconds:.1f} s"


def _held_by_machines(listed: int, lapsed: int, draining: int, max_workers: int) -> str:
    """Why the machines beyond capacity hold a start back: they count toward max_workers until they are gone."""
    if lapsed or not draining:
        held = f"{listed} of max {max_workers} machines exist (registered or not)"
        return held + (f"; {draining} draining count toward it until they are gone" if draining else "")
    return f"{draining} draining count toward max {max_workers} until they are gone"


def decide(
    demand: Demand, workers: Sequence[WorkerView], settings: PolicySettings, state: PolicyState, now: float
) -> Decision:
    s = settings
    queued, running = max(0, demand.queued), max(0, demand.running)
    need = -(-(queued + running) // s.slots)
    target = min(max(need, s.min_workers), s.max_workers)
    waiting = ("≥" if demand.capped else "") + _n(queued, "job")
    words = f"{waiting} waiting, {running} running, {_n(s.slots, 'slot')} per worker → {_n(need, 'worker')}"
    if need > s.max_workers or (demand.capped and need >= s.max_workers):  # capped demand: there may be more
        words += f" (capped at max_workers {s.max_workers})"
    elif need < s.min_workers:
        words += f" (raised to min {s.min_workers})"

    # Sliding-window maximum: keep only earlier needs that are higher than this one and still in the window.
    horizon = now - s.scale_down_window
    recs = [(at, r) for at, r in state.recommendations if at > horizon and r > target]
    recs.append((now, target))
    peak = min(max(recs[0][1], s.min_workers), s.max_workers)

    activity = observe(state.activity, queued + running, now, s.demand_halflife)
    # no spare for a group with nothing to do: scale-to-zero stays idle_timeout after the last job
    spare = spare_jobs(activity, s.headroom, s.lookahead, s.demand_halflife) if queued + running else 0
    ahead = min(max(-(-(queued + running + spare) // s.slots), s.min_workers), s.max_workers)
    desired = max(peak, ahead)
    if ahead > max(peak, target):
        words += (
            f"; {ahead} with a spare of {_n(spare, 'job')} for the demand's noise "
            f"({60 * rate(activity, s.demand_halflife):.1f} changes/min; headroom {s.headroom:g}, "
            f"lookahead {_secs(s.lookahead)})"
        )
    elif peak > target:
        words += f"; keeping {peak}, the peak of the last {_secs(s.scale_down_window)} (scale-down window)"

    starting = [w for w in workers if w.state == "starting"]
    booting = [w for w in starting if now - w.started_at < s.startup_grace]
    lapsed = tuple(w.id for w in starting if now - w.started_at >= s.startup_grace)
    idle = [w for w in workers if w.state == "idle"]
    busy = [w for w in workers if w.state == "busy"]
    n_draining = sum(1 for w in workers if w.state == "draining")
    capacity = len(booting) + len(idle) + len(busy)
    parts = [f"{n} {label}" for n, label in ((len(busy), "busy"), (len(idle), "idle"), (len(booting), "starting"))]
    have = f"have {capacity}" + (f" ({', '.join(p for p in parts if not p.startswith('0 '))})" if capacity else "")
    if lapsed:
        have += f"; {_n(len(lapsed), 'worker')} not registered after {_secs(s.startup_grace)}"
        have += f" (stopping {'it' if len(lapsed) == 1 else 'them'})"
    if n_draining:
        have += f"; {n_draining} draining (not counted)"

    horizon_up = now - s.step_period
    starts = tuple((at, n) for at, n in state.recent_starts if at > horizon_up)
    start, action = 0, "no change"
    drain: tuple[str, ...] = ()
    if desired > capacity:
        wanted = start = desired - capacity
        room = max(0, s.max_workers - len(workers))  # every listed machine counts until it is gone
        limits = []
        if s.max_step_up is not None and wanted > (step_room := max(0, s.max_step_up - sum(n for _, n in starts))):
            start = step_room
            used_up = " is used up" if not step_room else ""
            limits.append(f"max_step_up {s.max_step_up} per {_secs(s.step_period)}{used_up}")
        if start > room:
            start = room
            limits.append(_held_by_machines(len(workers), len(lapsed), n_draining, s.max_workers))
        limit = "; ".join(limits)
        if start == wanted:
            action = f"starting {start}"
        elif start:
            action = f"starting {start} of {wanted} ({limit})"
        else:
            action = f"no change: {wanted} more wanted, but {limit}"
        if start:
            starts += ((now, start),)
    elif capacity > desired:
        excess = capacity - desired

        def idle_for(w: WorkerView) -> float:
            return now - (w.idle_since if w.idle_since is not None else w.started_at)

        # Longest idle first; ties: the most recently started; then id, for determinism.
        ranked = sorted(idle, key=lambda w: (-idle_for(w), -w.started_at, w.id))
        over_max = min(max(0, capacity - s.max_workers), len(ranked))
        chosen = ranked[:over_max]
        ripe = [w for w in ranked[over_max:] if idle_for(w) >= s.idle_timeout]
        chosen += ripe[: excess - over_max]
        drain = tuple(w.id for w in chosen)
        why = []
        if over_max:
            why.append(f"{_n(over_max, 'idle worker')} above max {s.max_workers}")
        if len(chosen) > over_max:
            why.append(f"idle for at least {_secs(s.idle_timeout)}")
        left = excess - len(chosen)
        if drain:
            action = f"draining {len(drain)}: {', '.join(drain)} ({'; '.join(why)})"
        if left:
            not_ripe = len(ranked) - len(chosen)
            held = []
            if not_ripe:
                longest = max(idle_for(w) for w in ranked[len(chosen) :])
                held.append(
                    f"{_n(not_ripe, 'idle worker')} not idle for {_secs(s.idle_timeout)} yet (longest {_secs(longest)})"
                )
            if left > not_ripe:
                extra_starting = min(left - not_ripe, len(booting))
                extra_busy = left - not_ripe - extra_starting
                if extra_starting:
                    held.append(f"{extra_starting} still starting")
                if extra_busy:
                    held.append(f"{_n(extra_busy, 'extra worker')} busy (busy workers are never drained)")
            action = (action + "; " if drain else f"no change: {_n(excess, 'worker')} more than needed, ") + (
                "; ".join(held)
            )
    else:
        action = "no change"

    reason = f"{words}; {have}; {action}"
    return Decision(
        desired=desired,
        start=start,
        drain=drain,
        reason=reason,
        state=PolicyState(recommendations=tuple(recs), recent_starts=starts, activity=activity),
        lapsed=lapsed,
    )
