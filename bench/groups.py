"""Many groups: what one controller pays per group per step, with 10 to 200 groups on one grid.

    python bench/groups.py                        # ~1 min: 10, 50 and 200 groups on SQLite
    python bench/groups.py --groups 50 --steps 40 --jobs 20

Everything but the machines is real and in one process, as ``scaleq up`` runs it: a SQLite store in a temp dir, the
in-process observer (:class:`~scaleq.scaling.observe.StoreObserver`) and the real :class:`Controller`. The machines
are *paper*: a provider whose ``start`` registers each new worker with the store at once (as a worker would after its
boot) and whose ``stop`` marks it gone, so that what is measured is the controller -- observe, decide, act, record --
and not a provider's API or a boot. Each group has its own queue and 0..``--max`` workers.

Per number of groups, three phases of ``--steps`` controller steps each (``Controller.step``: every group observed,
decided and acted on, concurrently):

* **idle** -- no jobs: the steady cost of a grid at rest;
* **scale-out** -- ``--jobs`` queued jobs per queue submitted before the phase: groups start workers up to the cap;
* **busy** -- the same jobs, every group at its cap with registered workers.

Columns: a step's wall time (p50/p99), the same per group (**decision latency per group**), and CPU per step and per
group (``time.process_time``: this process does nothing else). The controller steps its groups concurrently on one
event loop over one store, so per-group cost is what bounds how many groups one autoscaler carries per tick.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scaleq.grid import Group
from scaleq.jobs import JobDefinition, Worker
from scaleq.notify import Notifier
from scaleq.providers.base import DESTROY_GRACE, Health, ProviderWorker
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.sim import percentile
from scaleq.store.sqlite import SQLiteStore


class PaperProvider:
    """Machines on paper: a started worker registers with the store at once; a stopped one is marked gone."""

    name = "paper"

    def __init__(self, store: SQLiteStore) -> None:
        self.store = store
        self.machines: dict[str, dict[str, ProviderWorker]] = {}
        self.count = 0

    async def workers(self, group: Group) -> list[ProviderWorker]:
        return list(self.machines.get(group.name, {}).values())

    async def start(self, group: Group, count: int) -> list[str]:
        ids, now = [], time.time()
        for _ in range(count):
            self.count += 1
            wid = f"{group.name}-w{self.count}"
            self.machines.setdefault(group.name, {})[wid] = ProviderWorker(
                wid, group.name, now, "running", version=group.version()
            )
            worker = Worker(
                id=wid,
                queue=group.queue,
                group=group.name,
                slots=group.slots,
                runtimes=list(group.runtimes),
                cpus=1.0,
                started_at=now,
                last_heartbeat=now,
                idle_since=now,
            )
            await self.store.register_worker(worker, now)
            ids.append(wid)
        return ids

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        self.machines.get(group.name, {}).pop(worker_id, None)
        await self.store.set_worker_state(worker_id, "gone")

    async def reap(self, group: Group, worker_ids: Collection[str]) -> set[str]:
        machines = self.machines.get(group.name, {})
        return {w for w in worker_ids if machines.pop(w, None) is not None}

    async def wait_gone(self, group: Group, timeout: float) -> bool:
        return not self.machines.get(group.name)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return {}

    async def preempted(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return {}

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        return list(self.machines.pop(group.name, {}))

    async def health(self) -> Health:
        return Health(True, "paper")

    async def close(self) -> None:
        return None


@dataclass
class Row:
    groups: int
    phase: str
    wall: list[float]  # seconds per step
    cpu: list[float]  # CPU seconds per step
    workers: int


async def phase(controller: Controller, name: str, steps: int, groups: int, store: SQLiteStore) -> Row:
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        await controller.step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    workers = len(await store.list_workers())
    return Row(groups, name, wall, cpu, workers)


async def run(groups: int, args: argparse.Namespace) -> list[Row]:
    with tempfile.TemporaryDirectory(prefix="scaleq-groups-") as tmp:
        store = SQLiteStore(Path(tmp) / "scaleq.db")
        await store.open()
        try:
            provider = PaperProvider(store)
            grid = [
                Group(
                    name=f"g{i:03d}",
                    queue=f"q{i:03d}",
                    provider="local",  # validated as a real group; the machines are the paper provider's
                    min_workers=0,
                    max_workers=args.max,
                    runtimes=["process"],  # type: ignore[list-item]  # validated into RuntimeKind
                )
                for i in range(groups)
            ]
            observer = StoreObserver(store, Notifier(), time.time)
            controller = Controller([(g, provider) for g in grid], observer)
            rows = [await phase(controller, "idle", args.steps, groups, store)]
            for g in grid:
                for j in range(args.jobs):
                    definition = JobDefinition(command=["true"], env={"N": str(j)})
                    await store.submit(g.queue, definition, priority=0, max_attempts=3, rerun=False, now=time.time())
            rows.append(await phase(controller, "scale-out", args.steps, groups, store))
            rows.append(await phase(controller, "busy", args.steps, groups, store))
            return rows
        finally:
            await store.close()


def table(rows: list[Row]) -> Table:
    t = Table(title="controller cost per step and per group (SQLite, in-process observer, paper machines)")
    for col in ("groups", "phase", "workers", "step p50", "step p99", "/group p50", "CPU/step", "CPU/group"):
        t.add_column(col, justify="right")
    for r in rows:
        ms = sorted(w * 1000 for w in r.wall)
        cpu = statistics.mean(r.cpu) * 1000
        t.add_row(
            str(r.groups),
            r.phase,
            str(r.workers),
            f"{percentile(ms, 50):.1f} ms",
            f"{percentile(ms, 99):.1f} ms",
            f"{percentile(ms, 50) / r.groups:.2f} ms",
            f"{cpu:.1f} ms",
            f"{cpu / r.groups:.2f} ms",
        )
    return t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--groups", default="10,50,200", help="numbers of groups, comma-separated (default 10,50,200)")
    p.add_argument("--steps", type=int, default=30, help="controller steps per phase (default 30)")
    p.add_argument("--jobs", type=int, default=20, help="queued jobs per queue in the busy phases (default 20)")
    p.add_argument("--max", type=int, default=5, help="max_workers of each group (default 5)")
    args = p.parse_args()
    console = Console(width=max(Console().width, 100))
    rows: list[Row] = []
    for n in (int(x) for x in args.groups.split(",")):
        console.print(f"[dim]{n} groups ...[/dim]")
        rows += asyncio.run(run(n, args))
    console.print(table(rows))


if __name__ == "__main__":
    main()
