"""scaleq's scaling policy: a pure function, tested directly."""

from __future__ import annotations

import math
import random

import pytest

from scaleq.grid import PolicySettings
from scaleq.scaling.forecast import Activity, observe, spare_jobs
from scaleq.scaling.policy import Decision, Demand, PolicyState, WorkerView, decide


def idle(wid: str, since: float, started: float = 0.0) -> WorkerView:
    return WorkerView(wid, started, "idle", 0, since)


def busy(wid: str, started: float = 0.0, slots: int = 1) -> WorkerView:
    return WorkerView(wid, started, "busy", slots)


def starting(wid: str, started: float) -> WorkerView:
    return WorkerView(wid, started, "starting")


def run(queued: int, running: int, workers=(), now: float = 100.0, state=None, **settings) -> Decision:
    s = PolicySettings(**{"max_workers": 10, **settings})
    return decide(Demand(now, queued, running), list(workers), s, state or PolicyState(), now)


def test_scales_up_from_zero_on_the_first_job_at_once():
    d = run(1, 0, [], max_workers=5)
    assert (d.desired, d.start, d.drain) == (1, 1, ())
    assert d.reason == "1 job waiting, 0 running, 1 slot per worker → 1 worker; have 0; starting 1"


def test_no_jobs_no_workers_is_no_change():
    d = run(0, 0, [])
    assert (d.desired, d.start, d.drain) == (0, 0, ())
    assert d.reason.endswith("no change")


def test_sizes_by_slots():
    assert run(7, 2, slots=4).desired == 3  # ceil(9 / 4)
    assert run(8, 0, slots=4).desired == 2
    assert run(0, 1, [busy("a")], slots=4).start == 0


def test_clamped_to_max_and_min():
    d = run(6, 0, [], max_workers=3)
    assert (d.desired, d.start) == (3, 3)
    assert d.reason == (
        "6 jobs waiting, 0 running, 1 slot per worker → 6 workers (capped at max_workers 3); have 0; starting 3"
    )
    d = run(0, 0, [], min_workers=2, max_workers=3)
    assert (d.desired, d.start) == (2, 2)
    assert "raised to min 2" in d.reason


def test_min_workers_are_never_drained():
    workers = [idle(f"w{i}", since=0.0) for i in range(3)]
    d = run(0, 0, workers, min_workers=2, idle_timeout=10)
    assert len(d.drain) == 1
    assert d.desired == 2


def test_idle_timeout_is_respected():
    workers = [busy("b"), idle("i", since=41.0)]  # idle for 59 s at now=100
    d = run(0, 1, workers, idle_timeout=60, scale_down_window=0)
    assert d.drain == ()
    assert "1 idle worker not idle for 60 s yet (longest 59 s)" in d.reason
    assert d.reason.startswith("0 jobs waiting, 1 running")
    d = run(0, 1, workers, now=101.0, idle_timeout=60, scale_down_window=0)
    assert d.drain == ("i",)
    assert "draining 1: i (idle for at least 60 s)" in d.reason


def test_idle_since_none_means_idle_since_start():
    d = run(0, 0, [WorkerView("i", 0.0, "idle")], idle_timeout=60)
    assert d.drain == ("i",)


def test_longest_idle_drained_first_then_newest_started():
    workers = [idle("short", since=90.0), idle("long", since=10.0), idle("old", 20.0, 0.0), idle("new", 20.0, 5.0)]
    d = run(0, 1, [busy("b"), *workers], idle_timeout=5, scale_down_window=0)
    assert d.drain == ("long", "new", "old", "short")
    d = run(0, 6, [busy("b1"), busy("b2"), busy("b3"), *workers], idle_timeout=5, scale_down_window=0)
    assert d.drain == ("long",)  # 7 workers for 6 jobs: only 1 too many; the others stay


def test_busy_and_starting_workers_are_never_drained_even_above_max():
    workers = [busy("b1"), busy("b2"), idle("i1", 99.0), idle("i2", 99.5), starting("s", 99.0)]
    d = run(0, 2, workers, max_workers=2, idle_timeout=600)
    # over max: idle ones go at once, whatever their idle time; busy and starting ones stay
    assert set(d.drain) == {"i1", "i2"}
    assert d.desired == 2
    assert "2 idle workers above max 2" in d.reason
    assert "1 still starting" in d.reason


def test_max_lowered_with_only_busy_workers_waits_for_them():
    d = run(0, 3, [busy("a"), busy("b"), busy("c")], max_workers=1)
    assert d.drain == () and d.start == 0
    assert "2 extra workers busy (busy workers are never drained)" in d.reason


