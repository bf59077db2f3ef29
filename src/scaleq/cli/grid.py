"""Commands that run or inspect the grid: up, server, worker, workers, tokens, purge, migrate."""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from scaleq import loop
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
    fail,
    out,
    setup_logging,
    size,
    table,
    with_client,
)
from scaleq.client import ApiError, format_detail
from scaleq.config import data_dir as resolve_data_dir
from scaleq.grid import Grid
from scaleq.jobs import RuntimeKind, parse_duration, parse_size, validate_queue_name
from scaleq.server.roles import ROLES
from scaleq.worker.runtime.base import Runtime
from scaleq.worker.runtime.jobuser import JobUser

tokens_app = typer.Typer(help="Create, list and revoke API tokens (admin only).", no_args_is_help=True)


def _running(pid: int) -> bool:
    """A live process (a zombie — killed, not yet reaped — does not count)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


HostOpt = Annotated[str | None, typer.Option(help="Address to listen on \\[default: 127.0.0.1].")]
PortOpt = Annotated[int | None, typer.Option(help="Port to listen on; 0 picks a free one \\[default: 8765].")]
StoreOpt = Annotated[
    str | None, typer.Option(help="Store: a sqlite path or postgresql:// URL \\[default: sqlite in the data dir].")
]
LeaseOpt = Annotated[float | None, typer.Option(help="Lease of a running job without heartbeat, in seconds.")]
OtlpOpt = Annotated[
    str | None,
    typer.Option(envvar="SCALEQ_OTLP_ENDPOINT", help="Push metrics over OTLP/HTTP, e.g. http://collector:4318."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")]
JobUserOpt = Annotated[
    str | None,
    typer.Option(
        "--job-user",
        envvar="SCALEQ_JOB_USER",
        help="User that process jobs run as when the worker runs as root \\[default: nobody]; naming root keeps "
        "them as root. A worker that is not root runs them as itself.",
    ),
]


def _job_user(asked: str | None) -> JobUser | None:
    """The resolved job user, or exit 2 naming --job-user."""
    from scaleq.worker.runtime.jobuser import JobUserError, resolve

    try:
        return resolve(asked)
    except JobUserError as exc:
        bad_input(f"--job-user: {exc}")


def up(
    grid_file: Annotated[Path | None, typer.Option("--grid", "-g", help="Grid file (TOML) to run.")] = None,
    host: HostOpt = None,
    port: PortOpt = None,
    store: StoreOpt = None,
    lease_seconds: LeaseOpt = None,
    otlp_endpoint: OtlpOpt = None,
    data_dir: DataDirOpt = None,
    job_user: JobUserOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the server, the store and the autoscaler in one process.

    Without --grid it runs the embedded default: one local group for queue 'default', scaling between 0 and the
    number of cores with process jobs. It writes the URL and an admin token into the data dir, so other scaleq
    commands given the same data dir need no further set-up. Run as root, its workers run process jobs as an
    unprivileged user (--job-user, default nobody), so that jobs cannot read the data dir.
    """
    from scaleq import grid as gridmod

    try:
        grid = gridmod.load(grid_file) if grid_file else gridmod.embedded_default()
    except gridmod.GridFileError as exc:
        bad_input(str(exc))
    _job_user(job_user)  # a name that cannot work fails here, not in every worker started
    _serve(grid, host, port, store, lease_seconds, otlp_endpoint, data_dir, verbose, job_user)


def server(
    host: HostOpt = None,
    port: PortOpt = None,
    store: StoreOpt = None,
    lease_seconds: LeaseOpt = None,
    otlp_endpoint: OtlpOpt = None,
    data_dir: DataDirOpt = None,
    verbose: VerboseOpt = False,
    max_output_bytes: Annotated[
        int | None,
        typer.Option(min=1, max=1 << 40, help="Largest outputs of one attempt, in bytes stored (default 256 MiB)."),
    ] = None,
    max_log_bytes: Annotated[
        int | None,
        typer.Option(min=1, max=1 << 40, help="Largest log of one attempt; past it the head is kept (default 16 MiB)."),
    ] = None,
    heartbeat_budget: Annotated[
        float | None,
        typer.Option(
            min=0.001,
            help="Most heartbeats a second the grid asks its busy workers for; past it they beat less often "
            "(default 250; give every server of one store the same).",
        ),
    ] = None,
) -> None:
    """Run the API server alone (no autoscaler, no workers): several of them can share one PostgreSQL store.

    Run the controller with 'scaleq autoscale --grid FILE' (or 'scaleq up --grid FILE' on one of them). The limits
    are those of a grid file's [server] section: give every server of one store the same.
    """
    from scaleq.grid import Grid, ServerSection

    limits = {
        "max_output_bytes": max_output_bytes,
        "max_log_bytes": max_log_bytes,
        "heartbeat_budget": heartbeat_budget,
    }
    section = ServerSection.model_validate({k: v for k, v in limits.items() if v is not None})
    _serve(Grid(server=section), host, port, store, lease_seconds, otlp_endpoint, data_dir, verbose)


