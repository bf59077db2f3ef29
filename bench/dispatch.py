"""Dispatch throughput and latency of no-op jobs: scaleq over HTTP (SQLite and PostgreSQL) against procrastinate
and pgqueuer on the same PostgreSQL, in one run.

    python bench/dispatch.py            # ~3 min: 3,000 jobs per drain, 1/4/16 slots, 100 latency rounds
    python bench/dispatch.py --quick    # ~1 min: 1,000 jobs, 50 rounds
    python bench/dispatch.py --only scaleq-sqlite,scaleq-pg --slots 4 --profile /tmp/prof   # py-spy the server

What runs where (2 cores are shared by all of it, as they would be on a small box):

* **scaleq**: ``scaleq up --port 0`` in its own process (uvicorn, uvloop + httptools), over SQLite in its data dir
  or over PostgreSQL; its grid file has no groups, so no controller shares the server's loop. The *submitter* is
  this process: ``Client.submit`` of ``{"command": ["true"], "env": {"I": …}}``, 8 requests in flight. The *no-op
  workers* are a separate process speaking the worker protocol with ``scaleq.client.Client``: register, then loop
  ``claim(worker, n=free slots, wait=20, finishes=[…])``, finishing every claimed job at once by letting its
  finish ride along with the next claim (the protocol's fast path; once every job is claimed, the last finishes go
  with ``n=0``, which answers at once). Slots 1, 4, 16 are 1x1, 1x4 and 4x4 (workers x slots).
* **procrastinate**: its worker (``run_worker_async(concurrency=c, wait=False)``) in a separate process, an
  ``async`` no-op task, jobs deferred from this process one ``defer_async`` at a time (8 in flight).
* **pgqueuer**: ``QueueManager.run(batch_size=10, mode=drain)`` in a separate process, the entrypoint's
  ``concurrency_limit`` set to 1/4/16 (its ``max_concurrent_tasks`` must be at least twice the batch), an
  ``async`` no-op;
  enqueued one at a time (8 in flight). The row "pgqueuer (no limit)" is its default: no concurrency limit.

*Submit* is the rate of putting N jobs in; *drain* the rate of running N pre-queued jobs to their recorded finish;
*both* submits and drains at once (from the first submit to the last finish). CPU is the user+system time per job of
the server, the workers' process and all PostgreSQL processes during the drain.

*Latency*: one job at a time to an idle worker (1 slot), parked in its long-poll; scaleq's *claimed* is when the
worker's claim answers with the job, *finished* is the server's ``finished_at`` (the finish rode along with the
worker's next claim); the peers' *start* is when the task body starts, *finished* is when the job's end is recorded
in their tables (procrastinate: the ``succeeded`` event; pgqueuer: its log row, written in batches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import multiprocessing as mp
import secrets
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pg
from rich.console import Console
from rich.table import Table

from scaleq.client import Client
from scaleq.jobs import JobDefinition, SubmitRequest

console = Console(width=160)
SUBMIT_CONCURRENCY = 8
LAYOUTS = {1: [1], 4: [4], 16: [4, 4, 4, 4]}  # slots -> slots per worker connection


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


@dataclass
class Drain:
    system: str
    slots: int
    n: int
    submit_s: float = 0.0
    drain_s: float = 0.0
    both_s: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)  # seconds during the drain, by process group

    @property
    def submit_rate(self) -> float:
        return self.n / self.submit_s if self.submit_s else 0.0

    @property
    def drain_rate(self) -> float:
        return self.n / self.drain_s if self.drain_s else 0.0

    @property
    def both_rate(self) -> float:
        return self.n / self.both_s if self.both_s else 0.0


@dataclass
class Latency:
    system: str
    claimed: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)


async def gather_limited(n: int, concurrency: int, make: Callable[[int], Awaitable[Any]]) -> None:
    it = iter(range(n))

    async def lane() -> None:
        for i in it:
            await make(i)

    await asyncio.gather(*(lane() for _ in range(concurrency)))


# -- scaleq -----------------------------------------------------------------------------------------------------


def noop_job(queue: str, nonce: str, i: int) -> SubmitRequest:
    return SubmitRequest(queue=queue, definition=JobDefinition(command=["true"], env={"I": str(i), "RUN": nonce}))


async def scaleq_submit(url: str, token: str, queue: str, n: int, nonce: str) -> float:
    async with Client(url, token) as client:
        t0 = time.perf_counter()
        await gather_limited(n, SUBMIT_CONCURRENCY, lambda i: client.submit(noop_job(queue, nonce, i)))
        return time.perf_counter() - t0


def _registration(worker_id: str, queue: str, slots: int) -> dict[str, Any]:
    return {
        "id": worker_id,
        "queue": queue,
        "slots": slots,
        "runtimes": ["process"],
        "cpus": 2.0,
        "hostname": "bench",
    }


async def noop_workers(
    url: str, token: str, admin: str, queue: str, layout: list[int], n: int, go: Any
) -> dict[str, float]:
    """Claim and finish ``n`` jobs over ``len(layout)`` worker connections; when it started and when the last
    finish was recorded (the server's ``finished_at``)."""
    clients = [Client(url, token) for _ in layout]
    ids = [f"bench-{secrets.token_hex(4)}" for _ in layout]
    for client, wid, slots in zip(clients, ids, layout, strict=True):
        await client.register(_registration(wid, queue, slots))
    claimed = 0
    all_claimed = asyncio.Event()
    await asyncio.to_thread(go.wait)
    t0 = time.time()

    async def work(client: Client, wid: str, slots: int) -> None:
        nonlocal claimed
        pending: list[dict[str, Any]] = []
        while True:
            if claimed >= n and not pending:
                return
            want = 0 if claimed >= n else slots
            claims, _, state = await client.claim(wid, want, wait=0 if want == 0 else 20, finishes=pending)
            claimed += len(claims)
            if claimed >= n:
                all_claimed.set()
            pending = [{"lease": c.lease, "reason": "success", "exit_code": 0} for c in claims]
            if state != "active" and not pending:
                return

    tasks = [asyncio.create_task(work(c, w, s)) for c, w, s in zip(clients, ids, layout, strict=True)]
    await all_claimed.wait()
    # A worker whose claim found the queue empty is parked in its long-poll (its finishes were recorded when the
    # claim arrived); end those claims the protocol's way: drain (which answers a parked claim at once).
    for client, wid in zip(clients, ids, strict=True):
        await client.heartbeat(wid, draining=True)
    await asyncio.gather(*tasks)
    for client, wid in zip(clients, ids, strict=True):
        await client.deregister(wid)
    for client in clients:
        await client.close()
    async with Client(url, admin) as reader:
        finished = await reader.list_jobs(queue=queue, state="finished", limit=10_000)
    assert len(finished) == n, f"{len(finished)} of {n} jobs finished"
    return {"start": t0, "end": max(j.finished_at or 0.0 for j in finished)}


def _noop_workers_proc(
    url: str, token: str, admin: str, queue: str, layout: list[int], n: int, go: Any, out: Any
) -> None:
    out.put(asyncio.run(noop_workers(url, token, admin, queue, layout, n, go)))


async def scaleq_latency(url: str, admin: str, worker_token: str, queue: str, rounds: int) -> Latency:
    result = Latency("")
    nonce = secrets.token_hex(4)
    async with Client(url, admin) as submitter, Client(url, worker_token) as worker:
        wid = f"lat-{nonce}"
        await worker.register(_registration(wid, queue, 1))
        got: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        stop = False

        async def work() -> None:
            pending: list[dict[str, Any]] = []
            while not stop:
                claims, _, _ = await worker.claim(wid, 1, wait=20, finishes=pending)
                for c in claims:
                    got.put_nowait((c.job.id, time.time()))
                pending = [{"lease": c.lease, "reason": "success", "exit_code": 0} for c in claims]

        task = asyncio.create_task(work())
        await asyncio.sleep(0.2)
        for i in range(rounds):
            t0 = time.time()
            job, _ = await submitter.submit(noop_job(queue, nonce, i))
            job_id, t_claimed = await got.get()
            assert job_id == job.id
            await asyncio.sleep(0.03)  # the finish rides along with the next claim; the worker is parked again
            done = await submitter.get_job(job.id)
            result.claimed.append(t_claimed - t0)
            if done.finished_at:
                result.finished.append(done.finished_at - t0)
        stop = True
        await worker.heartbeat(wid, draining=True)
        await worker.deregister(wid)
        with contextlib.suppress(Exception):
            await task
    return result


def run_scaleq(
    system: str, store: str | None, slots_list: list[int], n: int, rounds: int, pg: Any, profile: Path | None
) -> tuple[list[Drain], Latency]:
    ctx = mp.get_context("spawn")
    drains: list[Drain] = []
    with _pg.scaleq_server(store) as server:
        console.print(f"[dim]{system}: server pid {server.pid} at {server.url}[/dim]")
        pg_pids = (lambda: _pg.postgres_pids(pg)) if store else (lambda: [])
        for slots in slots_list:
            queue = f"bench-{slots}-{secrets.token_hex(3)}"
            d = Drain(system, slots, n)
            d.submit_s = asyncio.run(scaleq_submit(server.url, server.admin_token, queue, n, secrets.token_hex(4)))
            go, out = ctx.Event(), ctx.Queue()
            proc = ctx.Process(
                target=_noop_workers_proc,
                args=(server.url, server.worker_token, server.admin_token, queue, LAYOUTS[slots], n, go, out),
            )
            proc.start()
            time.sleep(1.0)  # imports + registration
            spy = _py_spy(server.pid, profile, f"{system}-{slots}") if profile else None
            before = _cpu(server.pid, proc.pid, pg_pids())
            go.set()
            times = out.get(timeout=600)
            after = _cpu(server.pid, proc.pid, pg_pids())
            proc.join()
            if spy:
                spy.terminate()
                spy.wait()
            d.drain_s = times["end"] - times["start"]
            d.cpu = {k: after[k] - before.get(k, 0.0) for k in after}
            # both at once: submitting and draining the same number of jobs
            queue = f"both-{slots}-{secrets.token_hex(3)}"
            go, out = ctx.Event(), ctx.Queue()
            proc = ctx.Process(
                target=_noop_workers_proc,
                args=(server.url, server.worker_token, server.admin_token, queue, LAYOUTS[slots], n, go, out),
            )
            proc.start()
            time.sleep(1.0)
            go.set()
            t0 = time.time()
            asyncio.run(scaleq_submit(server.url, server.admin_token, queue, n, secrets.token_hex(4)))
            times = out.get(timeout=600)
            proc.join()
            d.both_s = times["end"] - t0
            drains.append(d)
            console.print(
                f"  {system} slots {slots}: submit {d.submit_rate:,.0f}/s, drain {d.drain_rate:,.0f}/s, "
                f"both {d.both_rate:,.0f}/s"
            )
        lat = asyncio.run(
            scaleq_latency(server.url, server.admin_token, server.worker_token, f"lat-{secrets.token_hex(3)}", rounds)
        )
        lat.system = system
    return drains, lat


def _cpu(server: int | None, workers: int, pg: list[int]) -> dict[str, float]:
    out = {"workers": _pg.cpu_seconds([workers]), "postgres": _pg.cpu_seconds(pg)}
    if server:
        out["server"] = _pg.cpu_seconds([server])
    return out


def _py_spy(pid: int, directory: Path, name: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).parent / "py-spy"
    cmd = [str(py_spy), "record", "--pid", str(pid), "--rate", "200", "--format", "speedscope"]
    cmd += ["--output", str(directory / f"{name}.json"), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- procrastinate ----------------------------------------------------------------------------------------------

STARTS: dict[str, float] = {}  # latency runs: job key -> when the task body started


class Counter:
    """Counts task bodies run in a peer's worker process; notes when the ``target``-th one ran."""

    target = 0
    count = 0
    end = 0.0
    done: asyncio.Event | None = None

    @classmethod
    def hit(cls) -> None:
        cls.count += 1
        if cls.count == cls.target and cls.done is not None:
            cls.end = time.time()
            cls.done.set()

    @classmethod
    def reset(cls, target: int) -> None:
        cls.target, cls.count, cls.end, cls.done = target, 0, 0.0, asyncio.Event()


def procrastinate_app(url: str, pool: int) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=url, min_size=1, max_size=pool))

    @app.task(name="noop")
    async def noop(i: int, key: str = "") -> None:
        if key:
            STARTS[key] = time.time()
        Counter.hit()

    return app


