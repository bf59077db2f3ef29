"""Commands about jobs and queues: submit, jobs, job, logs, outputs, cancel, queues."""

from __future__ import annotations

import contextlib
import re
import shlex
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.live import Live
from rich.progress import Progress
from rich.spinner import Spinner

from scaleq.cli.common import (
    DataDirOpt,
    Output,
    OutputOpt,
    ServerOpt,
    TokenOpt,
    ago,
    bad_input,
    duration,
    emit_json,
    err,
    fail,
    out,
    sanitize,
    size,
    table,
    validation_message,
    with_client,
)
from scaleq.client import ApiError, Client, Unreachable
from scaleq.eta import in_words
from scaleq.jobfile import JobInputError, JobSpec, build, encode_blobs, load_lines, problems
from scaleq.jobs import ArraySpec, Job, Reason, State, SubmitRequest, array_id, validate_queue_name

#: ``--state``: a job state, or a finished job's reason (``failed`` = finished with reason failed).
StateFilter = StrEnum("StateFilter", {v: v for v in [*State, *Reason]})  # type: ignore[misc]


def _job_id(value: str | None) -> str | None:
    """A job id or a prefix of one: 6 to 64 hex digits, checked here so a typo is bad input (exit 2)."""
    if value is not None and not re.fullmatch(r"[0-9a-f]{6,64}", value):
        raise typer.BadParameter(f"{value!r} is not a job id: give the id or a prefix of at least 6 hex digits")
    return value


JobIdArg = Annotated[str, typer.Argument(help="Job id or a unique prefix (6+ hex digits).", callback=_job_id)]

PriorityOpt = Annotated[int, typer.Option(min=-1000, max=1000, help="Higher runs first; FIFO within a priority.")]
MaxAttemptsOpt = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=100,
        help="Infrastructure budget: attempts before a job lost with its worker finishes as worker_lost (a "
        "preempted attempt is not counted) \\[default: 3].",
    ),
]
RetriesOpt = Annotated[
    int | None,
    typer.Option(
        min=0, max=100, help="Program budget: times a failed or timed-out attempt is queued again \\[default: 0]."
    ),
]
RetryCodesOpt = Annotated[
    list[int] | None,
    typer.Option(
        "--retry-on-exit-code",
        help="Retry only a failure with this exit code (then a timeout is not retried); repeatable. Needs --retries.",
    ),
]


def _retries(
    spec: dict[str, object], max_attempts: int | None, retries: int | None, codes: list[int] | None
) -> dict[str, object]:
    """A job's retry settings: the flags over the job file's (a line's, for submit-many) over the defaults."""
    flags = {"max_attempts": max_attempts, "retries": retries, "retry_on_exit_codes": codes or None}
    return {**spec, **{k: v for k, v in flags.items() if v is not None}}


def _request(where: str, **fields: object) -> SubmitRequest:
    """The submit request, checked as the server checks it; bad input exits 2 naming the field."""
    try:
        return SubmitRequest.model_validate(fields)
    except ValidationError as exc:
        bad_input(f"{where}: {problems(exc)}")


def _summary(job: Job) -> dict:
    return {
        "id": job.id,
        "queue": job.queue,
        "state": job.state.value,
        "reason": job.reason.value if job.reason else None,
        "exit_code": job.exit_code,
        "error": job.error,
        "attempts": job.attempts,
        "max_attempts": job.max_attempts,
        "failures": job.failures,
        "retries": job.retries,
        "retry_on_exit_codes": job.retry_on_exit_codes,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "finished_at": job.finished_at,
        "array_id": job.array_id,
        "array_index": job.array_index,
    }


def _status(job: Job) -> str:
    if job.state != State.finished:
        return job.state.value
    text = f"finished ({job.reason.value if job.reason else '?'}"
    if job.exit_code is not None:
        text += f", exit {job.exit_code}"
    return text + ")"


class _Progress:
    """A spinner line that redraws itself (elapsed time ticks even while the long-poll waits)."""

    def __init__(self, job: Job) -> None:
        self.job = job
        self.start = time.monotonic()
        self.spinner = Spinner("dots")

    def __rich__(self) -> Spinner:
        self.spinner.update(
            text=f"{self.job.id[:12]} {self.job.state.value} · {duration(time.monotonic() - self.start)}"
        )
        return self.spinner


