"""Commands for worker groups: plan, apply, destroy, groups, events, autoscale."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer

from scaleq.cli.common import (
    DataDirOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    emit_json,
    err,
    fail,
    load_grid,
    out,
    setup_logging,
    table,
    with_client,
)
from scaleq.client import Client
from scaleq.config import data_dir as resolve_data_dir

T = TypeVar("T")
GridOpt = Annotated[Path, typer.Option("--grid", "-g", help="Grid file (TOML).")]


async def _worker_token(client: Client, directory: Path) -> str:
    """The data dir's worker token, or a new one made through the API and recorded there."""
    path = directory / "worker.token"
    if path.exists():
        return path.read_text().strip()
    created = await client.create_token("worker", "grid workers (scaleq apply)")
    directory.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(created["token"] + "\n")
    return created["token"]


def _with_deployer(
    grid_file: Path, server: str | None, token: str | None, data_dir: Path | None, fn: Callable[..., Awaitable[T]]
) -> T:
    from scaleq.deploy import Deployer
    from scaleq.providers.registry import ProviderContext

    grid = load_grid(grid_file)
    directory = resolve_data_dir(data_dir)

    async def go(client: Client) -> T:
        ctx = ProviderContext(
            grid.name, client.server, await _worker_token(client, directory), directory, grid.server.public_url
        )
        return await fn(Deployer(grid, directory, client, ctx))

    return with_client(server, token, data_dir, go)


def _print_plans(plans: list, output: Output, title: str) -> None:
    if output == Output.json:
        emit_json([p.as_dict() for p in plans])
        return
    table(
        ["group", "provider", "action", "workers", "out of date", "desired now", "why"],
        [
            (
                p.name,
                p.provider,
                p.action + ("" if not p.changes else f" ({len(p.changes)} changes)"),
                p.workers,
                p.out_of_date,
                "" if p.desired is None else p.desired,
                p.reason,
            )
            for p in plans
        ],
        title=title,
    )
    for p in plans:
        for line in [*p.changes, *p.done]:
            out.print(f"  {p.name}: {line}", markup=False)


def plan(
    grid_file: GridOpt,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show, per group, what exists, what apply would change, and the decision the policy would take now.

    The decision is made from this one observation: it shows no spare, which needs the demand's recent history.
    """
    plans = _with_deployer(grid_file, server, token, data_dir, lambda d: d.plan())
    _print_plans(plans, output, f"plan for {grid_file}")


def apply(
    grid_file: GridOpt,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Make the providers match the grid file: create groups (min workers), drain out-of-date workers, remove
    groups no longer declared. Run 'scaleq autoscale' (or 'scaleq up --grid') to scale them with their queues."""
    plans = _with_deployer(grid_file, server, token, data_dir, lambda d: d.apply())
    _print_plans(plans, output, "applied")


def destroy(
    grid_file: GridOpt,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove everything apply created for this grid (from recorded state and the providers' labels).

    Refused (exit 1) while a live controller ('scaleq up --grid', 'scaleq autoscale') runs one of its groups: it
    would start the workers again. Stop it first."""
    from scaleq.deploy import Refused

    try:
        plans = _with_deployer(grid_file, server, token, data_dir, lambda d: d.destroy())
    except Refused as exc:
        fail(str(exc))
    _print_plans(plans, output, "destroyed")
    if output == Output.table and not plans:
        out.print("nothing recorded or running for this grid")


def groups(
    output: OutputOpt = Output.table, server: ServerOpt = None, token: TokenOpt = None, data_dir: DataDirOpt = None
) -> None:
    """Worker groups: current, desired, min and max workers, and their state: ok, or why the controller cannot act
    (quota, rate_limited: the provider refused; error), since when and in the provider's words; and the controller's
    note (capped at max_workers, jobs no worker can run)."""
    found = with_client(server, token, data_dir, lambda c: c.groups())
    if output == Output.json:
        emit_json(found)
        return
    now = time.time()

    def state(g: dict) -> str:
        if g.get("state", "ok") == "ok":
            return "ok"
        since = f" for {now - g['state_since']:.0f} s" if g.get("state_since") is not None else ""
        return f"{g['state']}{since}: {g['message']}"

    table(
        ["name", "queue", "provider", "current", "desired", "min", "max", "state", "note"],
        [
            (
                g["name"],
                g["queue"],
                g["provider"],
                g["current"],
                g["desired"],
                g["min"],
                g["max"],
                state(g),
                g.get("note", ""),
            )
            for g in found
        ],
    )


def events(
    group: Annotated[str | None, typer.Option(help="Only this group.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many, newest first.")] = 50,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Every scaling decision and provider problem: time, group, from → to, and the reason in words."""
    found = with_client(server, token, data_dir, lambda c: c.events(group=group, limit=limit))
    if output == Output.json:
        emit_json(found)
        return
    table(
        ["time", "group", "kind", "from → to", "reason"],
        [
            (
                time.strftime("%H:%M:%S", time.localtime(e["time"])),
                e["group"],
                e["kind"],
                "" if e["to"] is None else f"{'' if e['from'] is None else e['from']} → {e['to']}",
                e["reason"],
            )
            for e in reversed(found)
        ],
    )


def autoscale(
    grid_file: GridOpt,
    tick: Annotated[float, typer.Option(help="Seconds between decisions when nothing happens.")] = 1.0,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Run the controller on its own against a remote server: observe → decide → act → record, per group."""
    from scaleq.providers.registry import ProviderContext, make_provider
    from scaleq.scaling.controller import Controller
    from scaleq.scaling.observe import RemoteObserver

    setup_logging(False)
    grid = load_grid(grid_file)
    directory = resolve_data_dir(data_dir)

    async def go(client: Client) -> None:
        ctx = ProviderContext(
            grid.name, client.server, await _worker_token(client, directory), directory, grid.server.public_url
        )
        controller = Controller([(g, make_provider(g, ctx)) for g in grid.groups], RemoteObserver(client), tick=tick)
        err.print(f"autoscaling {len(grid.groups)} group(s) of {grid.name} against {client.server}")
        await controller.run()

    try:
        with_client(server, token, data_dir, go)
    except KeyboardInterrupt:
        raise typer.Exit(0) from None
