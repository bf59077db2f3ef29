"""Dispatch throughput and latency of no-op jobs: scaleq over HTTP (SQLite and PostgreSQL) against procrastinate
and pgqueuer on the same PostgreSQL, in one run.

    python bench/dispatch.py            # ~3 min: 2,000 jobs per drain, 1/4/16 slots, 100 latency rounds
    python bench/dispatch.py --quick    # ~1 min: 500 jobs, 30 rounds
    python bench/dispatch.py --only scaleq-pg --slots 1 --profile DIR   # py-spy (--gil) the server during drains

What runs where (the 2 cores are shared by all of it, as they would be on a small box):

* **PostgreSQL**: one throw-away cluster (``tests/pg.py``: initdb, default settings, loopback), a database each for
  scaleq, procrastinate and pgqueuer.
* **scaleq**: ``scaleq up --port 0`` in its own process (uvicorn, httptools), over SQLite in its data dir or over
  PostgreSQL; its grid file has no groups, so no controller shares the server's loop. The *submitter* is this
  process: ``Client.submit`` of ``{"command": ["true"], "env": {"I": …}}``, 8 requests in flight. The *no-op
  workers* are another process speaking the worker protocol with ``scaleq.client.Client``: register, then loop
  ``claim(worker, n=free slots, wait=20, finishes=[…])``, finishing every claimed job at once by letting its finish
  ride along with the next claim (the protocol's fast path); once every job is claimed, the last finishes go with
  ``n=0``. Slots 1, 4, 16 are 1x1, 1x4 and 4x4 (worker connections x slots). A drain ends at the server's
  ``finished_at`` of its last job.
* **procrastinate**: its worker, ``run_worker_async(concurrency=1/4/16)``, in another process, with an ``async``
  no-op task; jobs deferred from this process one ``defer_async`` at a time, 8 in flight.
* **pgqueuer**: 1/4/16 ``QueueManager``s (each on its own asyncpg connection, its default batch of 10 and no
  concurrency limit — what "concurrency" means in pgqueuer's own benchmark) in another process, with an ``async``
  no-op entrypoint; enqueued one at a time, 8 in flight. (Its per-entrypoint ``concurrency_limit`` cannot stand in
  for slots: with a limit, the next batch waits for the previous one's status flush and a wake-up, ~0.5 jobs/s per
  unit of limit here.)
* A peer's drain ends when its task body has run for the last job (a little in its favour: its final status
  write is not waited for).

*Submit* is the rate of putting N jobs in one at a time (8 in flight); *batch* putting them in 500 per request, one
request after another (scaleq's ``POST /jobs/batch``, procrastinate's ``batch_defer_async``, pgqueuer's ``enqueue``
of lists), measured once per system; *drain* the rate of running N pre-queued jobs; *both* submits and drains
N/2 jobs at once (from the first submit to the last finish). *CPU ms/job* is user+system time per job during the
drain: ``s`` the scaleq server, ``w`` the workers' process, ``p`` the whole PostgreSQL cluster.

*Latency*: one job at a time to an idle worker (1 slot) parked in its long-poll, submitter and worker in this
process. scaleq's *claimed* is when the worker's claim answers with the job; *finished* is the server's
``finished_at`` (the finish rode along with the worker's next claim). The peers' *start* is when the task body
starts; *finished* is when the job's end is recorded in their tables (procrastinate: its ``succeeded`` event;
pgqueuer: its log row, which it writes in batches).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import logging
import multiprocessing as mp
import secrets
import signal
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
BATCH = 500  # jobs per batch submit (scaleq's CLI default; within each system's limits)
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
    batch_s: float = 0.0  # submitting the n jobs BATCH at a time, one request (or statement) after another
    cpu: dict[str, float] = field(default_factory=dict)  # seconds during the drain, by process group

    @property
    def submit_rate(self) -> float:
        return self.n / self.submit_s if self.submit_s else 0.0

    @property
    def batch_rate(self) -> float:
        return self.n / self.batch_s if self.batch_s else 0.0

    @property
    def drain_rate(self) -> float:
        return self.n / self.drain_s if self.drain_s else 0.0

    @property
    def n_both(self) -> int:
        return max(self.n // 2, 100)

    @property
    def both_rate(self) -> float:
        return self.n_both / self.both_s if self.both_s else 0.0


@dataclass
class Latency:
    system: str
    claimed: list[float] = field(default_factory=list)
    finished: list[float] = field(default_factory=list)


_OUT: Any = None  # in a load process: where its messages go


def _mark(phase: str) -> None:
    """Tell the parent this load process is ``ready`` (set up, waiting for go) or has ``ended`` the measured work
    (the parent then reads the server's and PostgreSQL's CPU)."""
    if _OUT is not None:
        _OUT.put({phase: 1.0})


def _child(out: Any, main: Awaitable[dict[str, float]]) -> None:
    """Body of a load process: run ``main`` and hand back its times (or the error, so the parent does not hang)."""
    global _OUT
    _OUT = out
    logging.getLogger("procrastinate").setLevel(logging.ERROR)
    try:
        out.put(asyncio.run(main))  # type: ignore[arg-type]
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        raise


def _result(out: Any, phase: str | None = None) -> dict[str, float]:
    """The next message of a load process: the mark of ``phase``, or (None) its times; other marks are skipped."""
    while True:
        got = out.get(timeout=600)
        if "error" in got:
            raise RuntimeError(f"load process failed: {got['error']}")
        if phase in got or (phase is None and "start" in got):
            return got


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
    _mark("ready")
    await asyncio.to_thread(go.wait)
    t0, cpu0 = time.time(), time.process_time()

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
    cpu = time.process_time() - cpu0
    _mark("ended")
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
    return {"start": t0, "end": max(j.finished_at or 0.0 for j in finished), "cpu": cpu}


def _noop_workers_proc(
    url: str, token: str, admin: str, queue: str, layout: list[int], n: int, go: Any, out: Any
) -> None:
    _child(out, noop_workers(url, token, admin, queue, layout, n, go))


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


async def scaleq_submit_batch(url: str, token: str, queue: str, n: int, nonce: str) -> float:
    async with Client(url, token) as client:
        jobs = [noop_job(queue, nonce, i) for i in range(n)]
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            await client.submit_many(jobs[start : start + BATCH])
        return time.perf_counter() - t0


def run_scaleq(
    system: str, store: str | None, slots_list: list[int], n: int, rounds: int, pg: Any, profile: Path | None
) -> tuple[list[Drain], Latency]:
    ctx = mp.get_context("spawn")
    drains: list[Drain] = []
    with _pg.scaleq_server(store) as server:
        console.print(f"[dim]{system}: server pid {server.pid} at {server.url}[/dim]")
        for slots in slots_list:
            queue = f"bench-{slots}-{secrets.token_hex(3)}"
            d = Drain(system, slots, n)
            d.submit_s = asyncio.run(scaleq_submit(server.url, server.admin_token, queue, n, secrets.token_hex(4)))
            if slots == slots_list[0]:  # (not a function of the slots)
                spare = f"batch-{secrets.token_hex(3)}"
                d.batch_s = asyncio.run(scaleq_submit_batch(server.url, server.admin_token, spare, n, "b"))
            go, out = ctx.Event(), ctx.Queue()
            proc = ctx.Process(
                target=_noop_workers_proc,
                args=(server.url, server.worker_token, server.admin_token, queue, LAYOUTS[slots], n, go, out),
            )
            proc.start()
            _result(out, "ready")  # imported and registered
            spy = _py_spy(server.pid, profile, f"{system}-{slots}") if profile else None
            before = _cpu(server.pid, pg if store else None)
            go.set()
            _result(out, "ended")
            after = _cpu(server.pid, pg if store else None)
            if spy:
                spy.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
                spy.wait()
            times = _result(out)
            proc.join()
            d.drain_s = times["end"] - times["start"]
            d.cpu = {k: after[k] - before.get(k, 0.0) for k in after} | {"workers": times["cpu"]}
            # both at once: submitting and draining (half as many jobs)
            queue = f"both-{slots}-{secrets.token_hex(3)}"
            go, out = ctx.Event(), ctx.Queue()
            proc = ctx.Process(
                target=_noop_workers_proc,
                args=(server.url, server.worker_token, server.admin_token, queue, LAYOUTS[slots], d.n_both, go, out),
            )
            proc.start()
            _result(out, "ready")
            go.set()
            t0 = time.time()
            asyncio.run(scaleq_submit(server.url, server.admin_token, queue, d.n_both, secrets.token_hex(4)))
            times = _result(out)
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


def _cpu(server: int | None, pg: Any) -> dict[str, float]:
    """CPU seconds so far of the server process and of the whole PostgreSQL cluster (the workers' process reports
    its own, for the measured interval)."""
    out = {}
    if server:
        out["server"] = _pg.cpu_seconds([server])
    if pg is not None:
        out["postgres"] = _pg.postgres_cpu(pg)
    return out


def _py_spy(pid: int, directory: Path, name: str) -> subprocess.Popen[bytes]:
    directory.mkdir(parents=True, exist_ok=True)
    py_spy = Path(sys.executable).parent / "py-spy"
    cmd = [str(py_spy), "record", "--pid", str(pid), "--rate", "200", "--gil", "--format", "raw"]
    cmd += ["--output", str(directory / f"{name}.txt"), "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- procrastinate ----------------------------------------------------------------------------------------------

STARTS: dict[str, float] = {}  # latency runs: job key -> when the task body started


class Counter:
    """Counts task bodies run in a peer's worker process; notes when the ``target``-th one ran."""

    target = 0
    count = 0
    end = 0.0
    cpu = 0.0  # process CPU seconds when the target-th ran
    done: asyncio.Event | None = None

    @classmethod
    def hit(cls) -> None:
        cls.count += 1
        if cls.count == cls.target and cls.done is not None:
            cls.end, cls.cpu = time.time(), time.process_time()
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


