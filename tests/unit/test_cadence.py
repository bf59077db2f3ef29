"""The grid's heartbeat cadence (:mod:`scaleq.server.cadence`): the settings' interval for a small fleet, slower as
the busy workers pass the budget, never slower than three beats a lease."""

from __future__ import annotations

import pytest

from scaleq.server.cadence import Cadence, interval
from scaleq.server.settings import ServerSettings


@pytest.mark.parametrize(
    ("busy", "expected"),
    [(0, 2.0), (499, 2.0), (500, 2.0), (750, 3.0), (1_000, 4.0), (1_250, 5.0), (2_000, 5.0), (100_000, 5.0)],
)
def test_the_interval_grows_with_the_busy_workers_up_to_a_third_of_the_lease(busy: int, expected: float) -> None:
    settings = ServerSettings(lease_seconds=15.0, heartbeat_budget=250.0)
    assert interval(settings, busy) == pytest.approx(expected)


def test_a_short_lease_keeps_the_settings_interval_at_any_size() -> None:
    settings = ServerSettings(lease_seconds=3.0, heartbeat_budget=1.0)  # lease/3 = 1 s = the settings' interval
    assert settings.heartbeat_seconds == 1.0
    assert interval(settings, 10_000) == 1.0


def test_a_long_lease_lets_a_large_fleet_keep_to_the_budget() -> None:
    settings = ServerSettings(lease_seconds=300.0, heartbeat_budget=500.0)
    assert interval(settings, 50_000) == pytest.approx(100.0)  # 500 beats a second
    assert interval(settings, 500_000) == pytest.approx(100.0)  # a third of the lease: then over the budget


def test_the_cadence_follows_what_housekeeping_counts() -> None:
    cadence = Cadence(ServerSettings(lease_seconds=15.0, heartbeat_budget=100.0))
    assert (cadence.busy, cadence.heartbeat_seconds) == (0, 2.0)
    cadence.count(400)
    assert (cadence.busy, cadence.heartbeat_seconds) == (400, 4.0)
    cadence.count(3)
    assert cadence.heartbeat_seconds == 2.0
