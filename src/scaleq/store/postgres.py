"""PostgreSQL store: several stateless servers on one database.

The operations are :class:`scaleq.store.sql.SQLStore`'s, run on a small thread pool over a psycopg 3 connection pool
(``psycopg_pool``). Claims use ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on or share a row.
Wake-ups cross servers with LISTEN/NOTIFY: whatever a server notifies locally it also publishes on the ``scaleq``
channel (batched), and a listener task feeds what other servers publish into its own notifier. A database restart is
survived: the pool replaces broken connections, the listener reconnects with backoff, and a request that fails while
the database is away gets 503 (workers retry), so nothing acknowledged is lost.

The hot paths are one statement each and skip the thread pool: a submit (``insert_new_job``) and the worker
protocol's claim with the finishes riding along (``worker_claim``) run on async connections of their own in the
event loop, whose planner settings keep the claim an ordered index scan at any queue length. Pooled connections
that served an operation within the last second are handed out without a health check (one round trip saved per
operation), and wake-ups are published from an async connection of their own with ``synchronous_commit`` off.

The schema is created and migrated by scaleq (:mod:`scaleq.store.migrations`; the versions applied are rows of table
``scaleq_schema``), each migration in its own transaction under an advisory lock, so servers starting together
migrate once; a database newer than the code is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from scaleq.jobs import Claim, Job, JobDefinition
from scaleq.loop import wait_set
from scaleq.notify import MISSED
from scaleq.store import rows
from scaleq.store.base import ArrayRecord, FinishResult, NotFound, Submission, WorkerClaim
from scaleq.store.heartbeats import Beat, HeartbeatBatches
from scaleq.store.migrations import Migration
from scaleq.store.queries import load
from scaleq.store.sql import SQLStore, waited

CHANNEL = "scaleq"
#: Keys whose NOTIFY goes out at once: they wake workers parked in a claim (and the autoscaler, with "any").
URGENT = ("queue:", "worker:")
#: At most this long, job changes alone wait to be published together.
LAZY_PUBLISH = 0.01
#: A heartbeat batch that PostgreSQL rolls back as a deadlock's victim is tried this many times in all.
DEADLOCK_TRIES = 3
#: A pooled connection idle for longer than this is checked before it is handed out.
CHECK_AFTER = 1.0
#: NOTIFY payloads start with a line naming the sending store (older servers' payloads do not).
ORIGIN = "from:"
#: A NOTIFY payload must be shorter than 8000 bytes.
MAX_PAYLOAD = 7900
#: Planner settings of the hot-path connections (see worker_claim and claim_plan in queries/postgres.sql).
CLAIM_OPTIONS = "-c enable_seqscan=off -c enable_bitmapscan=off -c enable_sort=off"
#: Deltas folded (by this store, since its last vacuum of them) past which their table is vacuumed: its dead rows
#: slow every queue_stats. A bulk load through the API folds ~5,000 a round, so it is a running count.
VACUUM_DELTAS_AFTER = 10_000
#: The LISTEN connection's TCP keepalives (libpq's): a peer gone silently is noticed after ~10 + 3 x 5 s.
LISTEN_KEEPALIVES: dict[str, Any] = {
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}
#: A LISTEN connection that lasted this long was a working one: the next reconnect starts its backoff afresh.
LISTEN_STABLE_SECONDS = 30.0
#: How long :meth:`PostgresStore.listen` waits for its first LISTEN before the server serves without it (a database
#: that does not answer); the listener goes on trying, and its first LISTEN delivers MISSED.
LISTEN_FIRST_SECONDS = 10.0
log = logging.getLogger("scaleq.store")


class PostgresStore(SQLStore):
    dialect = "postgres"
    Q = load("postgres")
    single_statement_batches = True

    def __init__(self, url: str, *, pool_size: int = 8, durability: str = "normal", migrate: bool = True) -> None:
        super().__init__(threads=pool_size, migrate=migrate)
        self.url = url
        self.pool_size = pool_size
        self._beats = HeartbeatBatches(self._heartbeat_batch)
        self.durability = durability
        self._pool: ConnectionPool | None = None
        self._hot: AsyncConnectionPool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[str] = set()
        self._flush: asyncio.Task[None] | None = None
        self._hurry = asyncio.Event()  # an urgent key is pending: publish without waiting
        self._publisher: psycopg.AsyncConnection | None = None
        self._origin = f"{ORIGIN}{secrets.token_hex(8)}"  # first line of what we publish, to skip our own
        self._used: dict[int, float] = {}  # id(connection) -> when it last served an operation without error
        self._folded = 0  # queue-count deltas folded here since this store last vacuumed their table

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        assert self._pool is not None, "store is not open"
        with self._pool.connection() as conn:
            yield conn
            self._used[id(conn)] = time.monotonic()  # (not reached when the operation failed)

    def _check(self, conn: psycopg.Connection) -> None:
        """The pool's health check of a connection it hands out, skipped for one that just served an operation
        without error: on the hot path the check would be one more round trip per operation. A connection that
        broke since (the database restarted in that second) fails its operation, which answers 503 and is
        retried; the pool then replaces it."""
        if time.monotonic() - self._used.get(id(conn), -CHECK_AFTER) >= CHECK_AFTER:
            ConnectionPool.check_connection(conn)

    @contextmanager
    def _transaction(self, conn: psycopg.Connection) -> Iterator[None]:
        with conn.transaction():
            yield

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.row_factory = dict_row  # type: ignore[assignment]
        if self.durability == "strict":
            conn.execute("SET synchronous_commit = on")

    def _connect_sync(self) -> None:
        self._pool = self._new_pool("scaleq", {})
        self._pool.open(wait=True, timeout=15)

    def _where(self) -> str:
        return "the database"

    def _schema_version(self, conn: psycopg.Connection) -> int:
        present: dict[str, Any] | None = conn.execute(self.Q["schema_table"]).fetchone()  # type: ignore[assignment]
        if present is None or not present["present"]:
            return 0
        row: dict[str, Any] | None = conn.execute(self.Q["schema_version"]).fetchone()  # type: ignore[assignment]
        return int(row["version"]) if row is not None and row["version"] is not None else 0

    def _lock_schema(self, conn: psycopg.Connection) -> None:
        conn.execute(self.Q["schema_lock"])

    def _apply(self, conn: psycopg.Connection, migration: Migration) -> None:
        conn.execute(migration.sql)  # several statements: allowed, as no parameters are passed
        conn.execute(self.Q["record_version"], {"version": migration.version})

    # -- the hot paths: one statement each ---------------------------------------------------------------------

    async def submit(
        self,
        queue: str,
        definition: JobDefinition,
        *,
        priority: int,
        max_attempts: int,
        rerun: bool,
        now: float,
        retries: int = 0,
        retry_on_exit_codes: list[int] | None = None,
    ) -> tuple[Job, bool]:
        job = rows.job_params(queue, definition, priority, max_attempts, retries, retry_on_exit_codes)
        params = {**job, "now": now}
        found = await self._hot_all("insert_new_job", params)
        if found:
            return rows.job(found[0]), True
        # it exists: answer with it, or queue it again on rerun (a transaction of several statements)
        return await super().submit(
            queue,
            definition,
            priority=priority,
            max_attempts=max_attempts,
            rerun=rerun,
            now=now,
            retries=retries,
            retry_on_exit_codes=retry_on_exit_codes,
        )

    async def submit_many(
        self, submissions: list[Submission], now: float, array: ArrayRecord | None = None
    ) -> list[tuple[Job, bool]]:
        """One transaction; the new jobs are inserted with one pipelined ``executemany`` (no round trip per job),
        those that exist already take the general path (found, or requeued on rerun)."""
        return await self.tx(lambda: self._submit_batch(submissions, now, array))

    def _submit_batch(
        self, submissions: list[Submission], now: float, array: ArrayRecord | None
    ) -> list[tuple[Job, bool]]:
        self._insert_array(array, now)
        params = [
            {
                **rows.job_params(
                    s.queue,
                    s.definition,
                    s.priority,
                    s.max_attempts,
                    s.retries,
                    s.retry_on_exit_codes,
                    s.array_id,
                    s.array_index,
                ),
                "now": now,
            }
            for s in submissions
        ]
        inserted: dict[str, Any] = {}
        with self.db.cursor() as cur:
            cur.executemany(self.Q["insert_new_job"], params, returning=True)
            while True:
                row = cur.fetchone()
                if row is not None:
                    inserted[row["id"]] = row
                if not cur.nextset():
                    break
        done = []
        for s, p in zip(submissions, params, strict=True):
            row = inserted.pop(p["id"], None)  # (popped: the same job twice in a batch is new only the first time)
            done.append((rows.job(row), True) if row is not None else self._submit(s, now))
        return done

    async def worker_claim(
        self,
        worker_id: str,
        n: int,
        now: float,
        lease_seconds: float,
        finishes: list[tuple[str, FinishResult]] | None = None,
    ) -> WorkerClaim:
        """One statement (worker_claim) on a hot-path connection."""
        finishes = finishes or []
        wait, batch = waited(), _batch(finishes)

        def params() -> dict[str, Any]:  # (made once a connection is ours: see waited)
            expires = now + lease_seconds + wait()
            return {"worker_id": worker_id, "n": max(n, 0), "now": now, "expires": expires, **batch}

        found = await self._hot_all("worker_claim", params)
        claim_rows = [r for r in found if r["finished_lease"] is None]
        if not claim_rows:
            raise NotFound(f"no worker {worker_id}; register first")
        done = {r["finished_lease"]: r for r in found if r["finished_lease"]}
        if all(lease in done for lease, _ in finishes):
            finished: list[Job | None] = [rows.job(done[lease]) for lease, _ in finishes]
        else:  # some were not finished now: repeated finishes, or stale leases (rare; a few lookups)
            finished = await self._run(self._finished, finishes, done)
        claimed = sorted((r for r in claim_rows if r["id"] is not None), key=lambda r: (-r["priority"], r["seq"]))
        claims = [Claim(job=rows.job(r), attempt=r["attempt_seq"], lease=r["lease"]) for r in claimed]
        return WorkerClaim(claim_rows[0]["worker_queue"], claim_rows[0]["worker_state"], claims, finished)

    async def heartbeat(
        self, worker_id: str, now: float, lease_seconds: float, held: list[str] | None = None
    ) -> tuple[str, set[str]]:
        """In a batch with the other heartbeats that arrive meanwhile (:mod:`scaleq.store.heartbeats`)."""
        state, live = await self._beats.beat(worker_id, now, lease_seconds, held)
        if state is None:
            raise NotFound(f"no worker {worker_id}; register first")
        return state, live

    async def _heartbeat_batch(self, beats: list[Beat]) -> dict[str, tuple[str | None, set[str]]]:
        """One statement (worker_heartbeats) on a thread of the store's pool: a thread holds its connection for the
        round trip alone, where an async connection waits for a busy event loop (see docs/benchmarks.md)."""

        # in worker order: where the plan follows the arrays, rows are locked in one order (the retry covers the rest)
        beats = sorted(beats, key=lambda b: b.worker_id)

        def write() -> list[Any]:
            return self._all(
                "worker_heartbeats",
                worker_ids=[b.worker_id for b in beats],
                nows=[b.now for b in beats],
                expires=[b.expires() for b in beats],  # (made once the connection is ours: the wait counts)
                helds=[None if b.held is None else json.dumps(b.held) for b in beats],
            )

        def op() -> list[Any]:
            # A batch renews many workers' leases in one statement, and the sweep that expires leases takes the same
            # rows in another order: PostgreSQL rolls one of the two back. Renewing again is safe (nothing of the
            # statement was kept), so the batch is tried again rather than failed.
            for _ in range(DEADLOCK_TRIES - 1):
                with contextlib.suppress(psycopg.errors.DeadlockDetected):
                    return write()
            return write()

        answers: dict[str, tuple[str | None, set[str]]] = {}
        for r in await self._run(op):
            state, live = answers.setdefault(r["worker_id"], (r["state"], set()))
            if r["lease"] is not None:
                live.add(r["lease"])
        return answers

    def _claim_rows(self, worker_id: str, caps: dict[str, Any], n: int, now: float, lease: float) -> list[Claim]:
        self.db.execute(self.Q["claim_plan"])  # runs inside the claim's transaction: see claim_plan
        return super()._claim_rows(worker_id, caps, n, now, lease)

    def _finish_rows(self, finishes: list[tuple[str, FinishResult]], now: float) -> dict[str, Any]:
        return {r["finished_lease"]: r for r in self._all("finish_batch", now=now, **_batch(finishes))}

    def _touch_rows(self, ids: str, now: float) -> list[Any]:
        return self._all("touch_workers", ids=ids, now=now)

    async def fold_queue_counts(self) -> None:
        """The statement triggers' deltas summed into queue_counts (migration 0011), once per housekeeping tick; the
        deltas' table vacuumed once ``VACUUM_DELTAS_AFTER`` have been folded since its last vacuum here (see
        vacuum_queue_count_deltas). A vacuum that fails (PostgreSQL before 12 has no SKIP_LOCKED, a statement
        timeout in the URL) is logged and left to autovacuum: it never fails the round."""

        def op() -> int:
            row = self._one("fold_queue_counts")
            return int(row["n"]) if row is not None else 0

        self._folded += await self._run(op)
        if self._folded < VACUUM_DELTAS_AFTER:
            return
        self._folded = 0
        try:
            await self._run(lambda: self.db.execute(self.Q["vacuum_queue_count_deltas"]))
        except psycopg.Error as exc:
            log.warning("could not vacuum queue_count_deltas (autovacuum will): %s", exc)

    def _new_pool(self, name: str, kwargs: dict[str, Any]) -> ConnectionPool:
        return ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, **kwargs},
            configure=self._configure,
            check=self._check,
            open=False,
            name=name,
        )

    def _close_sync(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def open(self) -> None:
        await super().open()
        # The hot paths (submit, the worker protocol's claim) run on async connections of their own, in the event
        # loop: no thread hop. Their planner settings keep the claim an ordered scan of jobs_claim that stops after
        # n rows, however long the queue (see claim_plan in queries/postgres.sql); set per connection, they cost
        # no statement.
        given = conninfo_to_dict(self.url).get("options")
        options = " ".join(filter(None, [str(given) if given else None, CLAIM_OPTIONS]))
        self._hot = AsyncConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True, "options": options},
            configure=self._configure_async,
            check=self._check_async,
            open=False,
            name="scaleq-hot",
        )
        await self._hot.open(wait=True, timeout=15)

    async def _configure_async(self, conn: psycopg.AsyncConnection) -> None:
        conn.row_factory = dict_row  # type: ignore[assignment]
        if self.durability == "strict":
            await conn.execute("SET synchronous_commit = on")

    async def _check_async(self, conn: psycopg.AsyncConnection) -> None:
        if time.monotonic() - self._used.get(id(conn), -CHECK_AFTER) >= CHECK_AFTER:  # see _check
            await AsyncConnectionPool.check_connection(conn)

    async def _hot_all(self, query: str, params: dict[str, Any] | Callable[[], dict[str, Any]]) -> list[dict[str, Any]]:
        """One statement on a hot-path connection, in the event loop (``params`` may be made once it has one)."""
        assert self._hot is not None, "store is not open"
        async with self._hot.connection() as conn:
            values = params() if callable(params) else params
            found = await (await conn.execute(self.Q[query], values)).fetchall()
            self._used[id(conn)] = time.monotonic()
        return found  # type: ignore[return-value]

    async def close(self) -> None:
        for task in (self._listener, self._flush):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._publisher is not None:
            with contextlib.suppress(psycopg.Error, OSError):
                await self._publisher.close()
            self._publisher = None
        if self._hot is not None:
            await self._hot.close()
            self._hot = None
        await super().close()

    # -- cross-server wake-ups --------------------------------------------------------------------------------

    def publish(self, keys: tuple[str, ...]) -> None:
        """Queue keys for NOTIFY. Wake-ups of waiting workers (a queue's or a worker's key) go out in this event-loop
        turn; job changes alone (what job followers on other servers wait for) are gathered for up to LAZY_PUBLISH
        seconds, so that a stream of claims and finishes costs one NOTIFY per interval, not one per job."""
        self._pending.update(keys)
        if any(k.startswith(URGENT) for k in keys):
            self._hurry.set()
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        """Send what is pending (and whatever is queued meanwhile) on the publisher connection: an async connection
        of its own, so a publish costs the event loop no thread hop and no pooled connection, with
        ``synchronous_commit`` off — a NOTIFY has nothing to make durable, so it need not wait for a WAL flush."""
        await wait_set(self._hurry, LAZY_PUBLISH)
        await asyncio.sleep(0)  # whatever else this turn queues goes in the same NOTIFY
        while self._pending:
            self._hurry.clear()
            keys, self._pending = self._pending, set()
            try:
                if self._publisher is None or self._publisher.closed:
                    self._publisher = await psycopg.AsyncConnection.connect(self.url, autocommit=True)
                    await self._publisher.execute("SET synchronous_commit = off")
                for payload in _payloads(self._origin, sorted(keys)):
                    await self._publisher.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload))
            except (psycopg.Error, OSError) as exc:
                log.warning("could not publish wake-ups: %s", exc)
                if self._publisher is not None:
                    with contextlib.suppress(psycopg.Error, OSError):
                        await self._publisher.close()
                    self._publisher = None

    async def listen(self, deliver: Callable[[tuple[str, ...]], None]) -> None:
        """Start feeding other servers' wake-ups into ``deliver`` (reconnecting as needed); return once the first
        LISTEN is in place, so a server serves only when it hears the others (a NOTIFY sent before it is lost), or
        once its first attempt failed or took ``LISTEN_FIRST_SECONDS``.

        Returning at once made the first LISTEN's ``MISSED`` land whenever the connection came up: on a loaded
        machine after claims had parked and a job had come, as a second wake for that job."""
        first = asyncio.Event()
        self._listener = asyncio.create_task(self._listen(deliver, first))
        if not await wait_set(first, LISTEN_FIRST_SECONDS):
            log.warning("no LISTEN connection after %.0f s; serving, and trying on", LISTEN_FIRST_SECONDS)
        elif self._listener.done():
            self._listener.result()  # it died of something no reconnect mends: the server does not start without it

    async def _listen(self, deliver: Callable[[tuple[str, ...]], None], first: asyncio.Event) -> None:
        """Each (re)connect delivers MISSED. TCP keepalives make a connection cut silently (a half-open socket, no
        traffic on it to fail) end within ~25 s rather than the kernel's two hours; the backoff starts again from
        0.2 s only after a connection that lasted, so one accepted and cut at once, again and again (a proxy, an
        idle-session timeout), is not a MISSED every 0.2 s."""
        try:
            await self._listen_on(deliver, first)
        finally:
            first.set()

    async def _listen_on(self, deliver: Callable[[tuple[str, ...]], None], first: asyncio.Event) -> None:
        delay = 0.2
        while True:
            listening = None
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, **LISTEN_KEEPALIVES
                ) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    listening = time.monotonic()
                    deliver(("any", MISSED))  # anything may have happened while we were not listening
                    first.set()
                    async for note in conn.notifies():
                        keys = note.payload.split("\n")
                        if keys[0].startswith(ORIGIN):
                            if keys[0] == self._origin:
                                continue  # our own: delivered locally when it was sent
                            keys = keys[1:]
                        deliver(tuple(keys))
            except (psycopg.Error, OSError) as exc:
                if listening is not None and time.monotonic() - listening > LISTEN_STABLE_SECONDS:
                    delay = 0.2
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", exc, delay)
                first.set()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)


def _batch(finishes: list[tuple[str, FinishResult]]) -> dict[str, list[Any]]:
    """Finishes as the array parameters of ``finish_batch`` and ``worker_claim``."""
    return {
        "leases": [lease for lease, _ in finishes],
        "reasons": [r.reason for _, r in finishes],
        "exit_codes": [r.exit_code for _, r in finishes],
        "errors": [r.error for _, r in finishes],
    }


def _payloads(origin: str, keys: list[str]) -> Iterator[str]:
    """``origin`` and the keys, one per line, cut into payloads NOTIFY accepts."""
    lines: list[str] = [origin]
    size = len(origin)
    for key in keys:
        if size + 1 + len(key) > MAX_PAYLOAD and len(lines) > 1:
            yield "\n".join(lines)
            lines, size = [origin], len(origin)
        lines.append(key)
        size += 1 + len(key)
    if len(lines) > 1:
        yield "\n".join(lines)
