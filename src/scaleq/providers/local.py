"""The local provider: workers are ``scaleq worker`` processes on this machine.

Each worker is a child process in its own session (a Ctrl-C of ``scaleq up`` does not reach it; the controller
drains it). Its label is a small JSON record in ``<state_dir>/<grid>/<group>/<worker id>.json`` with the pid and
start time; the process's command line carries the worker id too, so a reused pid is never mistaken for a worker.
After a restart the records let the controller adopt the workers still running instead of starting duplicates.
Workers of groups with process jobs get ``--job-user`` when ``scaleq up`` was given one (otherwise the worker's
default applies: ``nobody`` when it runs as root); the state and log dirs are private (0700) like the data dir
they live in, so a job cannot use one as a way in even as its working directory.

The record is written *before* the process starts (without a pid), then again with it: a ``kill -9`` of the
controller between the two leaves a record, and the next controller finds the process by the worker id in its
command line (or, if there is none after :data:`SPAWN_GRACE`, drops the record). Written after, that window left a
worker nobody listed: never counted against ``max_workers``, never drained, running forever (found by the fault
campaign, tests/faults).

``destroy`` is the skeleton's (:class:`~scaleq.providers.base.ProviderBase`): drain, then SIGKILL what is still
there after the grace.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Collection
from pathlib import Path

from scaleq.grid import Group
from scaleq.jobs import RuntimeKind
from scaleq.providers.base import Health, ProviderBase, ProviderWorker, Status, new_worker_id, worker_args

#: How long a record without a pid (written just before its process starts) may go without a process to find.
SPAWN_GRACE = 30.0


def _find_worker(worker_id: str) -> int | None:
    """The pid of the ``scaleq worker --worker-id WORKER_ID`` process, if one runs."""
    needle = b"\0--worker-id\0" + worker_id.encode() + b"\0"
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if needle in (entry / "cmdline").read_bytes():
                return int(entry.name)
    return None


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # gone
    return stat.rpartition(")")[2].split()[:1] in (["Z"], ["X"])


class LocalProvider(ProviderBase):
    name = "local"
    poll_every = 0.1

    def __init__(
        self, *, grid: str, server: str, token: str, state_dir: Path, log_dir: Path, job_user: str | None = None
    ) -> None:
        self.grid = grid
        self.job_user = job_user
        self.server = server
        self.token = token
        self.state_dir = state_dir
        self.log_dir = log_dir
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._stopping: set[str] = set()

    def _dir(self, group: Group) -> Path:
        return self.state_dir / self.grid / group.name

    def _dir_of(self, record: dict) -> Path:
        return self.state_dir / self.grid / record["group"]

    def _alive(self, record: dict) -> bool:
        pid = record["pid"]
        if pid is None:  # a record written just before its process started: not a process yet, or one to find
            pid = record["pid"] = _find_worker(record["id"])
            if pid is None:
                return time.time() - record["started_at"] < SPAWN_GRACE
            (self._dir_of(record) / f"{record['id']}.json").write_text(json.dumps(record))
            if record["id"] in self._stopping:  # stopped while it had no pid: now it has one
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        child = self._children.get(record["id"])
        if child is not None:
            return child.poll() is None  # (and reaps it once it has exited)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        if not cmdline:
            # empty: a zombie (ended), or a process between its exec and its new command line (the parent's Popen
            # returns once the exec is past its point of no return, before the kernel sets the arguments): a young
            # record's is taken for starting, so that a live worker's record is never deleted
            if _zombie(pid):
                return False
            return time.time() - record["started_at"] < SPAWN_GRACE
        return record["id"].encode() in cmdline

    async def workers(self, group: Group) -> list[ProviderWorker]:
        found = []
        directory = self._dir(group)
        for path in sorted(directory.glob("*.json")) if directory.exists() else []:
            try:
                record = json.loads(path.read_text())
            except (OSError, ValueError):
                path.unlink(missing_ok=True)
                continue
            if not self._alive(record):
                path.unlink(missing_ok=True)
                self._children.pop(record["id"], None)
                self._stopping.discard(record["id"])
                continue
            if record.get("server", self.server) != self.server and record["id"] not in self._stopping:
                # left by an earlier server at another address: it can never reach us, so let it go
                await self.stop(group, record["id"])
            status: Status = "stopping" if record["id"] in self._stopping else "running"
            found.append(
                ProviderWorker(
                    record["id"],
                    group.name,
                    record["started_at"],
                    status,
                    f"pid {record['pid']}",
                    record.get("version", ""),
                )
            )
        return found

    def _argv(self, group: Group, worker_id: str) -> list[str]:
        argv = [sys.executable, "-m", "scaleq", *worker_args(group, self.server, worker_id, server_grace=300)]
        if self.job_user is not None and RuntimeKind.process in group.runtimes:
            argv += ["--job-user", self.job_user]
        return argv

    async def start(self, group: Group, count: int) -> list[str]:
        directory = self._dir(group)
        directory.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for private in (self.state_dir, self.state_dir / self.grid, directory, self.log_dir):
            os.chmod(private, 0o700)
        ids = []
        for _ in range(count):
            worker_id = new_worker_id(self.grid, group.name)
            env = {**os.environ, **group.env, "SCALEQ_TOKEN": self.token, "PYTHONUNBUFFERED": "1"}
            record = {
                "id": worker_id,
                "pid": None,
                "started_at": time.time(),
                "group": group.name,
                "version": group.version(),
            }
            path = directory / f"{worker_id}.json"
            path.write_text(json.dumps(record))  # first: see the module's docstring
            try:
                with open(self.log_dir / f"{worker_id}.log", "ab") as logf:
                    # subprocess, not asyncio's: an asyncio child's transport kills the process when it is garbage
                    # collected (BaseSubprocessTransport.close), so a provider dropped after `apply` (or collected
                    # in a cycle) would SIGKILL the workers it had just started. (Popen's fork and exec block the
                    # loop no longer than asyncio's own, which runs the same Popen.)
                    proc = subprocess.Popen(  # noqa: ASYNC220 (see above)
                        self._argv(group, worker_id),
                        stdin=subprocess.DEVNULL,
                        stdout=logf,
                        stderr=logf,
                        env=env,
                        start_new_session=True,
                    )
            except Exception:  # not started: no record
                path.unlink(missing_ok=True)
                raise
            self._children[worker_id] = proc
            record["pid"] = proc.pid
            path.write_text(json.dumps(record))
            ids.append(worker_id)
        return ids

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        path = self._dir(group) / f"{worker_id}.json"
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if self._alive(record):
            self._stopping.add(worker_id)
            if record["pid"] is not None:  # else signalled once found (see _alive)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(record["pid"], signal.SIGKILL if force else signal.SIGTERM)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """The process's exit code if it ended, and the last line its log has."""
        found = {}
        for worker_id in worker_ids:
            child = self._children.get(worker_id)
            code = None if child is None else child.poll()
            what = "running" if code is None else f"exited with code {code}"
            try:
                lines = (self.log_dir / f"{worker_id}.log").read_text(errors="replace").strip().splitlines()
            except OSError:
                lines = []
            said = f"; its log ends: {lines[-1][-300:]}" if lines else "; its log is empty"
            found[worker_id] = f"process {what}{said} ({self.log_dir / f'{worker_id}.log'})"
        return found

    async def clean_up(self, group: Group, drained: list[ProviderWorker]) -> None:
        with contextlib.suppress(OSError):
            self._dir(group).rmdir()

    async def health(self) -> Health:
        return Health(True, f"local processes via {sys.executable}")
