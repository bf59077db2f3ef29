"""Drivers of the real controller over a provider, shared by every provider's tests: the same scenario, run against
each provider's stand-in or engine, so each provider is held to the same promise.

- :func:`never_registering`: workers that never register are stopped after ``startup_grace`` and never pile up
  beyond ``max_workers`` machines.
- :func:`refused_then_retried`: a quota or rate-limit refusal is the group's state, held while the controller backs
  off, and gone once a retry succeeds.
- :func:`taken_back`: the jobs of a busy worker whose machine the provider took back (a spot VM preempted, a pod
  evicted) go back to the queue without spending an attempt; a busy worker merely silent keeps its jobs.

Both step the controller by hand on a :class:`FakeClock`, so ``startup_grace`` and the backoff pass at once.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from scaleq.grid import Group
from scaleq.jobs import JobDefinition, RuntimeKind, Worker
from scaleq.notify import Notifier
from scaleq.providers.base import Provider
from scaleq.scaling.controller import SILENT_AFTER, Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.store.base import Event, GroupStatus, Store
from tests.helpers.waiting import eventually


class FakeClock:
    """A clock the test moves: the controller and the policy read it, so startup_grace passes at once."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def never_registering(
    provider: Provider,
    group: Group,
    store: Store,
    machines: Callable[[], Awaitable[int]],
    *,
    rounds: int = 3,
    timeout: float = 30.0,
    failed: Callable[[], Awaitable[object]] | None = None,
) -> list[Event]:
    """Drive the real controller over ``provider`` for a group whose workers never register: more jobs than
    ``max_workers`` can run, and a clock that jumps past ``startup_grace``. Each round: a step starts workers up to
    max; the clock jumps; a step stops them all (lapsed) and starts none while their machines are listed; then
    their machines go. After every step the provider's own count of machines (``machines``: from the
    stand-in or the engine, not from the provider) must not exceed ``max_workers``. ``failed``, if given, is
    awaited before the clock jumps: the machines' failure, as the provider will see it, has happened (a stand-in
    fails on its own time, the real clock's). Returns the group's events."""
    for i in range(3 * group.max_workers):
        definition = JobDefinition(command=["echo", str(i)])
        await store.submit(group.queue, definition, priority=0, max_attempts=3, rerun=False, now=time.time())
    clock = FakeClock(time.time())
    controller = Controller([(group, provider)], StoreObserver(store, Notifier(), clock), clock=clock)

    async def step() -> int:
        await controller.step()
        count = await machines()
        assert count <= group.max_workers, f"{count} machines for max_workers {group.max_workers}"
        return count

    for _ in range(rounds):
        assert await step() == group.max_workers  # started up to max, no further
        if failed is not None:
            await failed()
        # past startup_grace for every machine started so far (their start times come from the provider: real time)
        clock.now = max(clock.now, time.time()) + group.startup_grace + 1
        await step()  # all lapsed: stopped, and no replacement while their machines are listed
        await eventually(lambda: _none(machines), timeout, what="the lapsed workers' machines gone")
    return await store.list_events(group.name, 0, 1000)


async def _none(machines: Callable[[], Awaitable[int]]) -> bool:
    return await machines() == 0


async def refused_then_retried(
    provider: Provider, group: Group, store: Store, refuse: Callable[[], object], lift: Callable[[], object]
) -> tuple[GroupStatus, GroupStatus]:
    """Drive the real controller while the provider refuses to start workers (``refuse``: the stand-in's knob), then
    after ``lift`` and the controller's backoff. Returns the group's status while refused and once it recovered."""
    definition = JobDefinition(command=["echo", "refused"])
    await store.submit(group.queue, definition, priority=0, max_attempts=3, rerun=False, now=time.time())
    clock = FakeClock(time.time())
    controller = Controller([(group, provider)], StoreObserver(store, Notifier(), clock), clock=clock)
    refuse()
    await controller.step()
    (refused,) = await store.list_groups()
    clock.advance(1.0)
    await controller.step()  # backing off: no call, the state stays
    (still,) = await store.list_groups()
    assert (still.state, still.state_since) == (refused.state, refused.state_since)
    lift()
    clock.advance(60.0)  # past the longest backoff
    await controller.step()
    (recovered,) = await store.list_groups()
    return refused, recovered


async def taken_back(
    provider: Provider, group: Group, store: Store, take: Callable[[str], object]
) -> tuple[dict[str, str], list[Event]]:
    """Drive the real controller over two busy workers on machines the provider started: ``take`` (the stand-in's
    knob) takes the first one's machine back; then both fall silent (the clock jumps past ``SILENT_AFTER``, well
    inside their leases). Returns {worker id: its job id} (the taken worker's first) and the group's events; the
    taken worker's job must be queued again with no attempt spent, the other's still running."""
    ids = await provider.start(group, 2)
    assert len(ids) == 2
    now = time.time()
    jobs: dict[str, str] = {}
    for worker_id in ids:  # each worker registers and claims one job that may be tried once
        worker = Worker(
            id=worker_id,
            queue=group.queue,
            group=group.name,
            slots=1,
            runtimes=[RuntimeKind.process],
            cpus=1,
            started_at=now,
            last_heartbeat=now,
        )
        await store.register_worker(worker, now)
        definition = JobDefinition(command=["echo", worker_id])
        await store.submit(group.queue, definition, priority=0, max_attempts=1, rerun=False, now=now)
        (claim,) = await store.claim(worker_id, 1, now, lease_seconds=60)
        jobs[worker_id] = claim.job.id
    take(ids[0])
    clock = FakeClock(now + SILENT_AFTER + 1)
    controller = Controller([(group, provider)], StoreObserver(store, Notifier(), clock), clock=clock)
    await controller.step()
    return jobs, await store.list_events(group.name, 0, 1000)
