"""Container jobs as a user runs them: ``scaleq up``, a ``scaleq worker --runtime docker``, and the CLI.

The embedded default group of ``scaleq up`` runs process jobs only, so the container jobs here go to the worker this
module starts (``--runtime docker --slots 2``) on the engine at ``DOCKER_HOST``. Every CLI call is a subprocess;
containers are checked through the docker SDK by the labels the runtime puts on them (``scaleq.job=<id>``). Needs
a real engine with ``scaleq-test/busybox:latest`` (``eval "$(scripts/docker-engine.sh | tail -n1)"``); fails,
never skips, without one.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import pytest

from tests.acceptance.support import HEX64, MARKER_VAR, Grid
from tests.helpers import wait_for
from tests.helpers.engine import BUSYBOX
from tests.helpers.processes import stop

pytestmark = pytest.mark.docker


@pytest.fixture(scope="module")
def docker_grid(tmp_path_factory: pytest.TempPathFactory, engine: docker.DockerClient) -> Iterator[Grid]:
    """``scaleq up --port 0 --data-dir <tmp>``: the embedded default grid (process jobs only)."""
    grid = Grid(tmp_path_factory.mktemp("docker-jobs") / "data")
    try:
        grid.start()
        yield grid
    finally:
        grid.stop()


@dataclass
class Worker:
    id: str
    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def job_objects(engine: docker.DockerClient, label: str) -> tuple[list[Any], list[Any]]:
    filters = {"label": ["scaleq.managed=true", label]}
    return engine.containers.list(all=True, filters=filters, ignore_removed=True), engine.volumes.list(filters=filters)


@pytest.fixture
def start_worker(docker_grid: Grid, engine: docker.DockerClient, tmp_path: Path) -> Iterator[Callable[[], Worker]]:
    """``scaleq worker --queue default --runtime docker --slots 2 --data-dir <the grid's>``, registered and idle.

    Teardown drains (SIGTERM), then kills, every worker started, and removes whatever its jobs left in the engine.
    """
    started: list[Worker] = []

    def start() -> Worker:
        worker_id = f"acc-docker-{uuid.uuid4().hex[:8]}"  # only so that teardown finds its containers
        log = tmp_path / f"{worker_id}.log"
        argv = [sys.executable, "-m", "scaleq", "worker", "--queue", "default", "--runtime", "docker"]
        argv += ["--slots", "2", "--data-dir", str(docker_grid.data_dir), "--worker-id", worker_id]
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                argv,
                env=docker_grid.env(**{MARKER_VAR: docker_grid.marker}),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        worker = Worker(worker_id, proc, log)
        started.append(worker)

        def registered() -> bool:
            assert proc.poll() is None, f"scaleq worker exited with {proc.returncode}:\n{worker.output()}"
            workers = docker_grid.api("GET", "/workers").raise_for_status().json()
            return any(w["id"] == worker_id and w["state"] == "active" for w in workers)

        wait_for(registered, 20, 0.2, f"worker {worker_id} to register")
        return worker

    yield start
    for w in started:
        stop(w.proc, grace=10)  # drains, then kills
        containers, volumes = job_objects(engine, f"scaleq.worker={w.id}")
        for obj in [*containers, *volumes]:
            with contextlib.suppress(docker.errors.NotFound):
                obj.remove(force=True)


def ok(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    return r


def test_a_container_job_with_an_input_limits_logs_and_outputs(
    docker_grid: Grid, start_worker: Callable[[], Worker], tmp_path: Path
) -> None:
    worker = start_worker()
    token = uuid.uuid4().hex
    (tmp_path / "greeting.txt").write_text(f"hello {token}\n")
    script = (
        "cat /inputs/greeting.txt; echo x > /outputs/o.txt; "
        # the limits as the container's cgroup sees them (v1 here; v2 elsewhere)
        "cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; "
        "cat /sys/fs/cgroup/cpu/cpu.cfs_quota_us 2>/dev/null || cut -d' ' -f1 /sys/fs/cgroup/cpu.max"
    )
    argv = ["submit", "default", "--image", BUSYBOX, "--input", str(tmp_path / "greeting.txt")]
    argv += ["--memory", "64m", "--cpus", "0.5", "--wait", "--", "sh", "-c", script]
    r = ok(docker_grid.cli(*argv))
    job_id = r.stdout.split()[0]
    assert re.fullmatch(HEX64, job_id), r.stdout
    assert "success" in r.stderr, r.stderr

    logs = ok(docker_grid.cli("logs", job_id)).stdout
    assert logs.splitlines() == [f"hello {token}", str(64 * 2**20), "50000"], logs

    out = tmp_path / "out"
    listing = json.loads(ok(docker_grid.cli("outputs", job_id, str(out), "-o", "json")).stdout)
    assert [i["path"] for i in listing] == ["o.txt"]
    assert (out / "o.txt").read_text() == "x\n"

    job = docker_grid.api_job(job_id)
    assert (job["state"], job["reason"], job["exit_code"]) == ("finished", "success", 0)
    assert [a["worker_id"] for a in job["attempt_history"]] == [worker.id]


def test_a_failing_container_job_exits_1_with_its_exit_code(
    docker_grid: Grid, start_worker: Callable[[], Worker], engine: docker.DockerClient
) -> None:
    start_worker()
    marker = uuid.uuid4().hex[:10]
    argv = ["submit", "default", "--image", BUSYBOX, "--wait", "--", "sh", "-c", f"echo {marker} >&2; exit 7"]
    r = docker_grid.cli(*argv)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "failed" in r.stderr and "exit 7" in r.stderr, r.stderr
    job_id = r.stdout.split()[0]

    r = docker_grid.cli(argv[0], "-o", "json", *argv[1:])  # the same job again: its result and exit code
    assert r.returncode == 1
    job = json.loads(r.stdout)
    assert (job["id"], job["state"], job["reason"], job["exit_code"]) == (job_id, "finished", "failed", 7)
    assert docker_grid.api_logs(job_id, "stderr") == f"{marker}\n"
    assert job_objects(engine, f"scaleq.job={job_id}") == ([], []), "the job's container was not removed"


def test_cancel_of_a_running_container_job_removes_its_container(
    docker_grid: Grid, start_worker: Callable[[], Worker], engine: docker.DockerClient
) -> None:
    start_worker()
    job_id = docker_grid.submit("default", "--image", BUSYBOX, "--", "sh", "-c", f"echo {uuid.uuid4().hex}; sleep 300")
    docker_grid.wait_state(job_id, "running", timeout=20)
    wait_for(
        lambda: any(c.status == "running" for c in job_objects(engine, f"scaleq.job={job_id}")[0]),
        10,
        0.2,
        "the job's container to run",
    )

    ok(docker_grid.cli("cancel", job_id))
    # the worker learns it at its next heartbeat (a third of the lease: 5 s by default) and removes the container,
    # whose job would sleep for 300 s
    wait_for(lambda: job_objects(engine, f"scaleq.job={job_id}") == ([], []), 60, 0.2, "the container to go")
    job = docker_grid.api_job(job_id)
    assert (job["state"], job["reason"]) == ("finished", "cancelled")


def test_sigterm_drains_the_worker_running_container_jobs(
    docker_grid: Grid, start_worker: Callable[[], Worker], engine: docker.DockerClient
) -> None:
    worker = start_worker()
    # the job holds until the test opens its gate (a file made in its container), once the worker drains
    gated = f"while [ ! -e /tmp/gate ]; do sleep 0.05; done; echo {uuid.uuid4().hex} > /outputs/done.txt"
    job_id = docker_grid.submit("default", "--image", BUSYBOX, "--", "sh", "-c", gated)
    docker_grid.wait_state(job_id, "running", timeout=20)
    # "running" is written when the server hands the claim out; a SIGTERM before the worker reads that answer hands
    # the job back unrun (a drain starts nothing new), so the signal waits until the container is there
    wait_for(lambda: bool(job_objects(engine, f"scaleq.job={job_id}")[0]), 20, 0.1, "the job's container")

    worker.proc.send_signal(signal.SIGTERM)

    def draining() -> bool:
        workers = docker_grid.api("GET", "/workers", params={"all": "true"}).raise_for_status().json()
        return any(w["id"] == worker.id and w["state"] == "draining" for w in workers)

    wait_for(draining, 20, 0.1, f"worker {worker.id} to drain")
    [container] = job_objects(engine, f"scaleq.job={job_id}")[0]
    assert container.exec_run(["touch", "/tmp/gate"]).exit_code == 0
    try:
        code = worker.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker did not drain in 30 s:\n{worker.output()}")
    assert code == 0, worker.output()
    job = docker_grid.api_job(job_id)
    assert (job["state"], job["reason"]) == ("finished", "success"), job  # the running job finished first
    assert [o["path"] for o in docker_grid.api("GET", f"/jobs/{job_id}/outputs").raise_for_status().json()] == [
        "done.txt"
    ]
    workers = {w["id"]: w for w in docker_grid.api("GET", "/workers", params={"all": "true"}).json()}
    assert worker.id not in workers or workers[worker.id]["state"] == "gone", "a drained worker deregisters"
    assert job_objects(engine, f"scaleq.worker={worker.id}") == ([], [])
