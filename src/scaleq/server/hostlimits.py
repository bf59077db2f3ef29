"""What a fleet needs of its server's host: open files, and an accept queue for a fleet reconnecting at once.

Each worker holds two connections to its server (its parked claim's and its heartbeats'), and a fleet reconnects in
bursts: thousands of jobs ending in the same second, each worker opening a connection for its result. So two limits
of the host meet a large fleet before the server's CPU does:

* **open files** — most systems start a process with a soft limit of 1,024 (~460 workers) under a hard limit of
  524,288 (systemd) or 1,048,576 (containerd, Docker). The server raises its soft limit to the hard one at start
  (:func:`raise_open_file_limit`), as Go's runtime does for its programs (nginx asks for it in its configuration,
  ``worker_rlimit_nofile``);
* **the accept queue** — connections the kernel holds until the server accepts them. Past it the kernel drops the
  handshakes and each client waits out TCP's doubling retransmit timer, for seconds while the server sits idle:
  at 5,000 workers whose jobs ended in the same second, uvicorn's default of 2,048 let hundreds of leases expire
  (docs/benchmarks.md, *A fleet reporting at once*). The server asks for :data:`LISTEN_BACKLOG`; the kernel caps it at
  ``net.core.somaxconn`` (4,096 by default since Linux 5.4), which only the host's administrator can raise.

:func:`check` says, on ``/health`` and so in ``scaleq doctor``, when the live fleet has outgrown either.
"""

from __future__ import annotations

import contextlib
import logging
import resource
from pathlib import Path

from scaleq.doctor.checks import Check

log = logging.getLogger("scaleq.server")

#: The backlog the server listens with (the kernel caps it at ``net.core.somaxconn``).
LISTEN_BACKLOG = 65535
#: Open files a server needs besides its workers' connections (the store, logs, spooled uploads).
SPARE_FILES = 100

SOMAXCONN = Path("/proc/sys/net/core/somaxconn")

FIX_OPEN_FILES = (
    "raise the hard open-file limit of the server's process (LimitNOFILE= in its systemd unit, --ulimit nofile= for "
    "docker run); the server raises its soft limit to the hard one at start (docs/operations.md, Large fleets)"
)
FIX_ACCEPT_QUEUE = (
    "raise net.core.somaxconn on the server's host (sysctl -w net.core.somaxconn=65535; on Kubernetes a sysctl the "
    "kubelet must allow with --allowed-unsafe-sysctls), then restart the server: a socket keeps the queue it started "
    "listening with. A fleet larger than the accept queue that reconnects at once has handshakes dropped and waits on "
    "TCP's retransmit timer while its leases run out (docs/operations.md, Large fleets)"
)

#: The accept queue the kernel granted this process's listening socket when it started (None: this process does not
#: listen through :func:`listening`, as an app embedded in tests).
granted: int | None = None


def raise_open_file_limit() -> int:
    """Raise this process's soft limit on open files to its hard limit; the limit now (logged)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):  # (above the kernel's nr_open: keep what we have)
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    limit = open_files()
    log.info("open-file limit %d: room for about %d workers", limit, workers_within(limit))
    return limit


def open_files() -> int:
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return soft if soft != resource.RLIM_INFINITY else 1 << 31


def accept_queue() -> int:
    """The server's accept queue: as granted when it started listening, else as the kernel would grant it now (where
    it does not say, as on macOS: as asked)."""
    return granted if granted is not None else _grant()


def listening() -> int:
    """The server is about to listen with :data:`LISTEN_BACKLOG`: remember the queue the kernel grants it, which a
    later change of ``net.core.somaxconn`` does not change for this socket."""
    global granted
    granted = _grant()
    return granted


def _grant() -> int:
    with contextlib.suppress(OSError, ValueError):
        return min(LISTEN_BACKLOG, int(SOMAXCONN.read_text()))
    return LISTEN_BACKLOG


def workers_within(files: int) -> int:
    return max(0, files - SPARE_FILES) // 2


def check(live_workers: int, files: int, queue: int) -> Check:
    """Whether the host holds the live fleet: its connections within ``files``, all of it reconnecting at once within
    the accept queue ``queue``. ``live_workers`` are the grid's: with several servers on one store, an upper bound of
    this server's share."""
    if live_workers > workers_within(files):
        return Check(
            "server",
            "host limits",
            False,
            f"{live_workers} live workers hold about {2 * live_workers} connections: past this server's open-file "
            f"limit of {files}, which leaves room for {workers_within(files)} workers",
            FIX_OPEN_FILES,
        )
    if live_workers > queue:
        return Check(
            "server",
            "host limits",
            False,
            f"{live_workers} live workers, more than this server's accept queue of {queue} connections "
            "(net.core.somaxconn): the fleet reconnecting at once would have handshakes dropped",
            FIX_ACCEPT_QUEUE,
        )
    return Check(
        "server",
        "host limits",
        True,
        f"{live_workers} live workers: open files for {workers_within(files)}, an accept queue of {queue} "
        "connections for a fleet reconnecting at once",
    )
