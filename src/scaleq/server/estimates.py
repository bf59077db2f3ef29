"""A queued job's estimated start: the inputs of :func:`scaleq.eta.estimate`, gathered from the store.

* **Ahead**: the queued jobs of its queue claimed before it (higher priority, or the same and older).
* **Capacity**: the groups serving its queue, as their controllers last wrote them (slots per worker, the policy's
  ``desired``, ``max_workers``, the workers still starting and since when, the median of the last boots seen: see
  migration 0009), with the workers registered on the queue. A group or worker that cannot run the job (a runtime,
  resources or tags it lacks) is left out, and the basis says so. The groups' capabilities are known where the server
  runs the controller (``scaleq up``); elsewhere a group is judged by its registered workers (as ``scaleq why`` judges
  it), and one with none registered is taken to fit.
  A group whose controller stopped is not scaled: only its registered workers count.
* **Run times**: the queue's running jobs (how long each has run) and its latest successful runs (their median is
  the typical run).

Three reads of the store (the job's place, the queue's runs) plus the groups and the workers, for one job: the single
job's page and ``scaleq job`` show it, never the job lists. The workers are read as classes of workers alike
(``worker_offers``), so a queue served by 10,000 workers of one machine type costs one row, not 10,000.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

from scaleq.eta import Estimate, GroupCapacity, estimate
from scaleq.grid import Group
from scaleq.jobs import Job, State
from scaleq.store.base import Store, WorkerOffer

__all__ = ["RECENT_RUNS", "estimate_start"]

#: Latest successful runs of the queue whose median is the typical run.
RECENT_RUNS = 50
#: Running jobs of the queue read (each holds a slot; a queue has at most as many as its workers' slots).
MAX_RUNNING = 10_000


async def estimate_start(store: Store, groups: Sequence[Group] | None, job: Job, now: float) -> Estimate | None:
    """When the queued ``job`` is expected to start (``Estimate.at`` None: cannot be told; ``basis`` says why);
    None for a job that is not queued. ``groups``: the grid's, where the server runs beside its controller."""
    if job.state != State.queued:
        return None
    ahead = await store.ahead_of(job.id, running=MAX_RUNNING, runs=RECENT_RUNS)
    statuses = [g for g in await store.list_groups() if g.queue == job.queue]
    offers = await store.worker_offers(job.queue)  # the active workers, in classes alike: a few rows, any fleet
    grid_groups = {g.name: g for g in groups or () if g.queue == job.queue}
    unfit: list[str] = []
    fitting: list[WorkerOffer] = []
    misfits: dict[str, str] = {}  # group -> why its registered workers cannot run the job (no grid to ask)
    for o in offers:
        why = o.capabilities.misfit(job.definition)
        if why is None:
            fitting.append(o)
        elif o.group is None or o.group not in grid_groups:
            unfit.append(f"worker {o.name} {why}")
            if o.group is not None:
                misfits.setdefault(o.group, why)
    by_group: dict[str | None, list[WorkerOffer]] = defaultdict(list)
    for o in fitting:
        by_group[o.group].append(o)

    capacity: list[GroupCapacity] = []
    named = set()
    for status in statuses:
        grid_group = grid_groups.get(status.name)
        if grid_group is not None and (why := grid_group.capabilities().misfit(job.definition)) is not None:
            unfit.append(f"group {status.name} {why}")
            continue
        if grid_group is None and status.name in misfits and not by_group.get(status.name):
            # no grid here: the group is judged by what its registered workers offer, as `why` judges it
            continue
        named.add(status.name)
        up = by_group.get(status.name, [])
        registered = sum(len(o.ids) for o in up)
        scaled = status.reporter == "controller"
        # the status may predate a registration: a worker seen registered is no longer starting
        still = max(0, min(len(status.starting), status.current - registered)) if scaled else 0
        starting = sorted(now - t for t in status.starting)[:still]  # the latest asked for are the ones left
        capacity.append(
            GroupCapacity(
                name=status.name,
                slots=status.slots if not up else max(o.slots for o in up),
                workers=registered,
                max_workers=status.max_workers if scaled else None,
                desired=status.desired if scaled else None,
                starting=tuple(max(0.0, s) for s in starting),
                boot_seconds=status.boot_seconds,
            )
        )
    for group, classes in by_group.items():
        if group is None or group not in named:
            slots = sum(o.slots * len(o.ids) for o in classes)
            capacity.append(GroupCapacity(name=group or "workers", slots=1, workers=slots))
    fitting_ids = {i for o in fitting for i in o.ids}
    running = [now - started for worker, started in ahead.running if worker in fitting_ids]
    return estimate(ahead.queued, capacity, running, ahead.recent_runs, now, unfit="; ".join(unfit[:3]))
