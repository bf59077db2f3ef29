"""8-9. Nothing is lost: a ``kill -9`` of ``scaleq up``, a worker killed mid-job (retried, or worker_lost)."""

from __future__ import annotations

import json
import os
import signal
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.support import Grid, pid_alive
from tests.helpers import wait_for
from tests.helpers.opendirs import open_dir


def unique() -> str:
    return uuid.uuid4().hex[:10]


# -- 8. kill -9 of the server ---------------------------------------------------------------------------------------


def test_kill_9_of_the_server_loses_nothing(grid: Grid, tmp_path: Path) -> None:
    tag = unique()
    gate = tmp_path / "gate"  # the jobs wait on it, not on a clock: a loaded machine must not finish them early
    wait_gate = f"while [ ! -e {gate} ]; do sleep 0.05; done"
    r = grid.cli("submit", "default", "--wait", "-o", "json", "--", "sh", "-c", f"echo before-the-crash-{tag}")
    assert r.returncode == 0, r.stderr
    done_before = grid.api_job(json.loads(r.stdout)["id"])
    logs_before = grid.cli("logs", done_before["id"]).stdout
    assert logs_before == f"before-the-crash-{tag}\n"

    slow = grid.submit("default", "--", "sh", "-c", f"{wait_gate}; echo slow-{tag}")
    grid.wait_state(slow, "running", 15)
    # Four more than the two local workers can take at once, behind the slow one.
    with ThreadPoolExecutor(max_workers=4) as pool:
        queued = list(
            pool.map(
                lambda i: grid.submit("default", "--", "sh", "-c", f"{wait_gate}; echo queued-{i}-{tag}"), range(4)
            )
        )
    states = [grid.api_job(j)["state"] for j in [slow, *queued]]
    assert states[0] == "running" and states.count("queued") >= 2, states

    grid.kill_server()
    gate.touch()  # the running jobs end while no server answers
    grid.start()  # same data dir; the commands below find it through the server.json it writes

    jobs = grid.wait_all_finished([slow, *queued], timeout=40)
    assert {j: (v["state"], v["reason"]) for j, v in jobs.items()} == {
        j: ("finished", "success") for j in [slow, *queued]
    }
    expected = {slow: f"slow-{tag}\n", **{j: f"queued-{i}-{tag}\n" for i, j in enumerate(queued)}}
    got = {j: grid.api_logs(j) for j in expected}
    assert got == expected, "the output of a job that ended around the crash is lost"

    # The job that had finished before the crash keeps its result and its logs, seen through the CLI.
    after = grid.job(done_before["id"])
    for key in ("state", "reason", "exit_code", "attempts", "finished_at"):
        assert after[key] == done_before[key], key
    assert len(after["attempt_history"]) == 1
    assert grid.cli("logs", done_before["id"][:8]).stdout == logs_before
    listed = {j["id"]: j for j in grid.json("jobs", "--state", "finished")}
    assert {done_before["id"], slow, *queued} <= listed.keys()


def test_a_job_that_ends_while_the_server_is_down_keeps_its_output(grid: Grid, tmp_path: Path) -> None:
    """Workers wait out a server outage and report afterwards: the result, the outputs *and the last output lines*
    of a job that ended while ``scaleq up`` was down (killed, then restarted) must all arrive."""
    tag = unique()
    go, done = tmp_path / "go", tmp_path / "done"
    script = (
        f"echo started-{tag}; while [ ! -e {go} ]; do sleep 0.1; done; "
        f'echo last-words-{tag}; echo {tag} > "$SCALEQ_OUTPUTS/result.txt"; touch {done}'
    )
    job_id = grid.submit("default", "--", "sh", "-c", script)
    wait_for(lambda: grid.api_logs(job_id) == f"started-{tag}\n", 20, 0.2, "the job's first line")

    grid.kill_server()
    go.touch()  # the job ends while no server answers
    wait_for(done.exists, 10, 0.1, "the job to end")
    time.sleep(0.5)  # the worker tries to report, and fails
    grid.start()

    job = grid.wait_state(job_id, "finished", 30)
    assert (job["reason"], job["exit_code"], len(job["attempt_history"])) == ("success", 0, 1), job
    out = tmp_path / "out"
    assert grid.cli("outputs", job_id, str(out)).returncode == 0
    assert (out / "result.txt").read_text() == f"{tag}\n"
    logs = grid.cli("logs", job_id)
    assert logs.stdout == f"started-{tag}\nlast-words-{tag}\n", "output written while the server was down is lost"


