"""Schema migrations and the named queries, on each dialect (as procrastinate's migration tests do).

For every earlier version: a database built up to it, filled with data (jobs in each state, attempts, logs, outputs
and blobs, workers, tokens, scaling events, groups) by plain SQL of that version, then opened by the store, which
migrates it to the head: no row is lost or changed, and the store works on it (claims, finishes, renewals). The same
for a database made by scaleq before migrations existed (its schema is tests/integration/fixtures/schema_v1_*.sql,
captured from that code), whose migrated schema must equal a fresh one. A database newer than the code is refused.
"""

from __future__ import annotations

import ast
import asyncio
import json
import re
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row
from typer.testing import CliRunner

import scaleq.store.postgres
import scaleq.store.sql
import scaleq.store.sqlite
from scaleq.cli import app
from scaleq.jobs import Capabilities, JobDefinition, RuntimeKind, Worker
from scaleq.store import migrations, queries
from scaleq.store.base import FinishResult, SchemaStatus, SchemaTooNew, Store
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore
from tests.pg import reset

FIXTURES = Path(__file__).parent / "fixtures"
DIALECTS = ("sqlite", "postgres")
HEAD = migrations.head("sqlite")
T0 = 1_000_000.0
runner = CliRunner()


# -- the named queries ------------------------------------------------------------------------------------------------


def used_queries(module: object) -> set[str]:
    """The query names a store module uses: ``self.Q["name"]``, ``self._one("name", …)`` (and ``_all``, ``_many``,
    ``_hot_all``, a local ``count``), and ``self._run(self._all, "name", …)``."""
    tree = ast.parse(Path(module.__file__).read_text())  # type: ignore[attr-defined]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Attribute) and node.value.attr == "Q":
            if isinstance(node.slice, ast.Constant):
                found.add(node.slice.value)
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            args = node.args
            if (
                name == "_run"
                and len(args) > 1
                and isinstance(args[0], ast.Attribute)
                and args[0].attr in ("_one", "_all")
            ):
                args = args[1:]
            elif name not in ("_one", "_all", "_many", "_hot_all", "count"):
                continue
            if isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
                found.add(args[0].value)
    return found


@pytest.mark.parametrize("dialect", DIALECTS)
def test_every_query_the_store_uses_resolves_in_each_dialect(dialect: str) -> None:
    own = scaleq.store.sqlite if dialect == "sqlite" else scaleq.store.postgres
    used = used_queries(scaleq.store.sql) | used_queries(own)
    assert {"claim", "get_job", "queue_stats", "schema_version"} <= used  # the scan sees the store's calls
    missing = used - queries.load(dialect).keys()
    assert not missing, f"{dialect}: no query named {sorted(missing)}"


def test_queries_written_once_are_in_both_dialects_and_a_name_is_defined_once() -> None:
    common = queries.parse((files("scaleq.store") / "queries" / "common.sql").read_text(), "common.sql")
    for dialect in DIALECTS:
        assert common.keys() <= queries.load(dialect).keys()
    with pytest.raises(ValueError, match=r"x\.sql: query twice is defined twice"):
        queries.parse("-- name: twice\nSELECT 1;\n-- name: twice\nSELECT 2;\n", "x.sql")


def test_both_dialects_have_the_same_numbered_migrations() -> None:
    labels = {d: [m.label for m in migrations.load(d)] for d in DIALECTS}
    assert labels["sqlite"] == labels["postgres"]
    assert labels["sqlite"][0] == "0001_initial" and len(labels["sqlite"]) == HEAD >= 2


def fresh_sqlite(tmp_path: Path) -> Path:
    """A SQLite database migrated to the head, closed."""
    path = tmp_path / "s.db"

    async def made() -> None:
        store = SQLiteStore(path)
        await store.open()
        await store.close()

    asyncio.run(made())
    return path


