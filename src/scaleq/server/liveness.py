"""A parked claim is a worker's heartbeat: the server keeps idle workers alive without a request from them.

An idle worker holds a long-poll claim open almost all the time (it re-polls at once when one comes back empty). Its
heartbeats then only say what the open claim already says — the worker is there — yet at ``heartbeat_seconds`` they
are most of a large fleet's requests (5,000 idle workers beating every 2 s are 2,500 requests/s; their claims, re-polled
every 20 s, 250/s). So this process counts the claims parked on it (:class:`OpenClaims`), and its housekeeping marks
all of those workers heard from in ONE store round trip per tick (:func:`touch_parked`). Registration answers
``claim_is_heartbeat: true``, and a worker that reads it skips its heartbeat while it is idle and parked; while it
holds leases it still beats, since only a heartbeat renews leases (and says which are still live).

Why in memory and not in the store on every claim: it costs nothing per request, and each server of several on one
PostgreSQL touches the workers parked on it. The price: a worker whose connection died is still counted until its
claim's long-poll ends (at most ``long_poll_max``), so it is marked gone that much later than ``worker_gone_after``
— its leases, if any, still expire on time, as they are renewed only by heartbeats.

The same record remembers each worker's queue, so a claim can take its queue's wake-up event before its first store
try and park after one round trip instead of two (the queue is checked against the store's answer, so a worker that
registered again on another queue is never parked on the old one).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

from scaleq.store.base import Store

#: Workers whose queue is remembered, at most (beyond it the record starts again: a cache, never the truth).
MAX_REMEMBERED = 200_000


class OpenClaims:
    """The claims parked on this server, by worker id, and the queue each worker last claimed from."""

    def __init__(self) -> None:
        self._open: Counter[str] = Counter()
        self._queues: dict[str, str] = {}

    @contextlib.contextmanager
    def parked(self, worker_id: str) -> Iterator[None]:
        """While inside, ``worker_id`` has a claim open here."""
        self._open[worker_id] += 1
        try:
            yield
        finally:
            self._open[worker_id] -= 1
            if self._open[worker_id] <= 0:
                del self._open[worker_id]

    def ids(self) -> list[str]:
        return sorted(self._open)

    def __len__(self) -> int:
        return len(self._open)

    def queue_of(self, worker_id: str) -> str | None:
        return self._queues.get(worker_id)

    def remember(self, worker_id: str, queue: str) -> None:
        if len(self._queues) >= MAX_REMEMBERED and worker_id not in self._queues:
            self._queues.clear()
        self._queues[worker_id] = queue

    def forget(self, worker_id: str) -> None:
        self._queues.pop(worker_id, None)


async def touch_parked(store: Store, claims: OpenClaims, now: float) -> int:
    """Mark every worker with a claim parked here as heard from at ``now``; how many (one store round trip)."""
    ids = claims.ids()
    if ids:
        await store.touch_workers(ids, now)
    return len(ids)