async def procrastinate_defer_batch(url: str, n: int) -> float:
    app = procrastinate_app(url, 2)
    async with app.open_async():
        task = app.tasks["noop"]
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            await task.batch_defer_async(*({"i": i} for i in range(start, min(start + BATCH, n))))
        elapsed = time.perf_counter() - t0
        # the bench's drains must not see these: procrastinate has one queue here
        await app.connector.execute_query_async("DELETE FROM procrastinate_jobs WHERE status = 'todo'")
        return elapsed


async def procrastinate_drain(url: str, concurrency: int, n: int, go: Any) -> dict[str, float]:
    app = procrastinate_app(url, concurrency + 4)
    Counter.reset(n)
    assert Counter.done is not None
    async with app.open_async():
        _mark("ready")
        await asyncio.to_thread(go.wait)
        t0, cpu0 = time.time(), time.process_time()
        worker = asyncio.create_task(app.run_worker_async(concurrency=concurrency, install_signal_handlers=False))
        await Counter.done.wait()
        _mark("ended")
        worker.cancel()  # procrastinate stops gracefully on cancellation
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        return {"start": t0, "end": Counter.end, "cpu": Counter.cpu - cpu0}


def _procrastinate_proc(url: str, concurrency: int, n: int, go: Any, out: Any) -> None:
    _child(out, procrastinate_drain(url, concurrency, n, go))