def _serve(
    grid: Grid,
    host: str | None,
    port: int | None,
    store: str | None,
    lease_seconds: float | None,
    otlp_endpoint: str | None,
    data_dir: Path | None,
    verbose: bool,
    job_user: str | None = None,
) -> None:
    from scaleq.embedded import serve
    from scaleq.store.base import SchemaTooNew

    setup_logging(verbose)
    directory = resolve_data_dir(data_dir)
    info = directory / "server.json"
    if info.exists():
        import json

        pid = json.loads(info.read_text()).get("pid")
        if pid and pid != os.getpid() and _running(pid):
            fail(f"a server is already running from {directory} (pid {pid}); stop it or use another --data-dir")
    try:
        loop.run(
            serve(
                grid,
                directory,
                host=host or grid.server.host,
                port=grid.server.port if port is None else port,
                store_url=store,
                lease_seconds=lease_seconds,
                otlp_endpoint=otlp_endpoint,
                job_user=job_user,
            )
        )
    except SchemaTooNew as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot listen: {exc}")
    except RuntimeError as exc:  # e.g. OTLP asked for without its packages
        fail(str(exc))
    except ValueError as exc:
        bad_input(str(exc))


class DockerOutputs(StrEnum):
    auto = "auto"
    bind = "bind"
    archive = "archive"


class OnNotice(StrEnum):
    """What SIGTERM means to a worker (see scaleq.worker.agent)."""

    drain = "drain"
    handback = "handback"


