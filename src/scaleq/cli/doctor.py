"""``scaleq doctor``: check every hop and print what is wrong and how to fix it (the checks live in scaleq.doctor)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from scaleq.cli.common import DataDirOpt, Output, OutputOpt, ServerOpt, TokenOpt, emit_json, load_grid, out
from scaleq.client import Client
from scaleq.config import ConfigError, resolve
from scaleq.config import data_dir as resolve_data_dir

GridOpt = Annotated[
    Path | None,
    typer.Option("--grid", "-g", help="Grid file (TOML): also check each group's signal, Prometheus and provider."),
]
_MARK = {"ok": "[green]✓[/green]", "failed": "[red]✗[/red]", "not checked": "[yellow]?[/yellow]"}


def doctor(
    grid_file: GridOpt = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Check every hop — server, token, clocks, store, lease sweeper, workers, leases, controllers and, with --grid,
    each group's signal, Prometheus and provider — and say what to fix. Exit 0 when all is well, 1 when not."""
    from scaleq.doctor.checks import Check, all_ok, summary
    from scaleq.doctor.remote import run_checks

    grid = None
    if grid_file is not None:
        grid = load_grid(grid_file)  # a bad grid file: exit 2
    directory = resolve_data_dir(data_dir)
    try:
        target = resolve(server, token, data_dir)
        unconfigured = ""
    except ConfigError as exc:
        target, unconfigured = None, str(exc)
    ctx = None
    if grid is not None:
        from scaleq.providers.registry import ProviderContext

        # doctor only asks providers for their health, which needs no token: read the recorded one, never make one
        token_file = directory / "worker.token"
        worker_token = token_file.read_text().strip() if token_file.exists() else ""
        ctx = ProviderContext(
            grid.name, target.server if target else "", worker_token, directory, grid.server.public_url
        )

    async def go() -> list[Check]:
        if target is None:
            return await run_checks(None, grid, ctx, unconfigured=unconfigured)
        async with Client(target.server, target.token, timeout=30) as client:
            return await run_checks(client, grid, ctx)

    try:
        checks = asyncio.run(go())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    ok = all_ok(checks)
    if output == Output.json:
        emit_json({"ok": ok, "summary": summary(checks), "checks": [c.as_dict() for c in checks]})
    else:
        t = Table(header_style="bold")
        t.add_column("hop", no_wrap=True)
        t.add_column("check", no_wrap=True)
        t.add_column("", no_wrap=True)
        t.add_column("detail", overflow="fold", ratio=3)
        t.add_column("how to fix", overflow="fold", ratio=2)
        for c in checks:
            t.add_row(escape(c.hop), escape(c.name), _MARK[c.status], escape(c.detail), escape(c.fix))
        out.print(t)
        out.print(("[green]" if ok else "[red]") + escape(summary(checks)) + ("[/green]" if ok else "[/red]"))
    raise typer.Exit(0 if ok else 1)