async def procrastinate_latency(url: str, rounds: int) -> Latency:
    import psycopg

    result = Latency("procrastinate")
    app = procrastinate_app(url, 6)
    async with app.open_async(), await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        worker = asyncio.create_task(app.run_worker_async(concurrency=1, install_signal_handlers=False))
        await asyncio.sleep(0.5)
        task = app.tasks["noop"]
        for i in range(rounds):
            key = f"procrastinate-lat-{i}"
            t0 = time.time()
            job_id = await task.defer_async(i=i, key=key)
            while key not in STARTS:
                await asyncio.sleep(0.0002)
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
    """A connection and pgqueuer's queries over it, with its asyncpg driver (its psycopg driver holds the
    connection for up to 1 s while it waits for a NOTIFY, which puts ~1 s on every idle pick-up)."""
    import asyncpg
    from pgqueuer import AsyncpgDriver, Queries

    conn = await asyncpg.connect(url)
    return conn, Queries(AsyncpgDriver(conn))


async def pgqueuer_setup(url: str) -> None:
    conn, queries = await _pgq_queries(url)
    try:
        await queries.install()
    finally:
        await conn.close()


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


async def pgqueuer_enqueue_batch(url: str, n: int) -> float:
    conn, queries = await _pgq_queries(url)
    try:
        t0 = time.perf_counter()
        for start in range(0, n, BATCH):
            k = min(BATCH, n - start)
            await queries.enqueue(["noop"] * k, [str(i).encode() for i in range(start, start + k)], [0] * k)
        elapsed = time.perf_counter() - t0
        await conn.execute("DELETE FROM pgqueuer")  # the bench's drains must not see these
        return elapsed
    finally:
        await conn.close()


def pgqueuer_manager(queries: Any, concurrency: int) -> Any:
    from pgqueuer import QueueManager

    qm = QueueManager(queries)

    @qm.entrypoint("noop", concurrency_limit=concurrency)
    async def noop(job: Any) -> None:
        if job.payload and job.payload.startswith(b"pgq-lat-"):
            STARTS[job.payload.decode()] = time.time()
        Counter.hit()

    return qm