@pytest.mark.parametrize(
    ("query", "index"),
    [
        ("claim", "jobs_claim"),
        ("has_queued", "jobs_claim"),
        ("expire_leases", "jobs_lease_expiry"),
        ("release_worker_jobs", "jobs_worker"),
        ("renew_leases", "jobs_worker"),
    ],
)
def test_sqlite_walks_indexes_of_one_state_for_the_hot_queries(query: str, index: str, tmp_path: Path) -> None:
    """0012: the indexes the claim, the lease sweep and a worker's renewals walk hold the jobs of one state (as
    PostgreSQL's do), and each query still seeks its index (the planner's own account, not a timing)."""
    path = fresh_sqlite(tmp_path)
    sql = SQLiteStore.Q[query]
    with sqlite3.connect(path) as conn:
        (definition,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = ?", (index,)).fetchone()
        params = dict.fromkeys(re.findall(r"(?<![:\w]):(\w+)", sql))
        plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert definition.endswith("WHERE state = 'queued'" if index == "jobs_claim" else "WHERE state = 'running'")
    assert f"USING INDEX {index}" in plan or f"USING COVERING INDEX {index}" in plan, plan


def test_sqlite_records_a_result_with_two_seeks_and_no_list_built_per_row(tmp_path: Path) -> None:
    """The finish statement seeks the job by lease, then by id, and looks its exit codes up with EXISTS: an
    ``IN (SELECT ...)`` there was built before the AND around it could skip it, eight times slower (the plan says
    "LIST SUBQUERY")."""
    path = fresh_sqlite(tmp_path)
    sql = SQLiteStore.Q["finish"]
    with sqlite3.connect(path) as conn:
        params = dict.fromkeys(re.findall(r"(?<![:\w]):(\w+)", sql))
        plan = " | ".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params))
    assert plan.startswith("SEARCH jobs USING INDEX sqlite_autoindex_jobs_2 (lease=?)"), plan
    assert "SCAN jobs" not in plan and "LIST SUBQUERY" not in plan, plan


# -- data of a version-1 database, in plain SQL -----------------------------------------------------------------------


def job(id_: str, seq: int, state: str, **extra: Any) -> dict[str, Any]:
    definition = {"command": ["echo", id_], "inputs": [{"path": "in.txt", "sha256": "b" * 64, "size": 11}]}
    row = {
        "id": id_ * 64 if len(id_) == 1 else id_,
        "queue": "q",
        "definition": json.dumps(definition),
        "runtime": "process",
        "cpus": 1.0,
        "memory": None,
        "gpus": 0,
        "tags": "[]",
        "host_network": 0,
        "priority": 0,
        "seq": seq,
        "state": state,
        "max_attempts": 3,
        "submitted_at": T0 + seq,
    }
    return row | extra


