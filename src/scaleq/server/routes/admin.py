"""Tokens, and purging old jobs (admin only)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter, HTTPException, status
from pydantic import BaseModel, Field

from scaleq.server.auth import new_token, require
from scaleq.server.roles import ROLES
from scaleq.server.routes.common import C

router = APIRouter(tags=["admin"])


class TokenRequest(BaseModel):
    role: str = Field(description=f"one of {', '.join(ROLES)}")
    name: str = Field(default="", max_length=200)


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None = None


class NewToken(TokenOut):
    token: str = Field(description="shown once; only its hash is stored")


@router.post("/tokens", response_model=NewToken, status_code=201, dependencies=[require("admin")])
async def create_token(body: TokenRequest, ctx: C) -> NewToken:
    if body.role not in ROLES:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            [{"loc": ["body", "role"], "msg": f"must be one of {', '.join(ROLES)}", "type": "value_error"}],
        )
    token_id, token, token_hash = new_token()
    now = ctx.now()
    await ctx.store.create_token(token_id, body.name, body.role, token_hash, now)
    return NewToken(id=token_id, name=body.name, role=body.role, created_at=now, token=token)


@router.get("/tokens", response_model=list[TokenOut], dependencies=[require("admin")])
async def list_tokens(ctx: C) -> list[TokenOut]:
    return [TokenOut(**t.__dict__) for t in await ctx.store.list_tokens()]


@router.delete("/tokens/{token_id}", status_code=204, dependencies=[require("admin")])
async def revoke_token(token_id: str, ctx: C) -> None:
    """Revoke a token. The last live admin token is never revoked (409): nobody could make tokens any more."""
    live = [t for t in await ctx.store.list_tokens() if t.revoked_at is None]
    if not any(t.id == token_id for t in live):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no live token {token_id}")
    if not await ctx.store.revoke_token(token_id, ctx.now()):  # the store refuses the last admin, also in a race
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"token {token_id} is the last admin token: create another admin token first "
            "(scaleq tokens create --role admin), then revoke this one",
        )
    ctx.request.app.state.tokens.clear()


class PurgeRequest(BaseModel):
    older_than: float = Field(ge=0, allow_inf_nan=False, description="seconds since a job finished (server clock)")
    queue: str | None = Field(default=None, description="only this queue's jobs (events are not per queue)")


class PurgedOut(BaseModel):
    before: float
    jobs: int
    log_chunks: int
    outputs: int
    blobs: int
    events: int


@router.post("/admin/purge", response_model=PurgedOut, dependencies=[require("admin")])
async def purge(body: PurgeRequest, ctx: C) -> PurgedOut:
    """Remove finished jobs that ended more than ``older_than`` seconds ago, with their attempts, logs, outputs and
    the bytes no other job refers to, and scaling events as old. Queued and running jobs are never touched."""
    before = ctx.now() - body.older_than
    p = await ctx.store.purge(before, body.queue)
    return PurgedOut(before=before, **dataclasses.asdict(p))