async def pgqueuer_drain(url: str, consumers: int, n: int, go: Any) -> dict[str, float]:
    """``consumers`` queue managers (each its own connection, default batch of 10, no concurrency limit), as in
    pgqueuer's own benchmark; 0 means one, as it comes."""
    lanes = [await _pgq_queries(url) for _ in range(max(consumers, 1))]
    managers = [pgqueuer_manager(q, 0) for _, q in lanes]
    Counter.reset(n)
    assert Counter.done is not None
    _mark("ready")
    await asyncio.to_thread(go.wait)
    t0, cpu0 = time.time(), time.process_time()
    workers = [asyncio.create_task(qm.run()) for qm in managers]
    await Counter.done.wait()
    _mark("ended")
    for qm in managers:
        qm.shutdown.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(*workers), 10)
    for conn, _ in lanes:
        with contextlib.suppress(Exception):
            await conn.close()
    return {"start": t0, "end": Counter.end, "cpu": Counter.cpu - cpu0}


def _pgqueuer_proc(url: str, concurrency: int, n: int, go: Any, out: Any) -> None:
    _child(out, pgqueuer_drain(url, concurrency, n, go))


async def pgqueuer_latency(url: str, rounds: int) -> Latency:
    result = Latency("pgqueuer")
    conn, queries = await _pgq_queries(url)
    wconn, wqueries = await _pgq_queries(url)
    qm = pgqueuer_manager(wqueries, 0)
    worker = asyncio.create_task(qm.run())
    await asyncio.sleep(0.5)
    sent: dict[int, float] = {}
    for i in range(rounds):
        key = f"pgq-lat-{i}"
        t0 = time.time()
        (job_id,) = await queries.enqueue("noop", key.encode())
        sent[int(job_id)] = t0
        while key not in STARTS:
            await asyncio.sleep(0.0002)
        result.claimed.append(STARTS[key] - t0)
        await asyncio.sleep(0.03)
    await asyncio.sleep(0.5)  # its status log is written in batches (at most every ~0.1 s)
    rows = await conn.fetch(
        "SELECT job_id, extract(epoch FROM created)::float8 AS at FROM pgqueuer_log WHERE status = 'successful'"
    )
    result.finished = [r["at"] - sent[r["job_id"]] for r in rows if r["job_id"] in sent]
    qm.shutdown.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(worker, 5)
    await conn.close()
    await wconn.close()
    return result


def run_peer(system: str, url: str, slots_list: list[int], n: int, rounds: int, pg: Any) -> tuple[list[Drain], Latency]:
    ctx = mp.get_context("spawn")
    drains = []
    if system == "procrastinate":
        asyncio.run(procrastinate_setup(url))
        enqueue, target, batch = procrastinate_defer, _procrastinate_proc, procrastinate_defer_batch
    else:
        asyncio.run(pgqueuer_setup(url))
        enqueue, target, batch = pgqueuer_enqueue, _pgqueuer_proc, pgqueuer_enqueue_batch
    configs = [(s, s, system) for s in slots_list]
    for slots, concurrency, name in configs:
        d = Drain(name, slots, n)
        if slots == slots_list[0]:  # (not a function of the slots; before the others are queued)
            d.batch_s = asyncio.run(batch(url, n))
        d.submit_s = asyncio.run(enqueue(url, n))
        go, out = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=target, args=(url, concurrency, n, go, out))
        proc.start()
        _result(out, "ready")
        before = _cpu(None, pg)
        go.set()
        _result(out, "ended")
        after = _cpu(None, pg)
        times = _result(out)
        proc.join()
        d.drain_s = times["end"] - times["start"]
        d.cpu = {k: after[k] - before.get(k, 0.0) for k in after} | {"workers": times["cpu"]}
        # both at once (half as many jobs)
        go, out = ctx.Event(), ctx.Queue()
        proc = ctx.Process(target=target, args=(url, concurrency, d.n_both, go, out))
        proc.start()
        _result(out, "ready")
        go.set()
        t0 = time.time()
        asyncio.run(enqueue(url, d.n_both))
        times = _result(out)
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
    cols = ("system", "slots", "submit/s", f"batch {BATCH}/s", "drain/s", "both/s", "drain ÷ procr.", "drain ÷ pgq.")
    for col in (*cols, "CPU ms/job"):
        t.add_column(col, justify="right" if col not in ("system",) else "left")
    for d in drains:
        p, q = ref.get(d.slots), ref2.get(d.slots)
        cpu = " + ".join(f"{k[0]} {v * 1000 / d.n:.2f}" for k, v in sorted(d.cpu.items()) if v > 0)
        t.add_row(
            d.system,
            str(d.slots) if d.slots else "∞",
            f"{d.submit_rate:,.0f}",
            f"{d.batch_rate:,.0f}" if d.batch_s else "",
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
    n = args.jobs or (500 if args.quick else 2000)
    rounds = args.rounds or (30 if args.quick else 100)
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
                d, lat = run_peer(peer, _pg.db_url(pg, peer), slots, n, rounds, pg)
                drains += d
                latencies.append(lat)
    report(drains, latencies, n)
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
