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
* their callers are answered after the ``COMMIT``, in one wake-up of the event loop.

Each caller sees exactly what running the operations one after another, in arrival order, would have given: they
run in that order, on one connection, and none is answered before its work is durable. Where the batch itself
breaks — the ``COMMIT`` fails, or an error makes SQLite roll the whole transaction back (``SQLITE_FULL``,
``SQLITE_IOERR``) — nothing of it was committed or answered, and each operation is run again on its own, as if it had
never been batched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("scaleq.store")

#: More than this many waiting operations are taken in two batches or more: one transaction stays short.
MAX_BATCH = 256


@dataclass
class _Op:
    call: Callable[[], Any]
    transaction: bool  # run alone: inside a transaction of its own (else in autocommit, one statement)
    loop: asyncio.AbstractEventLoop
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
        self._draining = False
        self.batches = 0  # batches of two or more run (a test reads it)

    async def run(self, call: Callable[[], Any], transaction: bool) -> Any:
        op = _Op(call, transaction, asyncio.get_running_loop())
        with self._lock:
            self._waiting.append(op)
            start = not self._draining
            self._draining = True
        if start:
            self._executor.submit(self._drain)
        return await op.future

    def _drain(self) -> None:
        """On the store thread: run what waits, batch after batch, until nothing does."""
        while True:
            with self._lock:
                batch, self._waiting = self._waiting[:MAX_BATCH], self._waiting[MAX_BATCH:]
                if not batch:
                    self._draining = False
                    return
            outcomes = list(self._run(batch))
            by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Op, bool, Any]]] = {}
            for op, (ok, value) in zip(batch, outcomes, strict=True):
                by_loop.setdefault(op.loop, []).append((op, ok, value))
            for loop, answers in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_answer, answers)
                except RuntimeError:  # that loop is closed: nobody waits for these answers any more
                    pass

    def _run(self, batch: list[_Op]) -> Iterator[tuple[bool, Any]]:
        if len(batch) == 1:
            yield self._alone(batch[0])
            return
        conn = self._conn()
        outcomes: list[tuple[bool, Any]] = []
        try:
            with self._transaction(conn):
                for op in batch:
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
            outcomes = [self._alone(op) for op in batch]
        yield from outcomes

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


def _answer(answers: list[tuple[_Op, bool, Any]]) -> None:
    for op, ok, value in answers:
        if op.future.cancelled():  # the caller left (its work stands, as with a thread hop)
            continue
        if ok:
            op.future.set_result(value)
        else:
            op.future.set_exception(value)
