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

_CACHE_SECONDS = 5.0  # a revoked token is refused by every server within this
# A binding changes only once its worker is gone and its id registered again with another token: a server that did
# not see that happen lets the old token act on the id for at most this long. Short, it was a store read per worker
# every few seconds (a fleet of 5,000 made hundreds a second).
_BINDING_SECONDS = 60.0
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


_MAX_ENTRIES = 100_000  # per map: a fleet of 10,000 workers uses a tenth; past it, start again (a miss is a read)


class TokenCache:
    """Recently seen token hashes → caller, so a hot path does not read the store on every request; recently
    confirmed worker → token bindings, so a claim or heartbeat does not read its binding every time; and the worker
    of each lease this server handed out, so a finish riding along with a claim does not read its lease's owner.

    A worker has one binding here: a registration overwrites it, a deregistration or this server marking the worker
    gone drops it. A lease is trusted only through its worker's binding, so it follows the binding (rebound, dropped
    or expired, the lease's owner is read from the store again). A lease handed out by another server, or forgotten
    after a restart or an overflow, is read from the store as before. What another server does to a binding reaches
    this one when the entry expires (:data:`_BINDING_SECONDS`)."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[Caller, float]] = {}
        self._bound: dict[str, tuple[str, float]] = {}  # worker id -> (token id, confirmed at)
        self._leases: dict[str, str] = {}  # lease -> worker id

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
        hit = self._bound.get(worker_id)
        return hit is not None and hit[0] == token_id and time.monotonic() - hit[1] < _BINDING_SECONDS

    def put_bound(self, worker_id: str, token_id: str) -> None:
        if len(self._bound) > _MAX_ENTRIES:
            self._bound.clear()
        self._bound[worker_id] = (token_id, time.monotonic())

    def unbind(self, worker_id: str) -> None:
        self._bound.pop(worker_id, None)

    def lease_bound(self, lease: str, token_id: str) -> bool:
        """Whether this server handed ``lease`` to a worker bound here to ``token_id`` now."""
        worker_id = self._leases.get(lease)
        return worker_id is not None and self.bound(worker_id, token_id)

    def put_leases(self, leases: list[str], worker_id: str) -> None:
        if len(self._leases) + len(leases) > _MAX_ENTRIES:
            self._leases.clear()
        for lease in leases:
            self._leases[lease] = worker_id

    def drop_leases(self, leases: list[str]) -> None:
        for lease in leases:
            self._leases.pop(lease, None)

    def clear(self) -> None:
        self._seen.clear()
        self._bound.clear()
        self._leases.clear()


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
