"""The ``process`` runtime: a job as a plain subprocess of the worker, for trusted local work.

Design:

- The job runs in its own session (``start_new_session``), hence its own process group: every signal goes to the
  whole group, so shells, their children and grandchildren die together.
- A plain process cannot be given ``/inputs`` and ``/outputs`` mounts, so ``SCALEQ_INPUTS`` / ``SCALEQ_OUTPUTS``
  point at the worker's per-attempt directories instead (the job writes its outputs there directly; nothing needs
  collecting afterwards). Nothing makes the inputs read-only here: this runtime is for trusted work.
- The job's working directory (unless it names one) is a fresh directory inside its attempt dir, which the worker
  keeps outside any data dir (in the system's temp dir).
- With a :class:`~scaleq.worker.runtime.jobuser.JobUser` (a root worker's default: ``nobody``) the job runs as that
  user: the attempt dir is handed to it for the run and taken back before the worker reads outputs from it (see
  :mod:`scaleq.worker.runtime.jobuser`). The job's env (``PATH``, ``LD_PRELOAD``, …) is the child's alone: it takes
  effect at the job's ``exec``, after privileges are dropped, and never in the worker or the watchdog.
- stdout and stderr are read in chunks, not lines, so output without a newline (progress bars, prompts) still
  reaches the sink as it is written.
- When the main process exits, stragglers left in its group are killed, as Docker does when a container's
  PID 1 exits: an attempt never leaves processes behind. Timeout and cancellation send SIGTERM to the group,
  then SIGKILL after ``kill_grace`` seconds.
- Exit codes of processes killed by a signal are reported the shell's way (128 + signal), like Docker's 137.
- A job's session outlives a killed worker by itself, so every group is listed with the runtime's
  :class:`~scaleq.worker.runtime.watchdog.Watchdog` while it runs: when the worker process dies, however it dies,
  the watchdog stops its jobs (``SIGTERM``, ``SIGKILL`` after ``kill_grace``), so a job whose lease expires is not
  still running here when it runs again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from scaleq.worker.runtime import jobuser
from scaleq.worker.runtime.base import LogSink, RunResult, RunSpec, result_for_exit, scaleq_env, uncancellable
from scaleq.worker.runtime.jobuser import JobUser
from scaleq.worker.runtime.watchdog import Watchdog

log = logging.getLogger(__name__)

_CHUNK = 64 * 1024
#: How long to wait for the pipes to close after the main process exits and its group was killed.
_DRAIN_TIMEOUT = 5.0


def _as(user: JobUser | None) -> str:
    return f" (as user {user.name})" if user is not None else ""


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


class ProcessRuntime:
    """Runs ``entrypoint + command`` as a subprocess group on the worker's host."""

    name = "process"

    def __init__(self, kill_grace: float = 5.0, job_user: JobUser | None = None) -> None:
        self.kill_grace = kill_grace
        #: Who jobs run as; None: the worker's own user.
        self.job_user = job_user
        self.watchdog = Watchdog(kill_grace)  # started with the first job

    async def check(self) -> None:
        """A subprocess can always be started."""

    async def cleanup_orphans(self, worker_id: str) -> int:
        """Nothing outlives a process group but its temp dir, removed at the end of each run."""
        return 0

    async def others_attempts(self, worker_id: str) -> set[tuple[str, int]]:
        """Other workers' jobs are theirs to stop (their watchdogs do it when they die)."""
        return set()

    async def reap_attempt(self, job_id: str, attempt: int) -> int:
        return 0

    async def run(self, spec: RunSpec, on_log: LogSink) -> RunResult:
        d = spec.definition
        user = self.job_user
        argv = [*(d.entrypoint or []), *d.command]
        workdir = d.workdir
        if workdir is not None:
            if not os.path.isdir(workdir):
                return RunResult(reason="failed", error=f"workdir {workdir} does not exist on this worker")
            if user is not None:
                if not jobuser.can_enter(workdir, user):
                    return RunResult(
                        reason="failed", error=f"workdir {workdir} is not accessible to the job user {user.name}"
                    )
                workdir = os.path.realpath(workdir)  # the path checked, not one re-resolved later
        spec.outputs_dir.mkdir(parents=True, exist_ok=True)
        attempt_dir = spec.outputs_dir.parent
        scratch = tempfile.mkdtemp(prefix="work-", dir=attempt_dir)
        env = {
            **os.environ,
            **d.env,
            "SCALEQ_INPUTS": str(spec.inputs_dir),
            "SCALEQ_OUTPUTS": str(spec.outputs_dir),
            **scaleq_env(spec),
        }
        cwd = workdir or scratch
        # as the job user, the child itself changes into its directory (after dropping privileges)
        where: dict[str, Any] = {"cwd": cwd} if user is None else {"preexec_fn": user.become(cwd)}
        try:
            if user is not None:
                await asyncio.to_thread(jobuser.give, attempt_dir, user)
            spawn = asyncio.ensure_future(
                asyncio.create_subprocess_exec(
                    *argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    start_new_session=True,
                    **where,
                )
            )
            try:
                proc = await asyncio.shield(spawn)
            except asyncio.CancelledError:
                # Cancelled while spawning: the process may exist already; don't let it outlive the attempt.
                await uncancellable(self._reap_spawn(spawn))
                raise
            except FileNotFoundError:
                return RunResult(reason="failed", exit_code=127, error=f"command not found: {argv[0]}")
            except PermissionError:
                # a name looked up in PATH, where a directory the job user may not search gave EACCES: found nowhere?
                if "/" not in argv[0] and shutil.which(argv[0], path=env.get("PATH")) is None:
                    return RunResult(reason="failed", exit_code=127, error=f"command not found: {argv[0]}")
                return RunResult(reason="failed", exit_code=126, error=f"permission denied: {argv[0]}{_as(user)}")
            except OSError as e:
                return RunResult(reason="failed", exit_code=126, error=f"cannot run {argv[0]}{_as(user)}: {e}")
            except subprocess.SubprocessError:  # become() failed in the child
                return RunResult(reason="failed", exit_code=126, error=f"cannot start {argv[0]}{_as(user)} in {cwd}")
            return await self._supervise(proc, d.max_duration, on_log)
        finally:
            if user is not None:
                # Before the worker reads anything in it (outputs), and also on cancellation: the group is dead.
                await uncancellable(asyncio.to_thread(jobuser.take_back, attempt_dir, user))
            shutil.rmtree(Path(scratch), ignore_errors=True)

    async def _reap_spawn(self, spawn: asyncio.Future[asyncio.subprocess.Process]) -> None:
        with contextlib.suppress(Exception):
            proc = await spawn
            await self._terminate(proc, proc.pid)

    async def _supervise(self, proc: asyncio.subprocess.Process, max_duration: float, on_log: LogSink) -> RunResult:
        pgid = proc.pid  # session leader: its pid is the group id
        self.watchdog.watch(pgid)
        readers = [
            asyncio.create_task(self._pump(proc.stdout, "stdout", on_log)),
            asyncio.create_task(self._pump(proc.stderr, "stderr", on_log)),
        ]
        try:
            try:
                async with asyncio.timeout(max_duration):  # (not wait_for: scaleq.loop.wait_set says why)
                    await _main_exit(proc)
            except TimeoutError:
                await uncancellable(self._terminate(proc, pgid))
                await self._drain(readers)
                return RunResult(
                    reason="timed_out",
                    exit_code=_exit_code(proc.returncode if proc.returncode is not None else -signal.SIGKILL),
                    error=f"exceeded max_duration of {max_duration:g} s",
                )
            await _kill_group(pgid)  # stragglers (background children) die with the main process
            await self._drain(readers)
            return result_for_exit(_exit_code(await proc.wait()))  # it has exited: wait() answers at once
        except asyncio.CancelledError:
            await uncancellable(self._terminate(proc, pgid))
            raise
        finally:
            for r in readers:
                r.cancel()
            self.watchdog.unwatch(pgid)  # the group is gone by now (killed on every way out)

    async def _terminate(self, proc: asyncio.subprocess.Process, pgid: int) -> None:
        """SIGTERM the group; SIGKILL it once the grace is over or as soon as the whole group is gone."""
        _killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + self.kill_grace
        while time.monotonic() < deadline and _group_alive(pgid):
            await asyncio.sleep(0.05)
        await _kill_group(pgid)
        await _main_exit(proc)

    async def _drain(self, readers: list[asyncio.Task[None]]) -> None:
        # A process that left the group (setsid) may still hold a pipe open: don't wait on it forever.
        done, pending = await asyncio.wait(readers, timeout=_DRAIN_TIMEOUT)
        for r in pending:
            r.cancel()
        for r in done:
            if not r.cancelled() and r.exception() is not None:
                log.warning("log pump failed", exc_info=r.exception())

    @staticmethod
    async def _pump(stream: asyncio.StreamReader | None, label: str, on_log: LogSink) -> None:
        if stream is None:
            return
        while chunk := await stream.read(_CHUNK):
            try:
                await on_log(label, chunk)
            except Exception:
                # A failing sink must not stall the pipe (the job would block writing to it).
                log.exception("log sink failed for %s; output dropped", label)


