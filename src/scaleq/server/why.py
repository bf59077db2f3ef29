"""Why a job is where it is: the chain of reasons, in words and numbers, behind ``scaleq why ID``.

A queued job waits for one of a few things, and the server already records each of them: the jobs ahead of it in
its queue (claimed by priority, then submit order), the groups and workers that serve its queue and whether they can
run it at all (:mod:`scaleq.server.runnable`'s look: a requirement, a tag, the runtime), and for each group that
can, what its controller last said (``groups``: current / desired / max_workers, the note "capped at max_workers",
the provider's refusal or error and since when, migration 0008) and did (``events``: scale-ups, errors with their
back-off), and its workers (registered ones, their busy slots; the ones started but not registered yet are booting,
timed against the group's past boots: a scale-up event to the worker's registration). A running or finished job is
explained by its attempts: lost, preempted, handed back, timed out, failed with which exit code, and which budget
retried it (``max_attempts`` for the infrastructure's losses, ``retries`` for the program's failures).

Each reason is one :class:`WhyStep`: a ``kind`` a script can test, a sentence, and the numbers it was made from.
Nothing here writes: the answer is a reading of the store at ``now``. ``estimated_start`` / ``estimate_basis`` are
filled by the route from :mod:`scaleq.server.estimates` (the same estimate ``GET /jobs/{id}`` answers); every reader
prints them when set.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, Field

from scaleq.jobs import Capabilities, Job, JobDefinition, Reason, State, Worker
from scaleq.server.runnable import Offer, misfit_of
from scaleq.store.base import Attempt, Event, GroupStatus, Store

#: A worker that registered longer than this after a scale-up is not counted as that scale-up's boot.
MAX_BOOT_SECONDS = 3600.0
#: Scaling events read per group for its boots and back-off.
EVENTS_READ = 200
#: Workers named one by one (the rest are counted).
WORKERS_NAMED = 5

Number = int | float | str | None
# the controller's words (scaling/controller.py): its error events and its note on a group at max_workers
_RETRY = re.compile(r"retry (\d+) in (\d+(?:\.\d+)?) s")
_CAPPED = re.compile(r"capped at max_workers \d+(?: \([^)]*\))?")


class WhyStep(BaseModel):
    kind: str = Field(description="what kind of reason: position, cannot_run, capped, starting, provider_error, …")
    text: str = Field(description="the reason in words")
    numbers: dict[str, Number] = Field(default_factory=dict, description="what the words were made from")


class Why(BaseModel):
    """The answer of ``GET /api/v1/jobs/{id}/why``."""

    job_id: str
    queue: str
    state: State
    reason: Reason | None = None
    chain: list[WhyStep]
    estimated_start: float | None = Field(default=None, description="when the job should start (epoch seconds)")
    estimate_basis: str | None = Field(default=None, description="what the estimate is based on, in words")


def _s(n: float) -> str:
    return f"{n:.1f} s" if n < 10 and n != int(n) else f"{n:.0f} s"  # a 0.3 s run is not "0 s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


async def explain(store: Store, grid_groups: Sequence[Any] | None, job: Job, now: float) -> Why:
    """The chain for ``job`` (``grid_groups``: the grid's groups when this process runs the controller, which say
    what each group offers before any of its workers registers)."""
    chain: list[WhyStep] = []
    attempts = await store.list_attempts(job.id)
    if job.state == State.queued:
        chain += await _queued(store, grid_groups, job, now)
    chain += _attempts(job, attempts, now)
    if job.state == State.finished:
        chain.append(_finished(job))
    return Why(job_id=job.id, queue=job.queue, state=job.state, reason=job.reason, chain=chain)


# -- a queued job ----------------------------------------------------------------------------------------------


async def _queued(store: Store, grid_groups: Sequence[Any] | None, job: Job, now: float) -> list[WhyStep]:
    pos = await store.queue_position(job.id)
    higher = f", {pos.higher} of them at a higher priority" if pos.higher else ""
    chain = [
        WhyStep(
            kind="position",
            text=f"{_plural(pos.ahead, 'job')} ahead of it in queue {job.queue}{higher} "
            f"({pos.queued} queued there in all; claimed by priority, then submit order)",
            numbers={"ahead": pos.ahead, "higher_priority": pos.higher, "queued": pos.queued, "priority": job.priority},
        )
    ]
    statuses = {g.name: g for g in await store.list_groups() if g.queue == job.queue}
    grid = {g.name: g for g in grid_groups or () if g.queue == job.queue}
    workers = await store.list_workers(queue=job.queue, include_gone=True)
    names = sorted(statuses.keys() | grid.keys())
    able = 0
    for name in names:
        own = [w for w in workers if w.group == name]
        # a live worker's word over a gone one's: the group may have changed what it offers since
        known = sorted(own, key=lambda w: w.state == "gone")
        caps = grid[name].capabilities() if name in grid else next((w.capabilities() for w in known), None)
        steps, can = await _group(store, name, caps, statuses.get(name), own, job, now)
        chain += steps
        able += can
    loose = [w for w in workers if w.state == "active" and w.group not in names]
    chain += _loose_workers(loose, job.definition)
    able += sum(1 for w in loose if w.capabilities().fits(job.definition))
    if not names and not loose:
        chain.append(
            WhyStep(
                kind="unserved",
                text=f"nothing serves queue {job.queue}: no group is bound to it and no worker takes it "
                "(it waits until one does; check the queue's name)",
                numbers={"groups": 0, "workers": 0},
            )
        )
    elif not able:
        chain.append(
            WhyStep(
                kind="nothing_fits",
                text=f"none of the {_plural(len(names), 'group')} and {_plural(len(loose), 'worker')} serving queue "
                f"{job.queue} can run it: it waits until one that can joins",
                numbers={"groups": len(names), "workers": len(loose)},
            )
        )
    return chain


def _offered(caps: Capabilities, definition: JobDefinition) -> dict[str, Number]:
    req = definition.requirements
    missing = sorted(set(definition.tags) - set(caps.tags))
    return {
        "runtime": definition.runtime.value,
        "runtimes_offered": ",".join(r.value for r in caps.runtimes),
        "cpus_needed": req.cpus,
        "cpus_offered": caps.cpus,
        "gpus_needed": req.gpus,
        "gpus_offered": caps.gpus,
        "memory_needed": req.memory,
        "memory_offered": caps.memory,
        "tags_missing": ",".join(missing) or None,
    }


async def _group(
    store: Store,
    name: str,
    caps: Capabilities | None,
    status: GroupStatus | None,
    workers: list[Worker],
    job: Job,
    now: float,
) -> tuple[list[WhyStep], bool]:
    """The steps of one group serving the job's queue, and whether it can run the job (or cannot be ruled out)."""
    if caps is not None and (why := misfit_of(Offer("group", name, caps), job.definition)) is not None:
        numbers: dict[str, Number] = {"group": name, **_offered(caps, job.definition)}
        return [WhyStep(kind="cannot_run", text=f"group {name} cannot run it: it {why}", numbers=numbers)], False
    steps = []
    if caps is None:
        steps.append(
            WhyStep(
                kind="group_unknown",
                text=f"group {name} serves the queue; what its workers offer is not known here until one registers",
                numbers={"group": name},
            )
        )
    else:
        steps.append(WhyStep(kind="can_run", text=f"group {name} can run it", numbers={"group": name}))
    if status is None:
        steps.append(
            WhyStep(
                kind="no_controller",
                text=f"group {name} has no status: no controller has reported it yet",
                numbers={"group": name},
            )
        )
        return steps, True
    counts: dict[str, Number] = {
        "group": name,
        "current": status.current,
        "desired": status.desired,
        "min_workers": status.min_workers,
        "max_workers": status.max_workers,
    }
    if status.reporter == "stopped":
        steps.append(
            WhyStep(
                kind="no_controller",
                text=f"no controller runs group {name}: the last one stopped {_s(now - status.updated_at)} ago",
                numbers={**counts, "stopped_at": status.updated_at},
            )
        )
    events = await store.list_events(name, 0, EVENTS_READ)
    if status.state != "ok":
        steps += _trouble(name, status, events, now)
    capped = _CAPPED.search(status.note)
    if capped is not None or status.max_workers == 0:
        said = capped.group(0) if capped is not None else f"capped at max_workers {status.max_workers}"
        steps.append(
            WhyStep(
                kind="capped",
                text=f"group {name} is {said}: {status.current} running or starting, none more until one is free",
                numbers=counts,
            )
        )
    registered = [w for w in workers if w.state != "gone"]
    starting = status.current - len(registered)
    if starting > 0:
        steps.append(_starting(name, starting, events, workers, now, counts))
    active = [w for w in registered if w.state == "active"]
    slots, busy = sum(w.slots for w in active), sum(w.busy for w in active)
    if active and busy >= slots:
        steps.append(
            WhyStep(
                kind="busy",
                text=f"the workers of group {name} are busy: {busy} of {slots} slots taken on "
                f"{_plural(len(active), 'worker')}",
                numbers={**counts, "workers": len(active), "slots": slots, "busy": busy},
            )
        )
    elif active:
        steps.append(
            WhyStep(
                kind="free_slots",
                text=f"group {name} has {slots - busy} free slot(s) on {_plural(len(active), 'worker')}: one should "
                "claim it at its next poll, unless the jobs ahead take them",
                numbers={**counts, "workers": len(active), "slots": slots, "busy": busy},
            )
        )
    elif status.current == 0 and status.desired == 0 and status.state == "ok" and status.max_workers > 0:
        steps.append(
            WhyStep(
                kind="not_scaled",
                text=f"group {name} has no workers and its controller wants none yet (min_workers "
                f"{status.min_workers}); it scales up when its signal sees the job",
                numbers=counts,
            )
        )
    return steps, True