SEED: dict[str, list[dict[str, Any]]] = {
    "jobs": [
        job("a", 1, "queued"),
        job(
            "b",
            2,
            "running",
            attempts=1,
            attempt_seq=1,
            worker_id="w-old",
            lease="lease-b",
            lease_expires_at=T0 + 900,
            started_at=T0 + 10,
        ),
        job(
            "c",
            3,
            "finished",
            reason="success",
            exit_code=0,
            attempts=1,
            attempt_seq=1,
            worker_id="w-old",
            started_at=T0 + 10,
            finished_at=T0 + 20,
        ),
        job(
            "d",
            4,
            "finished",
            reason="failed",
            exit_code=3,
            error="exit 3",
            attempts=2,
            attempt_seq=2,
            worker_id="w-old",
            started_at=T0 + 30,
            finished_at=T0 + 40,
        ),
        job("e", 5, "finished", reason="cancelled", error="cancelled by request", finished_at=T0 + 50, priority=5),
    ],
    "attempts": [
        {"job_id": "b" * 64, "attempt": 1, "worker_id": "w-old", "lease": "lease-b", "started_at": T0 + 10},
        {
            "job_id": "c" * 64,
            "attempt": 1,
            "worker_id": "w-old",
            "lease": "lease-c",
            "started_at": T0 + 10,
            "ended_at": T0 + 20,
            "outcome": "success",
        },
        {
            "job_id": "d" * 64,
            "attempt": 1,
            "worker_id": "w-old",
            "lease": "lease-d1",
            "started_at": T0 + 21,
            "ended_at": T0 + 25,
            "outcome": "lost",
        },
        {
            "job_id": "d" * 64,
            "attempt": 2,
            "worker_id": "w-old",
            "lease": "lease-d2",
            "started_at": T0 + 30,
            "ended_at": T0 + 40,
            "outcome": "failed",
        },
    ],
    "logs": [
        {"seq": 1, "job_id": "c" * 64, "attempt": 1, "stream": "stdout", "data": b"hello\n", "at": T0 + 11},
        {"seq": 2, "job_id": "c" * 64, "attempt": 1, "stream": "stderr", "data": b"\x00\xffbytes", "at": T0 + 12},
    ],
    "blobs": [{"sha256": "b" * 64, "data": b"input bytes"}, {"sha256": "f" * 64, "data": b"output bytes"}],
    "outputs": [{"job_id": "c" * 64, "attempt": 1, "path": "out/result.txt", "sha256": "f" * 64, "size": 12}],
    "workers": [
        {
            "id": "w-old",
            "queue": "q",
            "grp": "g",
            "slots": 2,
            "state": "active",
            "runtimes": '["process"]',
            "cpus": 2.0,
            "memory": 1 << 30,
            "gpus": 0,
            "tags": "[]",
            "host_network": 0,
            "hostname": "h1",
            "started_at": T0,
            "last_heartbeat": T0 + 15,
        },
        {
            "id": "w-draining",
            "queue": "q",
            "grp": None,
            "slots": 1,
            "state": "draining",
            "runtimes": '["docker"]',
            "cpus": 1.0,
            "memory": None,
            "gpus": 1,
            "tags": '["gpu"]',
            "host_network": 1,
            "hostname": "h2",
            "started_at": T0,
            "last_heartbeat": T0 + 15,
        },
        {
            "id": "w-gone",
            "queue": "other",
            "grp": None,
            "slots": 1,
            "state": "gone",
            "runtimes": '["process"]',
            "cpus": 1.0,
            "memory": None,
            "gpus": 0,
            "tags": "[]",
            "host_network": 0,
            "hostname": "h3",
            "started_at": T0,
            "last_heartbeat": T0,
        },
    ],
    "tokens": [
        {"id": "t1", "name": "admin", "role": "admin", "hash": "hash-1", "created_at": T0},
        {"id": "t2", "name": "old", "role": "worker", "hash": "hash-2", "created_at": T0, "revoked_at": T0 + 5},
    ],
    "events": [
        {"id": 1, "at": T0 + 1, "grp": "g", "kind": "scale_up", "from_count": 0, "to_count": 2, "reason": "2 queued"},
        {"id": 2, "at": T0 + 2, "grp": "g", "kind": "error", "from_count": None, "to_count": None, "reason": "quota"},
    ],
    "groups": [
        {
            "name": "g",
            "queue": "q",
            "provider": "local",
            "min_workers": 0,
            "max_workers": 4,
            "current": 2,
            "desired": 2,
            "updated_at": T0 + 2,
        },
    ],
}
KEYS = {
    "jobs": "id",
    "attempts": "lease",
    "logs": "seq",
    "blobs": "sha256",
    "outputs": "path",
    "workers": "id",
    "tokens": "id",
    "events": "id",
    "groups": "name",
}


