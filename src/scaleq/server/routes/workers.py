"""The worker protocol: register, claim (long-poll, finishes riding along), heartbeat, finish, logs, outputs.

Every call about a running job presents the attempt's lease token; a stale one is answered 409 and the worker
abandons that attempt. One heartbeat renews all of a worker's leases and tells it which of its leases are still
live, so a cancelled job stops at the worker's next contact.

A worker token acts only on what it owns: a worker id is bound to the token that registered it (until the worker
is gone), and a worker token may claim, heartbeat, drain or deregister only its own workers, finish, release or
upload for their leases only, and read only the input blobs of the jobs they hold (403 otherwise). A token shared
by several workers (one per group is the default) owns all of them. An admin token acts on any worker.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, Field, field_validator

from scaleq.jobs import MAX_SIZE, Claim, Job, RuntimeKind, State, Worker, validate_queue_name
from scaleq.server import metrics, outputs
from scaleq.server.auth import Caller, WorkerCaller, require
from scaleq.server.liveness import OpenClaims
from scaleq.server.longpoll import LongPoll
from scaleq.server.routes.common import C, Ctx
from scaleq.store.base import FinishResult, NotFound, StaleLease

router = APIRouter(tags=["workers"])


class Registration(BaseModel):
    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
    queue: str
    group: str | None = None
    slots: int = Field(ge=1, le=1024)
    runtimes: list[RuntimeKind]
    cpus: float = Field(gt=0, le=1_000_000)
    memory: int | None = Field(default=None, ge=0, le=MAX_SIZE)
    gpus: int = Field(default=0, ge=0, le=1_000_000)
    tags: list[str] = Field(default_factory=list, max_length=1000)
    host_network: bool = False
    hostname: str = Field(default="", max_length=255)

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        return validate_queue_name(v)

    @field_validator("group", "hostname", "tags")
    @classmethod
    def _text(cls, v: str | list[str] | None) -> str | list[str] | None:
        for text in [v] if isinstance(v, str) else v or []:
            if len(text) > 255 or any(ord(ch) < 32 for ch in text):
                raise ValueError("must be at most 255 characters, without control characters")
        return v


class Registered(BaseModel):
    lease_seconds: float
    heartbeat_seconds: float
    long_poll_max: float
    claim_is_heartbeat: bool = Field(
        default=True,
        description="an open claim keeps the worker alive: while idle with a claim parked it need not heartbeat "
        "(it still must while it holds leases: only a heartbeat renews them)",
    )


class FinishBody(BaseModel):
    lease: str
    reason: Literal["success", "failed", "timed_out", "cancelled"]
    exit_code: int | None = Field(default=None, ge=-(2**31), le=2**32 - 1, description="a process's exit status")
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
    heartbeat_seconds: float | None = Field(
        default=None,
        description="beat every this many seconds while holding the leases claimed: the grid's cadence, which the "
        "leases' term is three of",
    )


class Beat(BaseModel):
    state: str
    leases: list[str]
    heartbeat_seconds: float | None = Field(
        default=None, description="beat every this many seconds from now on: the grid's cadence (it slows as it grows)"
    )


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
    #: Bytes of output the worker did not send because the log is capped (counted, never stored).
    dropped: int = Field(default=0, ge=0, le=1 << 62)


class LeaseBody(BaseModel):
    lease: str


class AttemptRef(BaseModel):
    job_id: str = Field(max_length=64)
    attempt: int = Field(ge=1, le=2**31 - 1)


class AttemptRefs(BaseModel):
    attempts: list[AttemptRef] = Field(max_length=1000)


class EndedAttempts(BaseModel):
    ended: list[AttemptRef]


class ReleaseBody(LeaseBody):
    reason: Literal["released", "preempted"] = Field(
        default="released",
        description="why the job is handed back, recorded as the attempt's outcome: the worker stopped by force "
        "(released), or its machine is being preempted or evicted (preempted)",
    )


class ReleaseWorkerBody(BaseModel):
    reason: Literal["preempted"] = Field(
        default="preempted", description="the worker's provider reports it preempted (spot VM, evicted pod)"
    )


class Released(BaseModel):
    jobs: list[str] = Field(description="ids of the jobs handed back to their queues")


async def _own_worker(ctx: Ctx, who: Caller, worker_id: str) -> None:
    """A worker token acts only on the workers registered with it; an admin token on any."""
    if who.role == "admin":
        return
    cache = ctx.request.app.state.tokens
    if cache.bound(worker_id, who.token_id):
        return
    owner = await ctx.store.worker_token(worker_id)
    if owner is None:  # also a worker registered before workers were bound: its 404 makes it register again
        raise NotFound(f"no worker {worker_id} registered with this token: register it first")
    if owner != who.token_id:
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"worker {worker_id} was registered with another token: a worker token acts only on its own workers",
        )
    cache.put_bound(worker_id, who.token_id)


async def _foreign_leases(ctx: Ctx, who: Caller, leases: list[str]) -> set[str]:
    """The leases of workers bound to another token (none for an admin). Unknown leases are left to the store. The
    leases this server handed to this token are known without a read (:class:`scaleq.server.auth.TokenCache`)."""
    if who.role == "admin" or not leases:
        return set()
    cache = ctx.request.app.state.tokens
    unknown = [lease for lease in leases if not cache.lease_bound(lease, who.token_id)]
    if not unknown:
        return set()
    owners = await ctx.store.lease_tokens(unknown)
    return {lease for lease, token in owners.items() if token is not None and token != who.token_id}


async def _own_lease(ctx: Ctx, who: Caller, lease: str) -> None:
    if await _foreign_leases(ctx, who, [lease]):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            "this lease belongs to a worker registered with another token: a worker token acts only on its own leases",
        )


@router.post("/workers", response_model=Registered)
async def register(body: Registration, ctx: C, who: WorkerCaller) -> Registered:
    """Register (or register again) a worker. Its id is bound to this token until the worker is gone."""
    if not await ctx.store.bind_worker(body.id, who.token_id) and who.role != "admin":
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"worker id {body.id} is a live worker registered with another token: give this worker another id "
            "(or wait until that one is gone)",
        )
    ctx.request.app.state.tokens.put_bound(body.id, who.token_id)
    ctx.request.app.state.open_claims.forget(body.id)  # its queue or capabilities may have changed
    now = ctx.now()
    await ctx.store.register_worker(Worker(started_at=now, last_heartbeat=now, **body.model_dump()), now)
    ctx.notifier.notify("any")
    s = ctx.settings
    return Registered(
        # the settings' beat, not the cadence's: a worker from before the cadence keeps the beat it registered with
        # for good, and a lease granted once the fleet has shrunk lasts only the settings' term (a newer worker
        # learns the cadence from its claims' and heartbeats' answers)
        lease_seconds=s.lease_seconds,
        heartbeat_seconds=s.heartbeat_seconds,
        long_poll_max=s.long_poll_max,
    )


@router.get("/workers", response_model=list[Worker], dependencies=[require("workers:read")])
async def list_workers(ctx: C, queue: str | None = None, all: bool = False) -> list[Worker]:
    return await ctx.store.list_workers(queue=queue, include_gone=all)


def _finished(ctx: Ctx, job: Job, now: float) -> None:
    """After a finish: count it, and wake those waiting on the job — and on its queue when it was queued again for
    a retry."""
    metrics.observe_finished(ctx.request.app, job, now)
    if job.state == State.queued:
        ctx.notifier.submitted(job.queue, job.id)
    else:
        ctx.notifier.changed(job.id)


async def _finish(ctx: Ctx, body: FinishBody) -> Job:
    now = ctx.now()
    job = await ctx.store.finish(body.lease, FinishResult(body.reason, body.exit_code, body.error), now)
    _finished(ctx, job, now)
    return job


@router.post("/workers/{worker_id}/claim", response_model=Claimed)
async def claim(worker_id: str, body: ClaimBody, ctx: C, request: Request, who: WorkerCaller) -> Claimed:
    """Finish what rides along, then return up to ``max`` jobs as soon as any is runnable (or none after ``wait``;
    at once when results rode along). While the claim is open it counts as the worker's heartbeat
    (:mod:`scaleq.server.liveness`)."""
    await _own_worker(ctx, who, worker_id)
    open_claims: OpenClaims = request.app.state.open_claims
    with open_claims.parked(worker_id):
        return await _claim(worker_id, body, ctx, request, who, open_claims)


async def _claim(
    worker_id: str, body: ClaimBody, ctx: Ctx, request: Request, who: Caller, open_claims: OpenClaims
) -> Claimed:
    foreign = await _foreign_leases(ctx, who, [f.lease for f in body.finishes])
    mine = [f for f in body.finishes if f.lease not in foreign]
    # The finishes and the first try are one store operation (one statement on PostgreSQL); the long-poll around it
    # is scaleq.server.longpoll's.
    poll = LongPoll(ctx, open_claims, request, worker_id, body.max, body.wait)
    try:
        now = ctx.now()
        results = [(f.lease, FinishResult(f.reason, f.exit_code, f.error)) for f in mine]
        got = await poll.first(now, results, carrying=bool(body.finishes))
        finished = _outcomes(
            ctx, body.finishes, foreign, dict(zip([f.lease for f in mine], got.finished, strict=True)), now
        )
        request.app.state.tokens.drop_leases([f.lease for f in mine])
        open_claims.remember(worker_id, got.queue)
        # With results riding along and nothing to hand out, answer at once: until the answer the worker must keep
        # renewing those leases (it cannot know they are in), so a parked claim would cost it a heartbeat every
        # heartbeat_seconds for a whole long-poll; its next claim, without them, parks as an idle worker's does.
        if not body.finishes:
            got = await poll.park(got)
    finally:
        poll.close()
    if got.claims:
        ctx.cadence.claimed(len(got.claims))
        request.app.state.tokens.put_leases([c.lease for c in got.claims], worker_id)
        metrics.observe_claimed(request.app, got.claims)
        for c in got.claims:
            ctx.notifier.changed(c.job.id)
    return Claimed(claims=got.claims, finished=finished, state=got.state, heartbeat_seconds=poll.beat)


def _outcomes(
    ctx: Ctx, finishes: list[FinishBody], foreign: set[str], done: dict[str, Job | None], now: float
) -> list[FinishOutcome]:
    """Per result that rode along, whether it landed (``done``: the store's answer for the worker's own leases)."""
    outcomes = []
    for f in finishes:
        if f.lease in foreign:
            outcomes.append(
                FinishOutcome(lease=f.lease, ok=False, detail="this lease belongs to another token's worker")
            )
            continue
        job = done[f.lease]
        if job is None:
            outcomes.append(FinishOutcome(lease=f.lease, ok=False, detail="this attempt no longer owns its job"))
            continue
        _finished(ctx, job, now)
        outcomes.append(FinishOutcome(lease=f.lease, ok=True))
    return outcomes


@router.post("/workers/{worker_id}/heartbeat", response_model=Beat)
async def heartbeat(worker_id: str, ctx: C, who: WorkerCaller, body: BeatBody | None = None) -> Beat:
    """Renew all of the worker's leases; the answer lists those still live."""
    await _own_worker(ctx, who, worker_id)
    if body is not None and body.draining:
        await ctx.store.set_worker_state(worker_id, "draining")
        ctx.notifier.notify(f"worker:{worker_id}", "any")
    held = body.leases if body is not None else None
    beat, term = ctx.cadence.heartbeat_seconds, ctx.cadence.lease_seconds  # one pair: the term is three of the beat
    state, leases = await ctx.store.heartbeat(worker_id, ctx.now(), term, held)
    return Beat(state=state, leases=sorted(leases), heartbeat_seconds=beat)


