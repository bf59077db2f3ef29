"""A live server on a free port with tokens of each role, and a controller running alongside it for a block."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import uvicorn

from scaleq.client import Client
from scaleq.grid import Group
from scaleq.scaling.controller import Controller
from scaleq.server import metrics
from scaleq.server.app import create_app
from scaleq.server.auth import new_token
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from tests.helpers.waiting import eventually

#: For tests that hold leases across several requests without a heartbeat: the default fixture's 2 s leases (short,
#: so expiry tests take seconds) expire under them on a loaded machine, which then re-runs or loses the job.
LONG_LEASES = ServerSettings(lease_seconds=60.0, sweep_interval=0.2, long_poll_max=5.0)


@dataclass
class LiveServer:
    url: str
    store: Store
    app: object
    tokens: dict[str, str]

    def client(self, role: str = "admin") -> Client:
        return Client(self.url, self.tokens[role])


async def make_tokens(store: Store) -> dict[str, str]:
    tokens = {}
    for role in ("admin", "submit", "worker", "read"):
        token_id, token, token_hash = new_token()
        await store.create_token(token_id, role, role, token_hash, time.time())
        tokens[role] = token
    return tokens


@contextlib.asynccontextmanager
async def serve(
    store: Store,
    settings: ServerSettings,
    port: int = 0,
    tokens: dict[str, str] | None = None,
    groups: Sequence[Group] | None = None,
    clock: Callable[[], float] = time.time,
) -> AsyncIterator[LiveServer]:
    """``groups``: the grid's, as ``scaleq up`` gives them to the server it runs beside its controller."""
    app = create_app(store, settings, manage_store=False, groups=groups, clock=clock)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=settings.keep_alive_seconds)
    server = uvicorn.Server(config)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        yield LiveServer(url, store, app, tokens or await make_tokens(store))
    finally:
        server.should_exit = True
        await task


async def housekept(live: LiveServer) -> None:
    """Wait for the server's first housekeeping round, which it runs at start-up in the background: a test that moves
    a fake clock, or sets what housekeeping counts, must do so after it, not have it land later at the moved time."""
    rounds = metrics.of(live.app).housekeeping  # type: ignore[arg-type]

    async def counted() -> bool:
        return any(m.name.endswith("_count") and m.value for m in rounds.collect()[0].samples)

    await eventually(counted, 30, what="the server's first housekeeping round", every=0.01)


@contextlib.asynccontextmanager
async def controlling(controller: Controller) -> AsyncIterator[None]:
    """Run a controller for the duration of the block."""
    task = asyncio.create_task(controller.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
