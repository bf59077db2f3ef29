"""Arrays (the jobs of one ``submit-many``, as one thing) and cost (worker-seconds and money).

An array's progress is one grouped count of its jobs by state and reason (the index ``jobs_array``), so reading an
array of 100,000 jobs costs what reading one of ten does, apart from the count itself. Cancel and rerun are one
statement each over the array's jobs.

Cost is worker-seconds, and money where the group has a ``price_per_hour`` (the grid file's, recorded with the
group's status): per group and per queue, the lives of the workers (registration to last heartbeat, from the
store's ledger, so gone and forgotten workers still count); per array and per job, each attempt's run time times
its share of its worker (the larger of one slot and the job's cpus over the worker's, at most the whole worker),
priced at its worker's group. Idle time is in the first and not the second.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from scaleq.loop import wait_set
from scaleq.server.auth import require
from scaleq.server.routes.common import C, Ctx
from scaleq.store.base import ArrayStatus, Usage

router = APIRouter(tags=["arrays"])


class CostOut(BaseModel):
    worker_seconds: float
    cost: float | None = Field(description="money, at the groups' price_per_hour; None when none has a price")
    unpriced_worker_seconds: float = Field(description="worker-seconds on groups without a price (not in cost)")


class ArrayOut(BaseModel):
    id: str
    queue: str
    name: str | None
    size: int
    created_at: float
    submitted: int = Field(description="jobs of the array the server holds (size, unless a submit was cut short)")
    queued: int
    running: int
    succeeded: int
    failed: int
    other: dict[str, int] = Field(description="finished for another reason: cancelled, timed_out, worker_lost")
    done: int = Field(description="finished, for any reason")
    percent: float = Field(description="done / size, in percent")
    cost: CostOut | None = None


class UsageOut(BaseModel):
    key: str | None = Field(description="the group, queue or array id (None: workers of no group)")
    group: str | None
    worker_seconds: float
    price_per_hour: float | None
    cost: float | None


async def _prices(ctx: Ctx) -> dict[str, float | None]:
    return {g.name: g.price_per_hour for g in await ctx.store.list_groups()}


def _cost(usage: list[Usage], prices: dict[str, float | None]) -> CostOut:
    priced = [(u, prices.get(u.group or "")) for u in usage]
    money = [u.worker_seconds * p / 3600 for u, p in priced if p is not None]
    return CostOut(
        worker_seconds=sum(u.worker_seconds for u in usage),
        cost=sum(money) if money else None,
        unpriced_worker_seconds=sum(u.worker_seconds for u, p in priced if p is None),
    )


def _out(a: ArrayStatus, cost: CostOut | None = None) -> ArrayOut:
    finished = dict(a.finished)
    succeeded, failed = finished.pop("success", 0), finished.pop("failed", 0)
    return ArrayOut(
        id=a.array.id,
        queue=a.array.queue,
        name=a.array.name,
        size=a.array.size,
        created_at=a.array.created_at,
        submitted=a.queued + a.running + a.done,
        queued=a.queued,
        running=a.running,
        succeeded=succeeded,
        failed=failed,
        other=finished,
        done=a.done,
        percent=round(100 * a.done / a.array.size, 2) if a.array.size else 100.0,
        cost=cost,
    )


@router.get("/arrays", response_model=list[ArrayOut], dependencies=[require("jobs:read")])
async def list_arrays(
    ctx: C, queue: str | None = None, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
) -> list[ArrayOut]:
    """Newest first, each with its progress; with its cost too (one query for all of them)."""
    found = await ctx.store.list_arrays(queue=queue, limit=limit)
    if not found:
        return []
    usage: dict[str | None, list[Usage]] = {}
    for u in await ctx.store.usage("array", 0.0, ctx.now()):
        usage.setdefault(u.key, []).append(u)
    prices = await _prices(ctx)
    return [_out(a, _cost(usage.get(a.array.id, []), prices)) for a in found]


def _progress(a: ArrayStatus) -> str:
    return f"{a.queued}/{a.running}/{a.done}"


@router.get("/arrays/{array_id}", response_model=ArrayOut, dependencies=[require("jobs:read")])
async def get_array(
    array_id: str,
    ctx: C,
    wait_seconds: Annotated[float, Query(alias="wait", ge=0, description="long-poll until the progress moves")] = 0,
    seen: Annotated[
        str | None, Query(max_length=100, description="with wait: the progress last seen, as queued/running/done")
    ] = None,
) -> ArrayOut:
    """An array by id or unique prefix, with its progress and cost. With ``wait`` and ``seen``, answers once the
    progress differs from ``seen`` (or after ``wait`` seconds)."""
    deadline = time.monotonic() + min(wait_seconds, ctx.settings.long_poll_max)
    while True:
        ev = ctx.notifier.event("any")  # taken before the read: no change between the two is missed
        a = await ctx.store.get_array(array_id)
        if seen is None or _progress(a) != seen or not await wait_set(ev, deadline - time.monotonic()):
            break
    usage = await ctx.store.usage("array", 0.0, ctx.now(), key=a.array.id)
    return _out(a, _cost(usage, await _prices(ctx)))


@router.post("/arrays/{array_id}/cancel", response_model=ArrayOut, dependencies=[require("jobs:write")])
async def cancel_array(array_id: str, ctx: C) -> ArrayOut:
    """Cancel every unfinished job of the array (running ones are stopped by their workers)."""
    a, cancelled = await ctx.store.cancel_array(array_id, ctx.now())
    for job_id, _ in cancelled:
        ctx.notifier.changed(job_id)
    return _out(a)


@router.post("/arrays/{array_id}/rerun", response_model=ArrayOut, dependencies=[require("jobs:write")])
async def rerun_array(
    array_id: str,
    ctx: C,
    failed: Annotated[bool, Query(description="only the jobs that did not succeed")] = False,
) -> ArrayOut:
    """Queue the array's finished jobs again (a new attempt each), in the array's order."""
    a, queued = await ctx.store.rerun_array(array_id, failed, ctx.now())
    for job_id, queue in queued:
        ctx.notifier.submitted(queue, job_id)
    return _out(a)


@router.get("/cost", response_model=list[UsageOut], dependencies=[require("grid:read")])
async def cost(
    ctx: C,
    by: Literal["group", "queue", "array"] = "group",
    since: Annotated[float, Query(ge=0, description="only time after this (seconds since the epoch)")] = 0.0,
) -> list[UsageOut]:
    """Worker-seconds and money per group, queue or array (per group within it) since ``since``."""
    prices = await _prices(ctx)
    out = []
    for u in await ctx.store.usage(by, since, ctx.now()):
        price = prices.get(u.group or "")
        cost = None if price is None else u.worker_seconds * price / 3600
        out.append(UsageOut(key=u.key, group=u.group, worker_seconds=u.worker_seconds, price_per_hour=price, cost=cost))
    return out