@router.post("/workers/{worker_id}/drain", response_model=Worker, dependencies=[require("admin")])
async def drain(worker_id: str, ctx: C) -> Worker:
    """Ask a worker to take no new jobs and exit once its running jobs are done."""
    await ctx.store.get_worker(worker_id)
    await ctx.store.set_worker_state(worker_id, "draining")
    ctx.notifier.notify(f"worker:{worker_id}", "any")
    return await ctx.store.get_worker(worker_id)


@router.post("/workers/{worker_id}/ended-attempts", response_model=EndedAttempts)
async def ended_attempts(worker_id: str, body: AttemptRefs, ctx: C, who: WorkerCaller) -> EndedAttempts:
    """Of the attempts a worker found on its engine, left there by other workers, those this server knows and has
    ended (lease lost, cancelled, released, finished): their runs are garbage, and the worker removes them. An attempt
    this server does not know is not answered (it may belong to another grid sharing the engine)."""
    await _own_worker(ctx, who, worker_id)
    ended = []
    for job_id in sorted({a.job_id for a in body.attempts}):
        over = {a.attempt for a in await ctx.store.list_attempts(job_id) if a.ended_at is not None}
        ended += [a for a in body.attempts if a.job_id == job_id and a.attempt in over]
    return EndedAttempts(ended=ended)


