"""Reporting simulation results: a Rich table, a targets check against the peers, and one plot per trace."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from scaleq.sim.engine import Result

__all__ = ["TargetCheck", "check_targets", "plot", "render_table", "render_targets"]


def _dur(seconds: float) -> str:
    if seconds < 100:
        return f"{seconds:.1f} s"
    if seconds < 6000:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def render_table(results: Sequence[Result], price_per_hour: float | None = None) -> Table:
    """The results, a row per trace and policy; with a price per worker-hour, a cost column beside worker·s."""
    table = Table(title="scaling policies, simulated", title_justify="left")
    for name, justify in (
        ("trace", "left"),
        ("policy", "left"),
        ("jobs", "right"),
        ("wait p50", "right"),
        ("wait p95", "right"),
        ("worker·s", "right"),
        *((("cost", "right"),) if price_per_hour is not None else ()),
        ("idle worker·s", "right"),
        ("peak", "right"),
        ("scale events", "right"),
        ("started", "right"),
        ("killed jobs", "right"),
        ("lost work", "right"),
    ):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    previous = None
    for r in results:
        if previous is not None and r.trace != previous:
            table.add_section()
        previous = r.trace
        jobs = f"{r.finished}" if r.finished == r.jobs else f"[red]{r.finished}/{r.jobs}[/red]"
        table.add_row(
            r.trace,
            r.policy,
            jobs,
            _dur(r.wait_p50),
            _dur(r.wait_p95),
            f"{r.worker_seconds:,.0f}",
            *((f"{r.worker_seconds * price_per_hour / 3600:,.2f}",) if price_per_hour is not None else ()),
            f"{r.idle_worker_seconds:,.0f}",
            str(r.peak_workers),
            str(r.scale_events),
            str(r.started),
            str(r.jobs_killed),
            _dur(r.lost_work) if r.lost_work else "0",
        )
    return table


@dataclass(frozen=True)
class TargetCheck:
    trace: str
    peer: str
    p95: float  # the policy's
    peer_p95: float
    idle_reduction: float  # 1 - idle / peer idle (0.3 = 30 % fewer idle worker-seconds)
    ok: bool


def check_targets(
    results: Sequence[Result], policy: str = "scaleq", idle_reduction: float = 0.30, wait_slack: float = 0.0
) -> list[TargetCheck]:
    """Per trace and peer: is ``policy``'s p95 wait equal or better, with ``idle_reduction`` fewer idle worker-s?

    ``wait_slack`` seconds of p95 difference count as equal (0 = strict).
    """
    by_key = {(r.trace, r.policy): r for r in results}
    checks = []
    for r in results:
        if r.policy == policy:
            continue
        ours = by_key.get((r.trace, policy))
        if ours is None:
            continue
        reduction = 1 - ours.idle_worker_seconds / r.idle_worker_seconds if r.idle_worker_seconds else 0.0
        if not r.idle_worker_seconds and not ours.idle_worker_seconds:
            reduction = 1.0
        ok = ours.wait_p95 <= r.wait_p95 + wait_slack and reduction >= idle_reduction and ours.finished == ours.jobs
        checks.append(TargetCheck(r.trace, r.policy, ours.wait_p95, r.wait_p95, reduction, ok))
    return checks


def render_targets(checks: Sequence[TargetCheck], policy: str = "scaleq", idle_reduction: float = 0.30) -> Table:
    table = Table(
        title=f"target: {policy} at equal or better p95 wait, ≥ {idle_reduction:.0%} fewer idle worker-seconds",
        title_justify="left",
    )
    for name in ("trace", "vs", f"p95 {policy}", "p95 peer", "idle worker·s saved", "met"):
        table.add_column(name, justify="left" if name in ("trace", "vs") else "right")
    for c in checks:
        table.add_row(
            c.trace,
            c.peer,
            _dur(c.p95),
            _dur(c.peer_p95),
            f"{c.idle_reduction:.0%}",
            "[green]yes[/green]" if c.ok else "[red]no[/red]",
        )
    return table


def plot(results: Sequence[Result], outdir: str | Path, prefix: str = "sim-") -> list[Path]:
    """One PNG per trace: queue length and workers over time, one line per policy. Returns the files written."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise RuntimeError("plotting needs matplotlib: pip install matplotlib") from e
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    traces: dict[str, list[Result]] = {}
    for r in results:
        traces.setdefault(r.trace, []).append(r)
    written = []
    for trace, group in traces.items():
        fig, (ax_q, ax_w) = plt.subplots(2, 1, figsize=(10, 6), sharex=True, constrained_layout=True)
        for i, r in enumerate(group):  # the first policy (scaleq, in the bench) drawn boldest, on top
            ts = [p[0] / 60 for p in r.series] + [r.end / 60]
            queued = [p[1] for p in r.series]
            alive = [p[2] for p in r.series]
            style = {"label": r.policy, "where": "post", "linewidth": 1.6 if i == 0 else 1.0}
            style |= {"zorder": 10 - i, "alpha": 1.0 if i == 0 else 0.75}
            ax_q.step(ts, [*queued, queued[-1] if queued else 0], **style)
            ax_w.step(ts, [*alive, alive[-1] if alive else 0], **style)
        ax_q.set_ylabel("jobs waiting")
        ax_w.set_ylabel("workers")
        ax_w.set_xlabel("minutes")
        ax_q.set_title(f"trace: {trace}")
        ax_q.legend(loc="upper right", fontsize="small")
        for ax in (ax_q, ax_w):
            ax.grid(alpha=0.3)
        path = outdir / f"{prefix}{trace}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