class Database:
    """Plain SQL on a database of either dialect, beside the store."""

    def __init__(self, dialect: str, target: str) -> None:
        self.dialect, self.target = dialect, target

    @contextmanager
    def connect(self) -> Iterator[Any]:
        if self.dialect == "sqlite":
            conn = sqlite3.connect(self.target, isolation_level=None)
            conn.row_factory = sqlite3.Row
            try:
                yield conn
            finally:
                conn.close()
        else:
            with psycopg.connect(self.target, autocommit=True, row_factory=dict_row) as conn:
                yield conn

    def param(self, name: str) -> str:
        return f":{name}" if self.dialect == "sqlite" else f"%({name})s"

    def seed(self) -> None:
        with self.connect() as conn:
            in_parts = self.has_blob_parts(conn)
            for table, rows in SEED.items():
                if table == "blobs" and in_parts:  # from 0010 on, the code writes a blob's bytes as parts
                    rows = [{**r, "data": b"", "size": len(r["data"]), "parts": 1} for r in rows]
                    for r in SEED["blobs"]:
                        part = {"sha256": r["sha256"], "part": 0, "data": r["data"]}
                        conn.execute(
                            f"INSERT INTO blob_parts (sha256, part, data) VALUES ({', '.join(map(self.param, part))})",
                            part,
                        )
                for row in rows:
                    cols = ", ".join(row)
                    conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join(map(self.param, row))})", row)
            if self.dialect == "postgres":  # the seeded rows' ids were given, not drawn: move the counters past them
                conn.execute("SELECT setval('job_seq', 5), setval('logs_seq_seq', 2), setval('events_id_seq', 2)")

    def snapshot(self) -> dict[str, list[dict[str, Any]]]:
        with self.connect() as conn:
            found = {
                table: [self._plain(r) for r in conn.execute(f"SELECT * FROM {table} ORDER BY {key}").fetchall()]
                for table, key in KEYS.items()
            }
            if self.has_blob_parts(conn):  # 0010: blobs' bytes in parts
                parts = conn.execute("SELECT * FROM blob_parts ORDER BY sha256, part").fetchall()
                found["blob_parts"] = [self._plain(r) for r in parts]
            return found

    def has_blob_parts(self, conn: Any) -> bool:
        exists = (
            "SELECT 1 AS x FROM sqlite_master WHERE name = 'blob_parts'"
            if self.dialect == "sqlite"
            else "SELECT 1 AS x WHERE to_regclass('blob_parts') IS NOT NULL"
        )
        return conn.execute(exists).fetchone() is not None

    def _plain(self, row: Any) -> dict[str, Any]:
        values = dict(row)
        for key in ("tags", "runtimes"):  # JSONB comes back parsed on PostgreSQL
            if key in values and not isinstance(values[key], str):
                values[key] = json.dumps(values[key])
        return {k: bytes(v) if isinstance(v, memoryview) else v for k, v in values.items()}

    def version(self) -> int:
        with self.connect() as conn:
            if self.dialect == "sqlite":
                return conn.execute("PRAGMA user_version").fetchone()[0]
            return conn.execute("SELECT max(version) AS v FROM scaleq_schema").fetchone()["v"]

    def catalog(self) -> list[tuple[Any, ...]]:
        """The schema as the database describes it: tables, columns, indexes."""
        with self.connect() as conn:
            if self.dialect == "sqlite":
                found = conn.execute("SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY name").fetchall()
                return [tuple(r) for r in found]
            columns = conn.execute(
                "SELECT table_name, column_name, data_type, is_nullable, column_default FROM information_schema.columns"
                " WHERE table_schema = 'public' ORDER BY table_name, column_name"
            ).fetchall()
            indexes = conn.execute(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' ORDER BY indexname"
            ).fetchall()
            return [tuple(r.values()) for r in columns + indexes]


# -- the database of each dialect ------------------------------------------------------------------------------------


@pytest.fixture(params=DIALECTS)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    if request.param == "postgres":
        return Database("postgres", request.getfixturevalue("pg_url"))
    return Database("sqlite", str(tmp_path / "scaleq.db"))


def make_store(db: Database, *, migrate: bool = True) -> Store:
    if db.dialect == "sqlite":
        return SQLiteStore(db.target, migrate=migrate)
    return PostgresStore(db.target, migrate=migrate)


@asynccontextmanager
async def opened(db: Database, *, migrate: bool = True) -> AsyncIterator[Store]:
    store = make_store(db, migrate=migrate)
    await store.open()
    try:
        yield store
    finally:
        await store.close()


async def build_at(db: Database, version: int) -> None:
    """A database with migrations 1..version applied, as the code of that version left it."""
    async with opened(db, migrate=False) as store:
        applied = await store.migrate(to=version)
    assert applied == [m.label for m in migrations.load(db.dialect)[:version]]


