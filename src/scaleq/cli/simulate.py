"""``scaleq simulate``: replay job-arrival traces through scaleq's scaling policy and its peers' (KEDA, a GCP MIG).

The policy run is the real :func:`scaleq.scaling.policy.decide`, with settings from the command line or from a
group of a grid file; see :mod:`scaleq.sim` for what is simulated and how the peers are modelled.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any

import typer

from scaleq import grid as gridmod
from scaleq.cli.common import Output, OutputOpt, bad_input, emit_json, fail, out
from scaleq.grid import PolicySettings
from scaleq.sim import (
    DEFAULT_TRACES,
    POLICIES,
    Result,
    Trace,
    TraceError,
    check_targets,
    load_csv,
    plot,
    render_table,
    render_targets,
    run_simulation,
)

DEFAULT_POLICIES = ("scaleq", "keda", "mig")
DEFAULT_MAX_WORKERS = 20  # without a grid file: the size the built-in traces are made for
_OPTION = {  # PolicySettings field -> the option that sets it, for error messages
    "min_workers": "--min-workers",
    "max_workers": "--max-workers",
    "slots": "--slots",
    "idle_timeout": "--idle-timeout",
    "scale_down_window": "--scale-down-window",
    "headroom": "--headroom",
    "lookahead": "--lookahead",
    "demand_halflife": "--demand-halflife",
}
JSON_FIELDS = (
    "trace",
    "policy",
    "jobs",
    "finished",
    "wait_p50",
    "wait_p95",
    "wait_max",
    "worker_seconds",
    "idle_worker_seconds",
    "peak_workers",
    "scale_events",
    "started",
    "jobs_killed",
    "lost_work",
)


def _traces(names: list[str], csv_files: list[Path], seed: int) -> list[Trace]:
    order = list(DEFAULT_TRACES)
    unknown = [n for n in names if n not in DEFAULT_TRACES]
    if unknown:
        bad_input(f"--trace: unknown trace {unknown[0]!r}; choose from {', '.join(order)} (or --csv FILE)")
    if not names and not csv_files:
        names = order
    # the same seeds as scaleq.sim.default_traces: seed 0 gives the documented traces
    traces = [DEFAULT_TRACES[n](seed=order.index(n) + 1 + seed) for n in dict.fromkeys(names)]
    for path in csv_files:
        try:
            traces.append(load_csv(path))
        except TraceError as exc:
            bad_input(f"--csv: {exc}")
    return traces


def _settings(
    grid_file: Path | None,
    group: str | None,
    overrides: dict[str, Any],
) -> tuple[PolicySettings, str]:
    """The policy settings, and where they came from (for the table's caption)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    if grid_file is None:
        if group is not None:
            bad_input("--group needs --grid FILE (the grid file that declares the group)")
        base: dict[str, Any] = {"max_workers": DEFAULT_MAX_WORKERS}
        source = "command line"
    else:
        try:
            grid = gridmod.load(grid_file)
        except gridmod.GridFileError as exc:
            bad_input(str(exc))
        names = [g.name for g in grid.groups]
        if group is None:
            if len(names) != 1:
                found = f"it declares {', '.join(names)}" if names else "it declares no groups"
                bad_input(f"{grid_file}: --group NAME is needed to choose the group to simulate; {found}")
            group = names[0]
        chosen = next((g for g in grid.groups if g.name == group), None)
        if chosen is None:
            bad_input(f"{grid_file}: no group named {group!r}; it declares {', '.join(names) or 'no groups'}")
        policy = chosen.policy()
        base = {f: getattr(policy, f) for f in policy.__dataclass_fields__}
        source = f"group {group} of {grid_file}" + (" with " + ", ".join(_OPTION[k] for k in given) if given else "")
    try:
        return PolicySettings(**(base | given)), source
    except ValueError as exc:
        message = str(exc)
        for field, option in _OPTION.items():
            if message.startswith(field) and field in given:
                message = f"{option}: {message}"
                break
        bad_input(message)


def result_dict(r: Result, price_per_hour: float | None = None) -> dict[str, Any]:
    data = {f: getattr(r, f) for f in JSON_FIELDS}
    if price_per_hour is not None:
        data["cost"] = r.worker_seconds * price_per_hour / 3600
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in data.items()}


def _price(given: float | None, grid_file: Path | None, group: str | None) -> float | None:
    """--price-per-hour, else the simulated group's price_per_hour in the grid file (None: no cost column)."""
    if given is not None:
        if not math.isfinite(given) or given < 0:
            bad_input(f"--price-per-hour: expected a number >= 0, got {given:g}")
        return given
    if grid_file is None:
        return None
    grid = gridmod.load(grid_file)  # (read and checked by _settings already)
    chosen = next((g for g in grid.groups if g.name == group), grid.groups[0] if len(grid.groups) == 1 else None)
    return chosen.price_per_hour if chosen else None


