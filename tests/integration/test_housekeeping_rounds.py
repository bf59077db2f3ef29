"""The housekeeping timer says how long its rounds take, and logs one slow enough to make parked workers' touches late.

A round is slowed by a store whose lease sweep waits first (a store waiting in line behind a fleet's requests does
that); the server's SQLite store does the rest for real.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from scaleq.notify import Notifier
from scaleq.server import housekeeping
from scaleq.server.liveness import OpenClaims
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Expired
from scaleq.store.sqlite import SQLiteStore

# heartbeats every 0.2 s: a round over SLOW_ROUNDS * 0.2 = 1 s is slow
SETTINGS = ServerSettings(lease_seconds=0.6, sweep_interval=0.05)


class SlowSweeps:
    """The store, with its lease sweeps ``delays`` seconds late, one delay per sweep (then none)."""

    def __init__(self, store: SQLiteStore, delays: list[float]) -> None:
        self.store = store
        self.delays = delays

    async def expire_leases(self, now: float) -> list[Expired]:
        if self.delays:
            await asyncio.sleep(self.delays.pop(0))
        return await self.store.expire_leases(now)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.store, name)


async def rounds(store: Any, n: int, open_claims: OpenClaims) -> list[float]:
    """Run the timer until it has observed ``n`` rounds; their durations."""
    seen: list[float] = []
    task = asyncio.create_task(
        housekeeping.run(store, Notifier(), SETTINGS, time.time, open_claims, observe=seen.append)
    )
    try:
        while len(seen) < n:
            assert not task.done(), task  # the timer never stops by itself: if it did, say so rather than hang
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return seen


async def test_each_round_is_observed_and_a_slow_one_is_logged(
    sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture
) -> None:
    open_claims = OpenClaims()
    with caplog.at_level(logging.WARNING, logger="scaleq.server"), open_claims.parked("w-1"):
        took = await rounds(SlowSweeps(sqlite_store, [1.1]), 3, open_claims)
    assert took[0] >= 1.1 and max(took[1:]) < 1.0, took
    [slow] = [r.getMessage() for r in caplog.records if "housekeeping took" in r.getMessage()]
    assert "1 parked" in slow


async def test_rounds_at_their_pace_log_nothing(sqlite_store: SQLiteStore, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="scaleq.server"):
        took = await rounds(SlowSweeps(sqlite_store, [0.3]), 3, OpenClaims())
    assert took[0] >= 0.3
    assert not [r for r in caplog.records if "housekeeping took" in r.getMessage()]
