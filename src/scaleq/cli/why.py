"""``scaleq why ID``: why a job waits (its place in its queue, what serves the queue and what each group that could
run it is doing), or how its attempts went; the server's ``GET /jobs/{id}/why`` in words (see scaleq.server.why)."""

from __future__ import annotations

import time
from typing import Any

from rich.markup import escape

from scaleq.cli.common import (
    DataDirOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    duration,
    emit_json,
    out,
    sanitize,
    with_client,
)
from scaleq.cli.jobs import JobIdArg
from scaleq.client import Client

#: How each kind of reason is marked: what blocks the job outright, what delays it, what is only said.
BLOCKING = {"unserved", "nothing_fits", "cannot_run", "provider_error", "no_controller"}
DELAYING = {"capped", "backing_off", "starting", "busy", "not_scaled", "group_unknown"}


def _mark(kind: str) -> str:
    if kind in BLOCKING:
        return "[red]✗[/red]"
    if kind in DELAYING:
        return "[yellow]…[/yellow]"
    return "[green]✓[/green]" if kind in {"can_run", "worker_can_run", "free_slots"} else "•"


def estimate_text(answer: dict[str, Any], now: float | None = None) -> str | None:
    """The estimated start in words, or None when the server gave none."""
    at = answer.get("estimated_start")
    if at is None:
        return None
    left = at - (now if now is not None else time.time())
    when = f"in about {duration(left)}" if left > 0 else "any moment now"
    basis = answer.get("estimate_basis")
    return f"{when} ({time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(at))})" + (f": {basis}" if basis else "")


def why(
    job_id: JobIdArg,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Say why a job is still waiting, or how its attempts went: the chain of reasons, each with its numbers.

    Queued: the jobs ahead of it; the groups serving its queue, which can run it, and what is missing where not.

    For each group that can: capped at max_workers, workers starting, a provider refusal or error, backing off.

    Running or finished: each attempt (lost, preempted, timed out, failed) and the budget that retried it.
    """

    async def go(client: Client) -> dict[str, Any]:
        return await client.why(job_id)

    answer = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json(answer)
        return
    state = answer["state"] + (f" ({answer['reason']})" if answer.get("reason") else "")
    out.print(f"job [bold]{answer['job_id'][:12]}[/bold] on queue {escape(sanitize(answer['queue']))}: {state}")
    for step in answer["chain"]:
        out.print(f"  {_mark(step['kind'])} {escape(sanitize(step['text']))}")
    if (said := estimate_text(answer)) is not None:
        out.print(f"estimated start: {escape(sanitize(said))}")
    elif answer["state"] == "queued":
        basis = answer.get("estimate_basis")
        out.print("estimated start: not known" + (f": {escape(sanitize(basis))}" if basis else ""))
