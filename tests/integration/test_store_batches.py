"""SQLite's store runs the operations that wait for its thread together, one transaction per batch
(:mod:`scaleq.store.batching`): each caller must get exactly what running them one by one would have given."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from scaleq.jobs import JobDefinition, Worker
from scaleq.store import batching
from scaleq.store.base import NotFound
from scaleq.store.sqlite import SQLiteStore


def keys(store: SQLiteStore) -> list[str]:
    return [r["k"] for r in store.db.execute("SELECT k FROM scratch ORDER BY k")]


@contextlib.asynccontextmanager
async def thread_held(store: SQLiteStore, seconds: float = 0.0) -> AsyncIterator[None]:
    """Hold the store's thread with an operation of its own while inside (and for at least ``seconds``): the
    operations started inside wait in line, and run after it, together. Its start is waited for, not guessed at (a
    sleep of the event loop's was: on a slow machine the hold began late, and the line joined its batch)."""
    entered, release = threading.Event(), threading.Event()

    def hold() -> None:
        entered.set()
        release.wait(60)

    holding = asyncio.create_task(store.tx(hold))
    assert await asyncio.to_thread(entered.wait, 60)
    began = time.monotonic()
    try:
        yield
        await asyncio.sleep(0.05)  # the operations started inside take their places (steps of this loop alone)
        await asyncio.sleep(max(0.0, seconds - (time.monotonic() - began)))
    finally:
        release.set()
        await holding


def start(*calls: Any) -> list[asyncio.Future[Any]]:
    return [asyncio.ensure_future(c) for c in calls]


async def test_operations_waiting_together_commit_together_and_a_failing_one_alone_is_undone(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one batch whatever the machine's load: at 20 ms, a store thread descheduled mid-batch split the line in two
    monkeypatch.setattr(batching, "MAX_SECONDS", 5.0)
    store = sqlite_store
    await store.tx(lambda: store.db.execute("CREATE TABLE scratch (k TEXT PRIMARY KEY)"))

    def insert(k: str, then_fail: bool = False) -> str:
        store.db.execute("INSERT INTO scratch (k) VALUES (?)", (k,))
        if then_fail:
            raise ValueError(f"{k} failed after its insert")
        return k

    before = store.batches_run
    async with thread_held(store):  # what comes meanwhile waits, and runs as one batch
        calls = []
        for i in range(20):
            k = f"k{i:02d}"
            if i == 5:
                calls.append(store.tx(insert, k, True))  # fails after writing: its write must go, alone
            elif i == 9:
                calls.append(store.tx(insert, "k03"))  # a real SQLite error (duplicate key), inside the batch
            else:
                calls.append(store.tx(insert, k))
        calls.append(store.get_job("no-such-job"))  # a store operation's own error
        started = start(*calls)
    outcomes = await asyncio.gather(*started, return_exceptions=True)
    assert store.batches_run == before + 1
    assert isinstance(outcomes[5], ValueError) and isinstance(outcomes[9], sqlite3.IntegrityError)
    assert isinstance(outcomes[20], NotFound)
    expected = [f"k{i:02d}" for i in range(20) if i not in (5, 9)]
    assert [o for i, o in enumerate(outcomes[:20]) if i not in (5, 9)] == expected
    assert await store.tx(keys, store) == expected


async def test_a_batch_whose_transaction_breaks_runs_each_operation_again_on_its_own(
    sqlite_store: SQLiteStore,
) -> None:
    store = sqlite_store
    await store.tx(lambda: store.db.execute("CREATE TABLE scratch (k TEXT PRIMARY KEY)"))

    def insert(k: str) -> str:
        store.db.execute("INSERT INTO scratch (k) VALUES (?)", (k,))
        return k

    def breaks() -> None:
        # as SQLite does on SQLITE_FULL or an I/O error: the whole transaction is rolled back under the batch
        store.db.execute("ROLLBACK")
        raise sqlite3.OperationalError("disk I/O error")

    async with thread_held(store):
        started = start(store.tx(insert, "a"), store.tx(insert, "b"), store.tx(breaks), store.tx(insert, "c"))
    outcomes = await asyncio.gather(*started, return_exceptions=True)
    assert outcomes[:2] == ["a", "b"] and outcomes[3] == "c"
    # alone, the breaking operation fails again (its ROLLBACK ends its own transaction): its caller gets an error
    assert isinstance(outcomes[2], sqlite3.OperationalError)
    assert await store.tx(keys, store) == ["a", "b", "c"]  # each once: nothing of the broken batch was kept


async def test_a_submit_and_the_claims_behind_it_in_one_batch_run_in_their_order(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store's own operations, batched: two workers' claims queued behind a submit, in one transaction — the
    first claim takes the job, the second finds nothing, exactly as one after the other."""
    # one batch whatever the machine's load: at 20 ms, a store thread descheduled mid-batch split the line in two
    monkeypatch.setattr(batching, "MAX_SECONDS", 5.0)
    store = sqlite_store
    now = time.time()
    for wid in ("w1", "w2"):
        caps = {"cpus": 4.0, "memory": 8 << 30, "gpus": 0, "runtimes": ["process"]}
        await store.register_worker(Worker(id=wid, queue="q", slots=1, started_at=now, last_heartbeat=now, **caps), now)
    before = store.batches_run
    async with thread_held(store):
        started = start(
            store.submit("q", JobDefinition(command=["true"]), priority=0, max_attempts=1, rerun=False, now=now),
            store.worker_claim("w1", 1, now, 30),
            store.worker_claim("w2", 1, now, 30),
        )
    submitted, c1, c2 = await asyncio.gather(*started)
    assert store.batches_run == before + 1
    assert [c.job.id for c in c1.claims] == [submitted[0].id] and c2.claims == []
    assert (await store.get_job(submitted[0].id)).state == "running"


async def test_a_lease_granted_or_renewed_after_a_wait_in_line_still_lasts_its_full_term(
    sqlite_store: SQLiteStore,
) -> None:
    """An overloaded server's operations wait in line for the store: a lease must be reckoned from when it is
    written, not from when its request arrived, or a worker's first heartbeat comes after it has expired."""
    store = sqlite_store
    t0 = time.time()
    caps = {"cpus": 4.0, "memory": 8 << 30, "gpus": 0, "runtimes": ["process"]}
    await store.register_worker(Worker(id="w1", queue="q", slots=2, started_at=t0, last_heartbeat=t0, **caps), t0)
    for cmd in ("a", "b"):
        await store.submit("q", JobDefinition(command=[cmd]), priority=0, max_attempts=1, rerun=False, now=t0)
    async with thread_held(store, 0.5):  # the line: half a second
        (claim,) = start(store.worker_claim("w1", 1, t0, 10.0))  # asked at t0, written over 0.5 s later
    got = await claim
    assert await store.expire_leases(t0 + 10.2) == []  # would have expired at t0 + 10 if reckoned from the ask
    asked = time.monotonic()
    async with thread_held(store, 0.5):
        (renewal,) = start(store.heartbeat("w1", t0 + 5, 10.0, [got.claims[0].lease]))  # the same for a renewal
    await renewal
    # the renewal waited in line no longer than this block took (about 0.5 s, more on a loaded machine): its lease
    # ends by t0 + 15 + that, and is over just after (a fixed t0 + 16.5 failed if the line took over 1.5 s)
    waited = time.monotonic() - asked
    assert await store.expire_leases(t0 + 15.2) == []
    assert [e.job_id for e in await store.expire_leases(t0 + 15 + waited + 0.1)] == [got.claims[0].job.id]


async def test_an_operation_after_the_store_closed_fails_at_once_and_so_does_the_next(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "scaleq.db")
    await store.open()
    await store.close()
    for job_id in ("a", "b"):  # the first must not leave the queue stuck for the second
        with pytest.raises(RuntimeError):
            await asyncio.wait_for(store.get_job(job_id), 5)


async def test_a_long_line_is_taken_in_batches_that_stop_after_their_time(
    sqlite_store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Operations behind a slow one go into the next batch: the answers before it wait for it alone."""
    # quick1 must end inside the batch's time and slow outside it: 0.5 s leaves quick1 far more than it needs on a
    # loaded machine (at 20 ms, a store thread descheduled in quick1 cut the batch before slow), and slow's 1 s is
    # past it for sure (a sleep is never shorter than asked)
    monkeypatch.setattr(batching, "MAX_SECONDS", 0.5)
    store = sqlite_store
    before = store.batches_run
    order: list[str] = []
    counted: dict[str, int] = {}  # the batches (of two or more) done when each step ran

    def step(name: str, seconds: float) -> str:
        counted[name] = store.batches_run
        time.sleep(seconds)
        order.append(name)
        return name

    async with thread_held(store):
        started = start(store.tx(step, "quick1", 0), store.tx(step, "slow", 1.0), store.tx(step, "quick2", 0))
    assert await asyncio.gather(*started) == ["quick1", "slow", "quick2"]
    assert order == ["quick1", "slow", "quick2"]
    assert store.batches_run == before + 1  # quick1 and slow together; quick2 after them, alone
    assert counted == {"quick1": before, "slow": before, "quick2": before + 1}  # quick2 ran after that batch ended


async def test_a_heartbeat_and_a_liveness_touch_go_ahead_of_the_claims_waiting_in_line(
    sqlite_store: SQLiteStore,
) -> None:
    """A server short of CPU has a line of claims for the store: a lease renewal that waits behind all of them comes
    late, and late enough is an expired lease. Operations merely waiting have no order their callers could see, so
    renewals and touches are taken first."""
    store = sqlite_store
    t0 = time.time()
    caps = {"cpus": 4.0, "memory": 8 << 30, "gpus": 0, "runtimes": ["process"]}
    for wid in ("w1", "w2"):
        await store.register_worker(Worker(id=wid, queue="q", slots=1, started_at=t0, last_heartbeat=t0, **caps), t0)
    seen: list[tuple[str, float, float]] = []

    def read(name: str) -> str:  # what a claim waiting in line sees of the workers' last word
        w1, w2 = (r[0] for r in store.db.execute("SELECT last_heartbeat FROM workers ORDER BY id"))
        seen.append((name, w1, w2))
        return name

    async with thread_held(store):
        started = start(
            *[store.tx(read, f"claim{i}") for i in range(30)],
            store.heartbeat("w1", t0 + 5, 15.0),
            store.touch_workers(["w2"], t0 + 7),
        )
    await asyncio.gather(*started)
    assert [name for name, _, _ in seen] == [f"claim{i}" for i in range(30)]  # the rest keep their order
    assert all((w1, w2) == (t0 + 5, t0 + 7) for _, w1, w2 in seen)  # every one of them ran after both
