"""The web dashboard: a small static front end (plain ES modules, no build step) that reads the same API as the CLI.

It is served at ``/dashboard/`` (``/`` redirects there). The files themselves are public and hold no data; every
request for data goes to ``/api/v1`` with the bearer token the user logs in with, kept in the tab's session storage.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

HERE = Path(__file__).parent

#: What the dashboard may serve: the front end's own files, nothing else of this package.
SUFFIXES = {".html", ".js", ".css", ".svg"}

HEADERS = {
    # Nothing outside this server: no CDN, no external fonts; scripts and styles from files only.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # revalidate every time (cheap: ETag / 304), so an upgraded server serves its new front end at once
    "Cache-Control": "no-cache",
}


class _DashboardFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        name = Path(path).name
        if name and Path(name).suffix not in SUFFIXES and path not in ("", "."):
            return PlainTextResponse("Not Found", status_code=404)
        response = await super().get_response(path, scope)
        response.headers.update(HEADERS)
        if path.endswith(".js"):
            response.headers["Content-Type"] = "text/javascript; charset=utf-8"
        return response


def mount(app: FastAPI) -> None:
    """Serve the dashboard at ``/dashboard/`` and redirect ``/`` there."""

    @app.get("/", include_in_schema=False)
    async def _root() -> RedirectResponse:
        return RedirectResponse("/dashboard/")

    app.mount("/dashboard", _DashboardFiles(directory=HERE, html=True), name="dashboard")
