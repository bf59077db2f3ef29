"""A parked claim is a worker's heartbeat: the server keeps idle workers alive without a request from them.

An idle worker holds a long-poll claim open almost all the time (it re-polls at once when one comes back empty). Its
heartbeats then only say what the open claim already says — the worker is there — yet at ``heartbeat_seconds`` they
are most of a large fleet's requests (5,000 idle workers beating every 2 s are 2,500 requests/s; their claims, re-polled
every 20 s, 250/s). So this process counts the claims parked on it (:class:`OpenClaims`), and its housekeeping marks
all of those workers heard from in ONE store call per tick (:func:`touch_parked`). Registration answers
``claim_is_heartbeat: true``, and a worker that reads it skips its heartbeat while it is idle and parked; while it
holds leases it still beats, since only a heartbeat renews leases (and says which are still live).

Why in memory and not in the store on every claim: it costs nothing per request, and each server of several on one
PostgreSQL touches the workers parked on it. The price: a worker whose connection died is still counted until its
claim's long-poll ends (at most ``long_poll_max``), so it is marked gone that much later than ``worker_gone_after``
— its leases, if any, still expire on time, as they are renewed only by heartbeats.

**The touch also reads which of those workers the store no longer holds active**, and answers their claims as a drain
notice does: a drain or a gone-mark this server did not hear of — another server's notice sent while this one's
listener was down, or another server's round marking a worker gone whose touches from here came late — would
otherwise leave the worker parked until its long-poll ended (up to ``long_poll_max``), unaware. The touch runs about
every ``heartbeat_seconds`` (a whole number of housekeeping ticks), so that is about the most such news waits. It is
the same statement on PostgreSQL; SQLite, which cannot write in a ``WITH``, reads after the touch.

The same record remembers each worker's queue, so a claim can take its queue's wake-up event before its first store
try and park after one round trip instead of two (the queue is checked against the store's answer, so a worker that
registered again on another queue is never parked on the old one).

**A claim that can know there is nothing new parks without a try.** A worker that finishes a job sends its result riding
along with a claim; with nothing to hand out, that claim is answered at once (the worker must keep renewing the result's
lease until it knows it landed), and the worker's next claim, a few milliseconds later, tried the store again before
parking — an empty try per job on a busy queue whose jobs go to the claims woken for them (at 5,000 workers with 450
jobs a second, 300 a second). So each empty try is remembered with the notifier's
:meth:`~scaleq.notify.Notifier.generation` read before it; a claim from the same worker within :data:`FRESH_SECONDS`,
while no wake for its queue (or for any queue: a worker's drain, a missed stretch of other servers' notices) has been
delivered since, parks at once. Every path that queues a job notifies its queue (this server's at once, another server's
when its NOTIFY arrives, which then wakes the parked claim as it would have anyway; a listener that reconnects delivers
:data:`~scaleq.notify.MISSED`, which counts as news for every queue); the freshness bound keeps a notice that never came
(a NOTIFY lost otherwise) from costing more than one long-poll, as for any parked claim. A worker registering again
forgets it (its capabilities may have changed).
"""

from __future__ import annotations

import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator

from scaleq.notify import Notifier
from scaleq.store.base import Store

#: Workers whose queue is remembered, at most (beyond it the record starts again: a cache, never the truth).
MAX_REMEMBERED = 200_000

#: How long a worker's empty store try stands for its next claim (see the module's docstring).
FRESH_SECONDS = 2.0

#: What an empty try was as of: the notifier's generation read before it, and when (monotonic).
Generation = tuple[int, int]


class OpenClaims:
    """The claims parked on this server, by worker id, and the queue each worker last claimed from."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._open: Counter[str] = Counter()
        self._queues: dict[str, str] = {}
        self._empty: dict[str, tuple[Generation, float]] = {}
        self._clock = clock

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
        self._empty.pop(worker_id, None)

    def found_nothing(self, worker_id: str, generation: Generation) -> None:
        """A store try for ``worker_id`` (active, asking for jobs) found nothing, as of ``generation``."""
        if len(self._empty) >= MAX_REMEMBERED and worker_id not in self._empty:
            self._empty.clear()
        self._empty[worker_id] = (generation, self._clock())

    def nothing_new(self, worker_id: str, generation: Generation) -> bool:
        """Whether ``worker_id``'s last try found nothing less than :data:`FRESH_SECONDS` ago and nothing was
        notified since (``generation`` is the notifier's now): its claim may park without a try. Once: the try
        after that one is real."""
        last = self._empty.pop(worker_id, None)
        return last is not None and last[0] == generation and self._clock() - last[1] < FRESH_SECONDS


async def touch_parked(store: Store, claims: OpenClaims, notifier: Notifier, now: float) -> int:
    """Mark every worker with a claim parked here as heard from at ``now``; how many. Those the store no longer
    holds active have their claims answered (see the module's docstring)."""
    ids = claims.ids()
    if ids:
        for worker_id in await store.touch_workers(ids, now):
            notifier.deliver((f"worker:{worker_id}",))
    return len(ids)
