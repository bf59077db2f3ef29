"""Compare scaleq's scaling policy with KEDA-like and MIG-like autoscalers on the default traces.

    PYTHONPATH=src python bench/policy_comparison.py [--boot-time 30] [--seeds 10] [--no-plots]

Prints the results table and the target check -- at equal or better p95 wait, at least 30 % fewer idle
worker-seconds than each peer, per trace -- with how long the simulation took (its speed is measured here, not
asserted in the tests), and writes ``docs/img/sim-<trace>.png``. ``--seeds N`` repeats the run on N seeds of every
trace and says how often each target is met (one seed can be lucky or unlucky).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from scaleq.grid import PolicySettings
from scaleq.sim import check_targets, default_traces, plot, render_table, render_targets, run_simulation

ROOT = Path(__file__).resolve().parent.parent
PEERS = ["keda", "mig", "mig-worker"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--boot-time", type=float, default=30.0, help="provider start latency, seconds (30: VMs)")
    ap.add_argument("--max-workers", type=int, default=20)
    ap.add_argument("--slots", type=int, default=1)
    ap.add_argument("--idle-timeout", type=float, default=PolicySettings().idle_timeout)
    ap.add_argument("--headroom", type=float, default=PolicySettings().headroom)
    ap.add_argument("--lookahead", type=float, default=PolicySettings().lookahead)
    ap.add_argument("--scale-down-window", type=float, default=PolicySettings().scale_down_window)
    ap.add_argument("--tick", type=float, default=1.0, help="scaleq controller tick, seconds")
    ap.add_argument("--dispatch", choices=("pack", "fifo", "random"), default="pack")
    ap.add_argument("--seeds", type=int, default=1, help="also check the targets on this many seeds")
    ap.add_argument("--outdir", type=Path, default=ROOT / "docs" / "img")
    ap.add_argument("--no-plots", action="store_true")
    args = ap.parse_args(argv)

    console = Console(width=160)
    settings = PolicySettings(
        max_workers=args.max_workers,
        slots=args.slots,
        idle_timeout=args.idle_timeout,
        scale_down_window=args.scale_down_window,
        headroom=args.headroom,
        lookahead=args.lookahead,
    )
    console.print(
        f"boot time {args.boot_time:g} s, max {settings.max_workers} workers, {settings.slots} slot(s), "
        f"idle_timeout {settings.idle_timeout:g} s, scale_down_window {settings.scale_down_window:g} s, "
        f"headroom {settings.headroom:g}, lookahead {settings.lookahead:g} s, dispatch {args.dispatch}"
    )
    started = time.perf_counter()
    results = run_simulation(
        default_traces(), ["scaleq", *PEERS], settings, args.boot_time, tick=args.tick, dispatch=args.dispatch
    )
    elapsed = time.perf_counter() - started
    console.print(render_table(results))
    checks = check_targets(results)
    console.print(render_targets(checks))
    met = sum(c.ok for c in checks)
    console.print(f"targets met: {met}/{len(checks)}  (simulated in {elapsed:.2f} s)")

    if args.seeds > 1:
        tally: dict[tuple[str, str], list[int]] = {}
        for seed in range(args.seeds):
            run = run_simulation(
                default_traces(seed=10 * seed),
                ["scaleq", *PEERS],
                settings,
                args.boot_time,
                tick=args.tick,
                dispatch=args.dispatch,
            )
            for c in check_targets(run):
                tally.setdefault((c.trace, c.peer), []).append(c.ok)
        table = Table(title=f"targets met over {args.seeds} seeds", title_justify="left")
        for name in ("trace", "vs", "met"):
            table.add_column(name)
        for (trace, peer), oks in tally.items():
            table.add_row(trace, peer, f"{sum(oks)}/{len(oks)}")
        console.print(table)
        total = [ok for oks in tally.values() for ok in oks]
        console.print(f"over all seeds: {sum(total)}/{len(total)}")

    if not args.no_plots:
        for path in plot(results, args.outdir):
            console.print(f"wrote {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
