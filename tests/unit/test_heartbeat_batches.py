"""Heartbeats in batches (:class:`scaleq.store.heartbeats.HeartbeatBatches`), against a stand-in for the statement
that records each batch it is sent and holds it until the test lets it go."""

from __future__ import annotations

import asyncio

import pytest

from scaleq.store import heartbeats
from scaleq.store.heartbeats import Beat, HeartbeatBatches


class Statement:
    def __init__(self) -> None:
        self.batches: list[list[Beat]] = []
        self.go = asyncio.Event()
        self.fail: Exception | None = None

    async def __call__(self, beats: list[Beat]) -> dict[str, tuple[str | None, set[str]]]:
        self.batches.append(beats)
        await self.go.wait()
        if self.fail is not None:
            raise self.fail
        return {b.worker_id: ("active", set(b.held or [])) for b in beats if b.worker_id != "unknown"}


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_a_heartbeat_alone_goes_at_once_and_those_arriving_meanwhile_go_together(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heartbeats, "IN_FLIGHT", 1)
    stmt = Statement()
    batches = HeartbeatBatches(stmt)
    first = asyncio.create_task(batches.beat("w1", 100.0, 15.0, ["a"]))
    await settle()
    assert [[b.worker_id for b in batch] for batch in stmt.batches] == [["w1"]]  # no wait for company
    rest = [asyncio.create_task(batches.beat(f"w{i}", 100.0, 15.0, [f"l{i}"])) for i in range(2, 6)]
    await settle()
    assert len(stmt.batches) == 1  # IN_FLIGHT batches at a time
    stmt.go.set()
    assert await first == ("active", {"a"})
    assert [await t for t in rest] == [("active", {f"l{i}"}) for i in range(2, 6)]
    assert [[b.worker_id for b in batch] for batch in stmt.batches] == [["w1"], ["w2", "w3", "w4", "w5"]]


async def test_a_batch_held_up_holds_up_only_its_own_heartbeats() -> None:
    # two batches in flight: one stuck (a lock wait, a half-open connection) leaves the other way open
    stuck, stmt = asyncio.Event(), Statement()
    stmt.go.set()

    async def send(beats: list[Beat]) -> dict[str, tuple[str | None, set[str]]]:
        if beats[0].worker_id == "stuck":
            await stuck.wait()
        return await stmt(beats)

    batches = HeartbeatBatches(send)
    held = asyncio.create_task(batches.beat("stuck", 100.0, 15.0, None))
    await settle()
    for i in range(3):
        assert await batches.beat(f"w{i}", 100.0, 15.0, None) == ("active", set())
    assert not held.done()
    stuck.set()
    assert await held == ("active", set())


async def test_a_worker_is_in_one_batch_at_a_time_once_and_a_batch_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(heartbeats, "MAX_BATCH", 3)
    stmt = Statement()
    batches = HeartbeatBatches(stmt)
    stmt.go.set()
    beats = [asyncio.create_task(batches.beat(w, 100.0, 15.0, None)) for w in ["w1", "w1", "w2", "w3", "w4", "w5"]]
    await asyncio.gather(*beats)
    # w1 alone, then w2 (two in flight); w1's second beat waits for its first batch to end; w5 for the bound
    assert [[b.worker_id for b in batch] for batch in stmt.batches] == [["w1"], ["w2"], ["w1", "w3", "w4"], ["w5"]]


async def test_an_unknown_worker_gets_no_state_and_a_failed_batch_fails_each_of_its_beats() -> None:
    stmt = Statement()
    batches = HeartbeatBatches(stmt)
    stmt.go.set()
    assert await batches.beat("unknown", 100.0, 15.0, None) == (None, set())
    stmt.fail = ConnectionError("the database restarted")
    failed = [asyncio.create_task(batches.beat(w, 100.0, 15.0, None)) for w in ["w1", "w2"]]
    for t in failed:
        with pytest.raises(ConnectionError):
            await t
    stmt.fail = None
    assert await batches.beat("w1", 100.0, 15.0, ["x"]) == ("active", {"x"})  # the next batch is tried all the same


async def test_the_term_counts_from_when_the_batch_is_written(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [50.0]
    monkeypatch.setattr(heartbeats.time, "monotonic", lambda: clock[0])
    stmt = Statement()
    batches = HeartbeatBatches(stmt)
    waiting = asyncio.create_task(batches.beat("w1", 100.0, 15.0, None))
    await settle()
    clock[0] += 4.0  # four seconds in line before the statement runs
    assert stmt.batches[0][0].expires() == 100.0 + 15.0 + 4.0
    stmt.go.set()
    await waiting