def simulate(
    trace: Annotated[
        list[str] | None,
        typer.Option(
            "--trace",
            help=f"A built-in trace ({', '.join(DEFAULT_TRACES)}); repeat for several.",
            show_default="all, unless --csv",
        ),
    ] = None,
    csv_file: Annotated[
        list[Path] | None,
        typer.Option(
            "--csv",
            help="Your own trace: a CSV with header arrival_seconds,duration_seconds (repeatable).",
            dir_okay=False,
        ),
    ] = None,
    policy: Annotated[
        list[str] | None,
        typer.Option(
            "--policy",
            "-p",
            help=f"Policy to compare ({', '.join(POLICIES)}); repeatable.",
            show_default=" ".join(DEFAULT_POLICIES),
        ),
    ] = None,
    grid_file: Annotated[
        Path | None, typer.Option("--grid", "-g", help="Take the policy settings from a group of this grid file.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="The group of --grid, if it has several.")] = None,
    min_workers: Annotated[int | None, typer.Option("--min-workers", show_default="0, or the group's")] = None,
    max_workers: Annotated[
        int | None, typer.Option("--max-workers", show_default=f"{DEFAULT_MAX_WORKERS}, or the group's")
    ] = None,
    slots: Annotated[
        int | None, typer.Option("--slots", help="Jobs per worker.", show_default="1, or the group's")
    ] = None,
    idle_timeout: Annotated[
        float | None,
        typer.Option(
            "--idle-timeout",
            help="Seconds idle before a worker may be drained.",
            show_default=f"{PolicySettings().idle_timeout:g}, or the group's",
        ),
    ] = None,
    scale_down_window: Annotated[
        float | None,
        typer.Option(
            "--scale-down-window",
            help="Seconds of peak demand to keep capacity for.",
            show_default=f"{PolicySettings().scale_down_window:g}, or the group's",
        ),
    ] = None,
    headroom: Annotated[
        float | None,
        typer.Option(
            "--headroom",
            help="Spare jobs to provision for, in standard deviations of the demand's move over --lookahead (0: none).",
            show_default=f"{PolicySettings().headroom:g}, or the group's",
        ),
    ] = None,
    lookahead: Annotated[
        float | None,
        typer.Option(
            "--lookahead",
            help="Seconds the spare covers: about a worker's start-up time.",
            show_default=f"{PolicySettings().lookahead:g}, or the group's",
        ),
    ] = None,
    demand_halflife: Annotated[
        float | None,
        typer.Option(
            "--demand-halflife",
            help="Half-life, in seconds, of the demand activity the spare is sized from.",
            show_default=f"{PolicySettings().demand_halflife:g}, or the group's",
        ),
    ] = None,
    boot_time: Annotated[
        float, typer.Option("--boot-time", help="Seconds from a start call to a worker claiming (30: VMs).")
    ] = 30.0,
    price_per_hour: Annotated[
        float | None,
        typer.Option(
            "--price-per-hour",
            help="What a worker costs per hour: adds the cost of each run (worker-seconds times the price).",
            show_default="the group's price_per_hour, or none",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Shift the built-in traces' seeds (0: as documented).")] = 0,
    plot_dir: Annotated[
        Path | None, typer.Option("--plot-dir", help="Write a PNG per trace here (needs matplotlib).", file_okay=False)
    ] = None,
    output: OutputOpt = Output.table,
) -> None:
    """Simulate traces of job arrivals under scaleq's scaling policy and KEDA-/MIG-like autoscalers, and compare
    waits, worker-seconds (and their cost, given a price per worker-hour), idle worker-seconds and killed jobs."""
    policies = list(dict.fromkeys(policy or DEFAULT_POLICIES))
    unknown = [p for p in policies if p not in POLICIES]
    if unknown:
        bad_input(f"--policy: unknown policy {unknown[0]!r}; choose from {', '.join(POLICIES)}")
    if not math.isfinite(boot_time) or boot_time < 0:
        bad_input(f"--boot-time: expected a number of seconds >= 0, got {boot_time:g}")
    settings, source = _settings(
        grid_file,
        group,
        {
            "min_workers": min_workers,
            "max_workers": max_workers,
            "slots": slots,
            "idle_timeout": idle_timeout,
            "scale_down_window": scale_down_window,
            "headroom": headroom,
            "lookahead": lookahead,
            "demand_halflife": demand_halflife,
        },
    )
    price = _price(price_per_hour, grid_file, group)
    traces = _traces(trace or [], csv_file or [], seed)
    results = run_simulation(traces, policies, settings, boot_time, seed=seed)

    written: list[Path] = []
    if plot_dir is not None:
        try:
            written = plot(results, plot_dir)
        except (RuntimeError, OSError) as exc:
            fail(f"--plot-dir: {exc}")

    if output == Output.json:
        emit_json([result_dict(r, price) for r in results])
        return
    out.print(
        f"settings from {source}: {settings.min_workers}..{settings.max_workers} workers, "
        f"{settings.slots} slot(s), idle_timeout {settings.idle_timeout:g} s, "
        f"scale_down_window {settings.scale_down_window:g} s, headroom {settings.headroom:g}, "
        f"lookahead {settings.lookahead:g} s; boot time {boot_time:g} s"
        + (f"; {price:g} per worker-hour" if price is not None else "")
    )
    out.print(render_table(results, price))
    checks = check_targets(results)
    if checks:
        out.print(render_targets(checks))
    for path in written:
        out.print(f"wrote {path}")
