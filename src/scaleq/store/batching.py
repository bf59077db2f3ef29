"""Operations in batches: what queues up while SQLite's one store thread is busy runs as one transaction.

Every store operation is a function run whole on the store thread (:mod:`scaleq.store.sql`). On SQLite there is one
such thread and one connection, so under load operations wait their turn — and each then paid its own thread hop
(an executor hand-off, a wake-up of the event loop) and its own ``BEGIN IMMEDIATE`` … ``COMMIT``. A fleet of
thousands of workers makes thousands of small operations a second (claims, finishes, heartbeats), most of that cost
overhead around a statement or two.

So :class:`Batches` keeps the operations waiting in a list of its own and has the thread take *all* of them at once:

* one operation waiting runs exactly as before (its own transaction, or none);
* several run in one ``BEGIN IMMEDIATE`` … ``COMMIT``, each inside a ``SAVEPOINT``: one that raises is rolled back to
  its savepoint, alone, and its caller gets the exception as before; the others' work commits;
* their callers are answered after the ``COMMIT``, in one wake-up of the event loop;
* lease renewals and liveness touches (``first``) are taken before the operations merely waiting: a server short of
  CPU has a line of claims for the thread, and a heartbeat at the back of it came seconds late (heartbeat p50 265 ms
  at 5,000 workers with jobs flowing on the 2-core bench machine; 50 ms with this lane);
* a batch takes no more operations once those run have taken :data:`MAX_SECONDS` (the rest wait for the next), so
  the answers of the operations before a heavy one (a large blob, a purge) wait for it alone, not for all that came
  after it; and the thread is handed back between batches, so a migration or the store's close queued meanwhile is
  not starved.

Each caller sees exactly what running the operations one after another would have given: they run in arrival order
(renewals and touches ahead of the rest, which is an order too: operations waiting together are all pending at
once, so no caller could have seen another), on one connection, and none is answered before its work is durable.
Where the batch itself breaks — the ``COMMIT`` fails, or an error makes SQLite roll the whole transaction back
(``SQLITE_FULL``, ``SQLITE_IOERR``) — nothing of it was committed or answered, and each operation is run again on
its own, as if it had never been batched: so an operation must be safe to run twice up to its failure (a function
of the database and its arguments: one that consumes a stream sets its position inside itself).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("scaleq.store")

#: More than this many waiting operations are taken in two batches or more: one transaction stays short.
MAX_BATCH = 256
#: A batch takes no more operations once those run have taken this long: the rest wait for the next batch, so an
#: operation's answer waits for the commit of little more than the operations before it.
MAX_SECONDS = 0.02


@dataclass
class _Op:
    call: Callable[[], Any]
    transaction: bool  # run alone: inside a transaction of its own (else in autocommit, one statement)
    loop: asyncio.AbstractEventLoop
    first: bool = False
    future: asyncio.Future[Any] = field(init=False)

    def __post_init__(self) -> None:
        self.future = self.loop.create_future()


class Batches:
    """Runs operations on ``executor``'s one thread over ``conn()``, those waiting together in one transaction.

    ``transaction(conn)`` is the dialect's transaction (``BEGIN IMMEDIATE`` … ``COMMIT``, rolled back on error)."""

    def __init__(
        self,
        executor: Executor,
        conn: Callable[[], Any],
        transaction: Callable[[Any], AbstractContextManager[None]],
    ) -> None:
        self._executor = executor
        self._conn = conn
        self._transaction = transaction
        self._lock = threading.Lock()
        self._waiting: list[_Op] = []
        self._first: list[_Op] = []  # waiting too, but taken before the rest (see run's ``first``)
        self._draining = False
        self.batches = 0  # batches of two or more run (a test reads it)

    async def run(self, call: Callable[[], Any], transaction: bool, first: bool = False) -> Any:
        """Run ``call`` (inside a transaction of its own when run alone, if ``transaction``). With ``first`` it goes
        ahead of the operations merely waiting: all of them are pending at once, so any order among them is one
        their callers could have seen, and a lease renewal is not held up behind a backlog of claims."""
        op = _Op(call, transaction, asyncio.get_running_loop(), first)
        with self._lock:
            (self._first if first else self._waiting).append(op)
            start = not self._draining
            self._draining = True
        if start:
            self._submit()
        return await op.future

    def _submit(self) -> None:
        try:
            self._executor.submit(self._drain)
        except RuntimeError as exc:  # the executor is shut down (the store closed): fail what waits, not hang it
            with self._lock:
                stranded, self._first, self._waiting, self._draining = self._first + self._waiting, [], [], False
            _deliver(stranded, [(False, exc)] * len(stranded))

    def _drain(self) -> None:
        """On the store thread: run one batch of what waits, then hand the thread back (a migration or the close
        queued on the same executor gets its turn) and come back for the rest."""
        with self._lock:
            batch, self._first = self._first[:MAX_BATCH], self._first[MAX_BATCH:]
            room = MAX_BATCH - len(batch)
            batch, self._waiting = batch + self._waiting[:room], self._waiting[room:]
            if not batch:
                self._draining = False
                return
        outcomes: list[tuple[bool, Any]] = []
        try:
            outcomes = self._run(batch)
        except BaseException as exc:  # not an operation's own error (those are outcomes): fail the batch whole
            outcomes = [(False, exc if isinstance(exc, Exception) else RuntimeError(f"store thread: {exc!r}"))] * len(
                batch
            )
            raise
        finally:
            with self._lock:  # what the time limit left undone goes first next time
                for op in reversed(batch[len(outcomes) :]):
                    (self._first if op.first else self._waiting).insert(0, op)
                more = self._draining = bool(self._first or self._waiting)
            _deliver(batch[: len(outcomes)], outcomes)
            if more:
                self._submit()

    def _run(self, batch: list[_Op]) -> list[tuple[bool, Any]]:
        """The outcomes of the first operations of ``batch``, in order: all of them, or those run until they had
        taken :data:`MAX_SECONDS` (what comes after a heavy operation does not hold its answer, nor theirs)."""
        if len(batch) == 1:
            return [self._alone(batch[0])]
        conn = self._conn()
        outcomes: list[tuple[bool, Any]] = []
        started = time.monotonic()
        try:
            with self._transaction(conn):
                for op in batch:
                    if outcomes and time.monotonic() - started > MAX_SECONDS:
                        break
                    conn.execute("SAVEPOINT op")
                    try:
                        value = op.call()
                    except Exception as exc:
                        if not conn.in_transaction:  # SQLite rolled the whole batch back: run each on its own
                            raise _Broken from exc
                        conn.execute("ROLLBACK TO op")
                        conn.execute("RELEASE op")
                        outcomes.append((False, exc))
                    else:
                        conn.execute("RELEASE op")
                        outcomes.append((True, value))
            self.batches += 1
        except Exception as exc:
            log.warning("a batch of %d store operations failed as a whole (%s): each runs again alone", len(batch), exc)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            outcomes = [self._alone(op) for op in batch]
        return outcomes

    def _alone(self, op: _Op) -> tuple[bool, Any]:
        try:
            if op.transaction:
                with self._transaction(self._conn()):
                    return True, op.call()
            return True, op.call()
        except Exception as exc:
            return False, exc


class _Broken(Exception):
    """The batch's transaction is gone: it must be run again, operation by operation."""


def _deliver(ops: list[_Op], outcomes: list[tuple[bool, Any]]) -> None:
    """Hand each caller its outcome on its own event loop, one wake-up per loop."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, bool, Any]]] = {}
    for op, (ok, value) in zip(ops, outcomes, strict=True):
        by_loop.setdefault(op.loop, []).append((op, ok, value))
    for loop, answers in by_loop.items():
        try:
            loop.call_soon_threadsafe(_answer, answers)
        except RuntimeError:  # that loop is closed: nobody waits for these answers any more
            pass


def _answer(answers: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in answers:
        if op.future.cancelled():  # the caller left (its work stands, as with a thread hop)
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)
