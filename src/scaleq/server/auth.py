"""Bearer tokens with roles. Tokens are random, shown once, and stored as their sha256 only.

Roles and what they may do (the scopes are in :mod:`scaleq.server.roles`):

- ``admin``: everything, including tokens.
- ``submit``: submit, cancel and read jobs; read queues, workers, groups, events, health and metrics.
- ``worker``: register, claim, heartbeat, finish, upload logs and outputs, fetch inputs; read queues, workers and
  metrics.
- ``read``: read jobs, queues, workers, groups, events, health and metrics (dashboards).

A worker token acts only on the workers registered with it (see :mod:`scaleq.server.routes.workers`): the request's
:class:`Caller` carries the token's id for that check, next to its role.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from scaleq.server.roles import SCOPES

_CACHE_SECONDS = 5.0
_bearer = HTTPBearer(auto_error=False)


def new_token() -> tuple[str, str, str]:
    """(token id, full token, its hash). The id is public; the token is shown once."""
    token_id = secrets.token_hex(4)
    token = f"sq_{token_id}_{secrets.token_urlsafe(24)}"
    return token_id, token, hash_token(token)


def hash_token(token: str) -> str:
    # Tokens carry 190 bits of randomness, so a plain sha256 is as strong as a slow hash here.
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    """Who made a request: the role of its token, and the token's public id."""

    role: str
    token_id: str


class TokenCache:
    """Recently seen token hashes → caller, so a hot path does not read the store on every request; and recently
    confirmed (worker, token) bindings, so a claim or heartbeat does not read its binding every time."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Caller, float]] = {}
        self._bound: dict[tuple[str, str], float] = {}

    def get(self, token_hash: str) -> Caller | None:
        hit = self._seen.get(token_hash)
        if hit and time.monotonic() - hit[1] < _CACHE_SECONDS:
            return hit[0]
        return None

    def put(self, token_hash: str, caller: Caller) -> None:
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[token_hash] = (caller, time.monotonic())

    def bound(self, worker_id: str, token_id: str) -> bool:
        at = self._bound.get((worker_id, token_id))
        return at is not None and time.monotonic() - at < _CACHE_SECONDS

    def put_bound(self, worker_id: str, token_id: str) -> None:
        if len(self._bound) > 10_000:
            self._bound.clear()
        self._bound[(worker_id, token_id)] = time.monotonic()

    def clear(self) -> None:
        self._seen.clear()
        self._bound.clear()


async def caller_of(request: Request, creds: HTTPAuthorizationCredentials | None) -> Caller:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    token_hash = hash_token(creds.credentials)
    cache: TokenCache = request.app.state.tokens
    caller = cache.get(token_hash)
    if caller is None:
        record = await request.app.state.store.find_token(token_hash)
        if record is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"}
            )
        caller = Caller(record.role, record.id)
        cache.put(token_hash, caller)
    return caller


async def role_of(request: Request, creds: HTTPAuthorizationCredentials | None) -> str:
    return (await caller_of(request, creds)).role


def _requiring(scope: str):
    async def dependency(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> Caller:
        caller = await caller_of(request, creds)
        if scope not in SCOPES.get(caller.role, set()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {caller.role!r} token may not do this (needs {scope!r})")
        return caller

    return dependency


def require(scope: str):
    """A route dependency: the token must grant ``scope``."""
    return Depends(_requiring(scope))


#: A route parameter: the caller, whose token must grant ``worker`` (the routes that check what it owns).
WorkerCaller = Annotated[Caller, Depends(_requiring("worker"))]