async def procrastinate_setup(url: str) -> None:
    app = procrastinate_app(url, 2)
    async with app.open_async():
        await app.schema_manager.apply_schema_async()


async def procrastinate_defer(url: str, n: int) -> float:
    app = procrastinate_app(url, SUBMIT_CONCURRENCY)
    async with app.open_async():
        task = app.tasks["noop"]
        t0 = time.perf_counter()
        await gather_limited(n, SUBMIT_CONCURRENCY, lambda i: task.defer_async(i=i))
        return time.perf_counter() - t0


async def procrastinate_drain(url: str, concurrency: int, n: int, go: Any) -> dict[str, float]:
    app = procrastinate_app(url, concurrency + 4)
    Counter.reset(n)
    assert Counter.done is not None
    async with app.open_async():
        await asyncio.to_thread(go.wait)
        t0 = time.time()
        worker = asyncio.create_task(app.run_worker_async(concurrency=concurrency, install_signal_handlers=False))
        await Counter.done.wait()
        worker.cancel()  # procrastinate stops gracefully on cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        return {"start": t0, "end": Counter.end}


def _procrastinate_proc(url: str, concurrency: int, n: int, go: Any, out: Any) -> None:
    out.put(asyncio.run(procrastinate_drain(url, concurrency, n, go)))


