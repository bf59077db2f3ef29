"""A server's LISTEN connection lost and made again: what other servers published meanwhile is treated as missed.

While the listener is down, other servers' NOTIFYs never reach this one: a job one of them queued would wait for a
claim parked here until its long-poll ended (20 s). So each (re)connect delivers ``MISSED``, which wakes the oldest
claim parked on every queue and counts as news for the workers whose last try found nothing (scaleq.notify)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import psycopg
import pytest

from scaleq.notify import MISSED
from scaleq.store.postgres import CHANNEL, PostgresStore


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(300):  # the listener reconnects within 0.2 s; this bounds a hang, it times nothing
        if condition():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never: {what}")


async def test_a_server_hears_other_servers_once_listen_returns(pg_store: PostgresStore, pg_url: str) -> None:
    """The server serves only after ``listen`` returns: a NOTIFY sent before the LISTEN would be lost, and the first
    LISTEN's MISSED, landing later, would wake a claim parked meanwhile a second time."""
    delivered: list[tuple[str, ...]] = []
    await pg_store.listen(delivered.append)
    assert delivered == [("any", MISSED)]
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("SELECT pg_notify(%s, %s)", (CHANNEL, "queue:q"))
    await until(lambda: ("queue:q",) in delivered, "another server's NOTIFY")


async def test_a_database_that_refuses_the_listener_does_not_hold_the_server_back(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    tries = 0

    async def refused(*args: object, **kwargs: object) -> psycopg.AsyncConnection:
        nonlocal tries
        tries += 1
        raise psycopg.OperationalError("connection refused")

    monkeypatch.setattr(psycopg.AsyncConnection, "connect", refused)
    delivered: list[tuple[str, ...]] = []
    await pg_store.listen(delivered.append)  # returns after the first attempt failed, and the listener tries on
    assert tries == 1
    assert delivered == []
    await until(lambda: tries >= 2, "a second attempt")


async def test_a_listener_that_reconnects_delivers_missed(pg_store: PostgresStore, pg_url: str) -> None:
    delivered: list[tuple[str, ...]] = []
    await pg_store.listen(delivered.append)
    assert delivered.count(("any", MISSED)) == 1  # the first LISTEN
    with psycopg.connect(pg_url, autocommit=True) as conn:
        killed = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE query LIKE 'LISTEN %' AND datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
    assert killed == [(True,)]
    await until(lambda: delivered.count(("any", MISSED)) == 2, "a second LISTEN after the first was cut")