# -- 9. a worker killed mid-job ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def killed_workers() -> Any:
    """Two jobs (one with the default 3 attempts, one with --max-attempts 1) on the two local workers, held on a gate;
    each job's worker is SIGKILLed while the job runs, then the gate opens. Both scenarios run side by side to halve
    the waiting."""
    with open_dir("scaleq-killed-workers-") as work:  # the jobs (run as nobody) wait on a gate in it
        # 6 s leases: a stalled replacement worker keeps its lease (at 3 s, a 2 s stall could add one); the killed
        # workers' leases still run out well inside the wait below
        grid = Grid(work / "data", lease_seconds=6.0)
        # the jobs wait on a gate, not on a clock: a loaded machine must not finish them before the kill
        gate = work / "gate"
        wait_gate = f"while [ ! -e {gate} ]; do sleep 0.05; done"
        try:
            grid.start()
            tag = unique()
            with ThreadPoolExecutor(max_workers=2) as pool:
                retried_f = pool.submit(grid.submit, "default", "--", "sh", "-c", f"{wait_gate}; echo retried-{tag}")
                lost_f = pool.submit(
                    grid.submit, "default", "--max-attempts", "1", "--", "sh", "-c", f"{wait_gate}; echo lost-{tag}"
                )
                retried, lost = retried_f.result(), lost_f.result()
            running = {j: grid.wait_state(j, "running", 20) for j in (retried, lost)}
            first_workers = {j: job["attempt_history"][-1]["worker_id"] for j, job in running.items()}
            records = grid.worker_records()
            victims = {j: records[w]["pid"] for j, w in first_workers.items()}
            for pid in set(victims.values()):
                os.kill(pid, signal.SIGKILL)
            wait_for(lambda: not any(pid_alive(p) for p in victims.values()), 5, 0.1, "the workers to die")
            gate.touch()  # the retry may now finish
            finished = grid.wait_all_finished([retried, lost], timeout=45)
            yield {
                "grid": grid,
                "retried": finished[retried],
                "lost": finished[lost],
                "first_workers": first_workers,
                "tag": tag,
            }
        finally:
            grid.stop()


def test_a_job_whose_worker_is_killed_is_retried_on_another_worker(killed_workers: dict) -> None:
    job = killed_workers["retried"]
    assert (job["state"], job["reason"], job["exit_code"]) == ("finished", "success", 0), job
    history = job["attempt_history"]
    assert len(history) == 2, history
    assert history[0]["worker_id"] == killed_workers["first_workers"][job["id"]]
    assert history[0]["outcome"] != "success"
    assert history[1]["outcome"] == "success"
    assert history[1]["worker_id"] != history[0]["worker_id"]
    grid = killed_workers["grid"]
    assert grid.api_logs(job["id"]) == f"retried-{killed_workers['tag']}\n"
    shown = grid.job(job["id"][:8])  # and the CLI tells the same story
    assert [a["worker_id"] for a in shown["attempt_history"]] == [a["worker_id"] for a in history]


def test_a_job_with_one_attempt_whose_worker_is_killed_finishes_worker_lost(killed_workers: dict) -> None:
    job = killed_workers["lost"]
    assert (job["state"], job["reason"]) == ("finished", "worker_lost"), job
    assert len(job["attempt_history"]) == 1
    grid = killed_workers["grid"]
    r = grid.cli("job", job["id"], "-o", "json")
    assert json.loads(r.stdout)["reason"] == "worker_lost"