async def procrastinate_latency(url: str, rounds: int) -> Latency:
    import psycopg

    result = Latency("procrastinate")
    app = procrastinate_app(url, 6)
    async with app.open_async(), await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        worker = asyncio.create_task(app.run_worker_async(concurrency=1, install_signal_handlers=False))
        await asyncio.sleep(0.5)
        task = app.tasks["noop"]
        for i in range(rounds):
            key = f"lat-{i}"
            t0 = time.time()
            job_id = await task.defer_async(i=i, key=key)
            while key not in STARTS:
                await asyncio.sleep(0.0005)
            result.claimed.append(STARTS[key] - t0)
            await asyncio.sleep(0.03)
            row = await (
                await conn.execute(
                    "SELECT extract(epoch FROM at) FROM procrastinate_events WHERE job_id = %s AND type = 'succeeded'",
                    (job_id,),
                )
            ).fetchone()
            if row:
                result.finished.append(float(row[0]) - t0)
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await worker
    return result


# -- pgqueuer ---------------------------------------------------------------------------------------------------


async def _pgq_queries(url: str) -> Any:
    import psycopg
    from pgqueuer import PsycopgDriver, Queries

    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    return conn, Queries(PsycopgDriver(conn))


async def pgqueuer_setup(url: str) -> None:
    conn, queries = await _pgq_queries(url)
    async with conn:
        await queries.install()


