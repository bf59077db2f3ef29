"""SQLite store: the embedded default.

One connection, owned by one thread (a single writer is SQLite's nature, and WAL lets the one thread serve reads
fast). WAL mode with ``synchronous=NORMAL`` survives ``kill -9`` of the server — a committed transaction is in the
WAL before the call returns; ``durability="strict"`` uses ``synchronous=FULL`` for power-loss safety too. The schema
version is ``PRAGMA user_version``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from scaleq.store.base import SchemaTooNew
from scaleq.store.queries import load
from scaleq.store.sql import SQLStore

SCHEMA_VERSION = 2


class SQLiteStore(SQLStore):
    Q = load("sqlite")

    def __init__(self, path: str | Path, *, durability: str = "normal") -> None:
        super().__init__(threads=1)
        self.path = str(path)
        self.durability = durability
        self._conn: sqlite3.Connection | None = None

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        assert self._conn is not None, "store is not open"
        yield self._conn

    @contextmanager
    def _transaction(self, conn: sqlite3.Connection) -> Iterator[None]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def _open_sync(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={'FULL' if self.durability == 'strict' else 'NORMAL'}")
        conn.execute("PRAGMA busy_timeout=5000")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            conn.close()
            raise SchemaTooNew(
                f"{self.path} has schema version {version}, newer than this scaleq ({SCHEMA_VERSION}): upgrade scaleq"
            )
        conn.executescript(self.Q["schema"])
        if 0 < version < 2:  # a version-1 file: its groups table predates the columns the schema now creates
            conn.executescript(self.Q["migrate_2"])
        conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
        self._conn = conn

    def _close_sync(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
