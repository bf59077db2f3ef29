"""PostgreSQL's queue counts after large folds: the deltas' dead rows are vacuumed away at once (issue 11).

``queue_stats`` reads the whole deltas table, dead rows included: right after a bulk load (900,000 deltas folded)
``GET /queues`` took 13-40 ms instead of 0.1 ms until autovacuum came by. A vacuum truncates a table whose pages hold
only dead rows, so the table's size on disk says whether one ran. Autovacuum is off for the table in these tests, so
nothing else vacuums it meanwhile.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import psycopg
import pytest

from scaleq.jobs import JobDefinition
from scaleq.store.postgres import VACUUM_DELTAS_AFTER, PostgresStore


@pytest.fixture
async def store(pg_url: str) -> AsyncIterator[PostgresStore]:
    s = PostgresStore(pg_url)
    await s.open()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("ALTER TABLE queue_count_deltas SET (autovacuum_enabled = false)")
    yield s
    await s.close()


def append_deltas(url: str, n: int) -> int:
    """``n`` deltas that move no count (as many statements would leave), and the table's size after them."""
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("INSERT INTO queue_count_deltas SELECT 'q', 0, 0, 0, 0 FROM generate_series(1, %s)", (n,))
        return table_size(conn)


def table_size(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT pg_relation_size('queue_count_deltas')").fetchone()
    assert row is not None
    return int(row[0])


async def test_a_large_fold_leaves_no_dead_rows_behind(store: PostgresStore, pg_url: str) -> None:
    await store.submit("q", JobDefinition(command=["true"]), priority=0, max_attempts=3, rerun=False, now=1.0)
    assert append_deltas(pg_url, VACUUM_DELTAS_AFTER) > 0
    await store.fold_queue_counts()
    with psycopg.connect(pg_url) as conn:
        assert table_size(conn) == 0, "the folded deltas' pages were not vacuumed away"
    [stats] = await store.queue_stats()
    assert (stats.queue, stats.queued) == ("q", 1)  # the submit's own delta was folded with the rest


async def test_a_small_fold_leaves_the_vacuum_to_autovacuum(store: PostgresStore, pg_url: str) -> None:
    size = append_deltas(pg_url, VACUUM_DELTAS_AFTER // 10)
    await store.fold_queue_counts()
    with psycopg.connect(pg_url) as conn:
        assert table_size(conn) == size  # deleted, not vacuumed: no VACUUM per sweep of a quiet grid
        assert conn.execute("SELECT count(*) FROM queue_count_deltas").fetchone() == (0,)


async def test_folds_that_add_up_to_a_large_one_are_vacuumed_too(store: PostgresStore, pg_url: str) -> None:
    """A bulk load through the API folds a few thousand deltas a round: what counts is the total since a vacuum."""
    part = VACUUM_DELTAS_AFTER * 6 // 10
    size = append_deltas(pg_url, part)
    await store.fold_queue_counts()
    with psycopg.connect(pg_url) as conn:
        assert table_size(conn) == size  # 60 % of the way: not yet
    append_deltas(pg_url, part)
    await store.fold_queue_counts()
    with psycopg.connect(pg_url) as conn:
        assert table_size(conn) == 0, "the folded deltas' pages were not vacuumed away"
