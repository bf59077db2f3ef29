"""Scaling records and signals: groups, events, and the demand of a group as the server counts it.

The demand endpoint is what a remote ``scaleq autoscale`` reads; it long-polls (``wait``) so a submit reaches a
remote controller as fast as an embedded one. Groups and events are written by whichever controller runs.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, Field

from scaleq.doctor.checks import Check
from scaleq.jobs import Capabilities
from scaleq.loop import wait_set
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
    note: str  # what the controller says of the group now ("capped at max_workers 4 (7 wanted)"); empty: nothing
    reporter: str  # controller | apply | stopped
    checks: list[dict[str, Any]]  # the controller's signal checks, as in /health
    price_per_hour: float | None = None
    state: str = Field(description="ok, quota, rate_limited or error: whether the controller can act")
    message: str = Field(description="the provider's words for a state other than ok")
    state_since: float | None
    slots: int = 1
    boot_seconds: float | None = None
    starting: list[float] = Field(default_factory=list)


class CheckIn(BaseModel):
    hop: str = Field(max_length=200)
    name: str = Field(max_length=100)
    ok: bool
    detail: str = Field(default="", max_length=4000)
    fix: str = Field(default="", max_length=2000)
    checked: bool = True


#: Most workers a count (of a group, in an event) may name: far past any grid, well inside a database integer.
MAX_COUNT = 1_000_000
#: Largest id a query may name (a signed 64-bit column).
MAX_ID = 2**63 - 1


class GroupIn(BaseModel):
    name: str
    queue: str
    provider: str
    min: int = Field(ge=0, le=MAX_COUNT)
    max: int = Field(ge=0, le=MAX_COUNT)
    current: int = Field(ge=0, le=MAX_COUNT)
    desired: int = Field(ge=0, le=MAX_COUNT)
    note: str = Field(default="", max_length=2000)
    reporter: Literal["controller", "apply", "stopped"] = "controller"
    checks: list[CheckIn] = Field(default_factory=list, max_length=20)
    price_per_hour: float | None = Field(default=None, ge=0, le=1e9, allow_inf_nan=False)
    state: Literal["ok", "quota", "rate_limited", "error"] = "ok"
    message: str = Field(default="", max_length=4000)
    state_since: float | None = Field(default=None, allow_inf_nan=False)
    slots: int = Field(default=1, ge=1, le=MAX_COUNT, description="slots per worker")
    boot_seconds: float | None = Field(
        default=None, ge=0, le=86400, allow_inf_nan=False, description="a typical boot of its workers, as seen"
    )
    starting: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        default_factory=list, max_length=MAX_COUNT, description="when each worker still starting was asked for"
    )


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
    from_: int | None = Field(default=None, alias="from", ge=0, le=MAX_COUNT)
    to: int | None = Field(default=None, ge=0, le=MAX_COUNT)
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
    limit: int | None = Field(default=None, ge=0, le=MAX_ID)


@router.get("/groups", response_model=list[GroupOut], dependencies=[require("grid:read")])
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
            note=g.note,
            reporter=g.reporter,
            checks=[c.as_dict() for c in g.checks],
            price_per_hour=g.price_per_hour,
            state=g.state,
            message=g.message,
            state_since=g.state_since,
            slots=g.slots,
            boot_seconds=g.boot_seconds,
            starting=list(g.starting),
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
            body.note,
            tuple(Check.from_dict(c.model_dump()) for c in body.checks),
            body.reporter,
            price_per_hour=body.price_per_hour,
            state=body.state,
            message=body.message,
            state_since=body.state_since,
            slots=body.slots,
            boot_seconds=body.boot_seconds,
            starting=tuple(body.starting),
        )
    )


@router.delete("/groups/{name}", status_code=204, dependencies=[require("admin")])
async def delete_group(name: str, ctx: C) -> None:
    await ctx.store.delete_group(name)


@router.get("/events", response_model=list[EventOut], response_model_by_alias=True, dependencies=[require("grid:read")])
async def events(
    ctx: C,
    group: str | None = None,
    after: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[EventOut]:
    """Scaling decisions and provider trouble, newest first."""
    return [
        EventOut.model_validate(
            {"id": e.id, "time": e.at, "group": e.group, "kind": e.kind, "from": e.from_count, "to": e.to_count}
            | {"reason": e.reason}
        )
        for e in await ctx.store.list_events(group, after, limit)
    ]


@router.post("/events", status_code=204, dependencies=[require("admin")])
async def record_event(body: EventIn, ctx: C) -> None:
    await ctx.store.record_event(body.group, body.kind, body.from_, body.to, body.reason, ctx.now())


@router.post("/demand", response_model=DemandOut, dependencies=[require("grid:read")])
async def demand(body: DemandQuery, ctx: C) -> DemandOut:
    """Jobs of ``queue`` that workers with ``capabilities`` could run: queued and running.

    With ``wait``, answers once anything changes on the server (or after ``wait`` seconds), so a remote autoscaler
    hears of a submit at once.
    """
    if body.wait:
        ev = ctx.notifier.event("any")
        await wait_set(ev, min(body.wait, ctx.settings.long_poll_max))
    queued, running = await ctx.store.demand(body.queue, body.capabilities, limit=body.limit)
    return DemandOut(queue=body.queue, queued=queued, running=running, at=time.time())
