"""A claim's long-poll: its first store try, then parked in its queue's line until a wake, its worker's drain or
its deadline.

The order of things is what makes it lossless and cheap:

* **Park, then try.** A claim takes its place in its queue's line of waiters (:meth:`scaleq.notify.Notifier.park`)
  and its worker's drain event *before* the store try whose empty answer it will wait on, so a submit in between is
  never missed. The worker's queue is remembered from its last claim (:class:`scaleq.server.liveness.OpenClaims`),
  so an idle re-poll parks before its first try: one store round trip, not two.
* **No try when nothing can be new.** A claim without results whose worker's last try found nothing under
  ``FRESH_SECONDS`` ago, with no wake of its queue (or of any queue) delivered since, parks without a try
  (:meth:`OpenClaims.nothing_new`; each empty try is recorded with the notifier's generation read before it).
* **A woken claim takes a new place before it tries**, so a submit during its try wakes it again; after the try it
  passes the wake on when jobs are still queued and it found nothing (the next claim parked before the wake may be
  able to run them), or when it took all it asked for but not the one job its wake stood for (:mod:`scaleq.notify`
  says when: another server's wake, or an older job left without one).
* **Results riding along are answered at once** when there is nothing to hand out (the route does not park such a
  claim): until its answer the worker must keep renewing those leases.

Each store try grants leases at the cadence of that moment (:mod:`scaleq.server.cadence`); :attr:`LongPoll.beat` is
the beat to answer with, read with the term of the last try.
"""

from __future__ import annotations

import time

from fastapi import Request

from scaleq.notify import ClaimWaiter, wait_any
from scaleq.server.liveness import OpenClaims
from scaleq.server.routes.common import Ctx
from scaleq.store.base import FinishResult, WorkerClaim


class LongPoll:
    """One claim of ``worker_id`` for up to ``n`` jobs, held open until ``wait`` (at most the server's long-poll)."""

    def __init__(
        self, ctx: Ctx, open_claims: OpenClaims, request: Request, worker_id: str, n: int, wait: float
    ) -> None:
        self.ctx, self.open_claims, self.request = ctx, open_claims, request
        self.worker_id, self.n = worker_id, n
        self.deadline = time.monotonic() + min(wait, ctx.settings.long_poll_max)
        self.notifier = ctx.notifier
        self.known = open_claims.queue_of(worker_id)
        self.waiter = self.notifier.park(self.known) if self.known and n > 0 else None
        self.drained = self.notifier.event(f"worker:{worker_id}")
        self.beat, self.term = ctx.cadence.heartbeat_seconds, ctx.cadence.lease_seconds  # as of each grant: a pair

    def close(self) -> None:
        """Leave the line (a wake this claim got and did not act on goes to the next claim)."""
        self.notifier.unpark(self.waiter)

    async def first(self, now: float, results: list[tuple[str, FinishResult]], carrying: bool) -> WorkerClaim:
        """The first try, with the results riding along (``carrying``: the claim came with results, its own or
        refused ones); none when its worker's last try found nothing and nothing was notified since."""
        waiter = self.waiter
        if (
            waiter is not None
            and not carrying
            and self.open_claims.nothing_new(self.worker_id, self.notifier.generation(waiter.queue))
        ):
            return WorkerClaim(waiter.queue, "active", [])
        return await self._try(now, self.known, results)

    async def park(self, got: WorkerClaim) -> WorkerClaim:
        """While ``got`` (the last try's answer) handed out nothing to an active worker: wait for a wake, the
        worker's drain or the deadline, and try again after a wake; the last answer."""
        while not got.claims and got.state == "active" and self.n > 0:
            if self.waiter is None or self.waiter.queue != got.queue:  # not parked on this queue yet: park, try again
                self.notifier.unpark(self.waiter)
                self._park(got.queue)
            elif time.monotonic() >= self.deadline or await self.request.is_disconnected():
                break
            elif not await wait_any((self.waiter.event, self.drained), self.deadline - time.monotonic()):
                break
            elif await self.request.is_disconnected():  # woken, but the worker is gone: its wake goes to the next
                break
            else:  # woken: take a new place in line before trying again
                woken = self.waiter
                self._park(got.queue)
                if woken.event.is_set():
                    got = await self._woken_try(woken, got.queue)
                    continue
                self.notifier.unpark(woken)  # the worker's drain: try as it is now
            self._cadence()
            got = await self._try(self.ctx.now(), got.queue)
        return got

    def _park(self, queue: str) -> None:
        self.waiter, self.drained = self.notifier.park(queue), self.notifier.event(f"worker:{self.worker_id}")

    def _cadence(self) -> None:
        self.beat, self.term = self.ctx.cadence.heartbeat_seconds, self.ctx.cadence.lease_seconds

    async def _woken_try(self, woken: ClaimWaiter, queue: str) -> WorkerClaim:
        """The try a wake bought, and where the wake goes after it (see the module's docstring)."""
        notifier, store = self.notifier, self.ctx.store
        woken.handled = True
        notifier.unpark(woken)
        self._cadence()
        try:
            got = await self._try(self.ctx.now(), queue)
        finally:
            notifier.back(woken)
        # a worker that now drains claims nothing: pass on at once; an active one only while jobs wait (and not past
        # a run of claims that found nothing: scaleq.notify.MAX_EMPTY_PASSES)
        if not got.claims and (got.state != "active" or await store.has_queued(got.queue)):
            notifier.pass_on(woken, found=False)
        elif len(got.claims) >= self.n and not notifier.spent(woken, [c.job.id for c in got.claims]):
            # it took all it could, but not the one job this server's wake stood for (an older one), or the wake is
            # another server's, which may stand for many (its NOTIFY carries a queue once per batch): the next claim
            # in line tries too — for a local wake, when no other woken claim is still out and jobs wait
            if woken.job is None or (not notifier.others_out(woken) and await store.has_queued(got.queue)):
                notifier.pass_on(woken, found=True)
        return got

    async def _try(
        self, now: float, queue: str | None, results: list[tuple[str, FinishResult]] | None = None
    ) -> WorkerClaim:
        """One store try; one that finds nothing for an active worker on ``queue`` (its queue, when known) is
        remembered as of the notifier's generation read before it (:meth:`OpenClaims.nothing_new`)."""
        before = self.notifier.generation(queue) if queue is not None else None
        got = await self.ctx.store.worker_claim(self.worker_id, self.n, now, self.term, finishes=results)
        if before is not None and got.queue == queue and got.state == "active" and not got.claims and self.n > 0:
            self.open_claims.found_nothing(self.worker_id, before)
        return got