def assert_nothing_lost(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> None:
    if "blob_parts" in after and "blob_parts" not in before:  # 0010 moved blobs' bytes into parts: join them back
        parts: dict[str, list[tuple[int, bytes]]] = {}
        for p in after["blob_parts"]:
            parts.setdefault(p["sha256"], []).append((p["part"], bytes(p["data"])))
        after = {
            **after,
            "blobs": [
                {**b, "data": b"".join(d for _, d in sorted(parts.get(b["sha256"], [])))} for b in after["blobs"]
            ],
        }
        assert all(b["size"] == len(b["data"]) for b in after["blobs"])
    for table, rows in before.items():
        assert len(after[table]) == len(rows), table
        for old, new in zip(rows, after[table], strict=True):
            assert {k: new[k] for k in old} == old, table  # (columns a migration added are not compared)


async def assert_the_store_works(store: Store, seeded_at: int = 1) -> None:
    """The seeded data reads back through the store, and the state machine runs on the migrated tables."""
    assert (await store.get_job("a" * 64)).state == "queued"
    assert [a.outcome for a in await store.list_attempts("d" * 64)] == ["lost", "failed"]
    assert [c.data for c in await store.read_logs("c" * 64, 1, 0, 10)] == [b"hello\n", b"\x00\xffbytes"]
    assert [o.path for o in await store.list_outputs("c" * 64)] == ["out/result.txt"]
    assert await store.get_blob("f" * 64) == b"output bytes"
    assert (await store.find_token("hash-1")) is not None and (await store.find_token("hash-2")) is None
    assert [e.kind for e in await store.list_events("g", 0, 10)] == ["error", "scale_up"]
    assert [(g.name, g.state, g.message, g.state_since) for g in await store.list_groups()] == [("g", "ok", "", None)]
    assert {w.id for w in await store.list_workers()} == {"w-old", "w-draining"}
    (stats,) = await store.queue_stats()
    assert (stats.queued, stats.running, stats.finished, stats.succeeded, stats.unsuccessful) == (1, 1, 3, 1, 2)
    assert stats.oldest_queued_at == T0 + 1
    # the running job's lease still renews and finishes it; the queued job is claimed and finished
    state, renewed = await store.heartbeat("w-old", T0 + 100, 60, ["lease-b"])
    assert (state, renewed) == ("active", {"lease-b"})
    assert (await store.finish("lease-b", FinishResult("success", 0), T0 + 101)).reason == "success"
    caps = {
        "runtimes": [RuntimeKind.process],
        "cpus": 2.0,
        "memory": None,
        "gpus": 0,
        "tags": [],
        "host_network": False,
    }
    await store.register_worker(Worker(id="w-new", queue="q", slots=2, started_at=T0, last_heartbeat=T0, **caps), T0)
    assert await store.demand("q", Capabilities(**caps)) == (1, 0)
    (claim,) = await store.claim("w-new", 4, T0 + 102, 60)
    assert claim.job.id == "a" * 64 and claim.attempt == 1
    done = await store.finish(claim.lease, FinishResult("failed", 1, "exit 1"), T0 + 103)
    assert (done.state, done.reason, done.exit_code) == ("finished", "failed", 1)
    (stats,) = await store.queue_stats()
    assert (stats.queued, stats.running, stats.finished, stats.succeeded, stats.unsuccessful) == (0, 0, 5, 2, 3)
    # retries by cause (0006): the jobs from before keep their behaviour (no failure retried); a new one retries
    seeded = await store.list_jobs(queue="q", state=None, limit=10)
    assert {(j.retries, j.failures, j.retry_on_exit_codes) for j in seeded} == {(0, 0, None)}
    flaky, _ = await store.submit(
        "q",
        JobDefinition(command=["flaky"]),
        priority=0,
        max_attempts=3,
        rerun=False,
        now=T0 + 104,
        retries=1,
        retry_on_exit_codes=[3],
    )
    (claim,) = await store.claim("w-new", 1, T0 + 105, 60)
    again = await store.finish(claim.lease, FinishResult("failed", 3, "exit 3"), T0 + 106)
    assert (again.id, again.state, again.failures, again.attempts) == (flaky.id, "queued", 1, 0)
    # 0007: jobs from before arrays belong to none; the old attempts got their worker's group and share (w-old: 2
    # slots of 2 cpus, jobs of 1 cpu: half), the workers' lives a row each in the ledger; groups have no price
    assert (await store.get_job("c" * 64)).array_id is None and await store.list_arrays(queue=None, limit=5) == []
    if seeded_at < ARRAYS_AND_COST:  # (seeded after it, by plain SQL, attempts carry no group or share)
        (ran,) = await store.usage("job", 0, T0 + 200, key="c" * 64)
        assert (ran.group, ran.worker_seconds) == ("g", 5.0)
        by_group = {u.key: u.worker_seconds for u in await store.usage("group", 0, T0 + 200)}
        assert by_group["g"] == 100.0  # w-old: T0 to its heartbeat above
    assert [g.price_per_hour for g in await store.list_groups()] == [None]
    # 0009: groups written before it have 1 slot per worker, no boot seen and no worker starting; the job queued
    # since is first in its queue, and the queue's two successful runs are timed (the one seeded, the one finished
    # above: started at T0 + 10, finished at T0 + 101)
    assert [(g.slots, g.boot_seconds, g.starting) for g in await store.list_groups()] == [(1, None, ())]
    ahead = await store.ahead_of(flaky.id, running=10, runs=10)
    assert (ahead.queued, ahead.running) == (0, ())
    assert len(ahead.recent_runs) == 2 and 91.0 in ahead.recent_runs


#: The migration that fills in the group and share of attempts made before it.
ARRAYS_AND_COST = 7


# -- upgrades ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", range(1, HEAD))
async def test_a_database_at_every_earlier_version_migrates_to_the_head_with_nothing_lost(
    db: Database, version: int
) -> None:
    await build_at(db, version)
    db.seed()
    before = db.snapshot()
    assert db.version() == version
    async with opened(db) as store:  # opening migrates
        assert db.version() == HEAD
        assert await store.schema_status() == SchemaStatus(HEAD, HEAD, [])
        assert_nothing_lost(before, db.snapshot())
        await assert_the_store_works(store, version)


def make_like_the_code_before_migrations(db: Database) -> None:
    """What scaleq at commit 8a9129c did on an empty database: its schema, run whole, then version 1."""
    schema = (FIXTURES / f"schema_v1_{db.dialect}.sql").read_text()
    with db.connect() as conn:
        if db.dialect == "sqlite":
            conn.executescript(schema)
            conn.execute("PRAGMA user_version=1")
        else:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(727274)")
                conn.execute("CREATE TABLE IF NOT EXISTS scaleq_schema (version INTEGER NOT NULL)")
                conn.execute(schema)
                conn.execute("INSERT INTO scaleq_schema (version) VALUES (1)")


async def test_a_database_made_before_migrations_existed_is_0001_and_migrates_cleanly(
    db: Database, tmp_path: Path
) -> None:
    make_like_the_code_before_migrations(db)
    db.seed()
    before = db.snapshot()
    async with opened(db, migrate=False) as store:
        status = await store.schema_status()
        assert status.version == 1 and status.pending == [m.label for m in migrations.load(db.dialect)[1:]]
        assert await store.migrate() == status.pending
        assert_nothing_lost(before, db.snapshot())
        await assert_the_store_works(store)
    migrated = db.catalog()
    # the same schema as a database made fresh at the head
    fresh = Database("sqlite", str(tmp_path / "fresh.db")) if db.dialect == "sqlite" else db
    if db.dialect == "postgres":
        reset(db.target)
    async with opened(fresh):
        pass
    assert fresh.catalog() == migrated


async def test_an_empty_database_gets_every_migration_once_even_with_servers_starting_together(db: Database) -> None:
    stores = [make_store(db) for _ in range(3)]
    await asyncio.gather(*(s.open() for s in stores))
    try:
        for s in stores:
            assert await s.schema_status() == SchemaStatus(HEAD, HEAD, [])
    finally:
        for s in stores:
            await s.close()
    if db.dialect == "postgres":
        with db.connect() as conn:
            found = [r["version"] for r in conn.execute("SELECT version FROM scaleq_schema ORDER BY version")]
        assert found == list(range(1, HEAD + 1))


async def test_a_failed_migration_is_rolled_back_whole(db: Database) -> None:
    await build_at(db, 1)
    # an index of 0002's name is there already (made by hand): 0002 fails at its first statement
    with db.connect() as conn:
        conn.execute("CREATE INDEX jobs_stats ON jobs (seq)")
    async with opened(db, migrate=False) as store:
        with pytest.raises((sqlite3.Error, psycopg.Error), match="jobs_stats"):
            await store.migrate()
        status = await store.schema_status()
    assert status.version == db.version() == 1 and status.pending[0] == "0002_queue_stats_index"
    if db.dialect == "postgres":  # 0002's later statement (the drop) was rolled back with it
        with db.connect() as conn:
            assert conn.execute("SELECT to_regclass('jobs_queue_state') AS i").fetchone()["i"] is not None


# -- refusals ---------------------------------------------------------------------------------------------------------


async def test_a_database_newer_than_the_code_is_refused_untouched(db: Database) -> None:
    async with opened(db):
        pass
    newer = HEAD + 1
    with db.connect() as conn:
        if db.dialect == "sqlite":
            conn.execute(f"PRAGMA user_version={newer}")
        else:
            conn.execute("INSERT INTO scaleq_schema (version) VALUES (%s)", (newer,))
    for migrate in (True, False):
        store = make_store(db, migrate=migrate)
        try:
            if migrate:
                with pytest.raises(SchemaTooNew) as refused:
                    await store.open()
            else:
                await store.open()
                with pytest.raises(SchemaTooNew) as refused:
                    await store.schema_status()
        finally:
            await store.close()
        message = str(refused.value)
        assert f"schema version {newer}" in message and f"(version {HEAD})" in message
        assert "upgrade scaleq" in message
    assert db.version() == newer


# -- scaleq migrate ---------------------------------------------------------------------------------------------------


def migrate_cli(*args: str) -> Any:
    return runner.invoke(app, ["migrate", *args])


async def test_migrate_check_says_what_is_pending_and_migrate_applies_it(db: Database) -> None:
    await build_at(db, 1)
    pending = [m.label for m in migrations.load(db.dialect)[1:]]
    # (the CLI runs its own event loop: in a thread, beside this test's)
    check = await asyncio.to_thread(migrate_cli, "--store", db.target, "--check")
    assert check.exit_code == 1 and all(label in check.stdout for label in pending)
    check = await asyncio.to_thread(migrate_cli, "--store", db.target, "--check", "--output", "json")
    assert check.exit_code == 1
    assert json.loads(check.stdout) | {"store": None} == {
        "store": None,
        "version": 1,
        "head": HEAD,
        "pending": pending,
        "applied": [],
    }
    assert db.version() == 1  # --check changes nothing
    done = await asyncio.to_thread(migrate_cli, "--store", db.target, "--output", "json")
    assert done.exit_code == 0 and json.loads(done.stdout)["applied"] == pending
    assert db.version() == HEAD
    check = await asyncio.to_thread(migrate_cli, "--store", db.target, "--check")
    assert check.exit_code == 0 and "up to date" in check.stdout


def test_migrate_refuses_a_newer_database_and_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "scaleq.db"
    assert migrate_cli("--data-dir", str(tmp_path), "--check").exit_code == 1  # no store there
    assert not path.exists()
    assert migrate_cli("--data-dir", str(tmp_path)).exit_code == 1
    conn = sqlite3.connect(path)
    conn.execute(f"PRAGMA user_version={HEAD + 5}")
    conn.close()
    refused = migrate_cli("--data-dir", str(tmp_path))
    assert refused.exit_code == 1 and f"schema version {HEAD + 5}" in refused.output
