"""The simulator: deterministic, sane metrics, clear trace errors."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from rich.console import Console

from scaleq.grid import PolicySettings
from scaleq.sim import (
    POLICIES,
    Action,
    Trace,
    TraceError,
    check_targets,
    default_traces,
    load_csv,
    render_table,
    render_targets,
    run_simulation,
    simulate,
)
from scaleq.sim.peers import KedaLike, MigLike, ScaleqPolicy
from scaleq.sim.traces import bursts, steady

SETTINGS = PolicySettings(max_workers=8)


def small_traces() -> list[Trace]:
    return [steady(seed=7, length=1800.0), bursts(seed=8, every=900.0, size=(5, 15), length=2700.0)]


def test_simulation_is_deterministic_for_a_seed():
    a = run_simulation(small_traces(), list(POLICIES), SETTINGS, boot_time=30.0, seed=3)
    b = run_simulation(small_traces(), list(POLICIES), SETTINGS, boot_time=30.0, seed=3)
    assert a == b
    assert [(r.trace, r.policy) for r in a] == [(t.name, p) for t in small_traces() for p in POLICIES]


def test_random_dispatch_is_deterministic_too():
    a = run_simulation(small_traces(), ["scaleq"], SETTINGS, 30.0, dispatch="random", seed=5)
    assert a == run_simulation(small_traces(), ["scaleq"], SETTINGS, 30.0, dispatch="random", seed=5)


def test_traces_are_deterministic_per_seed():
    assert default_traces() == default_traces()
    assert default_traces(seed=1) != default_traces()
    for trace in default_traces():
        arrivals = [a for a, _ in trace.jobs]
        assert arrivals == sorted(arrivals) and trace.jobs
        assert all(d >= 0 for _, d in trace.jobs)
        assert trace.horizon > arrivals[-1]


@pytest.mark.parametrize("boot_time", [2.0, 30.0])
def test_metrics_are_sane_and_scaleq_loses_no_work(boot_time):
    results = run_simulation(small_traces(), list(POLICIES), SETTINGS, boot_time)
    for r in results:
        assert r.finished == r.jobs, r
        assert all(w >= 0 and not math.isnan(w) for w in r.waits)
        assert 0 <= r.wait_p50 <= r.wait_p95 <= r.wait_max
        assert 0 <= r.idle_worker_seconds <= r.worker_seconds
        assert 1 <= r.peak_workers <= SETTINGS.max_workers
        assert r.started >= r.peak_workers
        if r.policy == "scaleq":
            assert r.jobs_killed == 0 and r.lost_work == 0
    # the worker-exported-metric MIG never goes below one VM
    for r in results:
        if r.policy == "mig-worker":
            assert min(workers for _, _, workers in r.series[1:]) >= 1


def test_scale_from_zero_waits_only_for_the_boot():
    trace = Trace.of("one", [(10.0, 5.0), (500.0, 5.0)])
    r = simulate(trace, ScaleqPolicy(PolicySettings(max_workers=2)), slots=1, boot_time=2.0)
    assert r.waits == (2.0, 2.0)
    idle = PolicySettings().idle_timeout  # a lone job is no noise: no spare, drained after the idle timeout
    assert r.started == 2  # drained in between, started again for the second job
    assert r.worker_seconds == pytest.approx(2 * (2 + 5 + idle), abs=1.0)
    assert r.idle_worker_seconds == pytest.approx(2 * idle, abs=1.0)
    assert "1 job waiting, 0 running" in r.events[0][3]


def test_peers_are_slower_from_zero():
    trace = Trace.of("one", [(10.0, 5.0)])
    keda = simulate(trace, KedaLike(PolicySettings(max_workers=2)), slots=1, boot_time=2.0)
    assert keda.waits == (22.0,)  # next KEDA poll at 30 s, + 2 s boot
    mig = simulate(trace, MigLike(PolicySettings(max_workers=2)), slots=1, boot_time=2.0)
    assert mig.waits == (112.0,)  # sampled at 60 s, acted on one period later at 120 s, + boot


class _KillBusy:
    """A test policy: one worker at t=0; at t=50 stops it, whatever it is doing."""

    name, event_driven, period, floor = "killer", False, 50.0, 0

    def __init__(self, grace: float) -> None:
        self.kill_grace = grace

    def step(self, demand, workers, now):
        alive = [w for w in workers if w.state != "draining"]
        if now == 50.0:
            return Action(0, 0, tuple(w.id for w in alive), "kill")
        if not alive:
            return Action(1, 1, (), "start")
        return Action(len(alive), 0, (), "keep")


def test_a_killed_job_is_requeued_and_its_work_counted_as_lost():
    trace = Trace("k", ((0.0, 100.0),), horizon=0.0)
    r = simulate(trace, _KillBusy(grace=0.0), slots=1, boot_time=0.0)
    assert (r.jobs_killed, r.lost_work) == (1, 50.0)
    assert r.finished == 1
    assert r.waits[0] == pytest.approx(100.0)  # killed at 50 s, restarted at 100 s by the next poll
    # with a long enough grace, the job finishes on the leaving worker
    r = simulate(trace, _KillBusy(grace=60.0), slots=1, boot_time=0.0)
    assert (r.jobs_killed, r.lost_work, r.waits) == (0, 0.0, (0.0,))


def test_slots_pack_jobs_onto_one_worker():
    trace = Trace.of("slots", [(0.0, 10.0)] * 4)
    r = simulate(trace, ScaleqPolicy(PolicySettings(max_workers=4, slots=4)), slots=4, boot_time=1.0)
    assert r.peak_workers == 1 and r.waits == (1.0,) * 4


def test_report_table_and_targets():
    results = run_simulation(small_traces(), ["scaleq", "keda", "mig"], SETTINGS, 30.0)
    table = render_table(results)
    assert table.row_count == len(results)
    checks = check_targets(results)
    assert {(c.trace, c.peer) for c in checks} == {(t.name, p) for t in small_traces() for p in ("keda", "mig")}
    console = Console(width=200, record=True)
    console.print(table)
    console.print(render_targets(checks))
    text = console.export_text()
    assert "idle worker·s" in text and "steady" in text


def test_plot_writes_one_png_per_trace(tmp_path: Path):
    from scaleq.sim import plot

    results = run_simulation(small_traces()[:1], ["scaleq", "keda"], SETTINGS, 30.0)
    paths = plot(results, tmp_path)
    assert paths == [tmp_path / "sim-steady.png"]
    assert paths[0].read_bytes()[:4] == b"\x89PNG"


def test_run_simulation_refuses_bad_parameters():
    with pytest.raises(ValueError, match="boot_time"):
        run_simulation(small_traces(), ["scaleq"], SETTINGS, -1.0)
    with pytest.raises(ValueError, match="unknown policy 'hpa'"):
        run_simulation(small_traces(), ["hpa"], SETTINGS, 1.0)
    with pytest.raises(ValueError, match="dispatch"):
        run_simulation(small_traces(), ["scaleq"], SETTINGS, 1.0, dispatch="lifo")  # type: ignore[arg-type]


# --- CSV traces ---------------------------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "trace.csv"
    path.write_text(text)
    return path


def test_load_csv(tmp_path: Path):
    path = write(tmp_path, "arrival_seconds,duration_seconds,note\n5,10,b\n\n0,2.5,a\n")
    trace = load_csv(path)
    assert trace.name == "trace"
    assert trace.jobs == ((0.0, 2.5), (5.0, 10.0))
    assert trace.horizon > 5.0


def test_load_csv_columns_in_any_order(tmp_path: Path):
    trace = load_csv(write(tmp_path, "duration_seconds , Arrival_Seconds\n3,1\n"), name="mine")
    assert (trace.name, trace.jobs) == ("mine", ((1.0, 3.0),))


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("arrival_seconds,duration_seconds\n0,1\n2,abc\n", r"trace.csv:3: column 2 \(duration_seconds\).*'abc'"),
        ("arrival_seconds,duration_seconds\n-1,1\n", r"trace.csv:2: column 1 \(arrival_seconds\).*'-1'"),
        ("arrival_seconds,duration_seconds\n0,1\n\n4,nan\n", r"trace.csv:4: column 2 \(duration_seconds\)"),
        ("arrival_seconds,duration_seconds\n0\n", r"trace.csv:2: expected 2 columns, got 1"),
        ("arrival,duration_seconds\n0,1\n", r"trace.csv:1: header is missing column 'arrival_seconds'"),
        ("", r"trace.csv: empty file"),
        ("arrival_seconds,duration_seconds\n", r"trace.csv: no jobs"),
    ],
)
def test_load_csv_errors_name_line_and_column(tmp_path: Path, text: str, where: str):
    with pytest.raises(TraceError, match=where):
        load_csv(write(tmp_path, text))


def test_load_csv_missing_file(tmp_path: Path):
    with pytest.raises(TraceError, match="cannot read"):
        load_csv(tmp_path / "nope.csv")