async def pgqueuer_enqueue(url: str, n: int) -> float:
    lanes = [await _pgq_queries(url) for _ in range(SUBMIT_CONCURRENCY)]
    it = iter(range(n))

    async def lane(queries: Any) -> None:
        for i in it:
            await queries.enqueue("noop", str(i).encode())

    t0 = time.perf_counter()
    await asyncio.gather(*(lane(q) for _, q in lanes))
    elapsed = time.perf_counter() - t0
    for conn, _ in lanes:
        await conn.close()
    return elapsed


def pgqueuer_manager(queries: Any, concurrency: int) -> Any:
    from pgqueuer import QueueManager

    qm = QueueManager(queries)

    @qm.entrypoint("noop", concurrency_limit=concurrency)
    async def noop(job: Any) -> None:
        if job.payload and job.payload.startswith(b"lat-"):
            STARTS[job.payload.decode()] = time.time()
        Counter.hit()

    return qm


async def pgqueuer_drain(url: str, concurrency: int, n: int, go: Any) -> dict[str, float]:
    conn, queries = await _pgq_queries(url)
    qm = pgqueuer_manager(queries, concurrency)
    Counter.reset(n)
    assert Counter.done is not None
    await asyncio.to_thread(go.wait)
    t0 = time.time()
    worker = asyncio.create_task(qm.run())
    await Counter.done.wait()
    qm.shutdown.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker, 10)
    with contextlib.suppress(Exception):
        await conn.close()
    return {"start": t0, "end": Counter.end}


