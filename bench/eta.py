"""How good is a queued job's estimated start? |estimated - actual start|, on the simulator's traces and a real run.

    PYTHONPATH=src python bench/eta.py [--boot-time 30] [--max-workers 20] [--slots 1] [--real 30] [--output json]

* **Simulated** (``scaleq.sim``): the five default traces under scaleq's real policy. At each instant jobs arrive and
  wait, the simulator shows what a server would know (:class:`scaleq.sim.engine.Snapshot`): the jobs ahead, the runs
  in progress, the workers (starting ones with how long since they were asked for), the policy's last ``desired``,
  the latest 50 run durations. :func:`scaleq.eta.estimate` -- the function the server calls -- estimates from that,
  with the boot time as the typical boot; the job's actual start is when the simulation started it.
* **Real** (``--real N``, 0 to skip): ``scaleq up`` with its embedded default grid (one local group, 0..cores
  workers of one slot, process jobs) in a temp dir; N ``sleep`` jobs of 1-4 s submitted 0.2-1.5 s apart (seeded);
  right after each submit, ``GET /jobs/{id}`` gives ``estimated_start``; at the end each job's ``started_at`` is the
  actual start. Jobs whose estimate was unknown (nothing timed yet) are counted apart.

Each table gives, over the jobs that waited (started later than they arrived; the others are estimated "now" and
right by construction), the median and p90 of the absolute error, beside the median wait for scale.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from scaleq.eta import GroupCapacity, estimate
from scaleq.grid import PolicySettings
from scaleq.sim import default_traces, percentile
from scaleq.sim.engine import Snapshot, simulate
from scaleq.sim.peers import make_policy
from scaleq.sim.traces import Trace


@dataclass
class Row:
    case: str
    jobs: int
    waited: int
    unknown: int
    wait_p50: float
    err_p50: float
    err_p90: float
    err_max: float


def summarise(case: str, jobs: int, pairs: list[tuple[float | None, float, float]]) -> Row:
    """pairs: (estimated start or None, actual start, arrival) of the jobs that waited."""
    errors = sorted(abs(est - actual) for est, actual, _ in pairs if est is not None)
    waits = sorted(actual - arrival for _, actual, arrival in pairs)
    return Row(
        case,
        jobs,
        len(pairs),
        sum(1 for est, _, _ in pairs if est is None),
        percentile(waits, 50),
        percentile(errors, 50),
        percentile(errors, 90),
        errors[-1] if errors else 0.0,
    )


def simulated(settings: PolicySettings, boot: float) -> list[Row]:
    return [one_trace(trace, settings, boot) for trace in default_traces()]


def one_trace(trace: Trace, settings: PolicySettings, boot: float) -> Row:
    estimates: dict[int, tuple[float | None, float]] = {}

    def probe(s: Snapshot) -> None:
        views = s.workers
        group = GroupCapacity(
            name="sim",
            slots=settings.slots,
            workers=sum(1 for v in views if v.state in ("idle", "busy")),
            max_workers=settings.max_workers,
            desired=s.desired,
            starting=tuple(s.at - v.started_at for v in views if v.state == "starting"),
            boot_seconds=boot,
        )
        running = [s.at - started for started in s.running]
        for job, ahead in s.waiting:
            est = estimate(ahead, [group], running, s.recent, s.at)
            estimates[job] = (est.at, s.at)

    result = simulate(trace, make_policy("scaleq", settings), settings.slots, boot, probe=probe)
    pairs = []
    for job, (est, arrival) in estimates.items():
        wait = result.waits[job]
        if math.isnan(wait):
            continue
        actual = trace.jobs[job][0] + wait
        if actual > arrival:
            pairs.append((est, actual, arrival))
    return summarise(f"sim: {trace.name}", len(trace.jobs), pairs)


def real(n: int, seed: int, console: Console) -> Row:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="scaleq-eta-") as tmp:
        data = Path(tmp) / "data"
        log = open(Path(tmp) / "up.log", "wb")  # open while the server runs
        proc = subprocess.Popen(
            [sys.executable, "-m", "scaleq", "up", "--port", "0", "--data-dir", str(data)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            url = ""
            for _ in range(300):
                try:
                    info = json.loads((data / "server.json").read_text())
                    if info.get("pid") == proc.pid:
                        url = info["url"]
                        httpx.get(url + "/api/v1/openapi.json", timeout=2).raise_for_status()
                        break
                except (OSError, ValueError, httpx.HTTPError):
                    pass
                if proc.poll() is not None:
                    raise SystemExit(f"scaleq up exited {proc.returncode}: see {log.name}")
                time.sleep(0.1)
            if not url:
                raise SystemExit("scaleq up did not answer within 30 s")
            token = (data / "admin.token").read_text().strip()
            api = httpx.Client(base_url=url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=30)
            submitted: list[tuple[str, float, float | None]] = []  # (id, submitted at, estimate)
            tag = f"{seed}-{time.time_ns()}"
            for i in range(n):
                seconds = round(rng.uniform(1.0, 4.0), 2)
                body = {
                    "queue": "default",
                    "definition": {"command": ["sh", "-c", f"sleep {seconds}; echo {tag}-{i}"]},
                }
                job = api.post("/jobs", json=body).raise_for_status().json()["job"]
                page = api.get(f"/jobs/{job['id']}").raise_for_status().json()
                est = page.get("estimated_start") if page["state"] == "queued" else page.get("started_at")
                submitted.append((job["id"], job["submitted_at"], est))
                time.sleep(rng.uniform(0.2, 1.5))
            deadline = time.time() + 300
            pairs = []
            for job_id, at, est in submitted:
                while True:
                    page = api.get(f"/jobs/{job_id}", params={"wait": 20, "state": "queued"}).json()
                    if page["started_at"] is not None or time.time() > deadline:
                        break
                started = page["started_at"]
                if started is not None and started > at:
                    pairs.append((est, started, at))
            api.close()
        finally:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
    console.print(f"real run: {n} jobs on scaleq up's default local group ({os.cpu_count()} cores)")
    return summarise(f"real: scaleq up, {n} process jobs", n, pairs)


def render(rows: list[Row], title: str) -> Table:
    t = Table(title=title)
    for col in ("case", "jobs", "waited", "unknown", "median wait", "median |err|", "p90 |err|", "max |err|"):
        t.add_column(col, justify="left" if col == "case" else "right")
    for r in rows:
        t.add_row(
            r.case,
            str(r.jobs),
            str(r.waited),
            str(r.unknown),
            f"{r.wait_p50:.1f} s",
            f"{r.err_p50:.1f} s",
            f"{r.err_p90:.1f} s",
            f"{r.err_max:.1f} s",
        )
    return t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boot-time", type=float, default=30.0, help="simulated provider start latency, seconds")
    ap.add_argument("--max-workers", type=int, default=20)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--real", type=int, default=30, help="jobs in the real run (0: skip it)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--output", choices=("table", "json"), default="table")
    args = ap.parse_args(argv)
    console = Console(width=160)
    settings = PolicySettings(max_workers=args.max_workers, slots=args.slots)
    rows = simulated(settings, args.boot_time)
    if args.real:
        rows.append(real(args.real, args.seed, console))
    if args.output == "json":
        print(json.dumps([asdict(r) for r in rows], indent=2))
    else:
        title = (
            f"|estimated - actual start| of jobs that waited (sim: boot {args.boot_time:g} s, max "
            f"{args.max_workers} workers x {args.slots} slot(s))"
        )
        console.print(render(rows, title))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
