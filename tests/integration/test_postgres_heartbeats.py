"""PostgreSQL writes the heartbeats that arrive together as one statement (:mod:`scaleq.store.heartbeats`): fewer
statements than heartbeats under a burst, and a batch that PostgreSQL picks as a deadlock's victim tried again."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from scaleq.jobs import JobDefinition, RuntimeKind, Worker
from scaleq.store.heartbeats import Beat
from scaleq.store.postgres import PostgresStore

T0 = 1_000_000.0


async def fleet(store: PostgresStore, n: int) -> dict[str, str]:
    """``n`` workers, each running one job: worker id -> lease."""
    leases = {}
    for i in range(n):
        w = Worker(
            id=f"w{i:03d}",
            queue="q",
            slots=1,
            started_at=T0,
            last_heartbeat=T0,
            runtimes=[RuntimeKind.process],
            cpus=1.0,
            memory=1 << 30,
            gpus=0,
            tags=[],
            host_network=False,
        )
        await store.register_worker(w, T0)
        await store.submit(
            "q", JobDefinition(command=["true", str(i)]), priority=0, max_attempts=3, rerun=False, now=T0
        )
        (claim,) = await store.claim(w.id, 1, T0, 5)
        leases[w.id] = claim.lease
    return leases


async def test_a_burst_of_heartbeats_is_written_in_fewer_statements_each_answered_as_its_own(
    pg_store: PostgresStore,
) -> None:
    leases = await fleet(pg_store, 60)
    sent: list[int] = []
    send = pg_store._beats.send

    async def counting(beats: list[Beat]) -> Any:
        sent.append(len(beats))
        return await send(beats)

    pg_store._beats.send = counting
    answers = await asyncio.gather(*(pg_store.heartbeat(w, T0 + 4, 5, held=[lease]) for w, lease in leases.items()))
    assert answers == [("active", {lease}) for lease in leases.values()]
    assert sum(sent) == 60 and len(sent) < 60  # the first alone, the rest together
    assert await pg_store.expire_leases(T0 + 8.9) == []


async def test_a_batch_rolled_back_as_a_deadlocks_victim_is_tried_again(
    pg_store: PostgresStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    leases = await fleet(pg_store, 2)
    real, victims = pg_store._all, []

    def deadlocked_once(query: str, **params: Any) -> Any:
        if query == "worker_heartbeats" and not victims:
            victims.append(query)
            raise psycopg.errors.DeadlockDetected("deadlock detected")
        return real(query, **params)

    monkeypatch.setattr(pg_store, "_all", deadlocked_once)
    answers = await asyncio.gather(*(pg_store.heartbeat(w, T0 + 4, 5) for w in leases))
    assert victims and answers == [("active", {lease}) for lease in leases.values()]


async def test_the_touch_of_parked_workers_skips_a_row_another_write_holds_rather_than_wait_for_it(
    pg_store: PostgresStore,
) -> None:
    """The touch (one statement for every worker parked on a server) never waits on a row lock: waiting, it held the
    locks of the rows it had touched while it queued, and at a fleet's teardown drains and heartbeat batches queued
    behind it until they timed out. The worker whose row is held is talking to a server; the next tick touches it."""
    await fleet(pg_store, 2)
    async with await psycopg.AsyncConnection.connect(pg_store.url) as other:
        await other.execute("UPDATE workers SET state = 'draining' WHERE id = 'w000'")  # in flight: w000's row held
        # (waiting, it would wait until the rollback); w000 still active as far as the touch can see
        assert await asyncio.wait_for(pg_store.touch_workers(["w000", "w001"], T0 + 10), 30) == []
        await other.rollback()
    assert (await pg_store.get_worker("w000")).last_heartbeat == T0  # skipped this tick
    assert (await pg_store.get_worker("w001")).last_heartbeat == T0 + 10
    await pg_store.touch_workers(["w000", "w001"], T0 + 12)  # the next tick, the row free again
    assert (await pg_store.get_worker("w000")).last_heartbeat == T0 + 12
