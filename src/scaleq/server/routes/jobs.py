"""Jobs: submit, read, cancel, logs, outputs; and queues."""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Response, status
from pydantic import BaseModel, Field

from scaleq.jobs import ArraySpec, Job, Reason, State, SubmitRequest, array_id
from scaleq.loop import wait_set
from scaleq.notify import wait_any
from scaleq.server import paging
from scaleq.server.auth import require
from scaleq.server.estimates import estimate_start
from scaleq.server.outputs import stream_blob
from scaleq.server.routes.common import C, Ctx
from scaleq.store.base import ArrayRecord, NotFound, Submission

router = APIRouter(tags=["jobs"])
#: Most jobs one batch submit may carry.
MAX_BATCH = 1000
#: Largest number a query may name (a signed 64-bit column).
MAX_ID = 2**63 - 1


class Submitted(BaseModel):
    job: Job
    created: bool
    warning: str | None = Field(default=None, description="set when nothing the server knows of can run the job")


class JobOut(Job):
    """A job as its own page shows it: with its estimated start while it is queued (the job lists leave it out:
    it costs a few reads per job)."""

    estimated_start: float | None = Field(
        default=None, description="queued: epoch seconds it is expected to start (null: not queued, or unknown)"
    )
    estimate_basis: str | None = Field(
        default=None, description="queued: what the estimate rests on, or why there is none, in words"
    )


async def _with_estimate(ctx: Ctx, job: Job) -> JobOut:
    est = await estimate_start(ctx.store, ctx.request.app.state.runnable.groups, job, ctx.now())
    return JobOut(
        **job.model_dump(),
        estimated_start=est.at if est else None,
        estimate_basis=est.basis if est else None,
    )


class AttemptOut(BaseModel):
    attempt: int
    worker_id: str
    started_at: float
    ended_at: float | None
    outcome: str | None


class LogLine(BaseModel):
    seq: int
    stream: str
    data: str
    at: float


class Logs(BaseModel):
    job_id: str
    attempt: int
    state: State
    chunks: list[LogLine]
    next: int
    #: Bytes of this attempt's output dropped past the per-attempt log cap (0: the log is whole).
    dropped: int = 0


class OutputOut(BaseModel):
    path: str
    sha256: str
    size: int


class QueueOut(BaseModel):
    name: str
    queued: int
    running: int
    finished: int
    succeeded: int
    unsuccessful: int
    oldest_queued_age: float | None


def _unprocessable(loc: list[str | int], msg: str) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, [{"loc": ["body", *loc], "msg": msg, "type": "value_error"}]
    )


def _decode_blobs(req: SubmitRequest, loc: list[str | int]) -> dict[str, bytes]:
    blobs: dict[str, bytes] = {}
    for sha, encoded in req.blobs.items():
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise _unprocessable([*loc, "blobs", sha], "is not base64") from exc
        if hashlib.sha256(data).hexdigest() != sha:
            raise _unprocessable([*loc, "blobs", sha], "bytes do not match their sha256")
        blobs[sha] = data
    return blobs


async def _store_inputs(ctx: Ctx, reqs: list[tuple[list[str | int], SubmitRequest]]) -> None:
    """Check that every input of every job has its bytes (sent now, by any job of the request, or stored before),
    then store the bytes sent. Nothing is stored when anything is wrong."""
    blobs: dict[str, bytes] = {}
    for loc, req in reqs:
        blobs.update(_decode_blobs(req, loc))
    needed = {i.sha256 for _, req in reqs for i in req.definition.inputs if i.sha256 not in blobs}
    missing = set(await ctx.store.missing_blobs(sorted(needed))) if needed else set()
    for loc, req in reqs:
        for n, item in enumerate(req.definition.inputs):
            if item.sha256 in missing:
                raise _unprocessable([*loc, "definition", "inputs", n], f"bytes of {item.path!r} were not sent (blobs)")
            if item.sha256 in blobs and len(blobs[item.sha256]) != item.size:
                raise _unprocessable([*loc, "definition", "inputs", n, "size"], "does not match the bytes sent")
    for sha, data in blobs.items():
        await ctx.store.put_blob(sha, data)


@router.post("/jobs", response_model=Submitted, dependencies=[require("jobs:write")])
async def submit(body: SubmitRequest, ctx: C, response: Response) -> Submitted:
    """Queue a job. The same definition on the same queue is the same job: its id and result come back."""
    await _store_inputs(ctx, [([], body)])
    job, created = await ctx.store.submit(
        body.queue,
        body.definition,
        priority=body.priority,
        max_attempts=body.max_attempts,
        rerun=body.rerun,
        now=ctx.now(),
        retries=body.retries,
        retry_on_exit_codes=body.retry_on_exit_codes,
    )
    if created:
        ctx.notifier.submitted(job.queue, job.id)
        response.status_code = status.HTTP_201_CREATED
    return Submitted(job=job, created=created, warning=await _warning(ctx, job))


class SubmitBatch(BaseModel):
    jobs: list[SubmitRequest] = Field(min_length=1, max_length=MAX_BATCH)
    array: ArraySpec | None = Field(
        default=None, description="make the jobs members of an array (one submit-many is one array)"
    )


