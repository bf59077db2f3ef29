"""The parked workers' touch: what one housekeeping round's ``touch_workers`` costs at a fleet's size.

    python bench/touch.py                               # ~1 min: both stores, 1,000 and 10,000 workers
    python bench/touch.py --stores sqlite --workers 10000 --rounds 30

A server touches every worker whose claim is parked on it once per ``heartbeat_seconds`` (``server/liveness.py``),
and reads which of them the store no longer holds active (their claims are then answered). This times that call
through the store's own object, as the server makes it, with every registered worker parked and active: the worst
case (each row written), and the common one (nobody to answer). The workers are registered first (not measured);
the first block of rounds warms the caches and is not reported; the table shows the median and the slowest round of
the next ``--rounds``. PostgreSQL runs in a throwaway cluster (``scripts/postgres.sh`` builds or finds it).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import _pg

from scaleq.jobs import RuntimeKind, Worker
from scaleq.store.base import Store
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore

T0 = 1_000_000.0


async def rounds(store: Store, n: int, count: int) -> tuple[float, float]:
    """Register ``n`` workers, warm up, then time ``count`` touches of all of them: (median, max) in ms."""
    await store.open()
    try:
        ids = [f"w-{i:06d}" for i in range(n)]
        for wid in ids:
            worker = Worker(
                id=wid, queue="q", slots=1, runtimes=[RuntimeKind.process], cpus=1.0, started_at=T0, last_heartbeat=T0
            )
            await store.register_worker(worker, T0)
        took: list[float] = []
        for k in range(count * 2):  # the first half warms up
            began = time.perf_counter()
            answered = await store.touch_workers(ids, T0 + 1 + k)
            took.append((time.perf_counter() - began) * 1000)
            assert answered == [], answered  # every worker is active: nobody's claim to answer
        return statistics.median(took[count:]), max(took[count:])
    finally:
        await store.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--stores", default="sqlite,postgres", help="comma-separated: sqlite, postgres")
    ap.add_argument("--workers", default="1000,10000", help="comma-separated fleet sizes")
    ap.add_argument("--rounds", type=int, default=15, help="timed touches per row (after as many to warm up)")
    args = ap.parse_args()
    stores = args.stores.split(",")
    sizes = [int(n) for n in args.workers.split(",")]
    print(f"# {_pg.machine()}")
    print(f"{'store':<10} {'workers':>8} {'median ms':>10} {'max ms':>8}")
    for name in stores:
        for n in sizes:
            if name == "postgres":
                with _pg.cluster("touch") as c:
                    median, worst = asyncio.run(rounds(PostgresStore(_pg.db_url(c, "touch")), n, args.rounds))
            else:
                with tempfile.TemporaryDirectory() as d:
                    median, worst = asyncio.run(rounds(SQLiteStore(Path(d) / "touch.db"), n, args.rounds))
            print(f"{name:<10} {n:>8,} {median:>10.1f} {worst:>8.1f}", flush=True)


if __name__ == "__main__":
    main()
