"""Where the controller observes and records: the store in-process (``up``), or the HTTP API (``autoscale``)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from scaleq.client import ApiError, Client, Unreachable
from scaleq.grid import Group
from scaleq.jobs import Worker
from scaleq.loop import wait_set
from scaleq.notify import Notifier
from scaleq.scaling.policy import Demand
from scaleq.store.base import GroupStatus, Store


def demand_limit(group: Group) -> int:
    """Queued jobs past what the group can run at once change no decision (the policy clamps at max_workers), and
    counting a long queue whole on every wake-up would cost O(queue): the count stops here."""
    return max(group.max_workers, 1) * group.slots


class StoreObserver:
    def __init__(self, store: Store, notifier: Notifier, clock: Callable[[], float]) -> None:
        self.store = store
        self.notifier = notifier
        self.clock = clock
        self._event = notifier.event("any")

    async def demand(self, group: Group) -> Demand:
        limit = demand_limit(group)
        queued, running = await self.store.demand(group.queue, group.capabilities(), limit=limit)
        return Demand(self.clock(), queued, running, capped=queued >= limit)

    async def registered(self, group: Group) -> list[Worker]:
        # gone ones too: the controller tells the provider which workers left
        workers = await self.store.list_workers(queue=group.queue, include_gone=True)
        return [w for w in workers if w.group == group.name]

    async def queued(self, queue: str) -> int:
        return next((q.queued for q in await self.store.queue_stats() if q.queue == queue), 0)

    async def drain(self, worker_id: str) -> None:
        await self.store.set_worker_state(worker_id, "draining")
        self.notifier.notify(f"worker:{worker_id}")

    async def release_worker(self, worker_id: str) -> list[str]:
        released = await self.store.release_worker(worker_id, self.clock())
        for r in released:
            self.notifier.submitted(r.queue, r.job_id)
        return [r.job_id for r in released]

    async def record(self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str) -> None:
        await self.store.record_event(group, kind, from_count, to_count, reason, self.clock())

    async def status(self, status: GroupStatus) -> None:
        await self.store.put_group(status)

    async def wait_for_change(self, timeout: float) -> None:
        await wait_set(self._event, timeout)
        # take the next event before the controller looks again, so nothing between is missed
        self._event = self.notifier.event("any")


class RemoteObserver:
    """The same observer over the HTTP API, for ``scaleq autoscale`` running apart from the server."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def demand(self, group: Group) -> Demand:
        caps = group.capabilities().model_dump(mode="json")
        limit = demand_limit(group)
        d = await self.client.demand(group.queue, caps, limit=limit)
        return Demand(d["at"], d["queued"], d["running"], capped=d["queued"] >= limit)

    async def registered(self, group: Group) -> list[Worker]:
        workers = await self.client.workers(include_gone=True)
        return [w for w in workers if w.group == group.name and w.queue == group.queue]

    async def queued(self, queue: str) -> int:
        return next((int(q["queued"]) for q in await self.client.queues() if q.get("name") == queue), 0)

    async def drain(self, worker_id: str) -> None:
        await self.client.drain_worker(worker_id)

    async def release_worker(self, worker_id: str) -> list[str]:
        return await self.client.release_worker(worker_id)

    async def record(self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str) -> None:
        await self.client.record_event(
            {"group": group, "kind": kind, "from": from_count, "to": to_count, "reason": reason}
        )

    async def status(self, status: GroupStatus) -> None:
        await self.client.put_group(
            {
                "name": status.name,
                "queue": status.queue,
                "provider": status.provider,
                "min": status.min_workers,
                "max": status.max_workers,
                "current": status.current,
                "desired": status.desired,
                "note": status.note,
                "reporter": status.reporter,
                "checks": [c.as_dict() for c in status.checks],
                "price_per_hour": status.price_per_hour,
                "state": status.state,
                "message": status.message[:4000],
                "state_since": status.state_since,
                "slots": status.slots,
                "boot_seconds": status.boot_seconds,
                "starting": list(status.starting),
            }
        )

    async def wait_for_change(self, timeout: float) -> None:
        # any change on the server ends this long-poll; the answer itself is not needed
        try:
            await self.client.demand("-", {}, wait=timeout)
        except (ApiError, Unreachable):
            await asyncio.sleep(min(timeout, 1.0))