def _trouble(name: str, status: GroupStatus, events: list[Event], now: float) -> list[WhyStep]:
    since = status.state_since
    what = {"quota": "refused more machines (quota)", "rate_limited": "refused more calls (rate limited)"}.get(
        status.state, "failed"
    )
    lasting = f" for {_s(now - since)}" if since is not None else ""
    steps = [
        WhyStep(
            kind="provider_error",
            text=f"group {name}: the provider {what}{lasting}: {status.message or '(no message)'}",
            numbers={
                "group": name,
                "state": status.state,
                "since": since,
                "seconds": None if since is None else now - since,
            },
        )
    ]
    last = next((e for e in events if e.kind == "error"), None)
    found = _RETRY.search(last.reason) if last is not None else None
    if last is not None and found is not None:
        tries, backoff = int(found.group(1)), float(found.group(2))
        at = last.at + backoff
        when = f"in {_s(at - now)}" if at > now else "now"
        steps.append(
            WhyStep(
                kind="backing_off",
                text=f"its controller backs off: failure {tries} in a row, next try {when} (back-off {_s(backoff)})",
                numbers={"group": name, "failures": tries, "backoff": backoff, "retry_at": at},
            )
        )
    return steps


def _starting(
    name: str, starting: int, events: list[Event], workers: list[Worker], now: float, counts: dict[str, Number]
) -> WhyStep:
    ups = sorted(e.at for e in events if e.kind == "scale_up")
    boots = []
    for w in workers:
        before = [at for at in ups if at <= w.started_at]
        if before and w.started_at - before[-1] <= MAX_BOOT_SECONDS:
            boots.append(w.started_at - before[-1])
    typical = statistics.median(boots) if boots else None
    into = now - ups[-1] if ups else None
    text = f"{_plural(starting, 'worker')} of group {name} starting"
    if into is not None:
        text += f": {_s(into)} into"
        text += f" a typical boot of {_s(typical)}" if typical is not None else " its boot (no boot recorded yet)"
    return WhyStep(
        kind="starting",
        text=text,
        numbers={
            **counts,
            "starting": starting,
            "seconds_into_boot": into,
            "typical_boot": typical,
            "boots": len(boots),
        },
    )