async def _follow(client: Client, job: Job, show: bool) -> Job:
    """Long-poll the job until it finishes, with a live spinner on a terminal."""
    progress = _Progress(job)
    with Live(progress, console=err, transient=True, refresh_per_second=8) if show else contextlib.nullcontext():
        while job.state != State.finished:
            job = progress.job = await client.get_job(job.id, wait=20, state=job.state.value)
    return job


def submit(
    queue: Annotated[str, typer.Argument(help="Queue to submit to.")],
    command: Annotated[list[str] | None, typer.Argument(help="Command and arguments, after '--'.")] = None,
    image: Annotated[str | None, typer.Option(help="Container image; without one the job runs as a process.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="KEY=VALUE, repeatable.")] = None,
    max_duration: Annotated[
        int | None, typer.Option(help="Seconds before the job is stopped (timed_out) \\[default: 3600].")
    ] = None,
    cpus: Annotated[float | None, typer.Option(help="CPU cores the job needs (a limit in docker).")] = None,
    memory: Annotated[str | None, typer.Option(help="Memory the job needs, e.g. 512m, 2g (a limit in docker).")] = None,
    gpus: Annotated[int | None, typer.Option(help="GPUs the job needs.")] = None,
    input_paths: Annotated[
        list[str] | None, typer.Option("--input", "-i", help="File or directory to place under /inputs; repeatable.")
    ] = None,
    tag: Annotated[
        list[str] | None, typer.Option("--tag", help="Only workers with this tag run it; repeatable.")
    ] = None,
    workdir: Annotated[str | None, typer.Option(help="Working directory inside the container.")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="Job file (TOML or JSON) with the definition's fields.")
    ] = None,
    priority: PriorityOpt = 0,
    max_attempts: MaxAttemptsOpt = None,
    retries: RetriesOpt = None,
    retry_on_exit_code: RetryCodesOpt = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run again if this exact job already finished.")] = False,
    wait: Annotated[bool, typer.Option("--wait", "-w", help="Follow the job; exit 0 only on success.")] = False,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Submit a job and print its id (the same definition on the same queue is the same job).

    Example: scaleq submit default --wait -- python3 -c "print('hello')"

    Retries by cause: --max-attempts for infrastructure losses, --retries (and --retry-on-exit-code) for the
    program's own failures; a job file may hold max_attempts, retries and retry_on_exit_codes too.
    """
    try:
        validate_queue_name(queue)
        definition, blobs, file_retries = build(
            file=file,
            command=command,
            image=image,
            env=env,
            max_duration=max_duration,
            cpus=cpus,
            memory=memory,
            gpus=gpus,
            inputs=input_paths,
            tags=tag,
            workdir=workdir,
        )
    except JobInputError as exc:
        bad_input(str(exc))
    except ValueError as exc:
        bad_input(f"queue: {exc}" if "queue" in str(exc) else str(exc))
    request = _request(
        str(file) if file else "job",
        queue=queue,
        definition=definition,
        priority=priority,
        rerun=rerun,
        blobs=encode_blobs(blobs),
        **_retries(file_retries, max_attempts, retries, retry_on_exit_code),
    )

    async def go(client: Client) -> tuple[Job, bool, str | None]:
        job, created, warning = await client.submit_checked(request)
        if output == Output.table:
            out.print(job.id, markup=False, highlight=False)  # stdout: the id alone, for ID=$(scaleq submit …)
            if not created:
                err.print(f"same job as before ({_status(job)}); --rerun runs a finished job again", markup=False)
        if warning:
            err.print(f"warning: {warning}", markup=False)
        if wait:
            job = await _follow(client, job, show=sys.stderr.isatty() and output == Output.table)
            if output == Output.table:
                err.print(f"{job.id[:12]} {_status(job)}" + (f": {job.error}" if job.error else ""), markup=False)
        return job, created, warning

    job, created, warning = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json({**_summary(job), "created": created} | ({"warning": warning} if warning else {}))
    if wait and job.reason != "success":
        raise typer.Exit(1)


BATCH = 500  # jobs per request (the server takes up to 1,000)
BATCH_BYTES = 16 << 20  # input bytes per request, well under the server's body limit (64 MiB by default)


def submit_many(
    queue: Annotated[str, typer.Argument(help="Queue to submit to.")],
    file: Annotated[
        Path,
        typer.Argument(
            help="JSON Lines: one job per line, as the fields of a job file ('-' reads stdin).", allow_dash=True
        ),
    ],
    priority: PriorityOpt = 0,
    max_attempts: MaxAttemptsOpt = None,
    retries: RetriesOpt = None,
    retry_on_exit_code: RetryCodesOpt = None,
    rerun: Annotated[bool, typer.Option("--rerun", help="Run again those of the jobs that already finished.")] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="A name for the array, shown beside its id.", show_default=False)
    ] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Submit many jobs from a file as one array, 500 per request; print their ids, one per line, in the file's
    order, and the array's id (on stderr; 'scaleq array ID' shows its progress).

    Each line holds a job file's fields as JSON; inputs are relative to the file (for '-', to this directory).
    Each job sees its line's index (from 0) in $SCALEQ_ARRAY_INDEX and the array's id in $SCALEQ_ARRAY_ID.

    Blank lines and lines starting with '#' are skipped. Every line is checked before anything is sent.

    Idempotent (the same lines on the same queue are the same array and the same jobs): after an interruption,
    run it again.

    Example line: {"command": ["python3", "sweep.py", "--alpha", "0.3"], "image": "python:3.12-slim"}

    A line may carry its own max_attempts, retries and retry_on_exit_codes; the flags set them for every line.
    """
    try:
        validate_queue_name(queue)
        found = load_lines(file)
    except JobInputError as exc:
        bad_input(str(exc))
    except ValueError as exc:
        bad_input(f"queue: {exc}")
    batches = _batches(
        queue,
        found,
        priority=priority,
        rerun=rerun,
        max_attempts=max_attempts,
        retries=retries,
        retry_on_exit_codes=retry_on_exit_code,
        where=file,
    )
    total = sum(len(b) for b in batches)
    aid = array_id(queue, [s.definition for s in found])  # from every line: the same file again is the same array
    try:
        spec = ArraySpec(id=aid, name=name, size=max(total, 1))
    except ValidationError as exc:
        bad_input(validation_message(exc, "--"))

    async def go(client: Client) -> list[tuple[Job, bool, str | None]]:
        done: list[tuple[Job, bool, str | None]] = []
        with Progress(transient=True, console=err, disable=not err.is_terminal) as bar:
            task = bar.add_task("submitting", total=total)
            for batch in batches:
                try:
                    done += await client.submit_many_checked(batch, spec.model_copy(update={"start": len(done)}))
                except (ApiError, Unreachable):
                    if done:
                        err.print(
                            f"{len(done)} of {total} jobs were submitted before this error; running the same "
                            "command again submits the rest (the others are found, not queued twice)",
                            markup=False,
                        )
                    raise
                bar.update(task, completed=len(done))
        return done

    done = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json([{**_summary(job), "created": c} | ({"warning": w} if w else {}) for job, c, w in done])
        return
    out.print("\n".join(job.id for job, _, _ in done), markup=False, highlight=False)
    new = sum(1 for _, created, _ in done if created)
    again = len(done) - new
    err.print(
        f"{len(done)} job{'s' if len(done) != 1 else ''} on {queue}: {new} newly queued"
        + (f", {again} submitted before (--rerun runs finished ones again)" if again else ""),
        markup=False,
    )
    if done:
        label = aid[:12] + (f" ({name})" if name else "")
        err.print(f"array {label}: 'scaleq array {aid[:12]}' shows its progress", markup=False)
    warned = [w for _, _, w in done if w]
    if warned:
        err.print(f"warning: {len(warned)} of them: {warned[0]}", markup=False)


def _batches(
    queue: str,
    found: list[JobSpec],
    *,
    priority: int,
    rerun: bool,
    max_attempts: int | None = None,
    retries: int | None = None,
    retry_on_exit_codes: list[int] | None = None,
    where: Path | None = None,
) -> list[list[SubmitRequest]]:
    """The requests of ``submit-many``: at most BATCH jobs and about BATCH_BYTES of input bytes each, every input's
    bytes sent once per request (the server takes them for any job of the request that names them)."""
    batches: list[list[SubmitRequest]] = []
    batch: list[SubmitRequest] = []
    sent: set[str] = set()
    size = 0
    for n, (definition, blobs, line_retries) in enumerate(found, start=1):
        fresh = {sha: data for sha, data in blobs.items() if sha not in sent}
        more = sum(len(d) for d in fresh.values())
        if batch and (len(batch) == BATCH or size + more > BATCH_BYTES):
            batches.append(batch)
            batch, sent, size = [], set(), 0
            fresh, more = blobs, sum(len(d) for d in blobs.values())
        batch.append(
            _request(
                f"{where}: job {n}" if where else f"job {n}",
                queue=queue,
                definition=definition,
                priority=priority,
                rerun=rerun,
                blobs=encode_blobs(fresh),
                **_retries(line_retries, max_attempts, retries, retry_on_exit_codes),
            )
        )
        sent |= fresh.keys()
        size += more
    if batch:
        batches.append(batch)
    return batches


def jobs(
    queue: Annotated[str | None, typer.Option(help="Only this queue.")] = None,
    state: Annotated[
        StateFilter | None,
        typer.Option(help="Only jobs in this state, or finished with this reason (failed, success, …)."),
    ] = None,
    limit: Annotated[
        int, typer.Option(min=1, max=10_000, help="At most this many, newest first (with --all: per request).")
    ] = 50,
    cursor: Annotated[
        str | None, typer.Option(help="The page after the one that printed this cursor (see 'more:' on stderr).")
    ] = None,
    all_pages: Annotated[bool, typer.Option("--all", help="Every matching job, page after page.")] = False,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """List jobs, newest first, a page at a time: when there are more, stderr says the --cursor of the next page."""
    wanted = state.value if state else None
    reason = wanted if wanted in set(Reason) else None

    async def go(c: Client) -> tuple[list[Job], str | None]:
        found: list[Job] = []
        after = cursor
        while True:
            page, after = await c.list_jobs_page(
                queue=queue, state=None if reason else wanted, reason=reason, limit=limit, cursor=after
            )
            found.extend(page)
            if not all_pages or after is None:
                return found, after

    found, more = with_client(server, token, data_dir, go)
    if more is not None:
        # the next page is the same query from the cursor on: the hint repeats the filters it was made with
        same = [*(["--queue", shlex.quote(queue)] if queue else []), *(["--state", wanted] if wanted else [])]
        same += ["--limit", str(limit)] if limit != 50 else []
        err.print(" ".join(["more: scaleq jobs", *same, "--cursor", more]), highlight=False)
    if output == Output.json:
        emit_json([_summary(j) for j in found])
        return
    now = time.time()
    table(
        ["id", "queue", "state", "exit", "attempts", "submitted", "ran for", "command"],
        [
            (
                j.id[:12],
                j.queue,
                _status(j),
                j.exit_code,
                j.attempts,
                ago(j.submitted_at, now),
                duration((j.finished_at or now) - j.started_at) if j.started_at else "",
                " ".join(j.definition.command)[:40],
            )
            for j in found
        ],
    )


def job(
    job_id: JobIdArg,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Show one job: its definition, state and attempts."""

    async def go(client: Client) -> tuple[tuple[Job, float | None, str | None], list[dict]]:
        found = await client.get_job_estimate(job_id)
        return found, await client.attempts(found[0].id)

    (j, starts_at, basis), attempts = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json(
            {
                **_summary(j),
                "estimated_start": starts_at,
                "estimate_basis": basis,
                "definition": j.definition.model_dump(mode="json"),
                "attempt_history": attempts,
            }
        )
        return
    d = j.definition
    rows = [
        ("id", j.id),
        ("queue", j.queue),
        ("state", _status(j)),
        *([("starts", f"{in_words(starts_at, time.time())} — {basis}")] if j.state == State.queued and basis else []),
        ("error", j.error or ""),
        ("image", d.image or "(process)"),
        ("command", " ".join(d.command)),
        ("env", " ".join(f"{k}={v}" for k, v in d.env.items())),
        ("inputs", ", ".join(i.path for i in d.inputs)),
        (
            "requirements",
            f"cpus {d.requirements.cpus:g}, memory {size(d.requirements.memory) or '-'}, gpus {d.requirements.gpus}",
        ),
        ("max duration", duration(d.max_duration)),
        ("tags", ", ".join(d.tags)),
        ("submitted", ago(j.submitted_at)),
        ("lost attempts", f"{j.attempts} of {j.max_attempts} counted (preempted and handed-back ones are not)"),
        ("retries", _retry_text(j)),
    ]
    table(["field", "value"], rows)
    if attempts:
        table(
            ["attempt", "worker", "started", "ended", "outcome"],
            [
                (a["attempt"], a["worker_id"], ago(a["started_at"]), ago(a["ended_at"]), a["outcome"] or "running")
                for a in attempts
            ],
            title="attempts",
        )


def _retry_text(j: Job) -> str:
    """The program-failure budget in words."""
    if not j.retries:
        return "none (a failure or timeout ends the job)"
    codes = j.retry_on_exit_codes
    kinds = f"failures with exit code {', '.join(map(str, codes))}" if codes else "failures and timeouts"
    return f"{j.failures} of {j.retries} used ({kinds})"


def logs(
    job_id: JobIdArg,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep printing until the job finishes.")] = False,
    attempt: Annotated[int | None, typer.Option(help="Attempt number \\[default: the latest].")] = None,
    raw: Annotated[
        bool,
        typer.Option(
            "--raw",
            help="Write the output as the job wrote it, escape sequences included, also to a terminal "
            "(by default a terminal gets control characters as \\xNN).",
        ),
    ] = False,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Print a job's output (stdout and stderr, in order)."""

    dropped = 0

    async def go(client: Client) -> list[dict]:
        nonlocal dropped
        after, collected, said = 0, [], ""
        while True:
            page = await client.logs(job_id, attempt=attempt, after=after, wait=20 if follow else 0)
            dropped = page.get("dropped", 0)
            if follow and page["state"] == "queued" and not page["chunks"] and said != "queued":
                # nothing to print yet: say so rather than sit silent ('scaleq events' / 'queues' say why it waits)
                err.print(f"job {job_id} is queued: waiting for a worker to start it (Ctrl-C to stop following)")
                said = "queued"
            for c in page["chunks"]:
                if output == Output.json:
                    collected.append(c)
                else:
                    stream = sys.stderr if c["stream"] != "stdout" else sys.stdout
                    # a terminal gets no escape sequence a job wrote; a pipe or a file gets the output as it was
                    stream.write(c["data"] if raw or not stream.isatty() else sanitize(c["data"]))
                    stream.flush()
            after = page["next"]
            if not page["chunks"] and (not follow or page["state"] == "finished"):
                return collected

    collected = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json(collected)
    if dropped:
        err.print(
            f"scaleq: {dropped} bytes of this attempt's output were dropped past the server's log cap "
            "(max_log_bytes): the head of the log is above, the rest was not kept",
            highlight=False,
        )


def outputs(
    job_id: JobIdArg,
    directory: Annotated[Path, typer.Argument(help="Where to write the job's /outputs files.")],
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Download the files the job wrote under /outputs into DIRECTORY."""
    root = directory.resolve()

    async def go(client: Client) -> list[dict]:
        listing = await client.outputs(job_id)
        for item in listing:
            target = (root / item["path"]).resolve()
            if root not in target.parents:
                fail(f"refusing output path outside {root}: {item['path']}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(await client.output_bytes(job_id, item["path"]))
        return listing

    listing = with_client(server, token, data_dir, go)
    if output == Output.json:
        emit_json(listing)
    else:
        table(["path", "size"], [(i["path"], size(i["size"])) for i in listing], title=f"written to {root}")


def cancel(
    job_id: Annotated[
        str | None,
        typer.Argument(help="Job id or a unique prefix (6+ hex digits).", callback=_job_id, show_default=False),
    ] = None,
    array: Annotated[
        str | None,
        typer.Option("--array", help="Cancel every unfinished job of this array instead.", show_default=False),
    ] = None,
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Cancel a queued or running job, or with --array ID all that an array has left (a running job is stopped
    by its worker)."""
    if (job_id is None) == (array is None):
        bad_input("give a job id, or --array ID (not both)")
    if array is not None:
        a = with_client(server, token, data_dir, lambda c: c.cancel_array(array))
        if output == Output.json:
            emit_json(a)
        else:
            out.print(
                f"array {a['id'][:12]}: {a['done']}/{a['size']} finished, {a['other'].get('cancelled', 0)} cancelled",
                markup=False,
            )
        return
    assert job_id is not None
    j = with_client(server, token, data_dir, lambda c: c.cancel(job_id))
    if output == Output.json:
        emit_json(_summary(j))
    else:
        out.print(f"{j.id[:12]} {_status(j)}", markup=False)


def queues(
    output: OutputOpt = Output.table,
    server: ServerOpt = None,
    token: TokenOpt = None,
    data_dir: DataDirOpt = None,
) -> None:
    """Queues with their job counts."""
    found = with_client(server, token, data_dir, lambda c: c.queues())
    if output == Output.json:
        emit_json(found)
        return
    table(
        ["queue", "queued", "running", "succeeded", "unsuccessful", "oldest waiting"],
        [
            (q["name"], q["queued"], q["running"], q["succeeded"], q["unsuccessful"], duration(q["oldest_queued_age"]))
            for q in found
        ],
    )
