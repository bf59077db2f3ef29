"""Shared fixtures: a store, a live server on a free port, clients with tokens of each role."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve
from tests.pg import Cluster, reset, start_cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    cluster = start_cluster()
    yield cluster
    cluster.stop("immediate")
    shutil.rmtree(cluster.data, ignore_errors=True)


@pytest.fixture
def pg_url(pg_cluster: Cluster) -> str:
    reset(pg_cluster.url)
    return pg_cluster.url


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


@pytest.fixture(params=["sqlite", "postgres"])
async def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """Each store dialect in turn: tests that take it run against SQLite and PostgreSQL."""
    store: Store = (
        PostgresStore(request.getfixturevalue("pg_url"))
        if request.param == "postgres"
        else SQLiteStore(tmp_path / "scaleq.db")
    )
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def live(any_store: Store, settings: ServerSettings) -> AsyncIterator[LiveServer]:
    async with serve(any_store, settings) as server:
        yield server
