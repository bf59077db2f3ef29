"""Process jobs cannot reach the server's secrets (issue 12), on the embedded default run as root.

A user with a submit token submits process jobs to ``scaleq up`` (the embedded default: local workers, SQLite), which
runs as root here, as it does on a fresh VM. The jobs run as ``nobody``: they try to read the data dir's
``admin.token`` and ``scaleq.db``, to list it and plant a file in it, to write outside their attempt dir, and to read
their worker's environment (which holds the worker token) — all refused by the kernel — while their outputs still
come back. A job still dies with its worker when that worker is killed with ``kill -9``.

The data dir lies in a directory every user may enter, so its own mode (0700) is what keeps the jobs out.
"""

from __future__ import annotations

import os
import pwd
import re
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.acceptance.support import Grid, base_env, cli, pid_alive
from tests.helpers.opendirs import open_dir
from tests.helpers.waiting import wait_for

NOBODY = pwd.getpwnam("nobody").pw_uid


@pytest.fixture(scope="module")
def setup() -> Iterator[tuple[Grid, str, Path]]:
    """A grid whose data dir sits in a world-enterable dir, a submit token for it, and that open dir."""
    assert os.geteuid() == 0, "this test is about a root worker: run the suite as root"
    with open_dir("scaleq-isolation-") as opened:
        grid = Grid(opened / "data", lease_seconds=3.0)
        try:
            grid.start()
            created = grid.cli("tokens", "create", "--role", "submit", "--name", "tenant")
            assert created.returncode == 0, created.stderr
            yield grid, created.stdout.strip().splitlines()[-1], opened
        finally:
            grid.stop()


def submit_as_tenant(grid: Grid, token: str, script: str) -> str:
    r = grid.cli("submit", "default", "--", "sh", "-c", script, SCALEQ_TOKEN=token)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()[0]


def test_a_submit_tokens_job_cannot_read_or_write_the_data_dir_and_its_outputs_come_back(
    setup: tuple[Grid, str, Path],
) -> None:
    grid, token, opened = setup
    data = grid.data_dir
    closed = opened / "closed"  # root's, 0755: readable, not writable by others
    closed.mkdir(mode=0o755, exist_ok=True)
    os.chmod(closed, 0o755)
    attempt_parent = '"$SCALEQ_OUTPUTS/../.."'  # the worker's own dir of attempt dirs
    tries = {
        "read-admin-token": f"cat {data}/admin.token",
        "read-worker-token": f"cat {data}/worker.token",
        "read-db": f"cat {data}/scaleq.db",
        "list-data-dir": f"ls {data}",
        "plant-in-data-dir": f"touch {data}/planted",
        "write-outside": f"touch {closed}/planted",
        "write-worker-dir": f"touch {attempt_parent}/planted",
        "list-worker-dir": f"ls {attempt_parent}",
        "read-worker-env": "cat /proc/$PPID/environ",
    }
    script = "id -u; " + "".join(
        f'{cmd} >/dev/null 2>&1 && echo "{name}: done" || echo "{name}: refused"; ' for name, cmd in tries.items()
    )
    script += 'echo made-by-the-job > "$SCALEQ_OUTPUTS/result.txt"'
    job_id = submit_as_tenant(grid, token, script)
    job = grid.wait_state(job_id, "finished", 60)
    assert (job["reason"], job["exit_code"]) == ("success", 0), (job.get("error"), job)

    logs = grid.api_logs(job_id)
    uid, *answers = logs.splitlines()
    assert uid == str(NOBODY)
    assert answers == [f"{name}: refused" for name in tries]
    assert grid.admin_token not in logs + grid.api_logs(job_id, "stderr")
    assert not (data / "planted").exists() and not (closed / "planted").exists()

    out = opened / "out"
    fetched = grid.cli("outputs", job_id, str(out), SCALEQ_TOKEN=token)
    assert fetched.returncode == 0, fetched.stderr
    assert (out / "result.txt").read_text() == "made-by-the-job\n"


def test_a_job_run_as_nobody_dies_with_its_killed_worker(setup: tuple[Grid, str, Path]) -> None:
    grid, token, opened = setup
    pidfile = opened / f"pid-{os.urandom(4).hex()}"
    job_id = submit_as_tenant(grid, token, f"echo $$ > {pidfile}; exec sleep 300")
    running = grid.wait_state(job_id, "running", 60)

    def job_pid() -> int | None:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        return int(text) if text else None

    pid = wait_for(job_pid, 30, 0.1, "the job to write its pid")
    status = Path(f"/proc/{pid}/status").read_text()
    assert re.search(rf"^Uid:\s+{NOBODY}\s", status, re.M), status
    worker = grid.worker_records()[running["attempt_history"][-1]["worker_id"]]
    os.kill(worker["pid"], signal.SIGKILL)
    wait_for(lambda: not pid_alive(pid), 15, 0.1, "the job to die with its worker")


def test_a_job_user_that_does_not_exist_is_refused_at_start_naming_the_flag(tmp_path: Path) -> None:
    for args in (
        ["up", "--job-user", "no-such-user-here", "--data-dir", str(tmp_path / "data")],
        ["worker", "--queue", "default", "--runtime", "process", "--job-user", "no-such-user-here"],
    ):
        r = cli(*args, env=base_env(SCALEQ_SERVER="http://127.0.0.1:9", SCALEQ_TOKEN="unused"))
        assert (r.returncode, r.stderr.strip()) == (2, "error: --job-user: no user 'no-such-user-here' on this host")
    assert not (tmp_path / "data").exists()  # refused before anything was made


def test_scaleq_up_passes_its_job_user_to_its_workers(tmp_path: Path) -> None:
    daemon = pwd.getpwnam("daemon")
    grid = Grid(tmp_path / "data", extra_args=["--job-user", "daemon"])
    try:
        grid.start()
        job_id = grid.api_submit("sh", "-c", "id -u; id -g")
        assert grid.api_logs(job_id).split() == [str(daemon.pw_uid), str(daemon.pw_gid)]
    finally:
        grid.stop()