class ArrayRef(BaseModel):
    id: str
    queue: str
    name: str | None
    size: int
    created_at: float


class SubmittedBatch(BaseModel):
    submitted: list[Submitted]
    array: ArrayRef | None = None


async def _array(ctx: Ctx, body: SubmitBatch) -> ArrayRecord | None:
    """The array the batch's jobs join, checked against the batch and against the array if it exists."""
    spec = body.array
    if spec is None:
        return None
    queue = body.jobs[0].queue
    for n, req in enumerate(body.jobs):
        if req.queue != queue:
            raise _unprocessable(["jobs", n, "queue"], f"an array's jobs are on one queue ({queue!r}, as the first)")
    whole = array_id(queue, [r.definition for r in body.jobs])
    if spec.id is None:
        if spec.start != 0 or spec.size not in (None, len(body.jobs)):
            raise _unprocessable(["array", "id"], "is needed when the batch is part of an array (start or size)")
        return ArrayRecord(whole, queue, spec.name, len(body.jobs), ctx.now())
    if spec.size is None:
        raise _unprocessable(["array", "size"], "is needed with id (the number of jobs in the whole array)")
    if spec.start + len(body.jobs) > spec.size:
        raise _unprocessable(["array", "start"], f"start {spec.start} + {len(body.jobs)} jobs is past size {spec.size}")
    if spec.start == 0 and spec.size == len(body.jobs) and spec.id != whole:
        raise _unprocessable(["array", "id"], "is not the id of these jobs (see scaleq.jobs.array_id)")
    try:
        found = (await ctx.store.get_array(spec.id)).array
    except NotFound:
        return ArrayRecord(spec.id, queue, spec.name, spec.size, ctx.now())
    if (found.queue, found.size) != (queue, spec.size):
        raise _unprocessable(["array", "id"], f"names an array of {found.size} jobs on queue {found.queue!r}")
    return found


@router.post("/jobs/batch", response_model=SubmittedBatch, dependencies=[require("jobs:write")])
async def submit_batch(body: SubmitBatch, ctx: C) -> SubmittedBatch:
    """Queue up to 1,000 jobs at once, each as ``POST /jobs`` would, in one transaction: all are queued (or found
    already there) or, on any error, none. The answers come back in the order of the jobs.

    With ``array``, the jobs are members of an array, numbered from ``array.start``: ``{}`` makes the batch an
    array of its own (its id computed from its jobs); an array of more than one batch names its ``id`` and
    ``size`` in each. A member's id includes the array and its index (it sees both in its environment)."""
    array = await _array(ctx, body)
    await _store_inputs(ctx, [(["jobs", n], req) for n, req in enumerate(body.jobs)])
    start = body.array.start if body.array else 0
    subs = [
        Submission(
            r.queue,
            r.definition,
            r.priority,
            r.max_attempts,
            r.rerun,
            r.retries,
            r.retry_on_exit_codes,
            array.id if array else None,
            start + n if array else None,
        )
        for n, r in enumerate(body.jobs)
    ]
    done = await ctx.store.submit_many(subs, ctx.now(), array)
    for job, created in done:
        if created:
            ctx.notifier.submitted(job.queue, job.id)
    return SubmittedBatch(
        submitted=[Submitted(job=job, created=created, warning=await _warning(ctx, job)) for job, created in done],
        array=ArrayRef(**vars(array)) if array else None,
    )


async def _warning(ctx: Ctx, job: Job) -> str | None:
    """Only for a job that waits (see scaleq.server.runnable)."""
    if job.state != State.queued:
        return None
    return await ctx.request.app.state.runnable.warning(job.queue, job.definition)


_PAGED: dict[int | str, dict[str, Any]] = {
    200: {
        "headers": {
            paging.HEADER: {
                "description": "the cursor of the next page (absent on the last page)",
                "schema": {"type": "string"},
            }
        }
    }
}


@router.get("/jobs", response_model=list[Job], dependencies=[require("jobs:read")], responses=_PAGED)
async def list_jobs(
    ctx: C,
    response: Response,
    queue: str | None = None,
    state: State | None = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    reason: Annotated[Reason | None, Query(description="only finished jobs with this reason")] = None,
    cursor: Annotated[
        str | None,
        Query(max_length=64, description="the X-Scaleq-Next-Cursor of the previous page: the page after it"),
    ] = None,
) -> list[Job]:
    """Newest first, a page at a time: when there are more, the answer's ``X-Scaleq-Next-Cursor`` header is the
    ``cursor`` for the next page (an opaque string; pages are stable while jobs are submitted)."""
    if reason is not None and state not in (None, State.finished):
        raise HTTPException(422, f"reason={reason.value} is a finished job's reason; state={state} has none")
    state = State.finished if reason is not None else state
    page = await ctx.store.list_jobs_page(
        queue=queue,
        state=state.value if state else None,
        limit=limit,
        reason=reason.value if reason else None,
        before=paging.decode(cursor) if cursor is not None else None,
    )
    if page.next_before is not None:
        response.headers[paging.HEADER] = paging.encode(page.next_before)
    return page.jobs


