"""Acceptance helpers: a real ``scaleq up`` in a subprocess, and the real CLI run as a user would run it.

Every command is ``python -m scaleq ...`` in a subprocess, pointed at the grid only through ``SCALEQ_DATA_DIR``
(or explicit ``--server``/``--token`` where a test is about them). Each grid carries a unique marker in its
environment, which its workers and their jobs inherit; at teardown the server gets SIGTERM (then SIGKILL), and the
worker pids recorded under ``<data-dir>/workers/**`` and every process still carrying the marker are killed, so no
test leaves processes behind — not even the orphans of a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.processes import stop
from tests.helpers.waiting import wait_for

MARKER_VAR = "SCALEQ_ACCEPTANCE_GRID"
HEX64 = r"^[0-9a-f]{64}$"


def base_env(**extra: str) -> dict[str, str]:
    """The environment of a user's shell: no scaleq settings leaking in from the test runner."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCALEQ_")}
    env.pop("COLUMNS", None)
    env.update(extra)
    return env


def cli(
    *args: str,
    data_dir: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m scaleq ARGS`` as a user would; stdin closed, output captured as text."""
    e = base_env() if env is None else env
    if data_dir is not None:
        e["SCALEQ_DATA_DIR"] = str(data_dir)
    return subprocess.run(
        [sys.executable, "-m", "scaleq", *args],
        env=e,
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` is a live (non-zombie) process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def processes_with_env(var: str, value: str) -> list[int]:
    """Pids of our processes whose environment holds ``var=value``."""
    needle = f"{var}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


@dataclass
class Grid:
    """A ``scaleq up`` subprocess over one data dir, and the CLI pointed at it."""

    data_dir: Path
    lease_seconds: float | None = None
    grid_file: Path | None = None  # ``scaleq up --grid``; without it the embedded default grid
    extra_args: list[str] = field(default_factory=list)  # more ``scaleq up`` options
    port: int = 0  # 0: a free port at each start; a fixed one brings a restarted server back where its workers are
    marker: str = field(default_factory=lambda: uuid.uuid4().hex)
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    worker_pids: set[int] = field(default_factory=set)

    @property
    def log_path(self) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}-up-{self.starts}.log"

    def env(self, **extra: str) -> dict[str, str]:
        return base_env(SCALEQ_DATA_DIR=str(self.data_dir), **extra)

    def start(self, timeout: float = 20) -> None:
        self.starts += 1
        args = [sys.executable, "-m", "scaleq", "up", "--port", str(self.port), "--data-dir", str(self.data_dir)]
        if self.lease_seconds is not None:
            args += ["--lease-seconds", str(self.lease_seconds)]
        if self.grid_file is not None:
            args += ["--grid", str(self.grid_file)]
        args += self.extra_args
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                args,
                env=base_env(**{MARKER_VAR: self.marker}),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        info = self.data_dir / "server.json"

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"scaleq up exited with {self.proc.returncode}:\n{self.log_path.read_text()}")
            try:
                recorded = json.loads(info.read_text())
            except (OSError, ValueError):
                return False
            if recorded.get("pid") != self.proc.pid:  # a server.json left behind by a killed server
                return False
            try:
                return httpx.get(recorded["url"] + "/api/v1/openapi.json", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, timeout, 0.1, "scaleq up to write server.json and answer")

    @property
    def url(self) -> str:
        return json.loads((self.data_dir / "server.json").read_text())["url"]

    @property
    def admin_token(self) -> str:
        return (self.data_dir / "admin.token").read_text().strip()

    def cli(self, *args: str, timeout: float = 60, **extra_env: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, env=self.env(**extra_env), timeout=timeout)

    def json(self, *args: str, timeout: float = 60) -> Any:
        """Run a command with ``-o json``; it must exit 0 and print JSON."""
        r = self.cli(*args, "-o", "json", timeout=timeout)
        assert r.returncode == 0, f"scaleq {' '.join(args)} -o json: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return json.loads(r.stdout)

    def submit(self, *args: str, timeout: float = 60) -> str:
        """Submit without waiting; the job id printed on stdout."""
        r = self.cli("submit", *args, timeout=timeout)
        assert r.returncode == 0, f"submit {args}: exit {r.returncode}\n{r.stdout}\n{r.stderr}"
        return r.stdout.split()[0]

    def job(self, job_id: str) -> dict[str, Any]:
        """``scaleq job ID -o json``: the summary, the definition and the attempt history."""
        return self.json("job", job_id)

    def api(self, method: str, path: str, token: str | None = None, **kw: Any) -> httpx.Response:
        """A raw request to the API (admin token unless given): for polling, which would be slow through the CLI."""
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        return httpx.request(method, f"{self.url}/api/v1{path}", headers=headers, timeout=30, **kw)

    def api_job(self, job_id: str) -> dict[str, Any]:
        r = self.api("GET", f"/jobs/{job_id}")
        r.raise_for_status()
        job = r.json()
        job["attempt_history"] = self.api("GET", f"/jobs/{job_id}/attempts").raise_for_status().json()
        return job

    def api_submit(self, *command: str, queue: str = "default", wait: bool = True, **definition: Any) -> str:
        """Set-up only: submit through the API (no CLI start), and by default wait for the job to finish."""
        body = {"queue": queue, "definition": {"command": list(command), **definition}}
        job_id = self.api("POST", "/jobs", json=body).raise_for_status().json()["job"]["id"]
        if wait:
            self.wait_state(job_id, "finished", 30)
        return job_id

    def api_logs(self, job_id: str, stream: str = "stdout", attempt: int | None = None) -> str:
        """One attempt's output on ``stream`` (the latest attempt unless given), read through the API."""
        text, after = [], 0
        while True:
            params = {"after": after, **({"attempt": attempt} if attempt else {})}
            page = self.api("GET", f"/jobs/{job_id}/logs", params=params).raise_for_status().json()
            if not page["chunks"]:
                return "".join(text)
            text += [c["data"] for c in page["chunks"] if c["stream"] == stream]
            after = page["next"]

    def wait_state(self, job_id: str, state: str, timeout: float) -> dict[str, Any]:
        return wait_for(
            lambda: j if (j := self.api_job(job_id))["state"] == state else None,
            timeout,
            0.2,
            f"job {job_id[:12]} to be {state}",
        )

    def wait_all_finished(self, job_ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        def done() -> dict[str, dict[str, Any]] | None:
            jobs = {i: self.api_job(i) for i in job_ids}
            return jobs if all(j["state"] == "finished" for j in jobs.values()) else None

        try:
            return wait_for(done, timeout, 0.3, f"{len(job_ids)} jobs to finish")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.diagnosis(job_ids)}") from None

    def diagnosis(self, job_ids: list[str]) -> str:
        """What the grid looks like: for failure messages."""
        lines = ["jobs:"]
        for i in job_ids:
            j = self.api_job(i)
            attempts = [(a["attempt"], a["worker_id"], a["outcome"]) for a in j["attempt_history"]]
            lines.append(f"  {i[:12]} {j['state']} {j['reason']} attempts={attempts}")
        workers = self.api("GET", "/workers", params={"all": True}).json()
        lines.append(
            "workers known to the server: " + ", ".join(f"{w['id']} {w['state']} busy={w['busy']}" for w in workers)
        )
        lines.append(f"worker records: {self.worker_records()}")
        alive = {i: pid_alive(r["pid"]) for i, r in self.worker_records().items()}
        lines.append(f"worker processes alive: {alive}")
        return "\n".join(lines)

    def worker_records(self) -> dict[str, dict[str, Any]]:
        """The local provider's records: worker id → {"id", "pid", ...}."""
        records = {}
        for path in (self.data_dir / "workers").glob("**/*.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text())
                if record["pid"] is None:  # written just before its process starts: not a process yet
                    continue
                records[record["id"]] = record
                self.worker_pids.add(int(record["pid"]))
        return records

    def kill_server(self) -> None:
        """``kill -9`` the server (not its workers), and reap it so its pid is really gone."""
        assert self.proc is not None
        self.worker_records()
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        self.worker_records()
        if self.proc is not None:
            stop(self.proc, grace=5)
        self.worker_records()
        for pid in self.worker_pids:
            _kill(pid)
        for pid in processes_with_env(MARKER_VAR, self.marker):
            _kill(pid)