@router.delete("/workers/{worker_id}", status_code=204)
async def deregister(worker_id: str, ctx: C, who: WorkerCaller) -> Response:
    """A worker leaving: it is marked gone (kept a while for the record)."""
    await ctx.store.get_worker(worker_id)
    await _own_worker(ctx, who, worker_id)
    await ctx.store.set_worker_state(worker_id, "gone")
    ctx.request.app.state.open_claims.forget(worker_id)
    ctx.request.app.state.tokens.unbind(worker_id)
    ctx.notifier.notify("any")
    return Response(status_code=204)


@router.post("/leases/finish", response_model=Job)
async def finish(body: FinishBody, ctx: C, who: WorkerCaller) -> Job:
    """Record an attempt's result. Repeating the same finish is harmless; a stale lease gets 409."""
    await _own_lease(ctx, who, body.lease)
    job = await _finish(ctx, body)
    ctx.request.app.state.tokens.drop_leases([body.lease])
    return job


@router.post("/leases/release", response_model=Job | None)
async def release(body: ReleaseBody, ctx: C, who: WorkerCaller) -> Job | None:
    """Hand a job back to its queue without counting the attempt: a worker stopped by force, or on its provider's
    preemption notice (``reason`` preempted, recorded as the attempt's outcome and as an event of its group)."""
    await _own_lease(ctx, who, body.lease)
    worker = await _lease_worker(ctx, body.lease) if body.reason == "preempted" else None
    now = ctx.now()
    job = await ctx.store.release(body.lease, now, body.reason)
    ctx.request.app.state.tokens.drop_leases([body.lease])
    if job is not None:
        ctx.notifier.submitted(job.queue, job.id)
        if worker is not None and worker.group:
            reason = f"worker {worker.id} is being preempted: job {job.id[:12]} handed back, no attempt spent"
            await ctx.store.record_event(worker.group, "preempted", None, None, reason, now)
    return job