def _pgqueuer_proc(url: str, concurrency: int, n: int, go: Any, out: Any) -> None:
    out.put(asyncio.run(pgqueuer_drain(url, concurrency, n, go)))


async def pgqueuer_latency(url: str, rounds: int) -> Latency:
    result = Latency("pgqueuer")
    conn, queries = await _pgq_queries(url)
    wconn, wqueries = await _pgq_queries(url)
    qm = pgqueuer_manager(wqueries, 1)
    worker = asyncio.create_task(qm.run())
    await asyncio.sleep(0.5)
    for i in range(rounds):
        key = f"lat-{i}"
        t0 = time.time()
        (job_id,) = await queries.enqueue("noop", key.encode())
        while key not in STARTS:
            await asyncio.sleep(0.0005)
        result.claimed.append(STARTS[key] - t0)
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.3)  # its status log is written in batches
    rows = await conn.execute(
        "SELECT p.payload, extract(epoch FROM l.created) FROM pgqueuer_log l"
        " JOIN (SELECT DISTINCT job_id FROM pgqueuer_log) j USING (job_id)"
        " LEFT JOIN pgqueuer p ON p.id = l.job_id WHERE l.status = 'successful'"
    )
    _ = rows
    qm.shutdown.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker, 5)
    await conn.close()
    await wconn.close()
    return result


def run_peer(
    system: str, url: str, slots_list: list[int], n: int, rounds: int, pg: Any, unlimited: bool
) -> tuple[list[Drain], Latency]:
    ctx = mp.get_context("spawn")
    drains = []
    if system == "procrastinate":
        asyncio.run(procrastinate_setup(url))
        enqueue, target = procrastinate_defer, _procrastinate_proc
    else:
        asyncio.run(pgqueuer_setup(url))
        enqueue, target = pgqueuer_enqueue, _pgqueuer_proc
    configs = [(s, s, system) for s in slots_list]
    if unlimited:
        configs.append((0, 0, f"{system} (no limit)"))
    for slots, concurrency, name in configs:
        d = Drain(name, slots, n)
        d.submit_s = asyncio.run(enqueue(url, n))
        go, out = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=target, args=(url, concurrency, n, go, out))
        proc.start()
        time.sleep(1.0)
        before = _cpu(None, proc.pid, _pg.postgres_pids(pg))
        go.set()
        times = out.get(timeout=600)
        after = _cpu(None, proc.pid, _pg.postgres_pids(pg))
        proc.join()
        d.drain_s = times["end"] - times["start"]
        d.cpu = {k: after[k] - before.get(k, 0.0) for k in after}
        # both at once
        go, out = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=target, args=(url, concurrency, n, go, out))
        proc.start()
        time.sleep(1.0)
        go.set()
        t0 = time.time()
        asyncio.run(enqueue(url, n))
        times = out.get(timeout=600)
        proc.join()
        d.both_s = times["end"] - t0
        drains.append(d)
        console.print(
            f"  {name} slots {slots}: submit {d.submit_rate:,.0f}/s, drain {d.drain_rate:,.0f}/s, "
            f"both {d.both_rate:,.0f}/s"
        )
    latency = procrastinate_latency if system == "procrastinate" else pgqueuer_latency
    return drains, asyncio.run(latency(url, rounds))