def worker(
    queue: Annotated[str, typer.Option("--queue", "-q", help="Queue to take jobs from.")],
    runtime: Annotated[
        list[RuntimeKind] | None,
        typer.Option("--runtime", "-r", help="docker (default) and/or process (trusted local work); repeatable."),
    ] = None,
    slots: Annotated[int | None, typer.Option(help="Jobs at once \\[default: one per CPU core].")] = None,
    worker_id: Annotated[str | None, typer.Option(help="Worker id \\[default: <hostname>-<random>].")] = None,
    group: Annotated[str | None, typer.Option(help="Worker group this worker belongs to.")] = None,
    tag: Annotated[list[str] | None, typer.Option("--tag", help="Tag this worker offers; repeatable.")] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU cores offered \\[default: all].")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory offered, e.g. 8g \\[default: all].")] = None,
    gpus: Annotated[int, typer.Option(help="GPUs offered.")] = 0,
    allow_host_network: Annotated[bool, typer.Option(help="Run jobs that ask for the host network.")] = False,
    docker_outputs: Annotated[
        DockerOutputs,
        typer.Option(
            help="How container jobs' /outputs reach the worker: bind-mounted (an engine on this host), copied out "
            "through the engine's API (archive), or auto: bind when the worker is root and the engine sees its files. "
            "Force bind only for a worker that can re-own what jobs write (root, or a rootless engine of its user)."
        ),
    ] = DockerOutputs.auto,
    server_grace: Annotated[float, typer.Option(help="Seconds to wait out an unreachable server.")] = 600.0,
    metrics_port: Annotated[
        int | None, typer.Option(help="Serve Prometheus /metrics on this port (0: any free port) \\[default: off].")
    ] = None,
    metrics_host: Annotated[str, typer.Option(help="Address for --metrics-port.")] = "0.0.0.0",
    on_notice: Annotated[
        OnNotice,
        typer.Option(
            envvar="SCALEQ_ON_NOTICE",
            help="What SIGTERM means: drain (finish running jobs, then exit), or handback (a preemption notice: hand "
            "running jobs back at once, no attempt spent, then exit). The gcp, kubernetes and fly providers set "
            "handback on spot/preemptible groups' workers themselves.",
        ),
    ] = OnNotice.drain,
    preemptible: Annotated[bool, typer.Option("--preemptible", help="Short for --on-notice handback.")] = False,
    job_user: JobUserOpt = None,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Debug logging.")] = False,
) -> None:
    """Run a worker: claim jobs from a queue and run them. SIGTERM drains it (a second SIGTERM hands jobs back);
    with --preemptible, SIGTERM hands them back at once."""
    from scaleq.config import ConfigError, resolve
    from scaleq.worker.agent import WorkerAgent, WorkerConfig, default_worker_id, total_memory
    from scaleq.worker.runtime.base import RuntimeUnavailable

    setup_logging(verbose)
    try:
        validate_queue_name(queue)
        mem = parse_size(memory) if memory else total_memory()
    except ValueError as exc:
        bad_input(str(exc))
    as_user = _job_user(job_user) if RuntimeKind.process in (runtime or []) else None
    try:
        target = resolve(server, token, data_dir)
    except ConfigError as exc:
        fail(str(exc))
    # the token is ours, not the jobs': keep it out of the environment process jobs inherit
    os.environ.pop("SCALEQ_TOKEN", None)
    kinds = runtime or [RuntimeKind.docker]
    runtimes: dict[str, Runtime] = {}
    for kind in dict.fromkeys(kinds):
        if kind == RuntimeKind.docker:
            from scaleq.worker.runtime.docker import DockerRuntime

            runtimes["docker"] = DockerRuntime(allow_host_network=allow_host_network, outputs=docker_outputs.value)
        else:
            from scaleq.worker.runtime.process import ProcessRuntime

            runtimes["process"] = ProcessRuntime(job_user=as_user)

    async def go() -> int:
        for rt in runtimes.values():
            try:
                await rt.check()
            except RuntimeUnavailable as exc:
                fail(f"runtime {rt.name}: {exc}")
        config = WorkerConfig(
            server=target.server,
            token=target.token,
            queue=queue,
            runtimes=runtimes,
            slots=slots or os.cpu_count() or 1,
            worker_id=worker_id or default_worker_id(),
            group=group,
            tags=tag or [],
            cpus=cpus or float(os.cpu_count() or 1),
            memory=mem,
            gpus=gpus,
            allow_host_network=allow_host_network,
            server_grace=server_grace,
            metrics_port=metrics_port,
            metrics_host=metrics_host,
            on_notice="handback" if preemptible else on_notice.value,
        )
        return await WorkerAgent(config).run()

    try:
        code = loop.run(go())
    except ApiError as exc:
        hint = " (check --token / SCALEQ_TOKEN: it needs the worker role)" if exc.status in (401, 403) else ""
        fail(f"the server refused this worker: {format_detail(exc.detail)}{hint}")
    raise typer.Exit(code)


