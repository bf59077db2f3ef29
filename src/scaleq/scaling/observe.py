"""The controller's in-process observer: signals and records straight from the store, wake-ups from the notifier."""

from __future__ import annotations

from collections.abc import Callable

from scaleq.grid import Group
from scaleq.jobs import Worker
from scaleq.scaling.policy import Demand
from scaleq.server.notify import Notifier, wait
from scaleq.store.base import GroupStatus, Store


class StoreObserver:
    def __init__(self, store: Store, notifier: Notifier, clock: Callable[[], float]) -> None:
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self._event = notifier.event("any")

    async def demand(self, group: Group) -> Demand:
        queued, running = await self.store.demand(group.queue, group.capabilities())
        return Demand(self.clock(), queued, running)

    async def registered(self, group: Group) -> list[Worker]:
        return [w for w in await self.store.list_workers(queue=group.queue) if w.group == group.name]

    async def drain(self, worker_id: str) -> None:
        await self.store.set_worker_state(worker_id, "draining")
        self.notifier.notify(f"worker:{worker_id}")

    async def record(self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str) -> None:
        await self.store.record_event(group, kind, from_count, to_count, reason, self.clock())

    async def status(self, status: GroupStatus) -> None:
        await self.store.put_group(status)

    async def wait_for_change(self, timeout: float) -> None:
        await wait(self._event, timeout)
        # take the next event before the controller looks again, so nothing between is missed
        self._event = self.notifier.event("any")
