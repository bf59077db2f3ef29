"""Fixtures of the acceptance suite: real ``scaleq up`` grids (see :mod:`tests.acceptance.support`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.support import Grid


def _grid(tmp_path_factory: pytest.TempPathFactory, name: str, lease_seconds: float | None) -> Iterator[Grid]:
    grid = Grid(tmp_path_factory.mktemp(name) / "data", lease_seconds=lease_seconds)
    try:
        grid.start()
        yield grid
    finally:
        grid.stop()


@pytest.fixture
def tmp_path(open_tmp_path: Path) -> Path:
    """The test's own files (gates, pid files, counters its jobs touch): where the grids' jobs can reach them.

    ``scaleq up`` runs as root here, so its process jobs run as ``nobody``, which cannot enter pytest's own temp dirs.
    """
    return open_tmp_path


@pytest.fixture(scope="session")
def shared_grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """One grid for the tests that only need a working grid (each uses its own job definitions)."""
    yield from _grid(tmp_path_factory, "shared", None)


@pytest.fixture
def grid(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Grid]:
    """A fresh, empty grid with 6-second leases, for tests about failures and scaling."""
    # short enough that a lost lease comes back quickly, long enough that a worker process stalled a few seconds on a
    # loaded machine keeps its lease (at 3 s, a 2 s stall could add a lost attempt)
    yield from _grid(tmp_path_factory, "grid", 6.0)