def test_stabilisation_window_damps_thrash():
    settings = {"idle_timeout": 0, "scale_down_window": 60, "headroom": 0}  # the window alone, without a spare
    workers = [busy(f"w{i}") for i in range(5)]
    d1 = run(0, 5, workers, now=0.0, **settings)
    assert d1.desired == 5
    # demand drops: 4 workers went idle, but the peak of the last 60 s is still 5
    calm = [busy("w0"), *(idle(f"w{i}", since=10.0) for i in range(1, 5))]
    d2 = run(0, 1, calm, now=10.0, state=d1.state, **settings)
    assert (d2.desired, d2.drain) == (5, ())
    assert "keeping 5, the peak of the last 60 s (scale-down window)" in d2.reason
    # demand comes back before the window ends: nothing was drained, nothing has to start
    d3 = run(0, 5, workers, now=30.0, state=d2.state, **settings)
    assert (d3.desired, d3.start, d3.drain) == (5, 0, ())
    d4 = run(0, 1, calm, now=95.0, state=d3.state, **settings)
    assert d4.desired == 1 and len(d4.drain) == 4


def test_window_state_stays_small():
    state, s = PolicyState(), PolicySettings(max_workers=50, scale_down_window=60)
    rng = random.Random(1)
    for t in range(2000):
        state = decide(Demand(t, rng.randint(0, 40), 0), [], s, state, float(t)).state
        values = [r for _, r in state.recommendations]
        assert values == sorted(values, reverse=True) and len(set(values)) == len(values)
        assert all(t - at < 60 for at, _ in state.recommendations)


def test_scale_up_is_not_held_back_by_the_window():
    d1 = run(0, 0, [], now=0.0, scale_down_window=600, headroom=0)
    d2 = run(4, 0, [], now=1.0, state=d1.state, scale_down_window=600, headroom=0)
    assert d2.start == 4


def test_max_step_up_limits_the_rate_of_starts():
    s = {"max_step_up": 2, "step_period": 10}
    d1 = run(5, 0, [], now=0.0, **s)
    assert d1.start == 2
    assert "starting 2 of 5 (max_step_up 2 per 10 s)" in d1.reason
    d2 = run(5, 0, [starting("a", 0.0), starting("b", 0.0)], now=5.0, state=d1.state, **s)
    assert d2.start == 0
    assert "no change: 3 more wanted, but max_step_up 2 per 10 s is used up" in d2.reason
    d3 = run(5, 0, [starting("a", 0.0), starting("b", 0.0)], now=10.5, state=d2.state, **s)
    assert d3.start == 2


def test_starting_workers_count_as_capacity_within_grace():
    workers = [starting("a", 90.0), starting("b", 95.0)]
    d = run(2, 0, workers, startup_grace=300)
    assert (d.start, d.drain) == (0, ())
    assert "have 2 (2 starting)" in d.reason
    late = [starting("a", 0.0), starting("b", 350.0)]
    d = run(2, 0, late, now=400.0, startup_grace=300)
    assert d.start == 1 and d.lapsed == ("a",)  # the lapsed one is stopped; it still counts toward max meanwhile
    assert "1 worker not registered after 300 s (stopping it)" in d.reason


class FakeClock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def test_workers_that_never_register_never_exceed_max_workers():
    """The runaway of issue 10: max 3, workers that never come up, the controller's 1 s tick for 25 minutes. Each
    lapsed worker is stopped (its machine takes a while to go: it is listed as draining meanwhile), and a
    replacement starts only as a machine goes -- never more than 3 machines."""
    clock, s = FakeClock(1000.0), PolicySettings(max_workers=3, startup_grace=300)
    machines: dict[str, tuple[float, float | None]] = {}  # id → (started at, stopped at)
    state, serial, most, lapsed_total = PolicyState(), 0, 0, 0
    delete_takes = 45.0
    end = clock() + 25 * 60
    while clock() < end:
        now = clock()
        machines = {i: m for i, m in machines.items() if m[1] is None or now - m[1] < delete_takes}
        views = [
            WorkerView(i, at, "starting" if stopped is None else "draining") for i, (at, stopped) in machines.items()
        ]
        d = decide(Demand(now, 10, 0), views, s, state, now)
        state = d.state
        for i in d.lapsed:
            assert machines[i][1] is None and now - machines[i][0] >= s.startup_grace
            machines[i] = (machines[i][0], now)
            lapsed_total += 1
        for _ in range(d.start):
            serial += 1
            machines[f"w{serial}"] = (now, None)
        most = max(most, len(machines))
        assert len(machines) <= s.max_workers, d.reason
        clock.advance(1.0)
    assert most == 3 and lapsed_total >= 12  # replaced round after round, never piled up
    assert serial == lapsed_total + sum(1 for _, stopped in machines.values() if stopped is None)


