"""Test helpers: a live server on a free port with tokens of each role."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import uvicorn

from scaleq.client import Client
from scaleq.grid import Group
from scaleq.jobs import JobDefinition
from scaleq.notify import Notifier
from scaleq.providers.base import Provider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.server.app import create_app
from scaleq.server.auth import new_token
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Event, GroupStatus, Store


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
    store: Store, settings: ServerSettings, port: int = 0, tokens: dict[str, str] | None = None
) -> AsyncIterator[LiveServer]:
    app = create_app(store, settings, manage_store=False)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
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


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, *, what: str = "condition", every: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout:g} s (last: {result!r})"
        await asyncio.sleep(every)


class FakeClock:
    """A clock the test moves: the controller and the policy read it, so startup_grace passes at once."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


async def never_registering(
    provider: Provider,
    group: Group,
    store: Store,
    machines: Callable[[], Awaitable[int]],
    *,
    rounds: int = 3,
    timeout: float = 30.0,
) -> list[Event]:
    """Drive the real controller over ``provider`` for a group whose workers never register: more jobs than
    ``max_workers`` can run, and a clock that jumps past ``startup_grace``. Each round: a step starts workers up to
    max; the clock jumps; a step stops them all (lapsed) and starts none while their machines are listed; then
    their machines go. After every step the provider's own count of machines (``machines``: from the
    stand-in or the engine, not from the provider) must not exceed ``max_workers``. Returns the group's events."""
    for i in range(3 * group.max_workers):
        definition = JobDefinition(command=["echo", str(i)])
        await store.submit(group.queue, definition, priority=0, max_attempts=3, rerun=False, now=time.time())
    clock = FakeClock(time.time())
    controller = Controller([(group, provider)], StoreObserver(store, Notifier(), clock), clock=clock)

    async def step() -> int:
        await controller.step()
        count = await machines()
        assert count <= group.max_workers, f"{count} machines for max_workers {group.max_workers}"
        return count

    for _ in range(rounds):
        assert await step() == group.max_workers  # started up to max, no further
        # past startup_grace for every machine started so far (their start times come from the provider: real time)
        clock.now = max(clock.now, time.time()) + group.startup_grace + 1
        await step()  # all lapsed: stopped, and no replacement while their machines are listed
        await eventually(lambda: _none(machines), timeout, what="the lapsed workers' machines gone")
    return await store.list_events(group.name, 0, 1000)


async def _none(machines: Callable[[], Awaitable[int]]) -> bool:
    return await machines() == 0


async def refused_then_retried(
    provider: Provider, group: Group, store: Store, refuse: Callable[[], object], lift: Callable[[], object]
) -> tuple[GroupStatus, GroupStatus]:
    """Drive the real controller while the provider refuses to start workers (``refuse``: the stand-in's knob), then
    after ``lift`` and the controller's backoff. Returns the group's status while refused and once it recovered."""
    definition = JobDefinition(command=["echo", "refused"])
    await store.submit(group.queue, definition, priority=0, max_attempts=3, rerun=False, now=time.time())
    clock = FakeClock(time.time())
    controller = Controller([(group, provider)], StoreObserver(store, Notifier(), clock), clock=clock)
    refuse()
    await controller.step()
    (refused,) = await store.list_groups()
    clock.advance(1.0)
    await controller.step()  # backing off: no call, the state stays
    (still,) = await store.list_groups()
    assert (still.state, still.state_since) == (refused.state, refused.state_since)
    lift()
    clock.advance(60.0)  # past the longest backoff
    await controller.step()
    (recovered,) = await store.list_groups()
    return refused, recovered
