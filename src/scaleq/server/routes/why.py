"""Why a job waits, runs or finished as it did: ``GET /jobs/{id}/why`` (see :mod:`scaleq.server.why`)."""

from __future__ import annotations

from fastapi import APIRouter

from scaleq.server.auth import require
from scaleq.server.estimates import estimate_start
from scaleq.server.routes.common import C
from scaleq.server.why import Why, explain

router = APIRouter(tags=["jobs"])


@router.get("/jobs/{job_id}/why", response_model=Why, dependencies=[require("jobs:read")])
async def why(job_id: str, ctx: C) -> Why:
    """The chain of reasons for a job (id or unique prefix): for a queued one, its place in its queue, what serves
    the queue, what each group that could run it is doing and when it should start (:mod:`scaleq.eta`); for one
    that ran, its attempts explained."""
    job = await ctx.store.get_job(job_id)
    answer = await explain(ctx.store, ctx.request.app.state.runnable.groups, job, ctx.now())
    est = await estimate_start(
        ctx.store, ctx.request.app.state.runnable.groups, job, ctx.now()
    )  # None unless queued; at None: cannot be told, basis says why
    if est is not None:
        answer = answer.model_copy(update={"estimated_start": est.at, "estimate_basis": est.basis})
    return answer
