"""Scale: claim latency, reads and server memory with 1k to 1M jobs queued, on SQLite and PostgreSQL.

    python bench/scale.py                         # ~2 min: both stores, levels 1,000 / 10,000 / 100,000
    python bench/scale.py --levels 10000,100000,1000000    # issue 11's rows, up to a million queued
    python bench/scale.py --stores sqlite --levels 1000,10000 --claims 100

The server is ``scaleq up`` in its own process (grid file without groups), as in ``bench/dispatch.py``. The queue is
filled from this process through the store's own objects and named queries (``insert_job``, many rows per
transaction; filling is not what is measured). Everything measured goes through HTTP with ``scaleq.client.Client``:

* **claim 1** — a registered worker's ``claim(n=1, wait=0)`` with the previous job's finish riding along (the
  worker protocol's fast path), one after the other: round trip p50 / p95;
* **claim 16** — the same with ``n=16`` and 16 finishes riding along;
* **submit** — one new job, round trip;
* **batch** — submit rate of ``POST /jobs/batch`` (``scaleq submit-many``), 1,000 jobs per request, a few requests
  one after another into a queue of their own, in jobs/s;
* **queues** — ``GET /queues`` (what the dashboard and ``scaleq jobs`` read), round trip;
* **metrics** — ``GET /metrics`` (a Prometheus scrape: the queue gauges count the jobs too), round trip;
* **jobs list** — the dashboard's Jobs page: ``GET /jobs?limit=100`` (newest first, all queues), and
  **queued list** the same filtered to the big queue's queued jobs; **workers list** — ``GET /workers``;
* **demand** — ``POST /demand`` as the autoscaler asks it (queued counted up to what a group of 10 workers x 4 slots
  could run), round trip;
* **RSS** — the server process's resident memory after the level's measurements.

Before measuring a level the worker registers again (silent through a long fill, it would be marked gone and its
claims answered empty — an earlier version of this bench measured exactly that at 1M), and a claim that gets fewer
jobs than it asked for from the full queue stops the run. On PostgreSQL the bench runs ``ANALYZE jobs`` after each
fill, as autovacuum would within a minute of a bulk load (``autovacuum_naptime``): right after loading 900,000 rows
the planner's statistics still describe a small table, and it reads whole queues where an index would do (measured
without it: ``GET /queues`` 217 ms and ``POST /demand`` 50 ms at 1M, in docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pg
import httpx
from rich.console import Console
from rich.table import Table

from scaleq.client import Client
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.store import rows
from scaleq.store.base import Store
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore

console = Console(width=220)
QUEUE = "scale"
CHUNK = 10_000
BATCH = 1000  # jobs per batch submit (the server's limit per request)
BATCHES = 5


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))] if s else float("nan")


async def fill(store: Store, count: int, start: int, nonce: str) -> float:
    """Queue ``count`` no-op jobs through the store's ``insert_job`` query, in transactions of 10,000."""
    assert isinstance(store, SQLiteStore | PostgresStore)
    t0 = time.perf_counter()
    now = time.time()
    for base in range(start, start + count, CHUNK):
        n = min(CHUNK, start + count - base)
        params = [
            {
                **rows.job_params(
                    QUEUE, JobDefinition(command=["true"], env={"I": str(i), "RUN": nonce}), priority=0, max_attempts=3
                ),
                "now": now,
            }
            for i in range(base, base + n)
        ]

        def op(params: list[dict[str, Any]] = params) -> None:
            if isinstance(store, PostgresStore):
                seqs = [
                    r["seq"]
                    for r in store.db.execute(
                        "SELECT nextval('job_seq') AS seq FROM generate_series(1, %s)", (len(params),)
                    )
                ]
            else:
                first = store.db.execute(store.Q["next_seq"]).fetchone()["seq"]
                seqs = list(range(first, first + len(params)))
            batch = [{**p, "seq": s} for p, s in zip(params, seqs, strict=True)]
            store.db.cursor().executemany(store.Q["insert_job"], batch)

        await store.tx(op)
    return time.perf_counter() - t0


