"""Shared fixtures: a store, a live server on a free port, clients with tokens of each role, the Docker Engine."""

from __future__ import annotations

import os
import shutil
from collections.abc import AsyncIterator, Generator, Iterator
from pathlib import Path

import docker
import pytest

from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve
from tests.helpers.engine import connect
from tests.helpers.opendirs import open_dir
from tests.pg import Cluster, reset, start_cluster


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, object, None]:
    """Under scripts/test (SCALEQ_NO_SKIP=1), where every service the tests need is installed and started, a skip is
    a failure: a skipped test there would be a missing service or a bug, counted as a pass."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.skipped and os.environ.get("SCALEQ_NO_SKIP") and not hasattr(report, "wasxfail"):
        report.outcome = "failed"
        report.longrepr = f"skipped under scripts/test, where nothing may skip: {report.longrepr}"


@pytest.fixture
def open_tmp_path() -> Iterator[Path]:
    """A fresh temp dir that every user may enter and write, for tests whose jobs run as another user
    (see :mod:`tests.helpers.opendirs`)."""
    with open_dir() as path:
        yield path


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
async def pg_store(pg_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(pg_url)
    await store.open()
    yield store
    await store.close()


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


@pytest.fixture
async def sqlite_live(sqlite_store: SQLiteStore, settings: ServerSettings) -> AsyncIterator[LiveServer]:
    """For tests where the store's dialect does not matter."""
    async with serve(sqlite_store, settings) as server:
        yield server


@pytest.fixture(scope="session")
def engine() -> Iterator[docker.DockerClient]:
    """The Docker Engine at ``$DOCKER_HOST`` with the test image (see :mod:`tests.helpers.engine`)."""
    client = connect()
    yield client
    client.close()
