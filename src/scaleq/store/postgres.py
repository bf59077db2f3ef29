"""PostgreSQL store: several stateless servers on one database.

The operations are :class:`scaleq.store.sql.SQLStore`'s, run on a small thread pool over a psycopg 3 connection pool
(``psycopg_pool``). Claims use ``FOR UPDATE SKIP LOCKED``, so concurrent claimers never wait on or share a row.
Wake-ups cross servers with LISTEN/NOTIFY: whatever a server notifies locally it also publishes on the ``scaleq``
channel (batched), and a listener task feeds what other servers publish into its own notifier. A database restart is
survived: the pool replaces broken connections, the listener reconnects with backoff, and a request that fails while
the database is away gets 503 (workers retry), so nothing acknowledged is lost.

The schema is created and migrated by scaleq (table ``scaleq_schema``); a database newer than the code is refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from scaleq.store.base import SchemaTooNew
from scaleq.store.queries import load
from scaleq.store.sql import SQLStore

SCHEMA_VERSION = 1
CHANNEL = "scaleq"
log = logging.getLogger("scaleq.store")


class PostgresStore(SQLStore):
    Q = load("postgres")

    def __init__(self, url: str, *, pool_size: int = 8, durability: str = "normal") -> None:
        super().__init__(threads=pool_size)
        self.url = url
        self.pool_size = pool_size
        self.durability = durability
        self._pool: ConnectionPool | None = None
        self._listener: asyncio.Task[None] | None = None
        self._pending: set[str] = set()
        self._flush: asyncio.Task[None] | None = None

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection]:
        assert self._pool is not None, "store is not open"
        with self._pool.connection() as conn:
            yield conn

    @contextmanager
    def _transaction(self, conn: psycopg.Connection) -> Iterator[None]:
        with conn.transaction():
            yield

    def _configure(self, conn: psycopg.Connection) -> None:
        conn.row_factory = dict_row  # type: ignore[assignment]
        if self.durability == "strict":
            conn.execute("SET synchronous_commit = on")

    def _open_sync(self) -> None:
        self._pool = ConnectionPool(
            self.url,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            check=ConnectionPool.check_connection,
            open=False,
            name="scaleq",
        )
        self._pool.open(wait=True, timeout=15)
        with self._pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(727274)")  # one migrator at a time across servers
            conn.execute("CREATE TABLE IF NOT EXISTS scaleq_schema (version INTEGER NOT NULL)")
            version = conn.execute(self.Q["schema_version"]).fetchone()["version"] or 0
            if version > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"the database has scaleq schema version {version}, newer than this scaleq ({SCHEMA_VERSION}): "
                    "upgrade scaleq"
                )
            if version < SCHEMA_VERSION:
                conn.execute(self.Q["schema"])
                conn.execute(self.Q["set_schema_version"], {"version": SCHEMA_VERSION})

    def _close_sync(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    async def close(self) -> None:
        for task in (self._listener, self._flush):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await super().close()

    # -- cross-server wake-ups --------------------------------------------------------------------------------

    def publish(self, keys: tuple[str, ...]) -> None:
        """Queue keys for NOTIFY; one batch goes out per event-loop turn."""
        self._pending.update(keys)
        if self._flush is None or self._flush.done():
            self._flush = asyncio.get_running_loop().create_task(self._send())

    async def _send(self) -> None:
        await asyncio.sleep(0)
        keys, self._pending = self._pending, set()
        if not keys:
            return
        payload = "\n".join(sorted(keys))
        try:
            await self._run(lambda: self.db.execute("SELECT pg_notify(%s, %s)", (CHANNEL, payload)))
        except psycopg.Error as exc:
            log.warning("could not publish wake-ups: %s", exc)

    async def listen(self, deliver: Callable[[tuple[str, ...]], None]) -> None:
        """Start feeding other servers' wake-ups into ``deliver`` (reconnecting as needed)."""
        self._listener = asyncio.create_task(self._listen(deliver))

    async def _listen(self, deliver: Callable[[tuple[str, ...]], None]) -> None:
        delay = 0.2
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    await conn.execute(f"LISTEN {CHANNEL}")
                    delay = 0.2
                    deliver(("any",))  # anything may have happened while we were not listening
                    async for note in conn.notifies():
                        deliver(tuple(note.payload.split("\n")))
            except (psycopg.Error, OSError) as exc:
                log.warning("LISTEN connection lost (%s); reconnecting in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
