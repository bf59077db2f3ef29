"""Worker agents in the test's own event loop, against a live server: what the worker tests, the metrics tests and
the PostgreSQL cluster tests run jobs with."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from scaleq.worker.agent import WorkerAgent, WorkerConfig
from scaleq.worker.runtime.process import ProcessRuntime
from tests.helpers.server import LiveServer


def agent(live: LiveServer, wid: str = "w1", slots: int = 2, **config: Any) -> WorkerAgent:
    """A worker for process jobs on queue ``q`` with a worker token of ``live``; ``config`` overrides or adds any
    :class:`WorkerConfig` field."""
    fields: dict[str, Any] = {
        "server": live.url,
        "token": live.tokens["worker"],
        "queue": "q",
        "runtimes": {"process": ProcessRuntime(kill_grace=1.0)},
        "slots": slots,
        "worker_id": wid,
        "cpus": 2.0,
    }
    return WorkerAgent(WorkerConfig(**{**fields, **config}))


@contextlib.asynccontextmanager
async def running(a: WorkerAgent, stop_within: float = 10) -> AsyncIterator[asyncio.Task[int]]:
    """Run the agent for the block; then drain it by force (a second drain request hands running jobs back)."""
    task = asyncio.create_task(a.run())
    try:
        yield task
    finally:
        if not task.done():
            a.request_drain()
            a.request_drain()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(task, stop_within)
