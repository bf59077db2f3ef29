"""A discrete-event simulation of one worker group under one scaling policy.

What is simulated, and how:

* **Jobs** arrive from a :class:`~scaleq.sim.traces.Trace` into one queue and are claimed oldest first (a job
  requeued after a kill keeps its place: it is the oldest).
* **Workers** have ``slots``; a started worker boots for ``boot_time`` seconds (the provider's start latency, the
  same for every policy), then claims. Which free worker gets a job is ``dispatch``: ``"pack"`` (default) gives it
  to the fullest worker, then to the one that became free most recently -- a finishing worker's next claim rides
  on its ``finish``, so it tends to win; ``"fifo"`` to the one that has waited longest (round robin), ``"random"``.
* **The policy** is woken on every arrival if it is event-driven (scaleq's controller is), and every ``period``
  seconds (scaleq's tick; the peers' poll). Its :class:`~scaleq.sim.peers.Action` is applied at once: started
  workers begin booting; a stopped worker that is starting or idle is gone; a stopped busy worker stops claiming
  and has the policy's ``kill_grace`` to finish -- what still runs then is killed, requeued and counted as lost.
* **Costs**: a worker costs from the moment it is asked for (boot included) until it is gone. It is *idle* while
  it is up, not leaving, and runs no job.

The run lasts until every job has finished and the trace's horizon is reached, the same span for every policy.

A ``probe`` (optional) is shown a :class:`Snapshot` at each instant jobs arrive and wait: what a server would know
then (the jobs ahead, the runs in progress, the workers, the policy's last decision, recent run times). The
start-time benchmark (``bench/eta.py``) estimates from it and compares with when each job did start.
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from scaleq.grid import PolicySettings
from scaleq.scaling.policy import Demand, WorkerView
from scaleq.sim.peers import SimPolicy, make_policy
from scaleq.sim.traces import Trace

__all__ = ["Result", "Snapshot", "percentile", "run_simulation", "simulate"]

Dispatch = Literal["pack", "fifo", "random"]
_DONE, _KILL, _BOOT, _ARRIVAL, _TICK = range(5)  # order of events at the same instant
_HARD_LIMIT = 86400.0  # give up this long after the horizon if jobs are still unfinished


@dataclass(frozen=True)
class Result:
    trace: str
    policy: str
    jobs: int
    finished: int
    wait_p50: float  # wait = finish - arrival - duration: queueing, plus any work lost to a kill
    wait_p95: float
    wait_max: float
    worker_seconds: float
    idle_worker_seconds: float
    peak_workers: int
    scale_events: int  # decisions that started or stopped workers
    started: int  # workers started
    jobs_killed: int  # job runs killed by scale-in (each requeued)
    lost_work: float  # seconds of job run time thrown away by those kills
    end: float
    series: tuple[tuple[float, int, int], ...] = field(repr=False)  # (t, queued, workers) at each change
    events: tuple[tuple[float, int, int, str], ...] = field(repr=False)  # (t, started, stopped, reason)
    waits: tuple[float, ...] = field(repr=False, default=())  # per job, in trace order (nan: unfinished)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a server would know at ``at``, just after jobs arrived and the policy decided."""

    at: float
    waiting: tuple[tuple[int, int], ...]  # (job, jobs queued ahead of it) for the jobs that arrived now and wait
    running: tuple[float, ...]  # start of each run in progress
    workers: tuple[WorkerView, ...]
    desired: int  # the policy's last decision
    recent: tuple[float, ...]  # durations of the latest finished runs, oldest first


