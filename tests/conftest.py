"""Shared fixtures: a store, a live server on a free port, clients with tokens of each role."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "scaleq.db")
    await store.open()
    yield store
    await store.close()


@pytest.fixture
def settings() -> ServerSettings:
    # short leases so expiry tests take seconds
    return ServerSettings(lease_seconds=2.0, sweep_interval=0.2, long_poll_max=5.0)


@pytest.fixture
async def live(sqlite_store: SQLiteStore, settings: ServerSettings) -> AsyncIterator[LiveServer]:
    async with serve(sqlite_store, settings) as server:
        yield server
