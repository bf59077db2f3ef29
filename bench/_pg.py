"""Shared bits of the dispatch, scale and container benchmarks: a throw-away PostgreSQL cluster (``tests/pg.py``),
a real ``scaleq up`` server in its own process, and CPU / memory readings from ``/proc``."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.pg import Cluster, start_cluster  # noqa: E402

_TICK = os.sysconf("SC_CLK_TCK")


# -- PostgreSQL -------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def cluster(*databases: str, statements: bool = False) -> Iterator[Cluster]:
    """A fresh cluster (default settings apart from max_connections=200) with ``databases`` created in it; with
    ``statements``, pg_stat_statements loaded (a restart) and created in ``postgres`` and ``template1`` (so in every
    database made after)."""
    import psycopg

    c = start_cluster()
    try:
        if statements:
            with psycopg.connect(c.url, autocommit=True) as conn:
                conn.execute("ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'")
            c.stop()
            c.start()
            for existing in ("template1", "postgres"):
                with psycopg.connect(c.url.rsplit("/", 1)[0] + "/" + existing, autocommit=True) as conn:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        with psycopg.connect(c.url, autocommit=True) as conn:
            for db in databases:
                conn.execute(f"CREATE DATABASE {db}")
        yield c
    finally:
        with contextlib.suppress(Exception):
            c.stop("immediate")
        shutil.rmtree(c.data, ignore_errors=True)


def top_statements(conn: Any, db: str, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` statements of database ``db`` that took the most time since pg_stat_statements was last reset."""
    rows = conn.execute(
        "SELECT calls, round(total_exec_time::numeric, 1) AS total_ms, round(mean_exec_time::numeric, 3) AS mean_ms,"
        " rows, round(total_plan_time::numeric, 1) AS plan_ms, left(regexp_replace(query, '\\s+', ' ', 'g'), 200)"
        " FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = %s)"
        " ORDER BY total_exec_time DESC LIMIT %s",
        (db, n),
    ).fetchall()
    keys = ("calls", "total_ms", "mean_ms", "rows", "plan_ms", "query")
    return [{k: float(v) if k.endswith("_ms") else v for k, v in zip(keys, r, strict=True)} for r in rows]


def db_url(c: Cluster, db: str) -> str:
    return c.url.rsplit("/", 1)[0] + "/" + db


def pg_version(c: Cluster) -> str:
    import psycopg

    with psycopg.connect(c.url) as conn:
        return str(conn.execute("SHOW server_version").fetchone()[0])


def postgres_pids(c: Cluster) -> list[int]:
    """The postmaster and all its children (backends, walwriter, …)."""
    try:
        master = int((c.data / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return []
    return [master, *children(master)]


# -- /proc ------------------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def cpu_seconds(pids: list[int], *, reaped: bool = False) -> float:
    """User + system CPU time of ``pids`` (those still alive); with ``reaped`` also that of their children which
    exited and were waited for (PostgreSQL's postmaster reaps its backends, so the total is monotonic)."""
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            if reaped:
                total += int(fields[13]) + int(fields[14])
    return total / _TICK


def postgres_cpu(c: Cluster) -> float:
    """CPU seconds used by the cluster so far: postmaster, live backends and the backends that have exited."""
    pids = postgres_pids(c)
    return cpu_seconds(pids[:1], reaped=True) + cpu_seconds(pids[1:])


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def machine() -> str:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = os.getloadavg()
    return (
        f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB, Linux {platform.release()}, "
        f"Python {platform.python_version()}, load {load[0]:.1f}/{load[1]:.1f}, "
        f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC"
    )


def speed_probe_ms() -> float:
    """How long this machine takes now for a fixed piece of single-threaded Python, in ms (the median of three).
    These VMs' speed drifts by a third and more over minutes (a neighbour's load, the host's clock), so rows run
    apart compare only as far as their probes agree; a probe is ~0.5 s."""
    record = {"id": "x" * 64, "queue": "q", "definition": {"command": ["sleep", "1"], "env": {"A": "1"}}, "at": 1.5}
    times = []
    for _ in range(3):
        started = time.perf_counter()
        for i in range(20_000):
            decoded = json.loads(json.dumps(record))
            decoded["at"] += sum(len(k) for k in decoded) * i % 7
        times.append(time.perf_counter() - started)
    return round(sorted(times)[1] * 1000, 1)


# -- a scaleq server in its own process -------------------------------------------------------------------------


@dataclass
class Server:
    """``scaleq up`` in a subprocess, with a grid file of no groups (no controller work) unless ``controller``."""

    proc: subprocess.Popen[bytes]
    data_dir: Path
    url: str
    admin_token: str
    worker_token: str

    @property
    def pid(self) -> int:
        return self.proc.pid


@contextlib.contextmanager
def scaleq_server(
    store: str | None, *, controller: bool = False, env: dict[str, str] | None = None
) -> Iterator[Server]:
    """Start ``scaleq up --port 0`` over ``store`` (a postgresql:// URL, or None for SQLite in the data dir).

    Without ``controller`` the grid has no groups; with it, ``scaleq up``'s embedded default (a local group on queue
    ``default``, which the benchmarks leave idle)."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaleq-bench-"))
    cmd = [sys.executable, "-m", "scaleq", "up", "--port", "0", "--data-dir", str(data_dir)]
    if not controller:
        (data_dir / "grid.toml").write_text('name = "bench"\n')
        cmd += ["--grid", str(data_dir / "grid.toml")]
    if store:
        cmd += ["--store", store]
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    try:
        info = data_dir / "server.json"
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"scaleq up exited {proc.returncode}: {(data_dir / 'server.log').read_text()}")
            if info.exists():
                with contextlib.suppress(ValueError):
                    data = json.loads(info.read_text())
                    if data.get("pid") == proc.pid:
                        break
            if time.monotonic() > deadline:
                raise RuntimeError("scaleq up did not start within 60 s")
            time.sleep(0.02)
        _wait_healthy(data["url"])  # server.json is written before admin.token is rewritten: read it after
        yield Server(
            proc,
            data_dir,
            data["url"],
            (data_dir / "admin.token").read_text().strip(),
            (data_dir / "worker.token").read_text().strip(),
        )
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
        shutil.rmtree(data_dir, ignore_errors=True)


def _wait_healthy(url: str) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url}/healthz did not answer")
        time.sleep(0.05)