#: Finished runs a Snapshot recalls.
RECENT = 50


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (0 for none)."""
    if not values:
        return 0.0
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


class _Worker:
    __slots__ = ("end", "id", "idle_since", "jobs", "last_change", "started_at", "state", "view")

    def __init__(self, wid: str, now: float) -> None:
        self.id, self.started_at, self.state = wid, now, "starting"  # starting | up | leaving | gone
        self.jobs: dict[int, float] = {}  # job -> start of this run
        self.idle_since: float | None = None
        self.last_change = now
        self.end = math.inf
        self.view: WorkerView | None = None

    def make_view(self) -> WorkerView:
        if self.state == "starting":
            v = WorkerView(self.id, self.started_at, "starting")
        elif self.state == "leaving":
            v = WorkerView(self.id, self.started_at, "draining", len(self.jobs))
        elif self.jobs:
            v = WorkerView(self.id, self.started_at, "busy", len(self.jobs))
        else:
            v = WorkerView(self.id, self.started_at, "idle", 0, self.idle_since)
        self.view = v
        return v


def simulate(
    trace: Trace,
    policy: SimPolicy,
    slots: int,
    boot_time: float,
    dispatch: Dispatch = "pack",
    seed: int = 0,
    probe: Callable[[Snapshot], None] | None = None,
) -> Result:
    """Run one trace under one policy (``probe``: see the module's docstring)."""
    arrivals = [a for a, _ in trace.jobs]
    durations = [d for _, d in trace.jobs]
    n = len(arrivals)
    attempt = [0] * n
    finish = [math.nan] * n
    rng = random.Random(seed)

    heap: list[tuple[float, int, int, int, int, int]] = []  # (t, kind, seq, worker/job, job, attempt)
    seq = 0

    def push(t: float, kind: int, a: int = 0, b: int = 0, c: int = 0) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(heap, (t, kind, seq, a, b, c))

    queue: list[tuple[float, int]] = []  # (arrival, job): oldest first
    workers: list[_Worker] = []
    alive: dict[str, _Worker] = {}
    by_id: dict[str, int] = {}
    running = 0
    idle_total = 0.0
    finished = killed = started = scale_events = peak = 0
    lost = 0.0
    series: list[tuple[float, int, int]] = []
    events: list[tuple[float, int, int, str]] = []
    recent: deque[float] = deque(maxlen=RECENT)
    desired = 0

    def gone(w: _Worker, t: float) -> None:
        nonlocal idle_total
        if w.state == "up" and not w.jobs and w.idle_since is not None:
            idle_total += t - w.idle_since
        w.state, w.end, w.view = "gone", t, None
        del alive[w.id]

    def stop(w: _Worker, t: float) -> None:
        if w.state == "starting" or (w.state == "up" and not w.jobs):
            gone(w, t)
        elif w.state == "up":
            w.state, w.view = "leaving", None
            last = max(s + durations[j] for j, s in w.jobs.items())
            if last - t > policy.kill_grace:
                push(t + policy.kill_grace, _KILL, by_id[w.id])

    def act(t: float) -> None:
        nonlocal started, scale_events, peak, desired
        views = [w.view or w.make_view() for w in alive.values()]
        a = policy.step(Demand(t, len(queue), running), views, t)
        desired = a.desired
        if a.start or a.stop:
            scale_events += 1
            events.append((t, a.start, len(a.stop), a.reason))
        for _ in range(a.start):
            w = _Worker(f"w{len(workers) + 1}", t)
            by_id[w.id] = len(workers)
            workers.append(w)
            alive[w.id] = w
            push(t + boot_time, _BOOT, by_id[w.id])
            started += 1
        for wid in a.stop:
            if wid in alive:
                stop(alive[wid], t)
        peak = max(peak, len(alive))

    def claim(t: float) -> None:
        nonlocal running, idle_total
        free = [w for w in alive.values() if w.state == "up" and len(w.jobs) < slots]
        if not free:
            return
        if dispatch == "pack":
            free.sort(key=lambda w: (-len(w.jobs), -w.last_change))
        elif dispatch == "fifo":
            free.sort(key=lambda w: (w.last_change, len(w.jobs)))
        else:
            rng.shuffle(free)
        for w in free:
            if not queue:
                return
            if not w.jobs and w.idle_since is not None:
                idle_total += t - w.idle_since
                w.idle_since = None
            while queue and len(w.jobs) < slots:
                _, j = heapq.heappop(queue)
                w.jobs[j] = t
                running += 1
                push(t + durations[j], _DONE, by_id[w.id], j, attempt[j])
            w.last_change, w.view = t, None

    next_arrival = 0
    if n:
        push(arrivals[0], _ARRIVAL)
    push(0.0, _TICK)
    last_point = (-1, -1)
    limit = trace.horizon + _HARD_LIMIT
    t = 0.0
    while heap:
        t = heap[0][0]
        if t > limit:
            break
        arrived = ticked = False
        first_new = next_arrival
        while heap and heap[0][0] == t:
            _, kind, _, a, b, c = heapq.heappop(heap)
            if kind == _DONE:
                w, j = workers[a], b
                if j in w.jobs and attempt[j] == c:
                    del w.jobs[j]
                    running -= 1
                    finish[j] = t
                    finished += 1
                    recent.append(durations[j])
                    w.last_change, w.view = t, None
                    if not w.jobs:
                        if w.state == "leaving":
                            gone(w, t)
                        else:
                            w.idle_since = t
            elif kind == _KILL:
                w = workers[a]
                if w.state == "leaving":
                    for j, s in w.jobs.items():
                        lost += t - s
                        killed += 1
                        attempt[j] += 1
                        running -= 1
                        heapq.heappush(queue, (arrivals[j], j))
                    w.jobs.clear()
                    gone(w, t)
            elif kind == _BOOT:
                w = workers[a]
                if w.state == "starting":
                    w.state, w.idle_since, w.last_change, w.view = "up", t, t, None
            elif kind == _ARRIVAL:
                heapq.heappush(queue, (arrivals[next_arrival], next_arrival))
                next_arrival += 1
                if next_arrival < n:
                    push(arrivals[next_arrival], _ARRIVAL)
                arrived = True
            else:
                ticked = True
        if queue:
            claim(t)
        if ticked or (arrived and policy.event_driven):
            act(t)
            if queue:
                claim(t)
        if probe is not None and arrived and queue:
            new = {j for _, j in queue if j >= first_new}
            if new:
                waiting = tuple((j, len(queue) - 1 - sum(1 for k in new if k > j)) for j in sorted(new))
                probe(
                    Snapshot(
                        t,
                        waiting,
                        tuple(s for w in alive.values() for s in w.jobs.values()),
                        tuple(w.view or w.make_view() for w in alive.values()),
                        desired,
                        tuple(recent),
                    )
                )
        point = (len(queue), len(alive))
        if point != last_point:
            series.append((t, *point))
            last_point = point
        if finished == n and t >= trace.horizon:
            break
        if ticked:
            push(t + policy.period, _TICK)

    end = t
    worker_seconds = 0.0
    for w in workers:
        worker_seconds += min(w.end, end) - w.started_at
        if w.state == "up" and not w.jobs and w.idle_since is not None:
            idle_total += end - w.idle_since
    per_job = tuple(max(0.0, finish[j] - arrivals[j] - durations[j]) for j in range(n))
    waits = sorted(w for w in per_job if not math.isnan(w))
    return Result(
        trace=trace.name,
        policy=policy.name,
        jobs=n,
        finished=finished,
        wait_p50=percentile(waits, 50),
        wait_p95=percentile(waits, 95),
        wait_max=waits[-1] if waits else 0.0,
        worker_seconds=worker_seconds,
        idle_worker_seconds=idle_total,
        peak_workers=peak,
        scale_events=scale_events,
        started=started,
        jobs_killed=killed,
        lost_work=lost,
        end=end,
        series=tuple(series),
        events=tuple(events),
        waits=per_job,
    )


def run_simulation(
    traces: list[Trace],
    policies: list[str],
    settings: PolicySettings,
    boot_time: float,
    tick: float = 1.0,
    dispatch: Dispatch = "pack",
    seed: int = 0,
) -> list[Result]:
    """Every trace under every named policy (see :data:`scaleq.sim.peers.POLICIES`), in that order."""
    if boot_time < 0 or not math.isfinite(boot_time):
        raise ValueError(f"boot_time must be a number of seconds >= 0, got {boot_time}")
    if tick <= 0:
        raise ValueError(f"tick must be > 0 seconds, got {tick}")
    if dispatch not in ("pack", "fifo", "random"):
        raise ValueError(f"dispatch must be 'pack', 'fifo' or 'random', got {dispatch!r}")
    return [
        simulate(trace, make_policy(name, settings, tick=tick, seed=seed), settings.slots, boot_time, dispatch, seed)
        for trace in traces
        for name in policies
    ]
