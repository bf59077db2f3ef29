"""A service the tests start as a subprocess (Prometheus, an OTLP receiver): its output in a log file for failure
messages, and stopped after the block whatever happened in it."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def background(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` with stdout and stderr in ``log``; stopped after the block (see :func:`stop`)."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        stop(proc, grace=10)


def stop(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM a process that still runs, and SIGKILL it if it has not exited ``grace`` seconds later."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