@router.get("/jobs/{job_id}", response_model=JobOut, dependencies=[require("jobs:read")])
async def get_job(
    job_id: str,
    ctx: C,
    wait_seconds: Annotated[float, Query(alias="wait", ge=0, description="long-poll until the job changes")] = 0,
    state: Annotated[State | None, Query(description="with wait: answer once the job is not in this state")] = None,
) -> JobOut:
    """A job by id or unique prefix, with its estimated start while queued (``estimated_start``,
    ``estimate_basis``). With ``wait`` and ``state``, answers when the job leaves that state."""
    deadline = time.monotonic() + min(wait_seconds, ctx.settings.long_poll_max)
    while True:
        job = await ctx.store.get_job(job_id)
        ev = ctx.notifier.event(f"job:{job.id}")
        job = await ctx.store.get_job(job.id)
        if state is None or job.state != state or job.state == State.finished:
            return await _with_estimate(ctx, job)
        if not await wait_set(ev, deadline - time.monotonic()):
            return await _with_estimate(ctx, job)


@router.get("/jobs/{job_id}/attempts", response_model=list[AttemptOut], dependencies=[require("jobs:read")])
async def attempts(job_id: str, ctx: C) -> list[AttemptOut]:
    job = await ctx.store.get_job(job_id)
    return [
        AttemptOut(
            attempt=a.attempt, worker_id=a.worker_id, started_at=a.started_at, ended_at=a.ended_at, outcome=a.outcome
        )
        for a in await ctx.store.list_attempts(job.id)
    ]


@router.post("/jobs/{job_id}/cancel", response_model=Job, dependencies=[require("jobs:write")])
async def cancel(job_id: str, ctx: C) -> Job:
    """Cancel a queued or running job (its worker stops it at its next contact). A finished job is unchanged."""
    job = await ctx.store.cancel(job_id, ctx.now())
    ctx.notifier.changed(job.id)
    return job


@router.get("/jobs/{job_id}/logs", response_model=Logs, dependencies=[require("jobs:read")])
async def logs(
    job_id: str,
    ctx: C,
    attempt: Annotated[int | None, Query(ge=1, le=MAX_ID, description="default: the latest attempt")] = None,
    after: Annotated[int, Query(ge=0, le=MAX_ID, description="return chunks after this seq")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    wait_seconds: Annotated[float, Query(alias="wait", ge=0, description="long-poll for new output")] = 0,
) -> Logs:
    """Log chunks of one attempt; with ``wait``, answers as soon as there is more output or the job finished."""
    deadline = time.monotonic() + min(wait_seconds, ctx.settings.long_poll_max)
    job = await ctx.store.get_job(job_id)
    while True:
        ev = ctx.notifier.event(f"logs:{job.id}")
        ev_job = ctx.notifier.event(f"job:{job.id}")
        job = await ctx.store.get_job(job.id)
        number = attempt or job.attempt
        chunks = await ctx.store.read_logs(job.id, number, after, limit) if number else []
        if chunks or job.state == State.finished or time.monotonic() >= deadline:
            break
        # Wake on new output or on any change of the job (finished, requeued to another attempt).
        if not await wait_any((ev, ev_job), deadline - time.monotonic()):
            break
    lines = [LogLine(seq=c.seq, stream=c.stream, data=c.data.decode("utf-8", "replace"), at=c.at) for c in chunks]
    _, dropped = await ctx.store.log_counts(job.id, number) if number else (0, 0)
    return Logs(
        job_id=job.id,
        attempt=number or 0,
        state=job.state,
        chunks=lines,
        next=lines[-1].seq if lines else after,
        dropped=dropped,
    )


@router.get("/jobs/{job_id}/outputs", response_model=list[OutputOut], dependencies=[require("jobs:read")])
async def outputs(job_id: str, ctx: C) -> list[OutputOut]:
    job = await ctx.store.get_job(job_id)
    return [OutputOut(path=o.path, sha256=o.sha256, size=o.size) for o in await ctx.store.list_outputs(job.id)]


@router.get("/jobs/{job_id}/outputs/{path:path}", dependencies=[require("jobs:read")])
async def output_file(job_id: str, path: str, ctx: C) -> Response:
    job = await ctx.store.get_job(job_id)
    for o in await ctx.store.list_outputs(job.id):
        if o.path == path:
            return await stream_blob(ctx.store, o.sha256)
    raise NotFound(f"job {job.id[:12]} has no output {path!r}")


@router.get("/queues", response_model=list[QueueOut], dependencies=[require("view")])
async def queues(ctx: C) -> list[QueueOut]:
    now = ctx.now()
    return [
        QueueOut(
            name=q.queue,
            queued=q.queued,
            running=q.running,
            finished=q.finished,
            succeeded=q.succeeded,
            unsuccessful=q.unsuccessful,
            oldest_queued_age=None if q.oldest_queued_at is None else max(0.0, now - q.oldest_queued_at),
        )
        for q in await ctx.store.queue_stats()
    ]
