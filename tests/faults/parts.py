"""The parts a campaign kills and restarts: ``scaleq`` subprocesses (servers, workers) and the process table check.

Design:

- A :class:`Service` is one ``python -m scaleq ARGS`` that can be started again with the same arguments after a
  ``kill -9`` (a server comes back on the same port, so its workers find it again). Each start appends to the same
  log file, for failure messages.
- Every process a campaign starts carries a marker in its environment, which workers hand down to their jobs (and
  the worker's watchdog); :func:`leftovers` lists what still carries it, so "nothing left behind" is read from the
  process table, not from any part's own bookkeeping.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.acceptance.support import pid_alive, processes_with_env
from tests.helpers.processes import stop

MARKER_VAR = "SCALEQ_FAULT_CAMPAIGN"


@dataclass
class Service:
    """A scaleq subprocess that the campaign can kill and start again."""

    name: str
    args: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    unexpected_exits: list[int] = field(default_factory=list)

    def start(self) -> None:
        self.starts += 1
        with open(self.log, "ab") as out:
            out.write(f"\n--- start {self.starts} ---\n".encode())
            out.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scaleq", *self.args],
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a signal meant for the test runner does not reach it
            )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def check(self) -> bool:
        """True if it runs; an exit nobody asked for is recorded (and the service started again)."""
        if self.proc is not None and self.proc.poll() is not None:
            self.unexpected_exits.append(self.proc.returncode)
            self.start()
            return False
        return True

    def kill(self) -> None:
        """``kill -9``, and reap it so that its pid is really gone."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, grace: float = 15) -> None:
        if self.proc is not None:
            stop(self.proc, grace)


def answers(url: str, token: str, path: str = "/jobs?limit=1") -> bool:
    """True if the server at ``url`` answers a request that reads the store."""
    try:
        return httpx.get(f"{url}/api/v1{path}", headers={"Authorization": f"Bearer {token}"}, timeout=3).is_success
    except httpx.HTTPError:
        return False


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def leftovers(marker: str, needle: str = "", var: str = MARKER_VAR) -> dict[int, str]:
    """Live processes whose environment holds ``var=marker`` (and ``needle`` in their command line): pid → command."""
    found = {}
    for pid in processes_with_env(var, marker):
        argv = cmdline(pid)
        if pid_alive(pid) and needle in " ".join(argv):
            found[pid] = " ".join(argv)[:200]
    return found


def parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def scaleq_workers(marker: str, var: str = MARKER_VAR) -> dict[int, str]:
    """Live ``scaleq worker`` processes of the campaign (not their watchdogs, not their jobs). A job is forked from
    its worker and, until its exec, shows the worker's command line and environment (for the whole of the
    ``preexec_fn`` that switches to the job user): a "worker" whose parent is a worker is such a fork, not a worker."""
    found = {
        pid: cmd for pid, cmd in leftovers(marker, var=var).items() if cmd.split()[1:4] == ["-m", "scaleq", "worker"]
    }
    return {pid: cmd for pid, cmd in found.items() if parent(pid) not in found}


def kill_all(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
