"""The start-time estimate (scaleq.eta): a pure function of the queue ahead, the capacity and run times."""

from __future__ import annotations

import random
import time

import pytest

from scaleq.eta import DEFAULT_BOOT, Estimate, GroupCapacity, estimate, in_words, nth_opening, run_in_turn

NOW = 1_700_000_000.0


def group(**kw: object) -> GroupCapacity:
    base: dict[str, object] = {"name": "g", "slots": 1, "workers": 0, "max_workers": 10, "desired": 0}
    base.update(kw)
    return GroupCapacity(**base)  # type: ignore[arg-type]


def test_empty_queue_and_an_idle_worker_start_now() -> None:
    est = estimate(0, [group(workers=1, desired=1)], running=[], durations=[40.0], now=NOW)
    assert est.at == NOW
    assert est.ahead == 0 and est.slots == 1 and est.duration == 40.0
    assert "0 ahead" in est.basis and "1 worker x 1 slot" in est.basis


@pytest.mark.parametrize(("ahead", "slots"), [(12, 3), (13, 3), (1, 1), (7, 4), (100_000, 16)])
def test_n_ahead_on_s_busy_free_slots_wait_whole_runs(ahead: int, slots: int) -> None:
    """N jobs ahead on S slots free now, each run D: the job is in round floor(N / S), i.e. after that many runs."""
    est = estimate(ahead, [group(workers=slots, desired=slots)], running=[], durations=[30.0, 40.0, 50.0], now=NOW)
    assert est.duration == 40.0
    assert est.at == pytest.approx(NOW + (ahead // slots) * 40.0)
    assert f"{ahead} ahead" in est.basis and "median run 40 s" in est.basis


def test_running_jobs_free_their_slots_when_their_typical_run_ends() -> None:
    # 2 slots, both busy: one has run 10 s of a typical 40 (30 left), the other 35 s (5 left)
    est = estimate(0, [group(workers=2, desired=2)], running=[10.0, 35.0], durations=[40.0], now=NOW)
    assert est.at == pytest.approx(NOW + 5.0)
    est = estimate(1, [group(workers=2, desired=2)], running=[10.0, 35.0], durations=[40.0], now=NOW)
    assert est.at == pytest.approx(NOW + 30.0)
    # a run already past the typical one is expected to need half a typical run more
    est = estimate(0, [group(workers=1, desired=1)], running=[100.0], durations=[40.0], now=NOW)
    assert est.at == pytest.approx(NOW + 20.0)


def test_scale_from_zero_waits_for_a_boot_first() -> None:
    g = group(workers=0, desired=1, boot_seconds=12.0)
    est = estimate(0, [g], running=[], durations=[], now=NOW)
    assert est.at == pytest.approx(NOW + 12.0)
    assert "1 worker starting (typical boot 12 s)" in est.basis
    # the group's status may not have caught up with the submit: a group at zero still starts one
    est = estimate(0, [group(workers=0, desired=0, boot_seconds=12.0)], running=[], durations=[], now=NOW)
    assert est.at == pytest.approx(NOW + 12.0)
    # never observed booting: the default boot, and the basis says it is assumed
    est = estimate(0, [group(workers=0, desired=1)], running=[], durations=[], now=NOW)
    assert est.at == pytest.approx(NOW + DEFAULT_BOOT)
    assert f"boot assumed {DEFAULT_BOOT:.0f} s" in est.basis


def test_a_worker_part_way_into_its_boot_needs_only_the_rest() -> None:
    g = group(workers=0, desired=2, starting=[8.0, 2.0], boot_seconds=20.0, slots=2)
    # 4 slots: two open at +12, two at +18
    assert estimate(1, [g], [], [60.0], NOW).at == pytest.approx(NOW + 12.0)
    assert estimate(2, [g], [], [60.0], NOW).at == pytest.approx(NOW + 18.0)
    assert estimate(4, [g], [], [60.0], NOW).at == pytest.approx(NOW + 72.0)
    assert "2 workers starting (typical boot 20 s, 8 s in)" in estimate(0, [g], [], [60.0], NOW).basis


def test_capacity_is_capped_at_max_workers() -> None:
    # the policy wants 10 (its desired may say so) but the group stops at 2: 6 ahead on 2 slots is 3 rounds
    capped = group(workers=2, desired=10, max_workers=2)
    est = estimate(6, [capped], running=[], durations=[10.0], now=NOW)
    assert est.at == pytest.approx(NOW + 30.0)
    assert est.slots == 2
    assert "(at max 2)" in est.basis
    # below max, the workers the policy asked for count once booted
    growing = group(workers=2, desired=4, max_workers=4, boot_seconds=5.0)
    assert estimate(2, [growing], [], [10.0], NOW).at == pytest.approx(NOW + 5.0)
    assert "2 workers starting" in estimate(2, [growing], [], [10.0], NOW).basis


def test_nobody_can_run_it_is_unknown_with_the_reason() -> None:
    est = estimate(3, [], running=[], durations=[10.0], now=NOW, unfit="group gpu-pool has no gpus (it asks 1)")
    assert est.at is None
    assert est.basis == "nothing can run it: group gpu-pool has no gpus (it asks 1)"
    assert estimate(0, [], [], [], NOW).basis == "nothing can run it: no group and no worker serves its queue"
    # a group capped at zero workers runs nothing either
    est = estimate(0, [group(max_workers=0)], [], [10.0], NOW)
    assert est.at is None and "no worker up or to start" in est.basis


def test_waiting_on_runs_nobody_has_timed_is_unknown() -> None:
    est = estimate(1, [group(workers=1, desired=1)], running=[], durations=[], now=NOW)
    assert est.at is None and "no run of its queue finished yet" in est.basis
    # but a free slot needs no timing
    assert estimate(0, [group(workers=1, desired=1)], running=[], durations=[], now=NOW).at == NOW


def test_durations_ahead_are_used_as_given() -> None:
    est = estimate([5.0, 50.0, 5.0], [group(workers=2, desired=2)], running=[], durations=[99.0], now=NOW)
    # slot A: 5, then 5 more (third job) -> opens at 10; slot B busy until 50
    assert est.at == pytest.approx(NOW + 10.0)
    assert est.ahead == 3


def test_several_groups_pool_their_slots() -> None:
    a = group(name="a", workers=1, desired=1)
    b = group(name="b", workers=0, desired=1, boot_seconds=15.0, slots=2)
    est = estimate(1, [a, b], running=[], durations=[100.0], now=NOW)
    assert est.at == pytest.approx(NOW + 15.0)  # a takes the first job ahead; b's first slot opens after its boot
    assert "1 worker x 1 slot in a" in est.basis and "0 workers x 2 slots in b" in est.basis


def test_counting_openings_agrees_with_stepping_through_the_queue() -> None:
    rng = random.Random(7)
    for _ in range(300):
        free = [rng.choice([0.0, rng.uniform(0, 200)]) for _ in range(rng.randint(1, 9))]
        period = rng.choice([1.0, 7.5, 40.0, 333.0])
        k = rng.randint(0, 60)
        assert nth_opening(free, k, period) == pytest.approx(run_in_turn(free, [period] * k))


def test_in_words() -> None:
    at = NOW + 180
    assert in_words(Estimate(at, "", 0, 1, 1.0), NOW) == f"in ~3 min (at {time.strftime('%H:%M', time.localtime(at))})"
    assert in_words(Estimate(NOW + 45, "", 0, 1, 1.0), NOW).startswith("in ~45 s (at ")
    assert in_words(Estimate(NOW + 3 * 3600, "", 0, 1, 1.0), NOW).startswith("in ~3.0 h (at ")
    assert in_words(Estimate(NOW, "", 0, 1, 1.0), NOW) == "now"
    assert in_words(Estimate(None, "x", 0, 0, None), NOW) == "unknown"
