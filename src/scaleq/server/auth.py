"""Bearer tokens with roles. Tokens are random, shown once, and stored as their sha256 only.

Roles and what they may do:

- ``admin``: everything, including tokens.
- ``submit``: submit, cancel and read jobs; read queues, workers, groups and events.
- ``worker``: register, claim, heartbeat, finish, upload logs and outputs, fetch inputs; read queues.
- ``read``: read jobs, queues, workers, groups, events and metrics (dashboards).
"""

from __future__ import annotations

import hashlib
import secrets
import time
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


class TokenCache:
    """Recently seen token hashes → role, so a hot path does not read the store on every request."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[str, float]] = {}

    def get(self, token_hash: str) -> str | None:
        hit = self._seen.get(token_hash)
        if hit and time.monotonic() - hit[1] < _CACHE_SECONDS:
            return hit[0]
        return None

    def put(self, token_hash: str, role: str) -> None:
        if len(self._seen) > 10_000:
            self._seen.clear()
        self._seen[token_hash] = (role, time.monotonic())

    def clear(self) -> None:
        self._seen.clear()


async def role_of(request: Request, creds: HTTPAuthorizationCredentials | None) -> str:
    if creds is None or creds.scheme.lower() != "bearer" or not creds.credentials:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED, "missing bearer token", headers={"WWW-Authenticate": "Bearer"}
        )
    token_hash = hash_token(creds.credentials)
    cache: TokenCache = request.app.state.tokens
    role = cache.get(token_hash)
    if role is None:
        record = await request.app.state.store.find_token(token_hash)
        if record is None:
            raise HTTPException(
                status.HTTP_401_UNAUTHORIZED, "unknown or revoked token", headers={"WWW-Authenticate": "Bearer"}
            )
        role = record.role
        cache.put(token_hash, role)
    return role


def require(scope: str):
    async def dependency(
        request: Request, creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
    ) -> str:
        role = await role_of(request, creds)
        if scope not in SCOPES.get(role, set()):
            raise HTTPException(status.HTTP_403_FORBIDDEN, f"a {role!r} token may not do this (needs {scope!r})")
        return role

    return Depends(dependency)
