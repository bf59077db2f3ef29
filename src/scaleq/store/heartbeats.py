"""Heartbeats in batches: one store statement for all the heartbeats that arrived while the last one ran.

On PostgreSQL a heartbeat is one statement on a thread of the store's pool. A fleet of thousands beats hundreds of
times a second, and each round trip a thread makes waits for the interpreter's lock, which a busy event loop hands
over every few milliseconds: taken one by one, the heartbeats kept the pool's threads and the event loop passing the
lock back and forth, and the loop fell behind on everything else (a half-core server with 2,000 workers answered
claims seconds late, with its event loop 250 ms late at p99; docs/benchmarks.md). :class:`HeartbeatBatches` keeps
the heartbeats that arrive while a batch runs and sends them together, one round trip for many:

* at most :data:`IN_FLIGHT` batches are written at a time; a heartbeat that arrives while fewer run goes at once
  (alone, on a quiet server: no added wait), the others wait for a batch to end and go together in the next;
* a worker is in one batch at a time, once (a second heartbeat of the same worker waits for the next batch: a
  statement must not update one row twice, nor two statements race on it), and a batch holds at most
  :data:`MAX_BATCH`;
* each heartbeat's lease term counts from when its batch got a connection (as :func:`scaleq.store.sql.waited` does
  for an operation alone): a renewal never hands out a term already spent waiting in line;
* a batch that fails fails each of its heartbeats with the error (the database away: their callers answer 503 and
  the workers beat again), and the next batch is tried all the same.

The store gives :meth:`HeartbeatBatches.send` a function that runs one batch and answers, per worker, its state
(None: no such worker) and the leases still live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

#: Most heartbeats in one statement: a batch stays a short statement and its commit a short wait.
MAX_BATCH = 500
#: Batches written at once: more than one, so that a statement held up (a lock wait, a connection gone half-open)
#: holds up the heartbeats of its batch and not every heartbeat the server takes meanwhile.
IN_FLIGHT = 2


@dataclass
class Beat:
    worker_id: str
    now: float  # the caller's clock: recorded as the worker's last heartbeat
    term: float  # the lease term to grant from when the batch gets its connection
    held: list[str] | None  # the leases the worker says it holds (None: all of its leases, as older workers ask)
    queued: float = field(default_factory=lambda: time.monotonic())  # (looked up when made: tests fake the clock)
    answer: asyncio.Future[tuple[str | None, set[str]]] = field(init=False)

    def __post_init__(self) -> None:
        self.answer = asyncio.get_running_loop().create_future()

    def expires(self) -> float:
        """When the leases it renews expire, if the batch is written now: its term plus its wait in line."""
        return self.now + self.term + (time.monotonic() - self.queued)


Send = Callable[[list[Beat]], Awaitable[dict[str, tuple[str | None, set[str]]]]]


class HeartbeatBatches:
    def __init__(self, send: Send) -> None:
        self.send = send
        self._waiting: list[Beat] = []
        self._running: set[asyncio.Task[None]] = set()
        self._sending: set[str] = set()  # the workers of the batches running

    async def beat(
        self, worker_id: str, now: float, term: float, held: list[str] | None
    ) -> tuple[str | None, set[str]]:
        """The worker's state (None: no such worker) and which of its leases are live, once its batch is written."""
        beat = Beat(worker_id, now, term, held)
        self._waiting.append(beat)
        self._start()
        return await beat.answer

    def _start(self) -> None:
        """Start batches of what waits, while fewer than :data:`IN_FLIGHT` run."""
        while self._waiting and len(self._running) < IN_FLIGHT:
            batch: list[Beat] = []
            later: list[Beat] = []
            for beat in self._waiting:
                if beat.worker_id in self._sending or len(batch) >= MAX_BATCH:
                    later.append(beat)
                else:
                    self._sending.add(beat.worker_id)
                    batch.append(beat)
            self._waiting = later
            if not batch:
                return
            task = asyncio.create_task(self._write(batch))
            self._running.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._start()

    async def _write(self, batch: list[Beat]) -> None:
        try:
            answers = await self.send(batch)
        except Exception as exc:
            for beat in batch:
                if not beat.answer.done():
                    beat.answer.set_exception(exc)
            return
        except BaseException:  # cancelled (the server shutting down): nobody is left waiting for ever
            for beat in batch:
                beat.answer.cancel()
            raise
        finally:
            self._sending.difference_update(b.worker_id for b in batch)
        for beat in batch:
            if not beat.answer.done():  # (a caller that gave up cancelled its answer)
                beat.answer.set_result(answers.get(beat.worker_id, (None, set())))