def test_a_lapsed_worker_still_counts_toward_max_until_its_machine_goes():
    d = run(5, 0, [starting("a", 0.0), starting("b", 0.0), busy("c")], now=400.0, max_workers=3, startup_grace=300)
    assert (d.desired, d.start, d.lapsed) == (3, 0, ("a", "b"))
    assert d.reason.endswith("no change: 2 more wanted, but 3 of max 3 machines exist (registered or not)")
    # below max, a replacement starts beside the lapsed one being deleted, up to max
    d = run(5, 0, [starting("a", 0.0), busy("c")], now=400.0, max_workers=3, startup_grace=300)
    assert (d.start, d.lapsed) == (1, ("a",))
    assert "starting 1 of 2 (2 of max 3 machines exist (registered or not))" in d.reason


def test_draining_workers_do_not_count():
    workers = [WorkerView("d1", 0.0, "draining", 1), WorkerView("d2", 0.0, "draining", 1)]
    d = run(2, 2, workers)
    assert d.start == 4
    assert "2 draining (not counted)" in d.reason


def test_draining_workers_count_toward_max_until_they_are_gone():
    # max 3: a busy worker told to drain leaves 2 running ones; no replacement until it is gone
    workers = [busy("a"), busy("b"), WorkerView("d", 0.0, "draining", 1)]
    d = run(5, 3, workers, max_workers=3)
    assert (d.desired, d.start, d.drain) == (3, 0, ())
    assert "have 2 (2 busy); 1 draining (not counted)" in d.reason
    assert d.reason.endswith("no change: 1 more wanted, but 1 draining count toward max 3 until they are gone")
    # it left: its replacement starts
    gone = run(5, 2, workers[:2], max_workers=3)
    assert gone.start == 1
    # below max, a draining worker leaves room for its replacement up to max only
    d = run(9, 1, [busy("a"), WorkerView("d", 0.0, "draining", 1)], max_workers=4)
    assert (d.desired, d.start) == (4, 2)
    assert "starting 2 of 3 (1 draining count toward max 4 until they are gone)" in d.reason


def test_reason_has_the_numbers_in_a_no_change_case():
    d = run(0, 3, [busy("a"), busy("b"), busy("c")], slots=1)
    assert d.reason == "0 jobs waiting, 3 running, 1 slot per worker → 3 workers; have 3 (3 busy); no change"


def test_decide_is_pure_and_deterministic():
    workers = [busy("a"), idle("b", 0.0), starting("c", 99.0)]
    first = run(3, 1, workers, idle_timeout=10)
    assert all(run(3, 1, workers, idle_timeout=10) == first for _ in range(3))


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"min_workers": 3, "max_workers": 2}, "max_workers"),
        ({"min_workers": -1}, "min_workers"),
        ({"slots": 0}, "slots"),
        ({"slots": 1.5}, "slots"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"scale_down_window": float("nan")}, "scale_down_window"),
        ({"step_period": 0}, "step_period"),
        ({"startup_grace": -5}, "startup_grace"),
        ({"max_step_up": 0}, "max_step_up"),
        ({"max_workers": True}, "max_workers"),
        ({"headroom": -0.5}, "headroom"),
        ({"headroom": float("inf")}, "headroom"),
        ({"lookahead": float("nan")}, "lookahead"),
        ({"demand_halflife": 0}, "demand_halflife"),
    ],
)
def test_nonsense_settings_are_refused_naming_the_field(settings, field):
    with pytest.raises(ValueError, match=field):
        PolicySettings(**settings)


