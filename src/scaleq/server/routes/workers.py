"""The worker protocol: register, claim (long-poll, finishes riding along), heartbeat, finish, logs, outputs.

Every call about a running job presents the attempt's lease token; a stale one is answered 409 and the worker
abandons that attempt. One heartbeat renews all of a worker's leases and tells it which of its leases are still
live, so a cancelled job stops at the worker's next contact.
"""

from __future__ import annotations

import base64
import io
import tarfile
import time
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from scaleq.jobs import Claim, Job, RuntimeKind, Worker
from scaleq.server import metrics
from scaleq.server.auth import require
from scaleq.server.notify import wait_any
from scaleq.server.routes.common import C, Ctx
from scaleq.store.base import FinishResult

router = APIRouter(tags=["workers"])
MAX_OUTPUT_BYTES = 256 * 1024 * 1024


class Registration(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    queue: str
    group: str | None = None
    slots: int = Field(ge=1, le=1024)
    runtimes: list[RuntimeKind]
    cpus: float = Field(gt=0)
    memory: int | None = None
    gpus: int = Field(default=0, ge=0)
    tags: list[str] = Field(default_factory=list)
    host_network: bool = False
    hostname: str = ""


class Registered(BaseModel):
    lease_seconds: float
    heartbeat_seconds: float
    long_poll_max: float


class FinishBody(BaseModel):
    lease: str
    reason: Literal["success", "failed", "timed_out", "cancelled"]
    exit_code: int | None = None
    error: str | None = Field(default=None, max_length=10_000)


class FinishOutcome(BaseModel):
    lease: str
    ok: bool
    detail: str | None = None


class ClaimBody(BaseModel):
    max: int = Field(default=1, ge=0, le=1024, description="free slots: at most this many jobs")
    wait: float = Field(default=20.0, ge=0, description="seconds to hold the call open while nothing is runnable")
    finishes: list[FinishBody] = Field(default_factory=list, description="results riding along")


class Claimed(BaseModel):
    claims: list[Claim]
    finished: list[FinishOutcome]
    state: str


class Beat(BaseModel):
    state: str
    leases: list[str]


class BeatBody(BaseModel):
    draining: bool = Field(default=False, description="the worker is draining: end its parked claim")
    leases: list[str] | None = Field(
        default=None,
        description="the leases the worker holds (running, or result not yet delivered): only these are renewed; "
        "a lease it does not list expires, and its job goes back to the queue. Omitted: all of them",
    )


class LogChunkIn(BaseModel):
    stream: Literal["stdout", "stderr", "system"]
    data: str = Field(description="base64")


class LogsBody(BaseModel):
    lease: str
    chunks: list[LogChunkIn] = Field(max_length=10_000)


class LeaseBody(BaseModel):
    lease: str


class AttemptRef(BaseModel):
    job_id: str = Field(max_length=64)
    attempt: int = Field(ge=1, le=2**31 - 1)


class AttemptRefs(BaseModel):
    attempts: list[AttemptRef] = Field(max_length=1000)


class EndedAttempts(BaseModel):
    ended: list[AttemptRef]


@router.post("/workers", response_model=Registered, dependencies=[require("worker")])
async def register(body: Registration, ctx: C) -> Registered:
    now = ctx.now()
    await ctx.store.register_worker(Worker(started_at=now, last_heartbeat=now, **body.model_dump()), now)
    ctx.notifier.notify("any")
    s = ctx.settings
    return Registered(
        lease_seconds=s.lease_seconds, heartbeat_seconds=s.heartbeat_seconds, long_poll_max=s.long_poll_max
    )


@router.get("/workers", response_model=list[Worker], dependencies=[require("view")])
async def list_workers(ctx: C, queue: str | None = None, all: bool = False) -> list[Worker]:
    return await ctx.store.list_workers(queue=queue, include_gone=all)


async def _finish(ctx: Ctx, body: FinishBody) -> Job:
    now = ctx.now()
    job = await ctx.store.finish(body.lease, FinishResult(body.reason, body.exit_code, body.error), now)
    metrics.observe_finished(ctx.request.app, job, now)
    ctx.notifier.changed(job.id)
    return job


@router.post("/workers/{worker_id}/claim", response_model=Claimed, dependencies=[require("worker")])
async def claim(worker_id: str, body: ClaimBody, ctx: C, request: Request) -> Claimed:
    """Finish what rides along, then return up to ``max`` jobs as soon as any is runnable (or none after ``wait``)."""
    # The finishes and the first claim are one store operation (one statement on PostgreSQL). That first try goes
    # without taking the wake-up events (the queue is not known yet): only when it finds nothing are they taken,
    # and the claim tried again before waiting, so that a submit in between is not missed.
    deadline = time.monotonic() + min(body.wait, ctx.settings.long_poll_max)
    now = ctx.now()
    results = [(f.lease, FinishResult(f.reason, f.exit_code, f.error)) for f in body.finishes]
    got = await ctx.store.worker_claim(worker_id, body.max, now, ctx.settings.lease_seconds, finishes=results)
    finished = []
    for f, job in zip(body.finishes, got.finished, strict=True):
        if job is None:
            finished.append(FinishOutcome(lease=f.lease, ok=False, detail="this attempt no longer owns its job"))
            continue
        metrics.observe_finished(request.app, job, now)
        ctx.notifier.changed(job.id)
        finished.append(FinishOutcome(lease=f.lease, ok=True))
    while not got.claims and got.state == "active" and body.max > 0 and time.monotonic() < deadline:
        ev = ctx.notifier.event(f"queue:{got.queue}")
        ev_worker = ctx.notifier.event(f"worker:{worker_id}")
        if await request.is_disconnected():
            break
        got = await ctx.store.worker_claim(worker_id, body.max, ctx.now(), ctx.settings.lease_seconds)
        if got.claims or got.state != "active":
            break
        if not await wait_any((ev, ev_worker), deadline - time.monotonic()):
            break
    if got.claims:
        metrics.observe_claimed(request.app, got.claims)
        for c in got.claims:
            ctx.notifier.changed(c.job.id)
    return Claimed(claims=got.claims, finished=finished, state=got.state)


@router.post("/workers/{worker_id}/heartbeat", response_model=Beat, dependencies=[require("worker")])
async def heartbeat(worker_id: str, ctx: C, body: BeatBody | None = None) -> Beat:
    """Renew all of the worker's leases; the answer lists those still live."""
    if body is not None and body.draining:
        await ctx.store.set_worker_state(worker_id, "draining")
        ctx.notifier.notify(f"worker:{worker_id}", "any")
    held = body.leases if body is not None else None
    state, leases = await ctx.store.heartbeat(worker_id, ctx.now(), ctx.settings.lease_seconds, held)
    return Beat(state=state, leases=sorted(leases))


@router.post("/workers/{worker_id}/drain", response_model=Worker, dependencies=[require("admin")])
async def drain(worker_id: str, ctx: C) -> Worker:
    """Ask a worker to take no new jobs and exit once its running jobs are done."""
    await ctx.store.get_worker(worker_id)
    await ctx.store.set_worker_state(worker_id, "draining")
    ctx.notifier.notify(f"worker:{worker_id}", "any")
    return await ctx.store.get_worker(worker_id)


@router.post("/workers/{worker_id}/ended-attempts", response_model=EndedAttempts, dependencies=[require("worker")])
async def ended_attempts(worker_id: str, body: AttemptRefs, ctx: C) -> EndedAttempts:
    """Of the attempts a worker found on its engine, left there by other workers, those this server knows and has
    ended (lease lost, cancelled, released, finished): their runs are garbage, and the worker removes them. An attempt
    this server does not know is not answered (it may belong to another grid sharing the engine)."""
    ended = []
    for job_id in sorted({a.job_id for a in body.attempts}):
        over = {a.attempt for a in await ctx.store.list_attempts(job_id) if a.ended_at is not None}
        ended += [a for a in body.attempts if a.job_id == job_id and a.attempt in over]
    return EndedAttempts(ended=ended)


@router.delete("/workers/{worker_id}", status_code=204, dependencies=[require("worker")])
async def deregister(worker_id: str, ctx: C) -> Response:
    """A worker leaving: it is marked gone (kept a while for the record)."""
    await ctx.store.get_worker(worker_id)
    await ctx.store.set_worker_state(worker_id, "gone")
    ctx.notifier.notify("any")
    return Response(status_code=204)


@router.post("/leases/finish", response_model=Job, dependencies=[require("worker")])
async def finish(body: FinishBody, ctx: C) -> Job:
    """Record an attempt's result. Repeating the same finish is harmless; a stale lease gets 409."""
    return await _finish(ctx, body)


@router.post("/leases/release", response_model=Job | None, dependencies=[require("worker")])
async def release(body: LeaseBody, ctx: C) -> Job | None:
    """Hand a job back to its queue without counting the attempt (a worker draining by force)."""
    job = await ctx.store.release(body.lease, ctx.now())
    if job is not None:
        ctx.notifier.submitted(job.queue, job.id)
    return job


@router.post("/leases/logs", status_code=204, dependencies=[require("worker")])
async def append_logs(body: LogsBody, ctx: C) -> Response:
    chunks = [(c.stream, base64.b64decode(c.data)) for c in body.chunks]
    job_id = await ctx.store.append_logs(body.lease, chunks, ctx.now())
    ctx.notifier.notify(f"logs:{job_id}")
    return Response(status_code=204)


@router.post(
    "/leases/outputs", status_code=204, dependencies=[require("worker")], max_body_size=MAX_OUTPUT_BYTES + (1 << 20)
)
async def put_outputs(request: Request, ctx: C, lease: Annotated[str, Header(alias="X-Scaleq-Lease")]) -> Response:
    """The attempt's ``/outputs`` as a tar archive (regular files only are kept)."""
    await ctx.store.check_lease(lease)
    body = await request.body()
    if len(body) > MAX_OUTPUT_BYTES:
        raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, f"outputs over {MAX_OUTPUT_BYTES} bytes")
    files: list[tuple[str, bytes]] = []
    try:
        with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
            for member in tar:
                name = member.name.lstrip("./")
                if member.isfile() and name and ".." not in name.split("/"):
                    f = tar.extractfile(member)
                    files.append((name, f.read() if f else b""))
    except tarfile.TarError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"outputs are not a tar archive: {exc}") from exc
    await ctx.store.put_outputs(lease, files)
    return Response(status_code=204)


@router.get("/blobs/{sha256}", dependencies=[require("worker")])
async def blob(sha256: str, ctx: C) -> Response:
    """Bytes of an input file, by content hash."""
    return Response(await ctx.store.get_blob(sha256), media_type="application/octet-stream")
