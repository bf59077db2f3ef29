"""Arrays: one ``scaleq submit-many`` of 100,000 small jobs, then its progress, list, cancel and rerun, on SQLite
and PostgreSQL.

    python bench/arrays.py                          # both stores, 100,000 jobs
    python bench/arrays.py --stores sqlite --jobs 20000

The server is ``scaleq up`` in its own process (grid file without groups: nothing runs the jobs). Everything goes
through the real CLI, as a user types it, so each time is the whole command (Python start-up included, ~0.4 s):

* **submit-many** — the file of N lines (each a different ``echo``) as one array, 500 jobs per request;
* **again** — the same file again: the same array and jobs, found (idempotent), none queued twice;
* **array** — ``scaleq array ID -o json``: the progress, one grouped count over the array's jobs;
* **arrays** — ``scaleq arrays -o json`` (the list, with every array's progress and cost);
* **cancel** — ``scaleq cancel --array ID`` (every job, one statement);
* **rerun** — ``scaleq array ID --rerun --failed`` (every job queued again, one statement).

The progress is also timed in the server alone (``GET /arrays/ID`` round trip, p50 of 20).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pg
import httpx
from rich.console import Console
from rich.table import Table

console = Console(width=160)
QUEUE = "arrays"


def cli(server: _pg.Server, *args: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    cmd = [sys.executable, "-m", "scaleq", *args, "--server", server.url, "--token", server.admin_token]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"})
    elapsed = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {r.returncode}\n{r.stderr}")
    return elapsed, r


def run_store(name: str, url: str | None, jobs: int) -> dict[str, Any]:
    with _pg.scaleq_server(url) as server, tempfile.TemporaryDirectory() as tmp:
        sweep = Path(tmp) / "sweep.jsonl"
        sweep.write_text("".join(json.dumps({"command": ["echo", str(i)]}) + "\n" for i in range(jobs)))
        result: dict[str, Any] = {"store": name, "jobs": jobs}
        result["submit-many"], r = cli(server, "submit-many", QUEUE, str(sweep), "--name", "bench")
        assert len(r.stdout.split()) == jobs
        result["again"], r = cli(server, "submit-many", QUEUE, str(sweep), "--output", "json")
        found = json.loads(r.stdout)
        assert not any(j["created"] for j in found)
        array_id = found[0]["array_id"]
        result["array"], r = cli(server, "array", array_id[:12], "--output", "json")
        assert json.loads(r.stdout)["queued"] == jobs
        headers = {"Authorization": f"Bearer {server.admin_token}"}
        times = []
        with httpx.Client(base_url=server.url + "/api/v1", headers=headers, timeout=60) as http:
            for _ in range(20):
                t0 = time.perf_counter()
                http.get(f"/arrays/{array_id}").raise_for_status()
                times.append(time.perf_counter() - t0)
        result["progress p50"] = sorted(times)[len(times) // 2]
        result["arrays"], r = cli(server, "arrays", "--output", "json")
        result["cancel"], r = cli(server, "cancel", "--array", array_id, "--output", "json")
        assert json.loads(r.stdout)["other"]["cancelled"] == jobs
        result["rerun"], r = cli(server, "array", array_id, "--rerun", "--failed", "--output", "json")
        assert json.loads(r.stdout)["queued"] == jobs
        console.print(f"  {name}: " + ", ".join(f"{k} {v:.2f} s" for k, v in result.items() if isinstance(v, float)))
        return result


def report(results: list[dict[str, Any]]) -> None:
    keys = ["submit-many", "again", "array", "progress p50", "arrays", "cancel", "rerun"]
    t = Table(title="arrays: one submit-many, then the array as one thing (seconds, whole commands)")
    for col in ["store", "jobs", *keys]:
        t.add_column(col, justify="left" if col == "store" else "right")
    for r in results:
        t.add_row(r["store"], f"{r['jobs']:,}", *(f"{r[k]:.3f}" if r[k] < 1 else f"{r[k]:.1f}" for k in keys))
    console.print(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=100_000)
    ap.add_argument("--stores", default="sqlite,postgres")
    args = ap.parse_args()
    stores = args.stores.split(",")
    console.print(f"[bold]machine[/bold]: {_pg.machine()}")
    results = []
    if "sqlite" in stores:
        results.append(run_store("sqlite", None, args.jobs))
    if "postgres" in stores:
        with _pg.cluster("scaleq") as pg:
            console.print(f"PostgreSQL {_pg.pg_version(pg)} (default settings)")
            results.append(run_store("postgres", _pg.db_url(pg, "scaleq"), args.jobs))
    report(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
