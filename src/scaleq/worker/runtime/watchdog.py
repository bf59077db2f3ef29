"""The process runtime's watchdog: a dead worker's process jobs die with it.

A process job runs in a session of its own (so that its whole tree can be signalled), which also means nothing
stops it when its worker is killed (``kill -9``, the OOM killer): it would go on running while its lease expires and
the job runs again elsewhere. So each :class:`~scaleq.worker.runtime.process.ProcessRuntime` starts one watchdog, a
small process in a session of its own, and tells it through a pipe which process groups its jobs run in (``+pgid``
when one starts, ``-pgid`` once it is gone). Only the worker holds the pipe's write end (pipes are not inherited by
jobs), so the watchdog reads end-of-file exactly when the worker process is gone, however it died; it then sends
``SIGTERM`` to every group still listed, ``SIGKILL`` after ``grace`` seconds, and exits. A parent-death signal would
reach only the job's first process, and only when the thread that forked it dies; the watchdog covers the whole
group and any thread. The window left is a job spawned but not yet listed (the few microseconds between the fork's
return and the write) when the worker dies.

Run as ``python watchdog.py GRACE`` (standard library only).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time

log = logging.getLogger(__name__)


class Watchdog:
    """The worker side: start the watchdog on first use, list and unlist process groups."""

    def __init__(self, grace: float) -> None:
        self.grace = grace
        self._proc: subprocess.Popen[bytes] | None = None
        self._groups: set[int] = set()

    def watch(self, pgid: int) -> None:
        self._groups.add(pgid)
        self._send(f"+{pgid}\n")

    def unwatch(self, pgid: int) -> None:
        self._groups.discard(pgid)
        self._send(f"-{pgid}\n")

    def close(self) -> None:
        """What the worker's death does: the watchdog stops every group still listed, then exits."""
        if self._proc is not None and self._proc.stdin is not None:
            self._proc.stdin.close()
            self._proc.wait()
        self._proc = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _send(self, line: str) -> None:
        for _ in range(2):  # a watchdog that died (killed by hand?) is replaced, with the groups listed so far
            fresh = self._proc is None or self._proc.poll() is not None
            try:
                if fresh:
                    self._start()
                assert self._proc is not None and self._proc.stdin is not None
                os.write(self._proc.stdin.fileno(), line.encode())
                return
            except (BrokenPipeError, OSError):
                self._proc = None
        log.warning("no watchdog for process jobs: they would outlive a killed worker")

    def _start(self) -> None:
        self._proc = subprocess.Popen(
            # this very file, which needs only the standard library: no import of scaleq, nothing from the env
            [sys.executable, "-I", "-S", os.path.abspath(__file__), f"{self.grace:g}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C for the worker's process group must not end it first
        )
        assert self._proc.stdin is not None
        for pgid in self._groups:  # a replacement learns what its predecessor knew
            os.write(self._proc.stdin.fileno(), f"+{pgid}\n".encode())


def _signal_groups(groups: set[int], sig: int) -> set[int]:
    """Signal each group; the ones still there."""
    alive = set()
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
            alive.add(pgid)
    return alive


def main(argv: list[str]) -> int:
    grace = float(argv[0]) if argv else 5.0
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin.buffer:  # until end-of-file: the worker is gone
        op, pgid = line[:1], int(line[1:])
        if op == b"+":
            groups.add(pgid)
        else:
            groups.discard(pgid)
    groups = _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while groups and time.monotonic() < deadline:
        time.sleep(0.05)
        groups = _signal_groups(groups, 0)
    _signal_groups(groups, signal.SIGKILL)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