async def _main_exit(proc: asyncio.subprocess.Process) -> int:
    """The main process's exit status, as soon as it exits.

    ``proc.wait()`` also waits for stdout/stderr to close, which a background child holding them delays.
    """
    loop = asyncio.get_running_loop()
    fd = None
    if proc.returncode is None:
        with contextlib.suppress(AttributeError, OSError):  # pidfds: Linux >= 5.3
            fd = os.pidfd_open(proc.pid)
    if fd is not None:
        exited = loop.create_future()

        def readable() -> None:
            if not exited.done():
                exited.set_result(None)

        loop.add_reader(fd, readable)
        try:
            await exited
        finally:
            loop.remove_reader(fd)
            os.close(fd)
    while proc.returncode is None:  # asyncio's child watcher reaps it right after exit
        await asyncio.sleep(0.01 if fd is not None else 0.1)
    return proc.returncode


async def _kill_group(pgid: int, timeout: float = 2.0) -> None:
    """SIGKILL the group and give the kernel a moment to finish them off, so callers see it gone."""
    _killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while _group_alive(pgid) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """Whether any process of the group still runs (zombies, which nobody may reap here, don't count)."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        pids = os.listdir("/proc")
    except OSError:  # no procfs (macOS): assume alive, the grace then runs out
        return True
    for pid in pids:
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        # fields after the command (which may contain spaces): state ppid pgrp ...
        fields = stat[stat.rfind(b")") + 2 :].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            return True
    return False
