"""``scaleq simulate``: JSON per (trace, policy), clear exit-2 errors, policy settings from a grid file's group."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from scaleq.cli import app
from scaleq.grid import Group
from scaleq.sim import load_csv, run_simulation

runner = CliRunner()

KEYS = {
    "trace",
    "policy",
    "wait_p50",
    "wait_p95",
    "worker_seconds",
    "idle_worker_seconds",
    "peak_workers",
    "scale_events",
    "jobs_killed",
}

GRID = """
[[groups]]
name = "small"
queue = "q"
max_workers = 4

[[groups]]
name = "wide"
queue = "q"
min_workers = 1
max_workers = 2
slots = 3
idle_timeout = 5
scale_down_window = 5
"""


def burst_csv(tmp_path: Path, jobs: int = 12, duration: float = 20.0) -> Path:
    path = tmp_path / "burst.csv"
    rows = [f"{i * 0.5},{duration}" for i in range(jobs)]
    path.write_text("arrival_seconds,duration_seconds\n" + "\n".join(rows) + "\n")
    return path


def run_json(*args: str) -> list[dict]:
    result = runner.invoke(app, ["simulate", *args, "--output", "json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_has_one_object_per_trace_and_policy():
    data = run_json("--trace", "sparse", "--trace", "steady")
    assert [(d["trace"], d["policy"]) for d in data] == [
        (t, p) for t in ("sparse", "steady") for p in ("scaleq", "keda", "mig")
    ]
    for d in data:
        assert KEYS <= d.keys()
        assert d["jobs"] == d["finished"] > 0
        assert 0 <= d["wait_p50"] <= d["wait_p95"]
        assert 0 <= d["idle_worker_seconds"] <= d["worker_seconds"]
    assert all(d["jobs_killed"] == 0 for d in data if d["policy"] == "scaleq")


def test_csv_trace_and_chosen_policies(tmp_path: Path):
    csv = str(burst_csv(tmp_path))
    data = run_json("--csv", csv, "--policy", "scaleq", "--policy", "mig-worker", "--boot-time", "0", "--headroom", "0")
    assert [(d["trace"], d["policy"]) for d in data] == [("burst", "scaleq"), ("burst", "mig-worker")]
    scaleq = data[0]
    assert scaleq["jobs"] == 12 and scaleq["peak_workers"] == 12  # default max 20, no spare: one worker per job
    assert scaleq["wait_p95"] == 0.0  # event-driven, boot time 0


def test_table_output_shows_results_and_targets():
    result = runner.invoke(app, ["simulate", "--trace", "sparse"])
    assert result.exit_code == 0, result.output
    assert "sparse" in result.stdout and "idle worker·s" in result.stdout
    assert "fewer idle worker-seconds" in result.stdout  # the target check vs the peers


def test_bad_csv_exits_2_naming_line_and_column(tmp_path: Path):
    path = tmp_path / "bad.csv"
    path.write_text("arrival_seconds,duration_seconds\n0,10\n5,ten\n")
    result = runner.invoke(app, ["simulate", "--csv", str(path)])
    assert result.exit_code == 2
    message = " ".join(result.stderr.split())
    assert f"{path}:3" in message and "column 2 (duration_seconds)" in message and "'ten'" in message

    path.write_text("arrival,duration\n0,10\n")
    result = runner.invoke(app, ["simulate", "--csv", str(path)])
    assert result.exit_code == 2
    assert "arrival_seconds" in result.stderr


def test_bad_options_exit_2():
    for args, words in (
        (["--trace", "nope"], "unknown trace 'nope'"),
        (["--policy", "hpa"], "unknown policy 'hpa'"),
        (["--min-workers", "3", "--max-workers", "2"], "--max-workers"),
        (["--slots", "0"], "--slots"),
        (["--boot-time", "-1"], "--boot-time"),
        (["--group", "cpu"], "--group needs --grid"),
        (["--demand-halflife", "0"], "--demand-halflife"),
    ):
        result = runner.invoke(app, ["simulate", "--trace", "sparse", *args])
        assert result.exit_code == 2, args
        assert words in " ".join(result.stderr.split()), (args, result.stderr)


def test_settings_come_from_the_grid_group(tmp_path: Path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    csv = burst_csv(tmp_path)
    data = run_json("--csv", str(csv), "--grid", str(grid), "--group", "wide", "--policy", "scaleq")
    # 12 jobs, 3 slots per worker, at most 2 workers, one always up
    assert data[0]["peak_workers"] == 2
    wide = Group(name="wide", queue="q", min_workers=1, max_workers=2, slots=3, idle_timeout=5, scale_down_window=5)
    (expected,) = run_simulation([load_csv(csv)], ["scaleq"], wide.policy(), boot_time=30.0)
    assert data[0]["wait_p95"] == round(expected.wait_p95, 3)
    assert data[0]["worker_seconds"] == round(expected.worker_seconds, 3)

    # an option overrides the group's value
    data = run_json("--csv", str(csv), "--grid", str(grid), "--group", "wide", "--max-workers", "1", "-p", "scaleq")
    assert data[0]["peak_workers"] == 1

    result = runner.invoke(app, ["simulate", "--csv", str(csv), "--grid", str(grid), "--group", "wide"])
    assert result.exit_code == 0
    assert "group wide of" in result.stdout and "1..2 workers, 3 slot(s)" in result.stdout


def test_a_price_adds_the_cost_of_each_policy(tmp_path: Path):
    csv = burst_csv(tmp_path)
    data = run_json("--csv", str(csv), "--price-per-hour", "0.36")
    assert {d["policy"] for d in data} == {"scaleq", "keda", "mig"}
    for d in data:
        assert d["cost"] == round(d["worker_seconds"] * 0.36 / 3600, 3) and d["cost"] > 0
    assert "cost" not in run_json("--csv", str(csv))[0]  # no price, no cost
    # the group's price_per_hour, from the grid file; the option wins over it
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID.replace('name = "wide"', 'name = "wide"\nprice_per_hour = 3.6'))
    from_grid = run_json("--csv", str(csv), "--grid", str(grid), "--group", "wide", "-p", "scaleq")
    assert from_grid[0]["cost"] == round(from_grid[0]["worker_seconds"] / 1000, 3)
    given = run_json("--csv", str(csv), "--grid", str(grid), "--group", "wide", "-p", "scaleq", "--price-per-hour", "0")
    assert given[0]["cost"] == 0
    shown = runner.invoke(app, ["simulate", "--csv", str(csv), "--price-per-hour", "0.36", "-p", "scaleq"])
    assert shown.exit_code == 0 and "cost" in shown.stdout and "0.36 per worker-hour" in shown.stdout
    refused = runner.invoke(app, ["simulate", "--csv", str(csv), "--price-per-hour", "-1"])
    assert refused.exit_code == 2 and "--price-per-hour" in refused.output


def test_grid_group_must_be_named_and_exist(tmp_path: Path):
    grid = tmp_path / "grid.toml"
    grid.write_text(GRID)
    result = runner.invoke(app, ["simulate", "--trace", "sparse", "--grid", str(grid)])
    assert result.exit_code == 2 and "small, wide" in result.stderr
    result = runner.invoke(app, ["simulate", "--trace", "sparse", "--grid", str(grid), "--group", "gpu"])
    assert result.exit_code == 2 and "no group named 'gpu'" in result.stderr

    grid.write_text('[[groups]]\nname = "only"\nmax_workers = 3\n')
    data = run_json("--trace", "sparse", "--grid", str(grid), "-p", "scaleq")  # the one group needs no --group
    assert data[0]["peak_workers"] <= 3

    grid.write_text('[[groups]]\nname = "only"\nmax_workers = "many"\n')
    result = runner.invoke(app, ["simulate", "--trace", "sparse", "--grid", str(grid)])
    assert result.exit_code == 2 and "groups[0].max_workers" in result.stderr


def test_plot_dir_gets_a_png_per_trace(tmp_path: Path):
    result = runner.invoke(
        app, ["simulate", "--trace", "sparse", "--csv", str(burst_csv(tmp_path)), "--plot-dir", str(tmp_path / "img")]
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == ["sim-burst.png", "sim-sparse.png"]


def test_demand_halflife_moves_the_spare():
    base = ["--trace", "steady", "--policy", "scaleq"]
    short, long_ = (run_json(*base, "--demand-halflife", h)[0] for h in ("10", "3600"))
    assert short["worker_seconds"] != long_["worker_seconds"]  # the setting reaches the policy the sim runs