async def measure(server: _pg.Server, worker_id: str, claims: int) -> dict[str, list[float]]:
    nonce = secrets.token_hex(4)
    out: dict[str, list[float]] = {
        k: []
        for k in ("claim1", "claim16", "submit", "batch", "queues", "demand", "metrics", "jobs", "queued", "workers")
    }
    headers = {"Authorization": f"Bearer {server.admin_token}"}
    async with (
        Client(server.url, server.worker_token) as w,
        Client(server.url, server.admin_token) as admin,
        httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as metrics,
    ):
        pending: list[dict[str, Any]] = []
        for _ in range(claims):
            t0 = time.perf_counter()
            got, _, _ = await w.claim(worker_id, 1, wait=0, finishes=pending)
            out["claim1"].append(time.perf_counter() - t0)
            if len(got) != 1:
                raise RuntimeError(f"a claim of 1 from a full queue got {len(got)} jobs: the measurement would be void")
            pending = [{"lease": c.lease, "reason": "success", "exit_code": 0} for c in got]
        for _ in range(max(claims // 8, 5)):
            t0 = time.perf_counter()
            got, _, _ = await w.claim(worker_id, 16, wait=0, finishes=pending)
            out["claim16"].append(time.perf_counter() - t0)
            if len(got) != 16:
                raise RuntimeError(
                    f"a claim of 16 from a full queue got {len(got)} jobs: the measurement would be void"
                )
            pending = [{"lease": c.lease, "reason": "success", "exit_code": 0} for c in got]
        await w.claim(worker_id, 0, wait=0, finishes=pending)
        for i in range(max(claims // 4, 10)):
            definition = JobDefinition(command=["true"], env={"S": f"{nonce}{i}"})
            req = SubmitRequest(queue=f"{QUEUE}-submit", definition=definition)
            t0 = time.perf_counter()
            await admin.submit(req)
            out["submit"].append(time.perf_counter() - t0)
        for b in range(BATCHES):
            batch = [
                SubmitRequest(
                    queue=f"{QUEUE}-batch", definition=JobDefinition(command=["true"], env={"B": f"{nonce}{b}-{i}"})
                )
                for i in range(BATCH)
            ]
            t0 = time.perf_counter()
            await admin.submit_many(batch)
            out["batch"].append(time.perf_counter() - t0)
        for _ in range(10):
            t0 = time.perf_counter()
            await admin.queues()
            out["queues"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            # as the autoscaler asks: counted only as far as a group of 10 workers x 4 slots could run
            await admin.demand(QUEUE, {"runtimes": ["process"], "cpus": 2.0}, limit=40)
            out["demand"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            (await metrics.get("/metrics")).raise_for_status()
            out["metrics"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await admin.list_jobs(limit=100)
            out["jobs"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await admin.list_jobs(queue=QUEUE, state="queued", limit=100)
            out["queued"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await admin.workers()
            out["workers"].append(time.perf_counter() - t0)
    return out


async def run_store(name: str, url: str | None, levels: list[int], claims: int) -> list[dict[str, Any]]:
    results = []
    with _pg.scaleq_server(url) as server:
        store: Store = PostgresStore(url, pool_size=2) if url else SQLiteStore(server.data_dir / "scaleq.db")
        await store.open()
        try:
            worker_id = f"scale-{secrets.token_hex(3)}"
            nonce = secrets.token_hex(4)
            queued = inserted = 0
            for level in levels:
                adding = level - queued
                fill_s = await fill(store, adding, inserted, nonce)
                inserted += adding
                if isinstance(store, PostgresStore):
                    # what autovacuum does within a minute of a bulk load: without it the planner still believes
                    # the table small, and reads whole queues where an index would do (see the module docstring)
                    await store.tx(lambda: store.db.execute("ANALYZE jobs"))
                async with Client(server.url, server.worker_token) as w:
                    # again: a worker silent through a long fill (1M jobs: a minute) is marked gone, and its claims
                    # would come back empty — and fast
                    await w.register(
                        {"id": worker_id, "queue": QUEUE, "slots": 16, "runtimes": ["process"], "cpus": 2.0}
                    )
                rss_before = _pg.rss_bytes(server.pid)
                timings = await measure(server, worker_id, claims)
                queued = level - claims - 16 * max(claims // 8, 5)  # what the measurements took out
                results.append(
                    {
                        "store": name,
                        "level": level,
                        "fill_rate": adding / fill_s,
                        "rss_before": rss_before,
                        "rss": _pg.rss_bytes(server.pid),
                        **{k: (pct(v, 50), pct(v, 95)) for k, v in timings.items()},
                        "batch_rate": BATCH * len(timings["batch"]) / sum(timings["batch"]),
                    }
                )
                r = results[-1]
                console.print(
                    f"  {name} {level:>7,} queued: claim1 p50 {r['claim1'][0] * 1000:.1f} ms, "
                    f"claim16 p50 {r['claim16'][0] * 1000:.1f} ms, queues {r['queues'][0] * 1000:.1f} ms, "
                    f"metrics {r['metrics'][0] * 1000:.1f} ms, jobs list {r['jobs'][0] * 1000:.1f} ms, "
                    f"batch {r['batch_rate']:,.0f} jobs/s, RSS {r['rss'] / 2**20:.0f} MiB "
                    f"(filled at {r['fill_rate']:,.0f} jobs/s)"
                )
        finally:
            await store.close()
    return results


def report(results: list[dict[str, Any]]) -> None:
    t = Table(title="Claim latency and server memory by jobs queued (HTTP round trips, ms)")
    for col in (
        "store",
        "queued",
        "claim 1 p50",
        "p95",
        "claim 16 p50",
        "p95",
        "submit p50",
        "batch jobs/s",
        "queues p50",
        "metrics p50",
        "jobs list p50",
        "queued list p50",
        "workers list p50",
        "demand p50",
        "server RSS",
    ):
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        t.add_row(
            r["store"],
            f"{r['level']:,}",
            f"{r['claim1'][0] * 1000:.1f}",
            f"{r['claim1'][1] * 1000:.1f}",
            f"{r['claim16'][0] * 1000:.1f}",
            f"{r['claim16'][1] * 1000:.1f}",
            f"{r['submit'][0] * 1000:.1f}",
            f"{r['batch_rate']:,.0f}",
            f"{r['queues'][0] * 1000:.1f}",
            f"{r['metrics'][0] * 1000:.1f}",
            f"{r['jobs'][0] * 1000:.1f}",
            f"{r['queued'][0] * 1000:.1f}",
            f"{r['workers'][0] * 1000:.1f}",
            f"{r['demand'][0] * 1000:.1f}",
            f"{r['rss'] / 2**20:.0f} MiB",
        )
    console.print(t)
    for store in dict.fromkeys(r["store"] for r in results):
        mine = [r for r in results if r["store"] == store]
        first, last = mine[0], mine[-1]
        console.print(
            f"{store}: {first['level']:,} → {last['level']:,} queued: "
            f"claim 1 p50 x{last['claim1'][0] / first['claim1'][0]:.2f}, "
            f"claim 16 p50 x{last['claim16'][0] / first['claim16'][0]:.2f}, "
            f"RSS {first['rss'] / 2**20:.0f} → {last['rss'] / 2**20:.0f} MiB, "
            f"GET /queues x{last['queues'][0] / first['queues'][0]:.1f}, "
            f"GET /metrics x{last['metrics'][0] / first['metrics'][0]:.1f}, "
            f"GET /jobs x{last['jobs'][0] / first['jobs'][0]:.1f}, "
            f"batch submit x{last['batch_rate'] / first['batch_rate']:.2f}, "
            f"POST /demand x{last['demand'][0] / first['demand'][0]:.1f}"
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", default="1000,10000,100000", help="jobs queued at each measurement")
    ap.add_argument("--claims", type=int, default=200, help="claims of one job measured per level")
    ap.add_argument("--stores", default="sqlite,postgres")
    args = ap.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    stores = args.stores.split(",")
    console.print(f"[bold]machine[/bold]: {_pg.machine()}")
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    if "sqlite" in stores:
        results += asyncio.run(run_store("sqlite", None, levels, args.claims))
    if "postgres" in stores:
        with _pg.cluster("scaleq") as pg:
            console.print(f"PostgreSQL {_pg.pg_version(pg)} (default settings)")
            results += asyncio.run(run_store("postgres", _pg.db_url(pg, "scaleq"), levels, args.claims))
    report(results)
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