async def _lease_worker(ctx: Ctx, lease: str) -> Worker | None:
    """The worker a live lease was handed to (None once it is not live, or the worker is forgotten)."""
    try:
        job_id, attempt = await ctx.store.check_lease(lease)
        worker_id = next(a.worker_id for a in await ctx.store.list_attempts(job_id) if a.attempt == attempt)
        return await ctx.store.get_worker(worker_id)
    except (StaleLease, NotFound, StopIteration):
        return None


@router.post("/workers/{worker_id}/release", response_model=Released, dependencies=[require("admin")])
async def release_worker(worker_id: str, ctx: C, body: ReleaseWorkerBody | None = None) -> Released:
    """Hand every running job of a worker back to its queue without spending an attempt, the attempts ending
    ``preempted``: the controller's call when the worker's provider reports it preempted or evicted (its jobs would
    otherwise wait for their leases to expire, and each count as lost)."""
    reason = (body or ReleaseWorkerBody()).reason
    await ctx.store.get_worker(worker_id)
    released = await ctx.store.release_worker(worker_id, ctx.now(), reason)
    for r in released:
        ctx.notifier.submitted(r.queue, r.job_id)
    if released:
        ctx.notifier.notify("any")
    return Released(jobs=[r.job_id for r in released])


@router.post("/leases/logs", status_code=204)
async def append_logs(body: LogsBody, ctx: C, who: WorkerCaller) -> Response:
    """Append to the attempt's log, up to the per-attempt cap (``max_log_bytes``): past it the head is kept, a note
    marks the cut and the bytes are counted as dropped; the answer's ``X-Scaleq-Log-Capped: 1`` tells the worker to
    stop sending (it then reports only how much more it dropped, in ``dropped``)."""
    await _own_lease(ctx, who, body.lease)
    chunks: list[tuple[str, bytes]] = []
    for n, c in enumerate(body.chunks):
        try:
            chunks.append((c.stream, base64.b64decode(c.data, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                [{"loc": ["body", "chunks", n, "data"], "msg": "is not base64", "type": "value_error"}],
            ) from exc
    done = await ctx.store.append_capped_logs(
        body.lease, chunks, ctx.now(), cap=ctx.settings.max_log_bytes, dropped=body.dropped
    )
    ctx.notifier.notify(f"logs:{done.job_id}")
    return Response(status_code=204, headers={"X-Scaleq-Log-Capped": "1"} if done.capped else None)


# (no body limit of its own: the route counts what arrives against max_output_bytes as it streams it to disk)
@router.post("/leases/outputs", status_code=204, max_body_size=1 << 40)
async def put_outputs(
    request: Request, ctx: C, who: WorkerCaller, lease: Annotated[str, Header(alias="X-Scaleq-Lease")]
) -> Response:
    """The attempt's ``/outputs`` as a tar archive (regular files and hard links to them are kept), checked against
    ``max_output_bytes`` as it is expanded and stored by parts (:mod:`scaleq.server.outputs`)."""
    await ctx.store.check_lease(lease)
    await _own_lease(ctx, who, lease)
    s = ctx.settings
    try:
        await outputs.receive_outputs(
            request, ctx.store, lease, limit=s.max_output_bytes, max_files=s.max_output_files, spool_dir=s.spool_dir
        )
    except outputs.OutputsRefused as exc:
        raise HTTPException(exc.status, str(exc)) from exc
    return Response(status_code=204)


@router.get("/blobs/{sha256}")
async def blob(sha256: str, ctx: C, who: WorkerCaller) -> Response:
    """Bytes of an input file, by content hash: to a worker token, only the inputs of the jobs its workers hold."""
    if who.role != "admin" and not await ctx.store.holds_input(who.token_id, sha256):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, "a worker token reads only the inputs of the jobs its workers hold"
        )
    return await outputs.stream_blob(ctx.store, sha256)
