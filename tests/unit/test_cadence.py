"""The grid's heartbeat cadence (:mod:`scaleq.server.cadence`): the settings' beat and lease for a small fleet;
past the budget a slower beat and a lease of three beats, never slower than three beats before a gone-mark."""

from __future__ import annotations

import pytest

from scaleq.server.cadence import Cadence, interval, lease
from scaleq.server.settings import ServerSettings

DEFAULT = ServerSettings()  # lease 15 s, beat 2 s, gone after 45 s, budget 250 beats a second


@pytest.mark.parametrize(
    ("busy", "beat", "term"),
    [
        (0, 2.0, 15.0),
        (500, 2.0, 15.0),
        (1_000, 4.0, 15.0),
        (1_250, 5.0, 15.0),
        (2_000, 8.0, 24.0),
        (3_750, 15.0, 45.0),
        (100_000, 15.0, 45.0),  # a third of worker_gone_after: the slowest beat
    ],
)
def test_past_the_budget_the_beat_slows_and_the_lease_is_three_beats(busy: int, beat: float, term: float) -> None:
    assert interval(DEFAULT, busy) == pytest.approx(beat)
    assert lease(DEFAULT, interval(DEFAULT, busy)) == pytest.approx(term)


def test_a_longer_term_granted_before_the_beat_quickened_is_allowed_for_as_long_as_it_lasts() -> None:
    t = [0.0]
    cadence = Cadence(ServerSettings(heartbeat_budget=100.0), clock=lambda: t[0])
    assert (cadence.longest_term(), cadence.slowest_beat()) == (15.0, 2.0)
    cadence.count(1_000)  # 10 s beats, 30 s leases
    assert (cadence.longest_term(), cadence.slowest_beat()) == (30.0, 10.0)
    cadence.count(500)  # 5 s beats, 15 s leases: one granted just before may live 30 s more, its worker at 10 s
    t[0] = 20.0
    cadence.count(0)  # quicker again: what was held over is kept, not replaced by the shorter 5 s / 15 s
    t[0] = 29.0
    assert (cadence.lease_seconds, cadence.longest_term(), cadence.slowest_beat()) == (15.0, 30.0, 10.0)
    t[0] = 30.0  # a lease term after the first quickening: every lease granted before it renewed since, or gone
    assert (cadence.longest_term(), cadence.slowest_beat()) == (15.0, 2.0)


def test_claims_count_at_once_and_only_slow_the_beat() -> None:
    cadence = Cadence(ServerSettings(heartbeat_budget=100.0))
    for _ in range(10):
        cadence.claimed(100)  # a thousand jobs handed out before housekeeping counts them
    assert (cadence.busy, cadence.heartbeat_seconds, cadence.lease_seconds) == (1_000, 10.0, 30.0)
    cadence.count(200)  # housekeeping's count stands: they finished meanwhile
    assert cadence.heartbeat_seconds == 2.0


def test_a_worker_is_given_up_on_after_three_of_the_longest_leases_that_may_be_live() -> None:
    t = [0.0]
    cadence = Cadence(ServerSettings(), clock=lambda: t[0])
    assert cadence.gone_after() == 45.0  # the settings' worker_gone_after: three 15 s leases
    cadence.count(100_000)  # 15 s beats, 45 s leases
    assert cadence.gone_after() == 135.0
    cadence.count(0)
    assert cadence.gone_after() == 135.0  # a 45 s lease granted just before may still stand
    t[0] = 45.0
    assert cadence.gone_after() == 45.0


def test_a_long_lease_of_the_settings_keeps_the_settings_gone_mark() -> None:
    cadence = Cadence(ServerSettings(lease_seconds=60.0))  # leases already longer than three 15 s beats
    cadence.count(100_000)
    assert (cadence.lease_seconds, cadence.gone_after()) == (60.0, 45.0)


def test_a_short_gone_mark_keeps_the_settings_beat_at_any_size() -> None:
    settings = ServerSettings(lease_seconds=3.0, worker_gone_after=3.0, heartbeat_budget=1.0)
    assert settings.heartbeat_seconds == 1.0
    assert interval(settings, 10_000) == 1.0
    assert lease(settings, 1.0) == 3.0


def test_the_cadence_follows_what_housekeeping_counts() -> None:
    cadence = Cadence(ServerSettings(heartbeat_budget=100.0))
    assert (cadence.busy, cadence.heartbeat_seconds, cadence.lease_seconds) == (0, 2.0, 15.0)
    cadence.count(1_000)
    assert (cadence.busy, cadence.heartbeat_seconds, cadence.lease_seconds) == (1_000, 10.0, 30.0)
    cadence.count(3)
    assert (cadence.heartbeat_seconds, cadence.lease_seconds) == (2.0, 15.0)