def workers(
    all_: Annotated[bool, typer.Option("--all", help="Include workers that are gone.")] = False,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Workers known to the server: queue, group, slots, busy, state, last heartbeat."""
    found = with_client(server, token, data_dir, lambda c: c.workers(include_gone=all_))
    if output == Output.json:
        emit_json([w.model_dump(mode="json") for w in found])
        return
    now = time.time()
    table(
        ["id", "queue", "group", "state", "busy", "slots", "runtimes", "cpus", "memory", "heartbeat"],
        [
            (
                w.id,
                w.queue,
                w.group or "",
                w.state,
                w.busy,
                w.slots,
                ",".join(w.runtimes),
                f"{w.cpus:g}",
                size(w.memory),
                ago(w.last_heartbeat, now),
            )
            for w in found
        ],
    )


@tokens_app.command("create")
def tokens_create(
    role: Annotated[str, typer.Option(help=f"One of: {', '.join(ROLES)}.")],
    name: Annotated[str, typer.Option(help="A note saying what the token is for.")] = "",
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Create a token; it is printed once, on the last line."""
    if role not in ROLES:
        bad_input(f"--role: must be one of {', '.join(ROLES)}")
    created = with_client(server, token, data_dir, lambda c: c.create_token(role, name))
    if output == Output.json:
        emit_json(created)
    else:
        err.print(f"token {created['id']} ({created['role']}) created; it is shown only now:")
        out.print(created["token"])


@tokens_app.command("list")
def tokens_list(
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List tokens (ids, roles, names — never the secrets)."""
    found = with_client(server, token, data_dir, lambda c: c.list_tokens())
    if output == Output.json:
        emit_json(found)
        return
    table(
        ["id", "role", "name", "created", "revoked"],
        [(t["id"], t["role"], t["name"], ago(t["created_at"]), ago(t["revoked_at"])) for t in found],
    )


@tokens_app.command("revoke")
def tokens_revoke(
    token_id: Annotated[str, typer.Argument(help="Token id (from 'scaleq tokens list').")],
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Revoke a token: it stops working at once."""
    with_client(server, token, data_dir, lambda c: c.revoke_token(token_id))
    out.print(f"revoked {token_id}")


def purge(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Jobs that finished longer ago than this: 90s, 15m, 12h, 7d, 2w.")
    ],
    queue: Annotated[str | None, typer.Option(help="Only this queue's jobs.")] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Remove finished jobs, with their logs, outputs and input bytes, once they are older than --older-than.

    Queued and running jobs are never touched. Scaling events as old go too (of every group). Needs the admin token.
    """
    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        bad_input(f"--older-than: {exc}")
    if queue is not None:
        try:
            validate_queue_name(queue)
        except ValueError as exc:
            bad_input(f"--queue: {exc}")
    done = with_client(server, token, data_dir, lambda c: c.purge(seconds, queue))
    if output == Output.json:
        emit_json(done)
        return
    table(
        ["jobs", "log chunks", "outputs", "blobs", "events"],
        [(done["jobs"], done["log_chunks"], done["outputs"], done["blobs"], done["events"])],
    )


def migrate(
    check: Annotated[
        bool, typer.Option("--check", help="Change nothing: exit 1 if migrations are pending (naming them), 0 if not.")
    ] = False,
    store: StoreOpt = None,
    output: OutputOpt = Output.table,
    data_dir: DataDirOpt = None,
) -> None:
    """Bring the store's schema up to this scaleq's version, one numbered migration per transaction.

    Servers do the same when they start, so this is for upgrading on purpose: before starting the new release's
    servers on a shared PostgreSQL database, or to see (--check) what an upgrade would do. A database migrated by a
    newer scaleq is refused, untouched.
    """
    from scaleq.store import open_store, sqlite_path
    from scaleq.store.base import SchemaTooNew, unavailable_errors

    url = store or str(resolve_data_dir(data_dir) / "scaleq.db")
    postgres = url.startswith(("postgresql://", "postgres://"))
    where = re.sub(r"//([^:@/]*):[^@/]*@", r"//\1:***@", url) if postgres else str(sqlite_path(url))
    if not postgres and where != ":memory:" and not Path(where).exists():
        fail(f"no store at {where}: a server creates it when it first starts (or give --store / --data-dir)")

    async def go() -> tuple[int, int, list[str], list[str]]:
        opened = open_store(url, migrate=False)
        await opened.open()
        try:
            status = await opened.schema_status()
            applied = [] if check else await opened.migrate()
        finally:
            await opened.close()
        return status.version, status.head, status.pending, applied

    try:
        version, head, pending, applied = asyncio.run(go())
    except SchemaTooNew as exc:
        fail(str(exc))
    except (sqlite3.Error, *unavailable_errors()) as exc:  # type: ignore[misc]  # (a tuple built at run time)
        fail(f"cannot reach the store at {where}: {exc}")
    if output == Output.json:
        emit_json(
            {
                "store": where,
                "version": head if applied else version,
                "head": head,
                "pending": [] if applied else pending,
                "applied": applied,
            }
        )
    elif not pending:
        out.print(f"{where}: schema version {version}, up to date")
    elif check:
        out.print(f"{where}: schema version {version} of {head}; pending: {', '.join(pending)}")
    else:
        out.print(f"{where}: schema version {version} → {head}; applied: {', '.join(applied)}")
    if check and pending:
        raise typer.Exit(1)
