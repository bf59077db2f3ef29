"""SQLite store: the embedded default.

One connection, owned by one thread (a single writer is SQLite's nature, and WAL lets the one thread serve reads
fast); operations that wait for it while it is busy run together, one transaction per batch
(:mod:`scaleq.store.batching`). WAL mode with ``synchronous=NORMAL`` survives ``kill -9`` of the server — a committed
transaction is in the WAL before the call returns; ``durability="strict"`` uses ``synchronous=FULL`` for power-loss
safety too. The schema version is ``PRAGMA user_version``, set in the transaction of the migration it records;
``BEGIN IMMEDIATE`` takes the database's one write lock, which is the schema lock too.

The database holds job env values and token hashes: its file is made 0600 before SQLite opens it (SQLite gives its
``-wal`` and ``-shm`` files the database file's mode), and files left looser by an older version are tightened.
"""

from __future__ import annotations

import contextlib
import functools
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from scaleq.store.base import FinishResult
from scaleq.store.batching import Batches
from scaleq.store.migrations import Migration
from scaleq.store.queries import load
from scaleq.store.rows import Row
from scaleq.store.sql import SQLStore

T = TypeVar("T")


class SQLiteStore(SQLStore):
    dialect = "sqlite"
    Q = load("sqlite")

    def __init__(self, path: str | Path, *, durability: str = "normal", migrate: bool = True) -> None:
        super().__init__(threads=1, migrate=migrate)
        self.path = str(path)
        self.durability = durability
        self._conn: sqlite3.Connection | None = None
        self._batches = Batches(self._executor, lambda: self._conn, self._transaction)

    @property
    def batches_run(self) -> int:
        """How many batches of two operations or more ran in one transaction (see :mod:`scaleq.store.batching`)."""
        return self._batches.batches

    async def _in_thread(self, transaction: bool, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        result: T = await self._batches.run(functools.partial(fn, *args, **kwargs), transaction)
        return result

    async def _first(self, fn: Callable[[], T], transaction: bool = True) -> T:
        result: T = await self._batches.run(fn, transaction, first=True)
        return result

    def _finish_rows(self, finishes: list[tuple[str, FinishResult]], now: float) -> dict[str, Row]:
        done = {}
        for lease, result in finishes:
            fields = {"lease": lease, "reason": result.reason, "exit_code": result.exit_code, "error": result.error}
            row = self._one("finish", now=now, **fields)
            if row is not None:
                self.db.execute(self.Q["end_attempt"], {"lease": lease, "now": now, "outcome": result.reason})
                done[lease] = row
        return done

    def _touch_rows(self, ids: str, now: float) -> list[Row]:
        self.db.execute(self.Q["touch_workers"], {"ids": ids, "now": now})
        return self._all("workers_not_active", ids=ids)  # a read after the write: still autocommit's one write

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        assert self._conn is not None, "store is not open"
        yield self._conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:  # (SQLite may have rolled it back itself: SQLITE_FULL, an I/O error)
                conn.execute("ROLLBACK")
            raise

    def _connect_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
            for name in (self.path, f"{self.path}-wal", f"{self.path}-shm"):
                with contextlib.suppress(FileNotFoundError, PermissionError):
                    if stat.S_IMODE(os.stat(name).st_mode) & 0o077:
                        os.chmod(name, 0o600)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        # busy_timeout first: switching to WAL needs a lock, and without it a second opener (another process, a
        # migration) fails at once with "database is locked" instead of waiting its turn
        conn.execute("PRAGMA busy_timeout=5000")
        _to_wal(conn)
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'strict' else 'NORMAL'}")
        self._conn = conn
        self._local.conn = conn  # (this is the store thread: every operation runs on it, over this connection)

    def _where(self) -> str:
        return self.path

    def _schema_version(self, conn: sqlite3.Connection) -> int:
        return int(conn.execute(self.Q["schema_version"]).fetchone()[0])

    def _lock_schema(self, conn: sqlite3.Connection) -> None:
        """Nothing to add: the transaction began IMMEDIATE, holding the write lock."""

    def _apply(self, conn: sqlite3.Connection, migration: Migration) -> None:
        # statement by statement: executescript would commit the open transaction first
        for statement in _statements(migration.sql, migration.label):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {int(migration.version)}")  # (a pragma takes no parameters)

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = self._local.conn = None


def _to_wal(conn: sqlite3.Connection, patience: float = 5.0) -> None:
    """Switch to WAL. On a new database, openers racing to switch it can be refused at once ("database is locked":
    SQLite skips the busy handler where waiting could deadlock), so the switch is tried again for ``patience`` s."""
    deadline = time.monotonic() + patience
    while True:
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _statements(script: str, source: str) -> list[str]:
    """A script's statements, cut where SQLite's own tokenizer says one is complete (quotes, comments and
    triggers' bodies are read as SQLite reads them)."""
    statements, pending = [], ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            statements.append(pending.strip())
            pending = ""
    if any(not part.strip().startswith("--") for part in pending.splitlines() if part.strip()):
        raise ValueError(f"migration {source}: the last statement has no closing semicolon")
    return statements
