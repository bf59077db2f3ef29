"""The provider interface, shared by local processes, Docker, Kubernetes, GCP and Fly.

A provider labels everything it creates with the grid, the group and the worker id, and ``list`` finds workers
from those labels on the provider itself — so ``destroy``, ``doctor`` and a restarted controller (adoption) see the
same truth, not only local state. ``stop`` asks a worker to drain (SIGTERM, or the provider's equivalent); a
worker that was told to drain by the server exits on its own, and ``list`` stops showing it.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from dataclasses import dataclass
from typing import Literal, Protocol

from scaleq.grid import Group

Status = Literal["starting", "running", "stopping"]


@dataclass(frozen=True)
class ProviderWorker:
    id: str
    group: str
    started_at: float
    status: Status
    detail: str = ""
    version: str = ""  # the group version it was started with (Group.version())


@dataclass(frozen=True)
class Health:
    ok: bool
    message: str


class ProviderError(Exception):
    """The provider refused or failed; the message says what and, where it can, how to fix it."""


def worker_args(group: Group, server: str, worker_id: str, server_grace: float) -> list[str]:
    """``scaleq worker …`` arguments (after the program) for a worker of ``group``: every provider starts the same."""
    argv = ["worker", "--server", server, "--queue", group.queue, "--slots", str(group.slots)]
    argv += ["--group", group.name, "--worker-id", worker_id]
    argv += ["--cpus", f"{group.resources.cpus:g}", "--gpus", str(group.resources.gpus)]
    argv += ["--server-grace", f"{server_grace:g}"]
    for runtime in group.runtimes:
        argv += ["--runtime", runtime.value]
    for tag in group.tags:
        argv += ["--tag", tag]
    if group.resources.memory:
        argv += ["--memory", str(group.resources.memory)]
    if group.allow_host_network:
        argv.append("--allow-host-network")
    return argv


async def wait_gone(provider: Provider, group: Group, timeout: float, every: float = 0.1) -> bool:
    """Wait until the provider lists no worker of the group; False on timeout."""
    deadline = time.monotonic() + timeout
    while await provider.list(group):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(every)
    return True


def new_worker_id(grid: str, group: str) -> str:
    return f"{grid}-{group}-{secrets.token_hex(3)}"


class Provider(Protocol):
    name: str

    async def list(self, group: Group) -> list[ProviderWorker]: ...
    async def start(self, group: Group, count: int) -> list[str]: ...
    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None: ...
    async def destroy(self, group: Group) -> list[str]:
        """Remove everything this provider created for the group; return what was removed."""
        ...

    async def health(self) -> Health: ...
