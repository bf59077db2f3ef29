"""Scaling records and signals: groups, events, and the demand of a group as the server counts it.

The demand endpoint is what a remote ``scaleq autoscale`` reads; it long-polls (``wait``) so a submit reaches a
remote controller as fast as an embedded one. Groups and events are written by whichever controller runs.
"""

from __future__ import annotations

import time
from typing import Annotated, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from scaleq.jobs import Capabilities
from scaleq.notify import wait
from scaleq.server.auth import require
from scaleq.server.routes.common import C
from scaleq.store.base import GroupStatus

router = APIRouter(tags=["scaling"])


class GroupOut(BaseModel):
    name: str
    queue: str
    provider: str
    min: int
    max: int
    current: int
    desired: int
    updated_at: float
    state: str = Field(description="ok, quota, rate_limited or error: whether the controller can act")
    message: str = Field(description="the provider's words for a state other than ok")
    state_since: float | None


class GroupIn(BaseModel):
    name: str
    queue: str
    provider: str
    min: int = Field(ge=0)
    max: int = Field(ge=0)
    current: int = Field(ge=0)
    desired: int = Field(ge=0)
    state: Literal["ok", "quota", "rate_limited", "error"] = "ok"
    message: str = Field(default="", max_length=4000)
    state_since: float | None = None


class EventOut(BaseModel):
    id: int
    time: float
    group: str
    kind: str
    from_: int | None = Field(alias="from", serialization_alias="from")
    to: int | None
    reason: str

    model_config = {"populate_by_name": True}


class EventIn(BaseModel):
    group: str
    kind: str = Field(max_length=40)
    from_: int | None = Field(default=None, alias="from")
    to: int | None = None
    reason: str = Field(max_length=4000)


class DemandOut(BaseModel):
    queue: str
    queued: int
    running: int
    at: float


class DemandQuery(BaseModel):
    queue: str
    capabilities: Capabilities
    wait: float = Field(default=0, ge=0)
    #: Count queued jobs only up to this many (an autoscaler needs no more than its group can run at once).
    limit: int | None = Field(default=None, ge=0)


@router.get("/groups", response_model=list[GroupOut], dependencies=[require("view")])
async def groups(ctx: C) -> list[GroupOut]:
    return [
        GroupOut(
            name=g.name,
            queue=g.queue,
            provider=g.provider,
            min=g.min_workers,
            max=g.max_workers,
            current=g.current,
            desired=g.desired,
            updated_at=g.updated_at,
            state=g.state,
            message=g.message,
            state_since=g.state_since,
        )
        for g in await ctx.store.list_groups()
    ]


@router.put("/groups/{name}", status_code=204, dependencies=[require("admin")])
async def put_group(name: str, body: GroupIn, ctx: C) -> None:
    await ctx.store.put_group(
        GroupStatus(
            name,
            body.queue,
            body.provider,
            body.min,
            body.max,
            body.current,
            body.desired,
            ctx.now(),
            body.state,
            body.message,
            body.state_since,
        )
    )


@router.delete("/groups/{name}", status_code=204, dependencies=[require("admin")])
async def delete_group(name: str, ctx: C) -> None:
    await ctx.store.delete_group(name)


@router.get("/events", response_model=list[EventOut], response_model_by_alias=True, dependencies=[require("view")])
async def events(
    ctx: C,
    group: str | None = None,
    after: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[EventOut]:
    """Scaling decisions and provider trouble, newest first."""
    return [
        EventOut(id=e.id, time=e.at, group=e.group, kind=e.kind, from_=e.from_count, to=e.to_count, reason=e.reason)
        for e in await ctx.store.list_events(group, after, limit)
    ]


@router.post("/events", status_code=204, dependencies=[require("admin")])
async def record_event(body: EventIn, ctx: C) -> None:
    await ctx.store.record_event(body.group, body.kind, body.from_, body.to, body.reason, ctx.now())


@router.post("/demand", response_model=DemandOut, dependencies=[require("view")])
async def demand(body: DemandQuery, ctx: C) -> DemandOut:
    """Jobs of ``queue`` that workers with ``capabilities`` could run: queued and running.

    With ``wait``, answers once anything changes on the server (or after ``wait`` seconds), so a remote autoscaler
    hears of a submit at once.
    """
    if body.wait:
        ev = ctx.notifier.event("any")
        await wait(ev, min(body.wait, ctx.settings.long_poll_max))
    queued, running = await ctx.store.demand(body.queue, body.capabilities, limit=body.limit)
    return DemandOut(queue=body.queue, queued=queued, running=running, at=time.time())
