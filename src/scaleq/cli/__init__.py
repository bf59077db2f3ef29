"""``scaleq``: the command line. Commands live in the modules beside this one (``jobs``, ``why``,
``arrays``, ``grid``, ``scale``, ``simulate``, ``doctor``, ``export``), their helpers in ``common``."""

from __future__ import annotations

import typer

from scaleq import __version__
from scaleq.cli import arrays, doctor, export, grid, jobs, scale, simulate, why

app = typer.Typer(
    name="scaleq",
    help="A self-hostable compute grid: container jobs on queues, run by worker groups that scale with them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"scaleq {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Exit codes: 0 ok, 1 failure, 2 bad usage or bad input."""


app.command(rich_help_panel="Run")(grid.up)
app.command(rich_help_panel="Run")(grid.server)
app.command(rich_help_panel="Run")(grid.worker)
app.command(rich_help_panel="Jobs")(jobs.submit)
app.command("submit-many", rich_help_panel="Jobs")(jobs.submit_many)
app.command(rich_help_panel="Jobs")(jobs.jobs)
app.command(rich_help_panel="Jobs")(jobs.job)
app.command(rich_help_panel="Jobs")(jobs.logs)
app.command(rich_help_panel="Jobs")(jobs.outputs)
app.command(rich_help_panel="Jobs")(jobs.cancel)
app.command(rich_help_panel="Jobs")(why.why)
app.command(rich_help_panel="Jobs")(arrays.array)
app.command(rich_help_panel="Jobs")(arrays.arrays)
app.command(rich_help_panel="Inspect")(jobs.queues)
app.command(rich_help_panel="Inspect")(grid.workers)
app.command(rich_help_panel="Inspect")(scale.groups)
app.command(rich_help_panel="Inspect")(scale.events)
app.command(rich_help_panel="Inspect")(arrays.cost)
app.command(rich_help_panel="Inspect")(doctor.doctor)
app.command(rich_help_panel="Groups")(scale.plan)
app.command(rich_help_panel="Groups")(scale.apply)
app.command(rich_help_panel="Groups")(scale.destroy)
app.command(rich_help_panel="Groups")(scale.autoscale)
app.command(rich_help_panel="Groups")(simulate.simulate)
app.add_typer(export.export_app, name="export", rich_help_panel="Groups")
app.add_typer(grid.tokens_app, name="tokens", rich_help_panel="Admin")
app.command(rich_help_panel="Admin")(grid.purge)
app.command(rich_help_panel="Admin")(grid.migrate)


def main() -> None:
    app()
