"""6. Bad input exits 2 with a message naming the field (or the file), and stores nothing."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.acceptance.support import Grid


@dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    names: str  # a regex the error message must match: the field, flag or file at fault
    file: str | None = None  # job file content, written to job.toml and passed with --file


CASES = {
    "unknown field in a job file": Case((), r"requirments", 'command = ["true"]\nrequirments = { cpus = 1 }\n'),
    "wrong type in a job file": Case((), r"max_duration", 'command = ["true"]\nmax_duration = "x"\n'),
    "negative --max-duration": Case(("--max-duration", "-5", "--", "true"), r"max[_-]duration"),
    "--env without =": Case(("--env", "NOEQUALS", "--", "true"), r"--env.*NOEQUALS|NOEQUALS.*--env"),
    "missing command": Case((), r"command"),
    "bad --memory": Case(("--memory", "lots", "--", "true"), r"memory.*lots|lots.*memory"),
    "bad queue name": Case(("--", "true"), r"queue"),
}


@pytest.fixture(scope="module")
def runs(shared_grid: Grid, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Count the jobs, run every bad submit (concurrently: each CLI start costs half a second), count again."""
    before = shared_grid.json("jobs", "--limit", "10000")
    work = tmp_path_factory.mktemp("bad-input")

    def run(item: tuple[str, Case]) -> subprocess.CompletedProcess[str]:
        name, case = item
        queue = "no such queue!" if name == "bad queue name" else "default"
        args = ["submit", queue, *case.args]
        if case.file is not None:
            path = work / (re.sub(r"\W+", "-", name) + ".toml")
            path.write_text(case.file)
            args[2:2] = ["--file", str(path)]
        return shared_grid.cli(*args)

    broken = work / "broken.toml"
    broken.write_text('command = ["echo", "x"\nmax_duration = 5\n')
    with ThreadPoolExecutor(max_workers=4) as pool:
        malformed = pool.submit(shared_grid.cli, "submit", "default", "--file", str(broken))
        results = dict(zip(CASES, pool.map(run, CASES.items()), strict=True))
        malformed_result = malformed.result()
    after = shared_grid.json("jobs", "--limit", "10000")
    return {"before": before, "after": after, "results": results, "malformed": (broken, malformed_result)}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_submit_exits_2_naming_the_field(name: str, runs: dict) -> None:
    r = runs["results"][name]
    assert r.returncode == 2, f"{name}: exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert re.search(CASES[name].names, r.stderr, re.S), f"{name}: the message does not name it:\n{r.stderr}"
    assert "Traceback" not in r.stderr
    assert r.stdout == "", "no job id may be printed"


def test_malformed_toml_exits_2_naming_the_file(runs: dict) -> None:
    path, r = runs["malformed"]
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr
    assert "TOML" in r.stderr
    assert "Traceback" not in r.stderr


def test_bad_input_stores_nothing(runs: dict) -> None:
    assert [j["id"] for j in runs["after"]] == [j["id"] for j in runs["before"]]


def test_error_messages_are_not_hard_wrapped_off_a_terminal(shared_grid: Grid, tmp_path: Path) -> None:
    """Scripts (and people reading CI logs) grep stderr: a message naming a file must name it on one line.

    A job file in a project a few directories deep easily has a path longer than 80 characters.
    """
    deep = tmp_path / "projects" / "quarterly-financial-reports" / "pipelines" / "nightly-aggregation"
    deep.mkdir(parents=True)
    path = deep / "aggregate-job.toml"
    path.write_text('command = ["true"]\nrequirments = { cpus = 1 }\n')
    assert len(str(path)) > 80
    r = shared_grid.cli("submit", "default", "--file", str(path))
    assert r.returncode == 2
    assert f"{path}: requirments" in r.stderr, f"message split over lines:\n{r.stderr}"


def test_unknown_state_filter_is_bad_usage(shared_grid: Grid) -> None:
    r = shared_grid.cli("jobs", "--state", "exploded")
    assert r.returncode == 2
    assert "--state" in r.stderr


@pytest.mark.parametrize("command", ["job", "logs", "cancel"])
def test_a_job_id_that_is_not_hex_is_bad_input(shared_grid: Grid, command: str) -> None:
    r = shared_grid.cli(command, "abc")
    assert r.returncode == 2, r
    assert "'abc' is not a job id" in r.stderr and "6 hex digits" in r.stderr


def test_a_finished_reason_is_a_state_filter(shared_grid: Grid) -> None:
    r = shared_grid.cli("submit", "default", "--wait", "--output", "json", "--", "sh", "-c", f"exit 3 # {time.time()}")
    job_id = json.loads(r.stdout)["id"]
    failed = shared_grid.json("jobs", "--state", "failed", "--limit", "10000")
    assert job_id in [j["id"] for j in failed]
    assert all(j["state"] == "finished" and j["reason"] == "failed" for j in failed), failed
    assert job_id not in [j["id"] for j in shared_grid.json("jobs", "--state", "success", "--limit", "10000")]
    r = shared_grid.cli("jobs", "--state", "exploded")
    assert r.returncode == 2 and "failed" in r.stderr  # the refusal lists the reasons too