def test_property_random_inputs_never_drain_busy_and_keep_bounds():
    rng = random.Random(20240601)
    for _ in range(3000):
        lo = rng.randint(0, 4)
        s = PolicySettings(
            min_workers=lo,
            max_workers=rng.randint(lo, lo + 8),
            slots=rng.randint(1, 4),
            idle_timeout=rng.choice([0.0, 5.0, 60.0]),
            scale_down_window=rng.choice([0.0, 30.0, 120.0]),
            max_step_up=rng.choice([None, 1, 3]),
            startup_grace=rng.choice([10.0, 300.0]),
            headroom=rng.choice([0.0, 1.0, 3.0]),
            lookahead=rng.choice([0.0, 30.0, 120.0]),
        )
        now = 1000.0
        workers = []
        for i in range(rng.randint(0, 14)):
            kind = rng.choice(["starting", "idle", "busy", "draining"])
            started = now - rng.uniform(0, 600)
            since = rng.choice([None, rng.uniform(started, now)]) if kind == "idle" else None
            workers.append(WorkerView(f"w{i}", started, kind, rng.randint(1, s.slots) if kind == "busy" else 0, since))
        state = PolicyState(
            recommendations=tuple(sorted((now - rng.uniform(0, 200), rng.randint(0, 12)) for _ in range(3))),
            recent_starts=((now - rng.uniform(0, 20), rng.randint(0, 3)),),
            activity=rng.choice([None, Activity(now - rng.uniform(0, 300), rng.randint(0, 40), rng.uniform(0, 500))]),
        )
        d = decide(Demand(now, rng.randint(0, 30), rng.randint(0, 10)), workers, s, state, now)
        kinds = {w.id: w.state for w in workers}
        assert all(kinds[i] == "idle" for i in d.drain), d
        assert len(set(d.drain)) == len(d.drain)
        assert s.min_workers <= d.desired <= s.max_workers
        assert d.start >= 0 and not (d.start and d.drain)
        capacity = sum(
            1
            for w in workers
            if w.state in ("idle", "busy") or (w.state == "starting" and now - w.started_at < s.startup_grace)
        )
        assert capacity - len(d.drain) >= min(s.min_workers, capacity)
        assert capacity + d.start <= max(s.max_workers, capacity)
        assert not d.start or len(workers) + d.start <= s.max_workers  # every machine counts toward max
        assert set(d.lapsed) == {
            w.id for w in workers if w.state == "starting" and now - w.started_at >= s.startup_grace
        }
        draining = sum(1 for w in workers if w.state == "draining")
        assert d.start == 0 or capacity + draining + d.start <= s.max_workers  # draining count until gone
        if s.max_step_up is not None:
            assert d.start <= s.max_step_up
        if capacity <= s.max_workers:  # drains below max only for workers idle long enough
            for i in d.drain:
                w = next(w for w in workers if w.id == i)
                assert now - (w.idle_since if w.idle_since is not None else w.started_at) >= s.idle_timeout
        assert d.reason


# --- the spare for the demand's noise (scaleq.scaling.forecast) ---

HALF = 180.0  # demand_halflife
# ≈ 0.4 changes of queued + running per second (12 jobs of a minute each: 0.2 arrivals + 0.2 completions a second);
# over a 30 s lookahead √(0.4 · 30) ≈ 3.5 → a spare of 3 jobs at headroom 1, 4 at the default 1.2
BUSY = Activity(100.0, 4, 0.4 * HALF / math.log(2))


def test_noisy_demand_keeps_a_worker_that_the_idle_timeout_alone_would_drain():
    settings = {"idle_timeout": 20, "scale_down_window": 20, "lookahead": 30, "demand_halflife": HALF}
    state = PolicyState(activity=BUSY)
    workers = [*(busy(f"b{i}") for i in range(4)), idle("spare", since=40.0)]  # idle 60 s > idle_timeout
    plain = run(0, 4, workers, state=state, headroom=0, **settings)
    assert plain.drain == ("spare",) and plain.desired == 4
    kept = run(0, 4, workers, state=state, headroom=1, **settings)
    assert (kept.desired, kept.start, kept.drain) == (7, 2, ())  # 4 + 3 spare: the idle one stays, 2 more start
    assert "7 with a spare of 3 jobs for the demand's noise (24.0 changes/min; headroom 1, lookahead 30 s)" in (
        kept.reason
    )


def test_the_spare_is_started_before_the_jobs_that_need_it():
    d = run(0, 4, [busy(f"b{i}") for i in range(4)], state=PolicyState(activity=BUSY), demand_halflife=HALF)
    assert (d.desired, d.start, d.drain) == (8, 4, ())
    workers, state = [busy(f"b{i}") for i in range(4)], PolicyState(activity=BUSY)
    d = run(0, 4, workers, state=state, demand_halflife=HALF, headroom=2, max_workers=20)
    assert (d.desired, d.start) == (11, 7)  # 2 · √(0.4 · 30) ≈ 6.9 → 7