# -- report -----------------------------------------------------------------------------------------------------


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report(drains: list[Drain], latencies: list[Latency], n: int) -> None:
    by = {(d.system, d.slots): d for d in drains}
    ref = {s: by.get(("procrastinate", s)) for s in (1, 4, 16)}
    ref2 = {s: by.get(("pgqueuer", s)) for s in (1, 4, 16)}
    t = Table(title=f"Throughput, no-op jobs ({n:,} per run)")
    for col in ("system", "slots", "submit/s", "drain/s", "both/s", "drain ÷ procr.", "drain ÷ pgq.", "CPU ms/job"):
        t.add_column(col, justify="right" if col not in ("system",) else "left")
    for d in drains:
        p, q = ref.get(d.slots), ref2.get(d.slots)
        cpu = " + ".join(f"{k[0]} {v * 1000 / d.n:.2f}" for k, v in sorted(d.cpu.items()) if v > 0)
        t.add_row(
            d.system,
            str(d.slots) if d.slots else "∞",
            f"{d.submit_rate:,.0f}",
            f"{d.drain_rate:,.0f}",
            f"{d.both_rate:,.0f}",
            f"{d.drain_rate / p.drain_rate:.2f}" if p and d.system != "procrastinate" else "",
            f"{d.drain_rate / q.drain_rate:.2f}" if q and not d.system.startswith("pgqueuer") else "",
            cpu,
        )
    console.print(t)
    t = Table(title="Latency to an idle worker (ms)")
    for col in ("system", "n", "claimed/start p50", "p95", "finished p50", "p95", "p50 ÷ procr."):
        t.add_column(col, justify="left" if col == "system" else "right")
    procr = next((x for x in latencies if x.system == "procrastinate"), None)
    for x in latencies:
        p50 = pct(x.claimed, 50)
        t.add_row(
            x.system,
            str(len(x.claimed)),
            f"{p50 * 1000:.1f}",
            f"{pct(x.claimed, 95) * 1000:.1f}",
            f"{pct(x.finished, 50) * 1000:.1f}" if x.finished else "—",
            f"{pct(x.finished, 95) * 1000:.1f}" if x.finished else "—",
            f"{p50 / pct(procr.claimed, 50):.2f}" if procr and x is not procr else "",
        )
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="1,000 jobs and 50 latency rounds (~1 min)")
    ap.add_argument("-n", "--jobs", type=int, default=None, help="jobs per drain (default 3,000; quick 1,000)")
    ap.add_argument("--rounds", type=int, default=None, help="latency rounds (default 100; quick 50)")
    ap.add_argument("--slots", default="1,4,16", help="comma-separated slot counts (1, 4, 16)")
    ap.add_argument(
        "--only", default="scaleq-sqlite,scaleq-pg,procrastinate,pgqueuer", help="systems to run (comma-separated)"
    )
    ap.add_argument("--profile", type=Path, default=None, help="py-spy the server during scaleq drains, into DIR")
    args = ap.parse_args()
    n = args.jobs or (1000 if args.quick else 3000)
    rounds = args.rounds or (50 if args.quick else 100)
    slots = [int(s) for s in args.slots.split(",")]
    only = args.only.split(",")
    console.print(f"[bold]machine[/bold]: {_pg.machine()}")
    console.print(
        f"scaleq {version('scaleq')}, procrastinate {version('procrastinate')}, pgqueuer {version('pgqueuer')}, "
        f"psycopg {version('psycopg')}, uvicorn {version('uvicorn')}"
    )
    drains: list[Drain] = []
    latencies: list[Latency] = []
    started = time.monotonic()
    with _pg.cluster("scaleq", "procrastinate", "pgqueuer") as pg:
        console.print(f"PostgreSQL {_pg.pg_version(pg)} on 127.0.0.1:{pg.port} (default settings)")
        if "scaleq-sqlite" in only:
            d, lat = run_scaleq("scaleq sqlite", None, slots, n, rounds, pg, args.profile)
            drains += d
            latencies.append(lat)
        if "scaleq-pg" in only:
            d, lat = run_scaleq("scaleq postgres", _pg.db_url(pg, "scaleq"), slots, n, rounds, pg, args.profile)
            drains += d
            latencies.append(lat)
        for peer in ("procrastinate", "pgqueuer"):
            if peer in only:
                d, lat = run_peer(peer, _pg.db_url(pg, peer), slots, n, rounds, pg, peer == "pgqueuer")
                drains += d
                latencies.append(lat)
    report(drains, latencies, n)
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
