"""Commands about arrays and cost: ``array``, ``arrays``, ``cost``.

An array is the jobs of one ``submit-many``, as one thing: ``scaleq array ID`` shows its progress (with
``--wait``, a progress bar on a terminal, a line per change otherwise) and runs its finished jobs again
(``--rerun``, ``--failed`` for the unsuccessful ones only); ``scaleq cancel --array ID`` cancels what it has left.
``scaleq cost`` shows worker-seconds, and money where the group has a ``price_per_hour``, per group, queue or
array (what the numbers mean: :mod:`scaleq.server.routes.arrays`).
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

from scaleq.cli.common import (
    DataDirOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    ago,
    bad_input,
    emit_json,
    err,
    out,
    table,
    with_client,
)
from scaleq.client import Client
from scaleq.jobs import parse_duration


def progress_line(a: dict[str, Any]) -> str:
    """``42/100 done (40 succeeded, 2 failed), 3 running, 55 queued`` — plus other reasons and missing jobs."""
    parts = [f"{a['succeeded']} succeeded", f"{a['failed']} failed"]
    parts += [f"{n} {reason}" for reason, n in sorted(a["other"].items()) if n]
    text = f"{a['done']}/{a['size']} done ({', '.join(parts)}), {a['running']} running, {a['queued']} queued"
    if a["submitted"] < a["size"]:
        text += f"; {a['size'] - a['submitted']} never submitted (run the same submit-many again)"
    return text


def money(cost: float | None) -> str:
    return "" if cost is None else f"{cost:,.2f}"


def worker_seconds(seconds: float) -> str:
    return f"{seconds:,.0f} (≈ {seconds / 3600:,.2f} h)"


def _label(a: dict[str, Any]) -> str:
    return a["id"][:12] + (f" ({a['name']})" if a["name"] else "")


def _finished(a: dict[str, Any]) -> bool:
    return a["queued"] == 0 and a["running"] == 0


async def _follow(client: Client, a: dict[str, Any], bar: bool) -> dict[str, Any]:
    """Long-poll the array until nothing of it is queued or running: a Rich bar on a terminal, else a plain line
    per change."""
    seen = None
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[line]}"),
        console=err,
        transient=True,
        disable=not bar,
    ) as progress:
        task = progress.add_task(_label(a), total=a["size"], line="")
        while True:
            key = f"{a['queued']}/{a['running']}/{a['done']}"
            if key != seen:
                seen = key
                if bar:
                    progress.update(task, completed=a["done"], line=progress_line(a))
                else:
                    err.print(f"{_label(a)}: {progress_line(a)}", markup=False)
            if _finished(a):
                return a
            a = await client.array(a["id"], wait=20, seen=key)


def array(
    array_id: Annotated[str, typer.Argument(help="Array id or a unique prefix (6+ characters).")],
    wait: Annotated[
        bool,
        typer.Option("--wait", "-w", help="Follow until nothing is queued or running; exit 0 only if all succeeded."),
    ] = False,
    rerun: Annotated[bool, typer.Option("--rerun", help="Queue the array's finished jobs again.")] = False,
    failed: Annotated[bool, typer.Option("--failed", help="With --rerun: only the jobs that did not succeed.")] = False,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show an array's progress (queued, running, succeeded, failed, and %) and cost; run it again with --rerun.

    Example: scaleq array 1a2b3c4d --wait
    """
    if failed and not rerun:
        bad_input("--failed goes with --rerun (scaleq array ID --rerun --failed)")

    async def go(client: Client) -> dict[str, Any]:
        a = await (client.rerun_array(array_id, failed=failed) if rerun else client.array(array_id))
        if rerun and output == Output.table:
            err.print(f"{_label(a)}: queued again; {progress_line(a)}", markup=False)
        if wait:
            a = await _follow(client, a, bar=sys.stderr.isatty() and output == Output.table)
            a = await client.array(a["id"])  # with its cost up to the end
        return a

    a = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json(a)
    else:
        cost = a["cost"] or {}
        rows = [
            ("id", a["id"]),
            ("name", a["name"] or ""),
            ("queue", a["queue"]),
            ("created", ago(a["created_at"])),
            ("progress", f"{a['percent']:g}% — {progress_line(a)}"),
            ("worker-seconds", worker_seconds(cost.get("worker_seconds", 0.0))),
            ("cost", money(cost.get("cost")) or "(no price: set price_per_hour on the group in the grid file)"),
        ]
        table(["field", "value"], rows)
    if wait and a["succeeded"] != a["size"]:
        raise typer.Exit(1)


def arrays(
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    limit: Annotated[int, typer.Option(min=1, max=10_000, help="At most this many, newest first.")] = 50,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List arrays (one per submit-many), newest first, with their progress and cost."""
    found = with_client(server, token, data_dir, lambda c: c.arrays(queue=queue, limit=limit))
    if output == Output.json:
        emit_json(found)
        return
    now = time.time()
    table(
        ["id", "name", "queue", "jobs", "done", "succeeded", "failed", "running", "queued", "cost", "created"],
        [
            (
                a["id"][:12],
                a["name"] or "",
                a["queue"],
                a["size"],
                f"{a['percent']:g}%",
                a["succeeded"],
                a["failed"] + sum(a["other"].values()),
                a["running"],
                a["queued"],
                money((a["cost"] or {}).get("cost")),
                ago(a["created_at"], now),
            )
            for a in found
        ],
    )


class By(StrEnum):
    group = "group"
    queue = "queue"
    array = "array"


def parse_since(value: str, now: float) -> float:
    """``--since``: a duration ago (``90m``, ``2d``) or a date/time (ISO 8601, local time unless it says)."""
    try:
        return now - parse_duration(value)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        bad_input(f"--since: {value!r} is neither a duration (90m, 2d) nor a date (2025-01-31, 2025-01-31T12:00)")


def cost(
    by: Annotated[By, typer.Option("--by", help="Group the worker-seconds by this.")] = By.group,
    since: Annotated[
        str | None, typer.Option("--since", help="Only time since then: a duration ago (7d) or a date.")
    ] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Worker-seconds, and money where a group has price_per_hour: per group or queue (worker lives, idle time
    included) or per array (each job's run time times its share of its worker)."""
    start = parse_since(since, time.time()) if since else 0.0
    found = with_client(server, token, data_dir, lambda c: c.cost(by=by.value, since=start))
    if output == Output.json:
        emit_json(found)
        return
    columns = [by.value] + (["group"] if by != By.group else []) + ["worker-seconds", "price/h", "cost"]
    rows = []
    for u in found:
        key = u["key"] or "(no group)"
        rows.append(
            [key[:12] if by == By.array else key]
            + ([u["group"] or "(no group)"] if by != By.group else [])
            + [worker_seconds(u["worker_seconds"]), money(u["price_per_hour"]), money(u["cost"])]
        )
    priced = [u["cost"] for u in found if u["cost"] is not None]
    total = sum(u["worker_seconds"] for u in found)
    rows.append(
        ["total"] + ([""] if by != By.group else []) + [worker_seconds(total), "", money(sum(priced)) if priced else ""]
    )
    table(columns, rows, title=f"since {ago(start)}" if since else None)
    if found and not priced:
        out.print("no group has a price: set price_per_hour on a group in the grid file to see money", markup=False)
