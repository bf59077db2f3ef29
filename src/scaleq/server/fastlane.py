"""The fast lane: a worker's claim and heartbeat answered by the same endpoints, without the framework's stack.

A fleet's traffic is almost all two requests: every idle worker keeps a claim parked (re-polled every 20 s) and a
busy one beats every few seconds. A profile of 5,000 idle workers on one server put three quarters of the server's
time in the framework around those two endpoints (five middleware layers, an exit stack per request, the
dependency solver, response validation) and a quarter in scaleq's own code; and a parked claim held about 250
objects the garbage collector tracks, most of them the stack's coroutines, cells and frames waiting with it
(see :mod:`scaleq.server.gcpolicy` for what that costs).

So :class:`FastLane` sits outside the app's middleware and takes ``POST /api/v1/workers/{id}/claim`` and
``…/heartbeat`` itself — only when the request is the ordinary one: a JSON body within the size limit that
validates, and a bearer token whose role may act as a worker. It then calls the very functions FastAPI routes to
(:func:`scaleq.server.routes.workers.claim` and ``heartbeat``) with the very same arguments, maps their exceptions
through the app's own exception handlers, and counts the answer in ``scaleq_http_requests`` under the route's
template, as the counting middleware would. Everything else — a malformed or oversized body, a missing, unknown or
wrong-role token, any other route — goes down the ordinary stack with the body replayed, so that every error answer
(401, 403, 413, 422) is the framework's own, byte for byte. What the lane does differently is only faster.
"""

from __future__ import annotations

import inspect
import logging
import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ValidationError
from starlette.responses import PlainTextResponse

from scaleq.server import metrics
from scaleq.server.auth import Caller, caller_of
from scaleq.server.roles import SCOPES
from scaleq.server.routes import workers
from scaleq.server.routes.common import Ctx, context

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

PATH = re.compile(r"/api/v1/workers/(?P<worker_id>[^/]+)/(?P<call>claim|heartbeat)")
TEMPLATES = {call: f"/api/v1/workers/{{worker_id}}/{call}" for call in ("claim", "heartbeat")}
JSON_HEADERS = [(b"content-type", b"application/json")]


class FastLane:
    """ASGI: the worker's two hot calls straight to their endpoints; the rest (and anything unusual) to ``stack``."""

    def __init__(self, stack: ASGIApp, api: FastAPI, max_body: int) -> None:
        self.stack = stack
        self.api = api
        self.max_body = max_body
        self.answered = 0  # requests the lane answered itself (the rest went down the stack)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = self._match(scope)
        if match is None:
            await self.stack(scope, receive, send)
            return
        body = await self._read_body(scope, receive)
        if body is None:  # chunked, oversized, or the client left while sending: the ordinary way
            await self.stack(scope, receive, send)
            return
        replay = _replaying(body, receive)
        request = Request(scope, replay)
        worker_id, call = match["worker_id"], match["call"]
        try:
            handler = PARSERS[call](body)
        except ValidationError:  # the framework answers 422, naming the field
            who = None
        else:
            who = await self._worker_caller(request, scope)
        if who is None:
            await self.stack(scope, replay, send)
            return
        self.answered += 1
        await self._answer(request, scope, replay, send, worker_id, call, handler, who)

    def _match(self, scope: Scope) -> re.Match[str] | None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return None
        path: str = scope["path"]
        root: str = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :]
        return PATH.fullmatch(path)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        headers = dict(scope["headers"])
        kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        length = headers.get(b"content-length")
        if kind != b"application/json" or length is None or not length.isdigit() or int(length) > self.max_body:
            return None
        chunks: list[bytes] = []
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        return b"".join(chunks)

    async def _worker_caller(self, request: Request, scope: Scope) -> Caller | None:
        header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        try:
            who = await caller_of(request, HTTPAuthorizationCredentials(scheme=scheme, credentials=token))
        except HTTPException:
            return None
        return who if "worker" in SCOPES.get(who.role, set()) else None

    async def _answer(
        self,
        request: Request,
        scope: Scope,
        receive: Receive,
        send: Send,
        worker_id: str,
        call: str,
        handler: Handler,
        who: Caller,
    ) -> None:
        status = 500
        try:
            answer = await handler(worker_id, context(request), request, who)
            status = 200
            payload = answer.model_dump_json().encode()
            headers = [*JSON_HEADERS, (b"content-length", str(len(payload)).encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": payload})
        except BaseException as exc:
            if not isinstance(exc, Exception):  # cancelled: the client went away before the answer
                status = 499
                raise
            status = await self._handled(exc, request, scope, receive, send)
        finally:
            metrics.of(self.api).http_requests.labels(TEMPLATES[call], str(status)).inc()

    async def _handled(self, exc: Exception, request: Request, scope: Scope, receive: Receive, send: Send) -> int:
        """Answer ``exc`` with the app's handler for it (its class's nearest); an unexpected one is a logged 500."""
        for cls in type(exc).__mro__:
            handler = self.api.exception_handlers.get(cls)
            if handler is not None:
                answered = handler(request, exc)
                response = await answered if inspect.isawaitable(answered) else answered
                await response(scope, receive, send)
                return response.status_code
        log.error("%s %s", scope["method"], scope["path"], exc_info=exc)
        await PlainTextResponse("Internal Server Error", status_code=500)(scope, receive, send)
        return 500


#: A call's endpoint with its validated body bound: the worker id, context, request and caller give its answer.
Handler = Callable[[str, Ctx, Request, Caller], Awaitable[BaseModel]]


def _claim(body: bytes) -> Handler:
    parsed = workers.ClaimBody.model_validate_json(body)
    return lambda worker_id, ctx, request, who: workers.claim(worker_id, parsed, ctx, request, who)


def _heartbeat(body: bytes) -> Handler:
    parsed = workers.BeatBody.model_validate_json(body) if body else None  # a heartbeat may come without a body
    return lambda worker_id, ctx, request, who: workers.heartbeat(worker_id, ctx, who, parsed)


#: Each call's body validated (raising :class:`ValidationError`, answered by the framework) into its handler.
PARSERS: dict[str, Callable[[bytes], Handler]] = {"claim": _claim, "heartbeat": _heartbeat}


def _replaying(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read once more, then what the client sends (its disconnect)."""
    pending = [{"type": "http.request", "body": body, "more_body": False}]

    async def replay() -> Message:
        return pending.pop() if pending else await receive()

    return replay
