"""The SQL store: every operation written once, over a small per-dialect adapter.

Each store operation is a plain function run whole on a worker thread with one connection, inside one transaction:
nothing interleaves with it, and the event loop pays one thread hop per operation, not one per statement. A dialect
(:mod:`scaleq.store.sqlite`, :mod:`scaleq.store.postgres`) supplies its named queries (``queries/common.sql`` with
``queries/<dialect>.sql``), how to get a connection, how to run a transaction and how to read, lock and record its
schema version; the migrations (:mod:`scaleq.store.migrations`) are applied here, the same way for both. The state
machine lives in the SQL: every transition is one conditional statement, so concurrent servers or a late worker can
never both win one.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, TypeVar

from scaleq.jobs import PROGRAM_FAILURES, Capabilities, Claim, Job, JobDefinition, Worker
from scaleq.store import migrations, rows
from scaleq.store.base import (
    BLOB_PART,
    Ahead,
    AmbiguousId,
    ArrayRecord,
    ArrayStatus,
    Attempt,
    Event,
    Expired,
    FinishResult,
    GroupStatus,
    JobsPage,
    LogChunk,
    LogsAppended,
    NotFound,
    OutputFile,
    Purged,
    QueuePosition,
    QueueStats,
    SchemaStatus,
    StaleLease,
    Submission,
    TokenRecord,
    Usage,
    WorkerClaim,
    WorkerOffer,
    WorkerTally,
    log_cap_note,
)

T = TypeVar("T")
Row = Any
log = logging.getLogger("scaleq.store")


def waited() -> Callable[[], float]:
    """Seconds since this was called: how long an operation then waited for the store (in line for its thread or a
    connection), added to the term of the leases it grants or renews. A lease lasts its full term from when it is
    written: an overloaded server whose operations wait seconds in line must not hand out leases already half spent
    (a fleet too large for its server lost them by the thousand: the worker's first heartbeat came too late). The
    times recorded stay the caller's ``now``."""
    called = time.monotonic()
    return lambda: time.monotonic() - called


class SQLStore:
    """Operations shared by the dialects. Subclasses set ``dialect`` and ``Q`` and implement
    ``_connect_sync``/``_close_sync``, ``_connection``, ``_transaction`` and the schema hooks (``_schema_version``,
    ``_lock_schema``, ``_apply``)."""

    dialect: str
    Q: dict[str, str]
    #: The dialect finishes and claims a batch in one statement, so it needs no explicit transaction around it.
    single_statement_batches = False

    def __init__(self, threads: int, *, migrate: bool = True) -> None:
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"scaleq-{type(self).__name__}")
        self._local = threading.local()
        #: Apply pending migrations when the store opens (``scaleq migrate --check`` opens without).
        self.migrate_on_open = migrate

    # -- plumbing ---------------------------------------------------------------------------------------------

    @contextmanager
    def _connection(self) -> Iterator[Any]:
        raise NotImplementedError

    @contextmanager
    def _transaction(self, conn: Any) -> Iterator[None]:
        raise NotImplementedError

    def _connect_sync(self) -> None:
        raise NotImplementedError

    def _close_sync(self) -> None:
        raise NotImplementedError

    def _open_sync(self) -> None:
        self._connect_sync()
        if self.migrate_on_open:
            try:
                self._migrate_sync()
            except BaseException:
                self._close_sync()
                raise

    # -- schema -----------------------------------------------------------------------------------------------

    def _where(self) -> str:
        """The database, as messages name it."""
        raise NotImplementedError

    def _schema_version(self, conn: Any) -> int:
        """The last migration applied (0 for an empty database)."""
        raise NotImplementedError

    def _lock_schema(self, conn: Any) -> None:
        """Inside a transaction: keep other migrators out until it ends."""
        raise NotImplementedError

    def _apply(self, conn: Any, migration: migrations.Migration) -> None:
        """Inside a transaction: run the migration and record its version."""
        raise NotImplementedError

    def _migrate_sync(self, to: int | None = None) -> list[str]:
        """Apply what is pending (up to version ``to``; all of it when None), one migration per transaction under
        the schema lock, reading the version again in each (another server may be migrating too); refuse a database
        newer than this code."""
        applied: list[str] = []
        with self._connection() as conn:
            while True:
                with self._transaction(conn):
                    self._lock_schema(conn)
                    todo = migrations.pending(self.dialect, self._schema_version(conn), self._where())
                    todo = [m for m in todo if to is None or m.version <= to]
                    if todo:
                        self._apply(conn, todo[0])
                if not todo:
                    return applied
                log.info("%s: applied schema migration %s", self._where(), todo[0].label)
                applied.append(todo[0].label)

    def _schema_status_sync(self) -> SchemaStatus:
        with self._connection() as conn:
            version = self._schema_version(conn)
        todo = migrations.pending(self.dialect, version, self._where())
        return SchemaStatus(version, migrations.head(self.dialect), [m.label for m in todo])

    async def schema_status(self) -> SchemaStatus:
        """Where the database stands (raises SchemaTooNew when it is newer than this code)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._schema_status_sync)

    async def migrate(self, to: int | None = None) -> list[str]:
        """Apply the pending migrations (up to version ``to``: the tests build databases at earlier versions); their
        labels, in order (none when it was up to date)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._migrate_sync, to)

    async def _run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on a store thread with a connection in ``self.db`` (no transaction: one statement)."""
        return await self._in_thread(False, fn, *args, **kwargs)

    async def tx(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` on a store thread inside one transaction."""
        return await self._in_thread(True, fn, *args)

    async def _first(self, fn: Callable[[], T], transaction: bool = True) -> T:
        """Run ``fn`` as :meth:`tx` (or :meth:`_run`) does; where operations wait their turn for the store's thread
        (SQLite), ahead of those merely waiting: a lease renewal must not queue behind a burst of claims."""
        return await self._in_thread(transaction, fn)

    async def _in_thread(self, transaction: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        def call() -> T:
            with self._connection() as conn:
                self._local.conn = conn
                try:
                    if transaction:
                        with self._transaction(conn):
                            return fn(*args, **kwargs)
                    return fn(*args, **kwargs)
                finally:
                    self._local.conn = None

        return await asyncio.get_running_loop().run_in_executor(self._executor, functools.partial(call))

    @property
    def db(self) -> Any:
        conn = getattr(self._local, "conn", None)
        assert conn is not None, "store operations run on a store thread"
        return conn

    async def open(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._open_sync)

    async def close(self) -> None:
        await asyncio.get_running_loop().run_in_executor(self._executor, self._close_sync)
        self._executor.shutdown(wait=True)

    def publish(self, keys: tuple[str, ...]) -> None:
        """Tell other servers on this database about wake-ups (a no-op where only one server can exist)."""

    async def listen(self, deliver: Callable[[tuple[str, ...]], None]) -> None:
        """Feed other servers' wake-ups into ``deliver`` (a no-op where only one server can exist)."""

    async def ping(self) -> None:
        await self._run(lambda: self.db.execute("SELECT 1").fetchone())

    def _one(self, query: str, **params: Any) -> Row | None:
        return self.db.execute(self.Q[query], params).fetchone()

    def _many(self, query: str, seq: list[dict[str, Any]]) -> None:
        if seq:
            self.db.cursor().executemany(self.Q[query], seq)

    def _all(self, query: str, **params: Any) -> list[Row]:
        return self.db.execute(self.Q[query], params).fetchall()

    # -- jobs -------------------------------------------------------------------------------------------------

    def _submit(self, s: Submission, now: float) -> tuple[Job, bool]:
        params = rows.job_params(
            s.queue,
            s.definition,
            s.priority,
            s.max_attempts,
            s.retries,
            s.retry_on_exit_codes,
            s.array_id,
            s.array_index,
        )
        seq = self._one("next_seq")["seq"]  # type: ignore[index]
        created = self.db.execute(self.Q["insert_job"], {**params, "seq": seq, "now": now}).rowcount == 1
        if not created and s.rerun:
            created = (
                self.db.execute(
                    self.Q["requeue_finished"],
                    {
                        "id": params["id"],
                        "seq": seq,
                        **{k: params[k] for k in ("priority", "max_attempts", "retries", "retry_on_exit_codes")},
                    },
                ).rowcount
                == 1
            )
            if created:
                self.db.execute(self.Q["clear_outputs"], {"job_id": params["id"]})
        return rows.job(self._one("get_job", id=params["id"])), created

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
        s = Submission(queue, definition, priority, max_attempts, rerun, retries, retry_on_exit_codes)
        return await self.tx(lambda: self._submit(s, now))

    async def submit_many(
        self, submissions: list[Submission], now: float, array: ArrayRecord | None = None
    ) -> list[tuple[Job, bool]]:
        def op() -> list[tuple[Job, bool]]:
            self._insert_array(array, now)
            return [self._submit(s, now) for s in submissions]

        return await self.tx(op)

    def _insert_array(self, array: ArrayRecord | None, now: float) -> None:
        if array is not None:
            params = {"id": array.id, "queue": array.queue, "name": array.name, "size": array.size, "now": now}
            self.db.execute(self.Q["insert_array"], params)

    async def purge(self, before: float, queue: str | None = None) -> Purged:
        params = {"before": before, "queue": queue}

        def count(query: str, **extra: Any) -> int:
            return self.db.execute(self.Q[query], {**params, **extra}).rowcount

        def op() -> Purged:
            candidates = [r["sha256"] for r in self._all("purge_candidates", **params) if r["sha256"]]
            count("purge_attempts")
            logs, outputs, jobs = count("purge_logs"), count("purge_outputs"), count("purge_jobs")
            blobs = count("purge_blobs", candidates=json.dumps(candidates)) if candidates else 0
            if candidates:
                count("purge_blob_parts", candidates=json.dumps(candidates))
            return Purged(jobs, logs, outputs, blobs, count("purge_events"))

        return await self.tx(op)

    def _by_id(self, kind: str, given: str, exact: str, by_prefix: str) -> Row:
        """A job's or an array's row by its full id or a unique prefix of at least 6 hex digits."""
        if len(given) == 64:
            row = self._one(exact, id=given)
            if row is None:
                raise NotFound(f"no {kind} {given}")
            return row
        if len(given) < 6 or any(c not in "0123456789abcdef" for c in given):
            raise NotFound(f"no {kind} {given} (give the full id or a prefix of at least 6 hex digits)")
        found = self._all(by_prefix, prefix=given)
        if not found:
            raise NotFound(f"no {kind} {given}")
        if len(found) > 1:
            raise AmbiguousId(f"{given} matches more than one {kind}; give more of the id")
        return found[0]

    def _get_job(self, job_id: str) -> Job:
        return rows.job(self._by_id("job", job_id, "get_job", "find_jobs_by_prefix"))

    async def get_job(self, job_id: str) -> Job:
        return await self._run(self._get_job, job_id)

    async def list_jobs(
        self,
        *,
        queue: str | None,
        state: str | None,
        limit: int,
        reason: str | None = None,
        before: int | None = None,
    ) -> list[Job]:
        return (await self.list_jobs_page(queue=queue, state=state, reason=reason, limit=limit, before=before)).jobs

    async def list_jobs_page(
        self, *, queue: str | None, state: str | None, limit: int, reason: str | None = None, before: int | None = None
    ) -> JobsPage:
        # one query per filter, each seeking its own index (see list_jobs in common.sql)
        query = "list_jobs"
        if queue is not None:
            query = "list_jobs_of_queue"
        elif state is not None:
            query = "list_jobs_in_state"
        params = {"queue": queue, "state": state, "reason": reason, "limit": limit + 1}
        found = await self._run(self._all, query, **params, before=(1 << 63) - 1 if before is None else before)
        more = len(found) > limit
        found = found[:limit]
        return JobsPage([rows.job(r) for r in found], int(found[-1]["seq"]) if more else None)

    async def queue_position(self, job_id: str) -> QueuePosition:
        row = await self._run(self._one, "queue_position", id=job_id)
        if row is None:
            return QueuePosition(0, 0, 0)
        return QueuePosition(int(row["ahead"]), int(row["higher"]), int(row["queued"]))

    async def list_attempts(self, job_id: str) -> list[Attempt]:
        return [rows.attempt(r) for r in await self._run(self._all, "list_attempts", job_id=job_id)]

    async def cancel(self, job_id: str, now: float) -> Job:
        def op() -> Job:
            job = self._get_job(job_id)
            row = self._one("cancel_job", id=job.id, now=now, error="cancelled by request")
            if row is None:
                return job
            self.db.execute(self.Q["end_attempts_of_job"], {"job_id": job.id, "now": now, "outcome": "cancelled"})
            return rows.job(row)

        return await self.tx(op)

    # -- arrays -----------------------------------------------------------------------------------------------

    def _find_array(self, array_id: str) -> ArrayRecord:
        return rows.array(self._by_id("array", array_id, "get_array", "find_arrays_by_prefix"))

    def _array_status(self, array: ArrayRecord, counts: list[Row]) -> ArrayStatus:
        by = {"queued": 0, "running": 0}
        finished: dict[str, int] = {}
        for r in counts:
            if r["state"] == "finished":
                finished[r["reason"] or "?"] = finished.get(r["reason"] or "?", 0) + r["n"]
            else:
                by[r["state"]] = by.get(r["state"], 0) + r["n"]
        return ArrayStatus(array, by["queued"], by["running"], finished)

    def _get_array(self, array_id: str) -> ArrayStatus:
        array = self._find_array(array_id)
        return self._array_status(array, self._all("array_counts", id=array.id))

    async def get_array(self, array_id: str) -> ArrayStatus:
        return await self._run(self._get_array, array_id)

    async def list_arrays(self, *, queue: str | None, limit: int) -> list[ArrayStatus]:
        def op() -> list[ArrayStatus]:
            found = [rows.array(r) for r in self._all("list_arrays", queue=queue, limit=limit)]
            counts: dict[str, list[Row]] = {}
            for r in self._all("arrays_counts", queue=queue, limit=limit):
                counts.setdefault(r["array_id"], []).append(r)
            return [self._array_status(a, counts.get(a.id, [])) for a in found]

        return await self.tx(op)  # one snapshot for the arrays and their counts

    async def cancel_array(self, array_id: str, now: float) -> tuple[ArrayStatus, list[tuple[str, str]]]:
        def op() -> tuple[ArrayStatus, list[tuple[str, str]]]:
            array = self._find_array(array_id)
            cancelled = self._all("cancel_array", id=array.id, now=now, error="cancelled by request (its array)")
            if cancelled:
                self.db.execute(self.Q["end_attempts_of_array"], {"id": array.id, "now": now})
            return self._get_array(array.id), [(r["id"], r["queue"]) for r in cancelled]

        return await self.tx(op)

    async def rerun_array(
        self, array_id: str, failed_only: bool, now: float
    ) -> tuple[ArrayStatus, list[tuple[str, str]]]:
        def op() -> tuple[ArrayStatus, list[tuple[str, str]]]:
            array = self._find_array(array_id)
            params = {"id": array.id, "failed_only": int(failed_only)}
            self.db.execute(self.Q["clear_outputs_of_array"], params)
            seq = self._one("next_seq")["seq"]  # type: ignore[index]  # (PostgreSQL draws its own per job)
            queued = self._all("rerun_array", seq=seq, **params)
            return self._get_array(array.id), [(r["id"], r["queue"]) for r in queued]

        return await self.tx(op)

    # -- cost -------------------------------------------------------------------------------------------------

    async def account_usage(self) -> None:
        await self._run(lambda: self.db.execute(self.Q["account_usage"]))

    async def usage(self, by: str, since: float, now: float, key: str | None = None) -> list[Usage]:
        query = {"group": "cost_by_group", "queue": "cost_by_queue", "array": "cost_by_array"}.get(by)
        if key is not None and by in ("array", "job"):
            query = f"cost_of_{by}"
        if query is None:
            raise ValueError(f"usage by {by!r}: expected group, queue, array, or job with a key")

        def op() -> list[Usage]:
            if by in ("group", "queue"):
                self.db.execute(self.Q["account_usage"])
            found = self._all(query, since=since, now=now, id=key)
            return [Usage(r["key"], r["grp"], float(r["seconds"] or 0.0)) for r in found]

        return await self.tx(op)

    # -- workers ----------------------------------------------------------------------------------------------

    async def register_worker(self, worker: Worker, now: float) -> None:
        await self._run(lambda: self.db.execute(self.Q["upsert_worker"], rows.worker_params(worker, now)))

    def _worker_caps(self, worker_id: str) -> dict[str, Any]:
        row = self._one("get_worker", id=worker_id)
        if row is None:
            raise NotFound(f"no worker {worker_id}; register first")
        return {"queue": row["queue"], **rows.caps_params(rows.worker_capabilities(row))}

    def _claim_rows(self, worker_id: str, caps: dict[str, Any], n: int, now: float, lease: float) -> list[Claim]:
        claimed = self._all("claim", worker_id=worker_id, n=n, now=now, expires=now + lease, **caps)
        claimed.sort(key=lambda r: (-r["priority"], r["seq"]))
        attempts = [
            {"job_id": r["id"], "attempt": r["attempt_seq"], "worker_id": worker_id, "lease": r["lease"], "now": now}
            for r in claimed
        ]
        self._many("insert_attempt", attempts)
        return [Claim(job=rows.job(r), attempt=r["attempt_seq"], lease=r["lease"]) for r in claimed]

    async def claim(self, worker_id: str, n: int, now: float, lease_seconds: float) -> list[Claim]:
        wait = waited()
        return await self.tx(
            lambda: self._claim_rows(worker_id, self._worker_caps(worker_id), n, now, lease_seconds + wait())
        )

    def _worker_claim(
        self, worker_id: str, n: int, now: float, lease_seconds: float, finishes: list[tuple[str, FinishResult]]
    ) -> WorkerClaim:
        """Record the finishes, read the worker and claim for it, in one transaction. PostgreSQL: one statement."""
        row = self._one("get_worker", id=worker_id)
        if row is None:
            raise NotFound(f"no worker {worker_id}; register first")
        finished = self._finish_many(finishes, now) if finishes else []
        if row["state"] != "active" or n <= 0:
            return WorkerClaim(row["queue"], row["state"], [], finished)
        caps = {"queue": row["queue"], **rows.caps_params(rows.worker_capabilities(row))}
        return WorkerClaim(
            row["queue"], row["state"], self._claim_rows(worker_id, caps, n, now, lease_seconds), finished
        )

    async def worker_claim(
        self,
        worker_id: str,
        n: int,
        now: float,
        lease_seconds: float,
        finishes: list[tuple[str, FinishResult]] | None = None,
    ) -> WorkerClaim:
        run = self._run if self.single_statement_batches else self.tx
        wait = waited()
        return await run(lambda: self._worker_claim(worker_id, n, now, lease_seconds + wait(), finishes or []))

    async def heartbeat(
        self, worker_id: str, now: float, lease_seconds: float, held: list[str] | None = None
    ) -> tuple[str, set[str]]:
        held_json = None if held is None else json.dumps(held)
        wait = waited()

        def op() -> tuple[str, set[str]]:
            renew = {"worker_id": worker_id, "expires": now + lease_seconds + wait(), "held": held_json}
            row = self._one("touch_worker", id=worker_id, now=now)
            if row is None:
                raise NotFound(f"no worker {worker_id}; register first")
            return row["state"], {r["lease"] for r in self._all("renew_leases", **renew)}

        return await self._first(op)

    async def has_queued(self, queue: str) -> bool:
        row = await self._run(self._one, "has_queued", queue=queue)
        return bool(row is not None and row["found"])

    async def touch_workers(self, worker_ids: list[str], now: float) -> list[str]:
        ids = json.dumps(worker_ids)
        return await self._first(lambda: [r["id"] for r in self._touch_rows(ids, now)], transaction=False)

    def _touch_rows(self, ids: str, now: float) -> list[Row]:
        """Touch the workers ``ids`` (a JSON array) and read those not active: the dialect's own (one statement on
        PostgreSQL; SQLite, which cannot write in a WITH, updates and then reads)."""
        raise NotImplementedError

    def _finish_rows(self, finishes: list[tuple[str, FinishResult]], now: float) -> dict[str, Row]:
        """Finish the attempts whose leases still own their jobs (or queue them again, for a program failure the job
        retries), and end those attempts; the jobs' rows by lease. The dialect's own: SQLite decides and writes each
        result's job in one statement and ends its attempt in a second (it runs in-process), PostgreSQL does all of
        it for the whole batch in one."""
        raise NotImplementedError

    def _repeated_finish(self, lease: str, result: FinishResult) -> Job | None:
        """A repeated finish of the attempt that did finish the job (or queue it again for a retry) is harmless:
        the job; None for a stale lease."""
        attempt = self._one("get_attempt", lease=lease)
        if attempt is not None and attempt["outcome"] == result.reason:
            job = self._get_job(attempt["job_id"])
            if (job.state == "finished" and job.reason == result.reason) or result.reason in PROGRAM_FAILURES:
                return job
        return None

    def _finish_many(self, finishes: list[tuple[str, FinishResult]], now: float) -> list[Job | None]:
        return self._finished(finishes, self._finish_rows(finishes, now))

    def _finished(self, finishes: list[tuple[str, FinishResult]], done: dict[str, Row]) -> list[Job | None]:
        """Per finish, its job from ``done`` (job rows by the lease that finished them), else a repeated finish."""
        return [
            rows.job(done[lease]) if lease in done else self._repeated_finish(lease, result)
            for lease, result in finishes
        ]

    async def finish(self, lease: str, result: FinishResult, now: float) -> Job:
        (job,) = await self.finish_many([(lease, result)], now)
        if job is None:
            raise StaleLease("this attempt no longer owns its job")
        return job

    async def finish_many(self, finishes: list[tuple[str, FinishResult]], now: float) -> list[Job | None]:
        if not finishes:
            return []
        run = self._run if self.single_statement_batches else self.tx
        return await run(self._finish_many, finishes, now)

    async def release(self, lease: str, now: float, outcome: str = "released") -> Job | None:
        def op() -> Job | None:
            row = self._one("release", lease=lease)
            if row is None:
                return None
            self.db.execute(self.Q["end_attempt"], {"lease": lease, "now": now, "outcome": outcome})
            return rows.job(row)

        return await self.tx(op)

    async def release_worker(self, worker_id: str, now: float, outcome: str = "preempted") -> list[Expired]:
        def op() -> list[Expired]:
            params = {"worker_id": worker_id, "now": now, "outcome": outcome}
            self.db.execute(self.Q["end_worker_attempts"], params)
            return [Expired(r["id"], r["queue"], r["state"]) for r in self._all("release_worker_jobs", **params)]

        return await self.tx(op)

    def _live_lease(self, lease: str) -> tuple[str, int]:
        attempt = self._one("get_attempt", lease=lease)
        if attempt is None or attempt["ended_at"] is not None:
            raise StaleLease("this attempt no longer owns its job")
        return attempt["job_id"], attempt["attempt"]

    async def check_lease(self, lease: str) -> tuple[str, int]:
        return await self._run(self._live_lease, lease)

    async def append_logs(self, lease: str, chunks: list[tuple[str, bytes]], now: float) -> str:
        return (await self.append_capped_logs(lease, chunks, now, cap=None)).job_id

    async def append_capped_logs(
        self, lease: str, chunks: list[tuple[str, bytes]], now: float, cap: int | None, dropped: int = 0
    ) -> LogsAppended:
        unsent = dropped

        def op() -> LogsAppended:
            job_id, attempt = self._live_lease(lease)
            counts = self._one("log_counts", job_id=job_id, attempt=attempt)
            kept_before, dropped_before = (int(counts["log_bytes"]), int(counts["log_dropped"])) if counts else (0, 0)
            room = None if cap is None else max(cap - kept_before, 0)
            keep: list[tuple[str, bytes]] = []
            dropped = unsent
            for stream, data in chunks:
                if room is None or len(data) <= room:
                    keep.append((stream, data))
                    room = None if room is None else room - len(data)
                    continue
                if room:  # the head of the chunk that crosses the cap
                    keep.append((stream, data[:room]))
                dropped += len(data) - room
                room = 0
            kept = sum(len(d) for _, d in keep)
            if dropped and not dropped_before:  # the first cut: say so where it happens, once
                keep.append(("system", log_cap_note(cap or 0).encode()))
            self._many(
                "append_log",
                [{"job_id": job_id, "attempt": attempt, "stream": s, "data": d, "now": now} for s, d in keep],
            )
            self.db.execute(
                self.Q["count_logs"], {"job_id": job_id, "attempt": attempt, "kept": kept, "dropped": dropped}
            )
            return LogsAppended(job_id, attempt, dropped_before + dropped, capped=room == 0)

        return await self.tx(op)

    async def log_counts(self, job_id: str, attempt: int) -> tuple[int, int]:
        row = await self._run(self._one, "log_counts", job_id=job_id, attempt=attempt)
        return (int(row["log_bytes"]), int(row["log_dropped"])) if row else (0, 0)

    async def read_logs(self, job_id: str, attempt: int, after: int, limit: int) -> list[LogChunk]:
        found = await self._run(self._all, "read_logs", job_id=job_id, attempt=attempt, after=after, limit=limit)
        return [LogChunk(r["seq"], r["attempt"], r["stream"], bytes(r["data"]), r["at"]) for r in found]

    async def put_outputs(self, lease: str, files: list[tuple[str, bytes]]) -> None:
        """Small outputs given whole (the server streams real uploads: put_blob_file, then record_outputs)."""
        recorded = []
        for path, data in files:
            sha = rows.sha256(data)
            await self.put_blob(sha, data)
            recorded.append(OutputFile(path, sha, len(data)))
        await self.record_outputs(lease, recorded)

    async def record_outputs(self, lease: str, files: list[OutputFile]) -> None:
        """The attempt's outputs, whose bytes are stored already; they replace what an earlier attempt left."""

        def op() -> None:
            job_id, attempt = self._live_lease(lease)
            self.db.execute(self.Q["clear_outputs"], {"job_id": job_id})
            self._many(
                "put_output",
                [
                    {"job_id": job_id, "attempt": attempt, "path": f.path, "sha256": f.sha256, "size": f.size}
                    for f in files
                ],
            )

        await self.tx(op)

    async def list_outputs(self, job_id: str) -> list[OutputFile]:
        found = await self._run(self._all, "list_outputs", job_id=job_id)
        return [OutputFile(r["path"], r["sha256"], r["size"]) for r in found]

    # -- blobs ------------------------------------------------------------------------------------------------
    # A blob's bytes are stored in parts of BLOB_PART bytes, written and read one part per statement, so no
    # operation holds more than one part (in Python, and in SQLite's own memory).

    def _put_parts(self, sha256: str, size: int, read: Callable[[int], bytes]) -> None:
        parts = -(-size // BLOB_PART)
        new = self._one("put_blob", sha256=sha256, empty=b"", size=size, parts=parts)
        if new is None:
            return  # the same bytes are there already
        for part in range(parts):
            data = read(BLOB_PART)
            if len(data) != min(BLOB_PART, size - part * BLOB_PART):
                raise ValueError(f"blob {sha256[:12]}: the bytes ended before its size ({size})")
            self.db.execute(self.Q["put_blob_part"], {"sha256": sha256, "part": part, "data": data})

    async def put_blob(self, sha256: str, data: bytes) -> None:
        view = memoryview(data)

        def op() -> None:  # (its reading starts over each time: an operation may run twice, see store/batching.py)
            offset = 0

            def read(n: int) -> bytes:
                nonlocal offset
                offset += n
                return bytes(view[offset - n : offset])

            self._put_parts(sha256, len(data), read)

        await self.tx(op)

    async def put_blob_file(self, sha256: str, size: int, path: str) -> None:
        """Store a file's bytes (whose hash and size the caller computed) part by part, in one transaction."""

        def op() -> None:
            with open(path, "rb") as f:
                self._put_parts(sha256, size, f.read)

        await self.tx(op)

    async def blob_info(self, sha256: str) -> tuple[int, int]:
        """(size, parts) of a blob; NotFound when there is none."""
        row = await self._run(self._one, "blob_info", sha256=sha256)
        if row is None:
            raise NotFound(f"no blob {sha256}")
        return int(row["size"]), int(row["parts"])

    async def read_blob_part(self, sha256: str, part: int) -> bytes:
        row = await self._run(self._one, "get_blob_part", sha256=sha256, part=part)
        if row is None:
            raise NotFound(f"no part {part} of blob {sha256}")
        return bytes(row["data"])

    async def get_blob(self, sha256: str) -> bytes:
        """A whole blob in memory: for small ones (inputs the worker writes, tests); routes stream parts."""
        _, parts = await self.blob_info(sha256)
        return b"".join([await self.read_blob_part(sha256, p) for p in range(parts)])

    async def missing_blobs(self, shas: list[str]) -> list[str]:
        return await self._run(lambda: [s for s in shas if self._one("has_blob", sha256=s) is None])

    # -- housekeeping -----------------------------------------------------------------------------------------

    async def expire_leases(self, now: float) -> list[Expired]:
        def op() -> list[Expired]:
            expired = self._all("expire_leases", now=now)
            if expired:
                self.db.execute(self.Q["end_lost_attempts"], {"now": now})
            return [Expired(r["id"], r["queue"], r["state"]) for r in expired]

        return await self.tx(op)

    async def extend_leases(self, now: float, lease_seconds: float) -> None:
        params = {"expires": now + lease_seconds, "now": now}
        await self._run(lambda: self.db.execute(self.Q["extend_leases"], params))

    async def mark_gone_workers(self, cutoff: float, forget_before: float) -> list[str]:
        def op() -> list[str]:
            gone = [r["id"] for r in self._all("mark_gone_workers", cutoff=cutoff)]
            self.db.execute(self.Q["account_usage"])  # a worker's life is in the ledger before it is forgotten
            if self.db.execute(self.Q["forget_workers"], {"cutoff": forget_before}).rowcount:
                self.db.execute(self.Q["forget_worker_tokens"])
            return gone

        return await self.tx(op)

    async def fold_queue_counts(self) -> None:
        """Nothing to fold: SQLite's triggers move the counts themselves (PostgreSQL overrides this)."""

    # -- views ------------------------------------------------------------------------------------------------

    async def queue_stats(self) -> list[QueueStats]:
        return [rows.queue_stats(r) for r in await self._run(self._all, "queue_stats")]

    async def worker_offers(self, queue: str) -> list[WorkerOffer]:
        return [rows.worker_offer(r) for r in await self._run(self._all, "worker_offers", queue=queue)]

    async def worker_tallies(self) -> list[WorkerTally]:
        return [rows.worker_tally(r) for r in await self._run(self._all, "worker_tallies")]

    async def busy_workers(self) -> int:
        row = await self._run(self._one, "busy_workers")
        return int(row["n"]) if row is not None else 0

    async def ahead_of(self, job_id: str, running: int, runs: int) -> Ahead:
        def op() -> Ahead:
            job = self._get_job(job_id)
            row = self._one("queued_ahead", id=job.id)
            busy = self._all("running_of_queue", queue=job.queue, limit=running)
            recent = self._all("recent_run_times", queue=job.queue, limit=runs)
            return Ahead(
                row["n"] if row else 0,
                tuple((r["worker_id"], r["started_at"]) for r in busy if r["started_at"] is not None),
                tuple(max(0.0, float(r["seconds"])) for r in recent),
            )

        return await self._run(op)  # reads only: no transaction (a few rows apart changes no estimate)

    async def demand(self, queue: str, capabilities: Capabilities, limit: int | None = None) -> tuple[int, int]:
        params = {"queue": queue, "limit": limit, **rows.caps_params(capabilities)}
        row = await self._run(self._one, "demand", **params)
        return (row["queued"] or 0, row["running"] or 0) if row else (0, 0)

    async def list_workers(self, *, queue: str | None = None, include_gone: bool = False) -> list[Worker]:
        found = await self._run(self._all, "list_workers", queue=queue, include_gone=include_gone)
        return [rows.worker(r) for r in found]

    async def get_worker(self, worker_id: str) -> Worker:
        row = await self._run(self._one, "one_worker", id=worker_id)
        if row is None:
            raise NotFound(f"no worker {worker_id}")
        return rows.worker(row)

    async def set_worker_state(self, worker_id: str, state: str) -> None:
        await self._run(lambda: self.db.execute(self.Q["set_worker_state"], {"id": worker_id, "state": state}))

    # -- tokens -----------------------------------------------------------------------------------------------

    async def create_token(self, token_id: str, name: str, role: str, token_hash: str, now: float) -> None:
        params = {"id": token_id, "name": name, "role": role, "hash": token_hash, "now": now}
        await self._run(lambda: self.db.execute(self.Q["insert_token"], params))

    async def find_token(self, token_hash: str) -> TokenRecord | None:
        row = await self._run(self._one, "find_token", hash=token_hash)
        return rows.token(row) if row else None

    async def list_tokens(self) -> list[TokenRecord]:
        return [rows.token(r) for r in await self._run(self._all, "list_tokens")]

    async def revoke_token(self, token_id: str, now: float) -> bool:
        return await self._run(lambda: self._one("revoke_token", id=token_id, now=now) is not None)

    async def bind_worker(self, worker_id: str, token_id: str) -> bool:
        return await self._run(lambda: self._one("bind_worker", worker_id=worker_id, token_id=token_id) is not None)

    async def worker_token(self, worker_id: str) -> str | None:
        row = await self._run(self._one, "worker_token", worker_id=worker_id)
        return row["token_id"] if row else None

    async def lease_tokens(self, leases: list[str]) -> dict[str, str | None]:
        def op() -> dict[str, str | None]:
            found = {lease: self._one("lease_token", lease=lease) for lease in leases}
            return {lease: row["token_id"] for lease, row in found.items() if row is not None}

        return await self._run(op)

    async def holds_input(self, token_id: str, sha256: str) -> bool:
        return await self._run(lambda: self._one("holds_input", token_id=token_id, sha256=sha256) is not None)

    # -- scaling records --------------------------------------------------------------------------------------

    async def record_event(
        self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str, now: float
    ) -> None:
        params = {
            "at": now,
            "grp": group,
            "kind": kind,
            "from_count": from_count,
            "to_count": to_count,
            "reason": reason,
        }
        await self._run(lambda: self.db.execute(self.Q["insert_event"], params))

    async def list_events(self, group: str | None, after: int, limit: int) -> list[Event]:
        found = await self._run(self._all, "list_events", grp=group, after=after, limit=limit)
        return [rows.event(r) for r in found]

    async def put_group(self, status: GroupStatus) -> None:
        await self._run(lambda: self.db.execute(self.Q["upsert_group"], rows.group_params(status)))

    async def list_groups(self) -> list[GroupStatus]:
        return [rows.group(r) for r in await self._run(self._all, "list_groups")]

    async def delete_group(self, name: str) -> None:
        await self._run(lambda: self.db.execute(self.Q["delete_group"], {"name": name}))