def test_the_spare_respects_max_workers_and_max_step_up():
    state = PolicyState(activity=BUSY)
    d = run(0, 4, [busy(f"b{i}") for i in range(4)], state=state, demand_halflife=HALF, max_workers=5)
    assert (d.desired, d.start) == (5, 1)
    d = run(0, 4, [busy(f"b{i}") for i in range(4)], state=state, demand_halflife=HALF, max_step_up=2)
    assert (d.desired, d.start) == (8, 2)
    assert "max_step_up 2 per 10 s" in d.reason


def test_a_huge_spare_is_clamped_not_an_overflow():
    huge = Activity(0.0, 1000, 1e300)  # an absurd activity: the product would overflow floor()
    assert spare_jobs(huge, 1e300, 1e300, 1.0) == 10**9
    d = run(0, 4, [busy(f"b{i}") for i in range(4)], state=PolicyState(activity=huge), max_workers=7)
    assert (d.desired, d.start) == (7, 3)


def test_a_capped_count_is_said_as_a_lower_bound():
    d = decide(Demand(0.0, 6, 0, capped=True), [], PolicySettings(max_workers=3, slots=2), PolicyState(), 0.0)
    assert d.reason.startswith("≥6 jobs waiting") and d.desired == 3


def test_the_spare_never_drains_a_busy_worker_and_min_workers_hold():
    state = PolicyState(activity=BUSY)
    workers = [busy(f"b{i}") for i in range(6)]
    d = run(0, 6, workers, state=state, demand_halflife=HALF, max_workers=4)  # max lowered below 6 busy workers
    assert d.drain == () and d.start == 0 and d.desired == 4
    d = run(0, 1, [busy("b")], state=state, demand_halflife=HALF, min_workers=6)
    assert d.desired == 6  # 1 + 4 spare < min 6


def test_no_spare_without_work_so_scale_to_zero_is_unchanged():
    state = PolicyState(activity=BUSY)
    d = run(0, 0, [idle("a", since=70.0), idle("b", since=85.0)], state=state, demand_halflife=HALF)
    assert (d.desired, d.drain) == (0, ("a",))  # idle 30 s ≥ idle_timeout 20 s; b (15 s) goes on a later call
    assert "spare" not in d.reason


def test_quiet_demand_keeps_no_spare():
    state = PolicyState()
    for k in range(8):  # one 5-minute job every 15 minutes
        t = 900.0 * k
        state = run(1, 0, [], now=t, state=state).state
        state = run(0, 1, [busy("b")], now=t + 1, state=state).state
        state = run(0, 0, [idle("b", t + 300.0)], now=t + 301, state=state).state
    assert spare_jobs(state.activity, 1.0, 30.0, PolicySettings().demand_halflife) == 0
    d = run(1, 0, [], now=7200.0, state=state)
    assert (d.desired, d.start) == (1, 1)
    assert "spare" not in d.reason


def test_a_noisy_trace_builds_a_spare_and_quiet_lets_it_decay():
    state, t = PolicyState(), 0.0
    while t < 300.0:  # 4 or 5 jobs, changing every 2 s: 0.5 changes/s → √(0.5 · 30) ≈ 3.9 → 4
        state = run(0, 4 + int(t) % 4 // 2, [], now=t, state=state, demand_halflife=HALF).state
        t += 2.0
    d = run(0, 4, [], now=t, state=state, demand_halflife=HALF)
    assert d.desired == 4 + spare_jobs(d.state.activity, PolicySettings().headroom, 30.0, HALF) >= 8
    later = run(0, 4, [], now=t + 6 * HALF, state=d.state, demand_halflife=HALF)  # six half-lives without a change
    assert later.desired == 4 and "spare" not in later.reason


def test_spare_is_counted_in_jobs_and_divided_by_slots():
    state = PolicyState(activity=Activity(0.0, 8, BUSY.count))
    d = decide(Demand(0.0, 0, 8), [], PolicySettings(max_workers=10, slots=4, demand_halflife=HALF), state, 0.0)
    assert d.desired == 3  # ceil((8 + 4) / 4)
    d = decide(Demand(0.0, 0, 8), [], PolicySettings(max_workers=10, slots=4, headroom=0), state, 0.0)
    assert d.desired == 2


def test_activity_is_a_pure_fold_of_the_observations():
    a = observe(None, 5, 10.0, 60.0)
    assert a == Activity(10.0, 5, 0.0)  # the first observation only sets the level
    b = observe(a, 8, 10.0, 60.0)
    assert b == Activity(10.0, 8, 3.0)
    c = observe(b, 7, 70.0, 60.0)  # one half-life later: 3 → 1.5, plus one change
    assert c.count == pytest.approx(2.5)
    assert observe(b, 7, 70.0, 60.0) == c