def _loose_workers(workers: list[Worker], definition: JobDefinition) -> list[WhyStep]:
    """Workers on the queue outside its groups (started by hand): named up to WORKERS_NAMED, the rest counted."""
    steps = []
    for w in workers[:WORKERS_NAMED]:
        why = misfit_of(Offer("worker", w.id, w.capabilities()), definition)
        if why is None:
            free = w.slots - w.busy
            steps.append(
                WhyStep(
                    kind="worker_can_run",
                    text=f"worker {w.id} can run it: {free} of {w.slots} slots free",
                    numbers={"worker": w.id, "slots": w.slots, "busy": w.busy},
                )
            )
        else:
            numbers: dict[str, Number] = {"worker": w.id, **_offered(w.capabilities(), definition)}
            steps.append(WhyStep(kind="cannot_run", text=f"worker {w.id} cannot run it: it {why}", numbers=numbers))
    if len(workers) > WORKERS_NAMED:
        rest = workers[WORKERS_NAMED:]
        fit = sum(1 for w in rest if w.capabilities().fits(definition))
        steps.append(
            WhyStep(
                kind="more_workers",
                text=f"and {len(rest)} more workers on the queue, {fit} of which can run it",
                numbers={"workers": len(rest), "can_run": fit},
            )
        )
    return steps


