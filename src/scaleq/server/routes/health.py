"""Health as the server sees it: who a token is, and the checks it runs over its store (:mod:`scaleq.server.checks`).

- ``GET /whoami`` (any valid token): the token's role and the server's clock — ``scaleq doctor`` checks the token
  with it and compares clocks.
- ``GET /health`` (``view``): the server-side checks (store writable, lease sweeper, workers heartbeating, leases
  renewing, each group's controller and its signal checks, the OTLP push) with the server's version, clock and lease
  timing. ``group=`` (repeatable) names groups to report even when the store knows nothing of them.
- ``GET /health/checks`` (``view``): the same checks alone, for the dashboard.

The store check's one write puts the empty blob again (content-addressed, never listed: nothing visible changes).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel

from scaleq import __version__
from scaleq.doctor.checks import all_ok
from scaleq.server.auth import require, role_of
from scaleq.server.checks import server_side_checks
from scaleq.server.otlp import ExportStatus
from scaleq.server.routes.common import C, Ctx

router = APIRouter(tags=["health"])
_bearer = HTTPBearer(auto_error=False)


class WhoAmI(BaseModel):
    role: str
    server_time: float


class CheckOut(BaseModel):
    hop: str
    name: str
    ok: bool
    status: str
    checked: bool
    detail: str
    fix: str


class HealthOut(BaseModel):
    ok: bool
    version: str
    server_time: float
    lease_seconds: float
    heartbeat_seconds: float
    sweep_interval: float
    worker_gone_after: float
    checks: list[CheckOut]


async def _role(request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> str:
    return await role_of(request, creds)


def _exporter(ctx: Ctx) -> ExportStatus | None:
    """The OTLP pusher's status, when this server pushes (``scaleq.server.otlp.pusher`` puts it on the app)."""
    return getattr(ctx.request.app.state, "otlp", None)


GroupsQuery = Annotated[list[str] | None, Query(description="groups to report even if the store knows none of them")]


@router.get("/whoami", response_model=WhoAmI)
async def whoami(ctx: C, role: Annotated[str, Depends(_role)]) -> WhoAmI:
    """The role of the token presented, and the server's clock."""
    return WhoAmI(role=role, server_time=ctx.now())


@router.get("/health", response_model=HealthOut, dependencies=[require("grid:read")])
async def health(ctx: C, group: GroupsQuery = None) -> HealthOut:
    """The hops the server can see, each with what is wrong and how to fix it."""
    now = ctx.now()
    checks = await server_side_checks(
        ctx.store,
        ctx.settings,
        now,
        group or (),
        exporter=_exporter(ctx),
        cadence=ctx.cadence,
    )
    s = ctx.settings
    return HealthOut(
        ok=all_ok(checks),
        version=__version__,
        server_time=now,
        lease_seconds=ctx.cadence.lease_seconds,
        heartbeat_seconds=ctx.cadence.heartbeat_seconds,
        sweep_interval=s.sweep_interval,
        worker_gone_after=ctx.cadence.gone_after(),
        checks=[CheckOut(**c.as_dict()) for c in checks],
    )


@router.get("/health/checks", response_model=list[CheckOut], dependencies=[require("grid:read")])
async def health_checks(ctx: C, group: GroupsQuery = None) -> list[CheckOut]:
    """The server-side checks alone (the dashboard's health panel)."""
    checks = await server_side_checks(
        ctx.store,
        ctx.settings,
        ctx.now(),
        group or (),
        exporter=_exporter(ctx),
        cadence=ctx.cadence,
    )
    return [CheckOut(**c.as_dict()) for c in checks]
