"""The fault campaign (issue 12): real servers, workers, PostgreSQL and the autoscaler killed at random while jobs
are submitted; nothing acknowledged is lost, nothing is finished twice, no two runs of a job overlap beyond the
lease, and nothing is left running. See :mod:`tests.faults.campaign`.

Bounded and seeded: ``SCALEQ_CAMPAIGN_SECONDS`` (default 40) is how long faults are injected in each scenario,
``SCALEQ_CAMPAIGN_SEED`` (default 12) picks the sequence of faults. Each scenario prints its table (``pytest -s``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.campaign import Settings, autoscale_campaign, postgres_campaign
from tests.pg import Cluster, start_cluster

SECONDS = float(os.environ.get("SCALEQ_CAMPAIGN_SECONDS", "40"))
SEED = int(os.environ.get("SCALEQ_CAMPAIGN_SEED", "12"))

# the suite's 120 s per test is too short for a campaign: its faults, then up to drain_timeout for the jobs
pytestmark = pytest.mark.timeout(SECONDS + Settings(0, 0).drain_timeout + 180)


@pytest.fixture
def settings() -> Settings:
    return Settings(seconds=SECONDS, seed=SEED)


@pytest.fixture
def crashable_cluster() -> Iterator[Cluster]:
    """A cluster of its own: the campaign crashes it, which other tests sharing one must not see."""
    cluster = start_cluster()
    try:
        yield cluster
    finally:
        try:
            cluster.stop("immediate")
        finally:
            shutil.rmtree(cluster.data, ignore_errors=True)


def test_postgres_two_servers_killed_workers_killed_database_crashed(
    crashable_cluster: Cluster, tmp_path: Path, settings: Settings
) -> None:
    result = postgres_campaign(crashable_cluster, tmp_path, settings)
    print(f"\n{result.table}\n")
    assert result.account.faults["kill server"] and result.account.faults["crash postgres"], result.table
    assert result.account.jobs > 0, result.table
    assert result.failures() == [], f"{result.table}\n" + "\n".join(result.failures())


def test_sqlite_autoscaler_killed_while_workers_start_and_drain(tmp_path: Path, settings: Settings) -> None:
    result = autoscale_campaign(tmp_path, settings)
    print(f"\n{result.table}\n")
    assert result.account.faults["kill scaleq up"], result.table
    assert result.account.jobs > 0, result.table
    assert result.failures() == [], f"{result.table}\n" + "\n".join(result.failures())
