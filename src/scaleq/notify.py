"""In-process wake-ups: a submit wakes the claims waiting on its queue, a finish wakes whoever follows the job.

Keys are plain strings (``queue:<name>``, ``job:<id>``, ``any``). A waiter takes the key's current event *before*
it checks its condition, then waits on it, so a notify between the check and the wait is never lost. Events live
only while someone holds them (weak values), so idle keys cost nothing. Across servers (PostgreSQL) the same
``notify`` is fed by LISTEN/NOTIFY. The server's routes wait on it and so does the controller running in the same
process (``scaleq up``), which wakes on every job event: that is why it sits below both.

**Claims are woken in turn, not all at once.** A parked claim waits on a :class:`ClaimWaiter` of its own, queued
oldest first per queue; a submit (``queue:<name>``, local or from another server) wakes ONE of them. Waking every
parked claim on each submit made each batch of jobs cost a store round trip per idle worker — 5,000 idle workers and
a batch every 0.2 s were 25,000 claims a second, of which all but a batch's worth found nothing. A woken claim that
finds nothing while jobs are still queued (the worker cannot run them, or another claim took them) passes the wake
on to the next claim parked *before* the wake (:meth:`Notifier.wake_claims` with ``before``), so a job that some
parked worker can run still reaches one, and a chain of passes ends after each older claim has tried once — or
after :data:`MAX_EMPTY_PASSES` claims in a row found nothing. Without that bound, one job no parked worker can run (a
GPU job on a queue of idle CPU workers) cost a store round trip for every parked claim, at each submit: 10,000 for a
fleet of 10,000. The price: a job only a rare worker can run, parked behind more than 50 that cannot, waits for that
worker's next claim (its long-poll's end at the latest, 20 s) instead of being handed to it at once.

**A wake of this server's own stands for one job; another server's may stand for many.** A local submit notifies
its queue once per job, so each job wakes a claim of its own (:attr:`ClaimWaiter.job`), and a woken claim that took
that job has used its wake up (:meth:`Notifier.spent`). One that took another job (an older one, left without a
wake: its chain ran out, or no claim was parked when it came) passes the wake on while jobs are still queued — when
it is the last woken claim of its queue back from the store (:meth:`Notifier.others_out`; those still out take the
oldest jobs they can, so it is the last one's to look) —, as does one woken by another server's NOTIFY (one per batch
of its keys) that took all it asked for; the chain ends at a claim that finds nothing. Passing on after every
success, local ones included, cost a second store try (and a ``has_queued``) for most jobs of a busy queue: at 5,000
workers with 400 jobs a second, 800 woken claims a second of which 500 found nothing.

**What another server published may be missed**: while this server's LISTEN connection is down (a database restart,
a network cut) its NOTIFYs are lost. On each (re)connect the listener delivers :data:`MISSED`, which wakes the
oldest claim parked on every queue, as another server's notice does (a job queued meanwhile reaches a claim now, not
at its long-poll's end), counts in :meth:`Notifier.generation` (a worker whose last try found nothing tries
again), and wakes whoever follows a job (``job:<id>``, ``logs:<id>``), who reads it again. A worker's drain missed
meanwhile is found by the server's next touch of its parked workers (:mod:`scaleq.server.liveness`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass, field

#: A wake passed on through this many claims in a row that found nothing stops there (see the module's docstring).
MAX_EMPTY_PASSES = 50
#: The key delivered when other servers' notices may have been missed (see the module's docstring).
MISSED = "missed"


class Signal(asyncio.Event):
    """An :class:`asyncio.Event` that :func:`wait_any` can wait on together with others, with one future for all.

    Waiting on several plain events takes a task per event (``asyncio.wait``), and a parked claim waits on two: at
    5,000 idle workers those tasks and their coroutines, contexts and callbacks were about a third of the objects the
    server's garbage collector scans (see :mod:`scaleq.server.gcpolicy`). A signal resolves the futures handed to it
    when it is set, so :func:`wait_any` needs a single future and a timer."""

    def __init__(self) -> None:
        super().__init__()
        self.listeners: list[asyncio.Future[bool]] = []

    def set(self) -> None:
        super().set()
        listeners, self.listeners = self.listeners, []
        for future in listeners:
            if not future.done():
                future.set_result(True)


@dataclass(eq=False)
class ClaimWaiter:
    """One parked claim on ``queue``: ``event`` is set when it is its turn; ``mark`` is the order number at that
    wake (the claims parked before it are the ones a pass may reach)."""

    queue: str
    seq: int
    event: Signal = field(default_factory=Signal)
    mark: int = 0
    #: how many claims in a row tried the store for this wake and found nothing, before it came here
    empty: int = 0
    #: the woken claim has tried the store (or passed its wake on): nothing more is owed
    handled: bool = False
    #: the job this server's own wake stands for (one per job); None: another server's, which may stand for many
    job: str | None = None


class Notifier:
    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, Signal] = weakref.WeakValueDictionary()
        #: called with the keys of every local notify, to tell other servers (PostgreSQL NOTIFY)
        self.forward: Callable[[tuple[str, ...]], None] | None = None
        #: parked claims by queue, oldest first (dicts keep insertion order)
        self._claims: dict[str, dict[ClaimWaiter, None]] = {}
        self._seq = itertools.count()
        #: woken claims by queue that have not come back from their store try yet (see :meth:`others_out`)
        self._out: dict[str, set[ClaimWaiter]] = {}
        #: wakes delivered per queue, and those that may concern any queue (a worker's drain, MISSED): what a
        #: claim's empty answer was as of
        self._queue_wakes: dict[str, int] = {}
        self._any_wakes = 0

    def park(self, queue: str) -> ClaimWaiter:
        """A claim parks on ``queue``: it waits on the returned waiter's event, and :meth:`unpark` s it after."""
        waiter = ClaimWaiter(queue, next(self._seq))
        self._claims.setdefault(queue, {})[waiter] = None
        return waiter

    def unpark(self, waiter: ClaimWaiter | None) -> None:
        """The claim stops waiting. A wake it got and did not act on goes to the next claim in line."""
        if waiter is None:
            return
        parked = self._claims.get(waiter.queue)
        if parked is not None:
            parked.pop(waiter, None)
            if not parked:
                del self._claims[waiter.queue]
        if waiter.event.is_set() and not waiter.handled:
            waiter.handled = True
            self.back(waiter)
            self.wake_claims(waiter.queue, 1, before=waiter.mark, empty=waiter.empty, job=waiter.job)

    def back(self, woken: ClaimWaiter) -> None:
        """A woken claim is back from its store try (or gave its wake away)."""
        out = self._out.get(woken.queue)
        if out is not None:
            out.discard(woken)
            if not out:
                del self._out[woken.queue]

    def others_out(self, woken: ClaimWaiter) -> bool:
        """Whether claims woken on ``woken``'s queue, other than it, are still to come back from their store tries:
        a job left without a wake is then theirs to find (each takes the oldest it can), and the last one back, if
        it took a job its wake did not stand for, looks whether any still waits."""
        return any(w is not woken for w in self._out.get(woken.queue, ()))

    def pass_on(self, woken: ClaimWaiter, found: bool) -> int:
        """A woken claim that tried the store passes its wake on (see the module's docstring): ``found`` whether it
        took all it asked for. Once :data:`MAX_EMPTY_PASSES` claims in a row have found nothing, the wake stops; how
        many were woken (0 or 1)."""
        empty = 0 if found else woken.empty + 1
        if empty >= MAX_EMPTY_PASSES:
            return 0
        return self.wake_claims(woken.queue, 1, before=woken.mark, empty=empty, job=woken.job)

    @staticmethod
    def spent(woken: ClaimWaiter, took: Collection[str]) -> bool:
        """Whether a woken claim that took the jobs ``took`` has used its wake up: it stood for one job of this
        server's, and that job is among them."""
        return woken.job is not None and woken.job in took

    def wake_claims(
        self, queue: str, n: int, *, before: int | None = None, empty: int = 0, job: str | None = None
    ) -> int:
        """Wake the ``n`` oldest claims parked on ``queue`` (only those parked before order number ``before``, when
        given: a passed-on wake, after ``empty`` claims in a row found nothing; ``job``: the job a wake of this
        server's own stands for); how many were woken."""
        parked = self._claims.get(queue)
        if not parked:
            return 0
        mark = next(self._seq) if before is None else before
        woken = [w for w in itertools.islice(parked, n) if w.seq < mark]
        if woken:
            self._out.setdefault(queue, set()).update(woken)
        for w in woken:
            del parked[w]
            w.mark = mark
            w.empty = empty
            w.job = job
            w.event.set()
        if not parked:
            del self._claims[queue]
        return len(woken)

    def parked(self, queue: str) -> int:
        return len(self._claims.get(queue, ()))

    def waiting(self, queue: str) -> int:
        """How many claims parked on ``queue`` are inside their wait (past their last store try; a claim parks
        before its try, so :meth:`parked` counts those still trying too)."""
        return sum(1 for w in self._claims.get(queue, ()) if w.event.listeners)

    def generation(self, queue: str) -> tuple[int, int]:
        """How many wakes of ``queue``, and of any queue, this server has delivered: read before a store try, and
        unchanged after it, it says that nothing a claim on ``queue`` could take has been queued since (every path
        that queues a job notifies its queue: scaleq.server.liveness.OpenClaims.nothing_new)."""
        return self._queue_wakes.get(queue, 0), self._any_wakes

    def event(self, key: str) -> Signal:
        ev = self._events.get(key)
        if ev is None:
            ev = Signal()
            self._events[key] = ev
        return ev

    def notify(self, *keys: str, job: str | None = None) -> None:
        self.deliver(keys, job)
        if self.forward is not None:
            self.forward(keys)

    def deliver(self, keys: tuple[str, ...], job: str | None = None) -> None:
        """Wake the local waiters of ``keys`` (what another server published arrives here; ``job``: the one job a
        queue's key stands for, as in this server's own :meth:`submitted`)."""
        for key in keys:
            ev = self._events.pop(key, None)
            if ev is not None:
                ev.set()
            if key.startswith("queue:"):
                queue = key.removeprefix("queue:")
                self._queue_wakes[queue] = self._queue_wakes.get(queue, 0) + 1
                self.wake_claims(queue, 1, job=job)
            elif key.startswith("worker:"):
                self._any_wakes += 1
            elif key == MISSED:
                self._any_wakes += 1
                for queue in list(self._claims):
                    self.wake_claims(queue, 1)
                # those following a job (its end, its logs) read it again: a few reads, one per follower
                for followed in [k for k in list(self._events) if k.startswith(("job:", "logs:"))]:
                    ev = self._events.pop(followed, None)
                    if ev is not None:
                        ev.set()

    def submitted(self, queue: str, job_id: str) -> None:
        self.notify(f"queue:{queue}", f"job:{job_id}", "any", job=job_id)

    def changed(self, job_id: str) -> None:
        self.notify(f"job:{job_id}", "any")


async def wait_any(events: tuple[Signal, ...], timeout: float) -> bool:
    """Wait until any of ``events`` fires, up to ``timeout`` seconds; True when one did (one future, no tasks)."""
    if any(ev.is_set() for ev in events):
        return True
    if timeout <= 0:
        return False
    loop = asyncio.get_running_loop()
    future: asyncio.Future[bool] = loop.create_future()
    for ev in events:
        ev.listeners.append(future)
    timer = loop.call_later(timeout, _expire, future)
    try:
        return await future
    finally:
        timer.cancel()
        for ev in events:
            with contextlib.suppress(ValueError):  # a set signal has let go of its listeners already
                ev.listeners.remove(future)


def _expire(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)
