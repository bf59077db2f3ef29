"""The HTTP server: the API under ``/api/v1`` (described by ``/api/v1/openapi.json``) over one store.

The server keeps no state of its own beyond the store, a notifier for long-polls and a short token cache, so
several servers can share one database.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from scaleq import __version__
from scaleq.notify import Notifier
from scaleq.server import dashboard, housekeeping, metrics
from scaleq.server.auth import TokenCache
from scaleq.server.cadence import Cadence
from scaleq.server.fastlane import FastLane
from scaleq.server.liveness import OpenClaims
from scaleq.server.routes import admin, arrays, health, jobs, scaling, why, workers
from scaleq.server.runnable import RunnableCheck
from scaleq.server.settings import ServerSettings
from scaleq.store.base import (
    AmbiguousId,
    NotFound,
    SchemaTooNew,
    StaleLease,
    Store,
    invalid_value_errors,
    unavailable_errors,
)

log = logging.getLogger("scaleq.server")

#: Answers of 503 (the store unavailable) are logged at most once this often, with a count of those in between.
UNAVAILABLE_LOG_EVERY = 10.0


class ScaleqApp(FastAPI):
    """The FastAPI app with the workers' fast lane (:mod:`scaleq.server.fastlane`) in front of its middleware."""

    def build_middleware_stack(self) -> Any:
        stack = super().build_middleware_stack()
        settings: ServerSettings = self.state.settings
        return FastLane(stack, self, settings.max_submit_bytes) if settings.fast_lane else stack


def create_app(
    store: Store,
    settings: ServerSettings | None = None,
    *,
    clock: Callable[[], float] = time.time,
    notifier: Notifier | None = None,
    manage_store: bool = True,
    groups: Sequence[Any] | None = None,
) -> FastAPI:
    """Build the app. With ``manage_store`` the app opens and closes the store in its lifespan."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_store:
            await store.open()
        app.state.notifier.forward = store.publish
        await store.listen(app.state.notifier.deliver)
        sweeper = asyncio.create_task(
            housekeeping.run(
                store,
                app.state.notifier,
                app.state.settings,
                clock,
                app.state.open_claims,
                on_gone=app.state.tokens.unbind,
                observe=metrics.of(app).housekeeping.observe,
                cadence=app.state.cadence,
            )
        )
        try:
            yield
        finally:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
            if manage_store:
                await store.close()

    settings = settings or ServerSettings()
    app = ScaleqApp(
        title="scaleq",
        version=__version__,
        description="Container jobs on queues, run by worker groups that scale with them.",
        openapi_url="/api/v1/openapi.json",
        docs_url="/api/v1/docs",
        redoc_url=None,
        lifespan=lifespan,
        max_body_size=settings.max_submit_bytes,  # every body but a job's outputs (their route sets its own)
    )
    app.state.store = store
    app.state.settings = settings
    app.state.clock = clock
    app.state.notifier = notifier or Notifier()
    app.state.tokens = TokenCache()
    app.state.open_claims = OpenClaims()  # parked claims count as their workers' heartbeats
    app.state.cadence = Cadence(settings)  # how often busy workers beat: less often as the fleet grows
    app.state.runnable = RunnableCheck(store, groups)  # groups: the grid's, when this process runs the controller

    for router in (jobs.router, why.router, arrays.router, workers.router, scaling.router, admin.router, health.router):
        app.include_router(router, prefix="/api/v1")
    dashboard.mount(app)
    metrics.install(app)  # GET /metrics (Prometheus) and the request counter

    @app.exception_handler(NotFound)
    async def _not_found(_: Request, exc: NotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(AmbiguousId)
    async def _ambiguous(_: Request, exc: AmbiguousId) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=400)

    @app.exception_handler(StaleLease)
    async def _stale(_: Request, exc: StaleLease) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "stale": True}, status_code=409)

    @app.exception_handler(SchemaTooNew)
    async def _schema(_: Request, exc: SchemaTooNew) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=500)

    said = {"at": -UNAVAILABLE_LOG_EVERY, "since": 0}

    async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
        # the database is away (restarting, failing over): 503, and workers and clients retry. Logged, at most once
        # per UNAVAILABLE_LOG_EVERY (a restart answers hundreds a second), so the log says why the answers failed;
        # the count of those not logged goes with the next line logged.
        now = time.monotonic()
        if now - said["at"] >= UNAVAILABLE_LOG_EVERY:
            more = f" (and {said['since']} more since the last of these)" if said["since"] else ""
            log.warning("answered 503, the store is unavailable: %s: %s%s", type(exc).__name__, exc, more)
            said["at"], said["since"] = now, 0
        else:
            said["since"] += 1
        return JSONResponse({"detail": f"store unavailable: {exc}"}, status_code=503, headers={"Retry-After": "1"})

    for exc_type in unavailable_errors():
        app.add_exception_handler(exc_type, _unavailable)

    async def _invalid(_: Request, exc: Exception) -> JSONResponse:
        msg = f"a value in the request cannot be stored: {exc}"
        return JSONResponse({"detail": [{"loc": ["request"], "msg": msg, "type": "value_error"}]}, status_code=422)

    for exc_type in invalid_value_errors():
        app.add_exception_handler(exc_type, _invalid)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        await store.ping()
        return {"status": "ok", "version": __version__}

    return app