# -- attempts, and how a job finished --------------------------------------------------------------------------


def _attempts(job: Job, attempts: list[Attempt], now: float) -> list[WhyStep]:
    steps, lost, failed = [], 0, 0
    for n, a in enumerate(attempts):
        last = n == len(attempts) - 1
        ran = max(0.0, (a.ended_at if a.ended_at is not None else now) - a.started_at)
        head = f"attempt {a.attempt} on worker {a.worker_id}"
        numbers: dict[str, Number] = {
            "attempt": a.attempt,
            "worker": a.worker_id,
            "outcome": a.outcome,
            "started_at": a.started_at,
            "ended_at": a.ended_at,
            "seconds": ran,
        }
        outcome = a.outcome
        if outcome is None:
            text = f"{head}: running for {_s(ran)}"
        elif outcome in ("lost", Reason.worker_lost):
            lost += 1
            text = (
                f"{head}: lost after {_s(ran)} (its worker stopped renewing the lease); the infrastructure budget "
                f"counts it ({lost} of max_attempts {job.max_attempts})"
            )
            text += "; queued again" if not last or job.state != State.finished else ""
            numbers |= {"lost": lost, "max_attempts": job.max_attempts}
        elif outcome == "preempted":
            text = f"{head}: preempted after {_s(ran)} (its provider took the machine back); not counted, queued again"
        elif outcome == "released":
            text = f"{head}: handed back after {_s(ran)} (its worker was draining or stopping); not counted"
        elif outcome in (Reason.failed, Reason.timed_out):
            if outcome == Reason.timed_out:
                limit = job.definition.max_duration
                text = f"{head}: timed out after {_s(ran)}" + (f" (max duration {_s(limit)})" if limit else "")
            else:
                code = job.exit_code if last else None
                text = f"{head}: failed after {_s(ran)}" + (f" with exit code {code}" if code is not None else "")
                numbers["exit_code"] = code
            if not last or job.state != State.finished:
                failed += 1
                text += f"; retried by the program budget ({failed} of retries {job.retries})"
                numbers |= {"retried": failed, "retries": job.retries}
        elif outcome == Reason.success:
            text = f"{head}: succeeded after {_s(ran)}"
        elif outcome == Reason.cancelled:
            text = f"{head}: cancelled after {_s(ran)}"
        else:
            text = f"{head}: ended {outcome} after {_s(ran)}"
        steps.append(WhyStep(kind="attempt", text=text, numbers=numbers))
    if job.state == State.running and not any(a.outcome is None for a in attempts):
        numbers = {"worker": job.worker_id}
        steps.append(WhyStep(kind="running", text=f"running on worker {job.worker_id}", numbers=numbers))
    return steps


def _finished(job: Job) -> WhyStep:
    numbers: dict[str, Number] = {"reason": job.reason, "exit_code": job.exit_code, "finished_at": job.finished_at}
    reason = job.reason
    if reason == Reason.success:
        text = "finished: succeeded"
    elif reason == Reason.worker_lost:
        text = (
            f"finished worker_lost: lost with its worker {job.attempts} times, the whole infrastructure budget "
            f"(max_attempts {job.max_attempts})"
        )
        numbers |= {"attempts": job.attempts, "max_attempts": job.max_attempts}
    elif reason in (Reason.failed, Reason.timed_out):
        what = "failed" + (f" with exit code {job.exit_code}" if job.exit_code is not None else "")
        what = "timed out" if reason == Reason.timed_out else what
        codes = job.retry_on_exit_codes
        if not job.retries:
            budget = "it retries no failures (retries 0)"
        elif job.failures >= job.retries:
            budget = f"its program budget is spent ({job.failures} of retries {job.retries})"
        elif codes is not None:
            budget = f"it retries only exit codes {', '.join(map(str, codes))}"
        else:
            budget = "not retried"
        text = f"finished: {what}; {budget}"
        numbers |= {"failures": job.failures, "retries": job.retries}
    else:
        text = f"finished: {reason.value if reason else 'unknown'}"
    if job.error:
        text += f" ({job.error})"
    return WhyStep(kind="finished", text=text, numbers=numbers)
