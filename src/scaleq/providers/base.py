"""The provider interface, and the one skeleton local processes, Docker, Kubernetes, GCP and Fly are built on.

A provider labels everything it creates with the grid, the group and the worker id, and ``workers`` finds workers
from those labels on the provider itself — so ``destroy``, ``doctor`` and a restarted controller (adoption) see the
same truth, not only local state. ``stop`` asks a worker to drain (SIGTERM, or the provider's equivalent); a
worker that was told to drain by the server exits on its own, and ``workers`` stops showing it.

The skeleton (:class:`ProviderBase`) writes the lifecycle once, over four primitives each provider implements —
``workers``, ``start``, ``stop`` and ``health``:

- ``destroy`` drains, then forces (:meth:`ProviderBase.drain_then_force`): every worker not already stopping is asked
  to drain; what is still there after ``grace`` seconds is stopped again (:meth:`ProviderBase.stop_after_grace`:
  with force by default — a provider whose second signal hands the worker's jobs back says so), and waited for
  ``force_grace`` more; then the provider removes what it keeps besides its workers (:meth:`ProviderBase.clean_up`).
- ``wait_gone`` polls ``workers`` every ``poll_every`` seconds until none is left.
- ``reap``: the controller, not the provider, knows which workers left the server (deregistered, or marked gone
  when their heartbeats stopped). It tells the provider, which frees what still holds them. Most providers have
  nothing to do — a worker's process, container, pod or machine ends with it — and keep the default.
- ``why_not_up``: the controller stops a worker that has not registered within ``startup_grace`` (its machine costs
  and may never come up) and asks the provider first why, from what the provider itself can see -- a pod's
  ``ImagePullBackOff``, a machine's exit, an instance's last creation error. The default knows nothing (``{}``).
- ``preempted``: of the workers the controller finds silent while holding jobs, those the provider took back (a spot
  VM preempted, a pod evicted), in the provider's words. The controller then hands their jobs back without spending
  an attempt. The default knows of none: their jobs come back when their leases expire, each a lost attempt.
- ``close`` releases the provider's API clients; the default has none.

:func:`start_each` starts several workers at once and keeps those that started when others fail. Blocking calls that
may hang run on daemon threads (:func:`scaleq.loop.in_daemon_thread`; the worker's docker runtime
uses its sibling ``spawn_daemon``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Literal, Protocol

from scaleq.grid import Group

log = logging.getLogger(__name__)

Status = Literal["starting", "running", "stopping"]
#: How long ``destroy`` lets workers drain before it forces them, unless told otherwise.
DESTROY_GRACE = 15.0


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


#: What a provider's refusal to make more machines is called in the group's status (``scaleq groups``, doctor).
Refusal = Literal["quota", "rate_limited"]


class CapacityRefused(ProviderError):
    """The provider refused for a quota (``quota``: more machines, CPUs, addresses than the project or namespace may
    have) or a rate limit (``rate_limited``: too many calls). Nothing to fix in scaleq: the group shows the state
    with the provider's words, and the controller backs off and retries."""

    def __init__(self, message: str, state: Refusal) -> None:
        super().__init__(message)
        self.state: Refusal = state


def preemptible(group: Group) -> bool:
    """Whether the group's machines may be taken back at short notice, so that the SIGTERM its workers get is a
    preemption notice, not a request to drain: a GCP spot VM (30 s), a pod on spot nodes (``[groups.kubernetes]
    spot``), a Fly machine (Fly stops machines itself, with ``stop_config``'s signal; the provider drains its own
    with SIGINT). Their workers run with ``--on-notice handback``: the jobs go back unspent at once."""
    match group.provider:
        case "gcp":
            return group.gcp is not None and group.gcp.spot
        case "kubernetes":
            return group.kubernetes is not None and group.kubernetes.spot
        case "fly":
            return True
    return False


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
    if preemptible(group):
        argv += ["--on-notice", "handback"]
    return argv


def new_worker_id(grid: str, group: str) -> str:
    return f"{grid}-{group}-{secrets.token_hex(3)}"


class Provider(Protocol):
    """What callers (the controller, ``plan``/``apply``/``destroy``, ``doctor``, ``scaleq up``) use of a provider."""

    name: str

    async def workers(self, group: Group) -> list[ProviderWorker]:
        """The group's workers, found by label on the provider itself."""
        ...

    async def start(self, group: Group, count: int) -> list[str]: ...
    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None: ...
    async def reap(self, group: Group, worker_ids: Collection[str]) -> set[str]:
        """These listed workers left the server: free what still holds them; return those now being removed."""
        ...

    async def wait_gone(self, group: Group, timeout: float) -> bool:
        """Wait until no worker of the group is listed; False on timeout."""
        ...

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """Why these workers have not registered, in the provider's words, for those it can tell ({} if none)."""
        ...

    async def preempted(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """Of these workers, those the provider took back (preempted, evicted), each with the provider's words."""
        ...

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        """Remove everything this provider created for the group; return the workers removed."""
        ...

    async def health(self) -> Health: ...
    async def close(self) -> None: ...


class ProviderBase(ABC):
    """The shared lifecycle, written once over the provider's primitives (see the module's docstring)."""

    name: str
    #: How often ``wait_gone`` looks.
    poll_every: float = 0.25
    #: How long ``destroy`` waits for the workers it stopped again after the grace.
    force_grace: float = 5.0

    # -- the primitives -----------------------------------------------------------------------------------------------

    @abstractmethod
    async def workers(self, group: Group) -> list[ProviderWorker]: ...

    @abstractmethod
    async def start(self, group: Group, count: int) -> list[str]: ...

    @abstractmethod
    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None: ...

    @abstractmethod
    async def health(self) -> Health: ...

    # -- the lifecycle ------------------------------------------------------------------------------------------------

    async def reap(self, group: Group, worker_ids: Collection[str]) -> set[str]:
        return set()  # the worker's process, container, pod or machine ends with it

    async def preempted(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return {}  # the provider cannot tell: the jobs come back through lease expiry

    async def close(self) -> None:
        return None

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return {}  # the provider cannot tell

    async def wait_gone(self, group: Group, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while await self.workers(group):
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(self.poll_every)
        return True

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        drained = await self.drain_then_force(group, grace, self.force_grace)
        await self.clean_up(group, drained)
        return [w.id for w in drained]

    async def drain_then_force(self, group: Group, grace: float, force_grace: float) -> list[ProviderWorker]:
        """Ask every worker to drain; after ``grace`` s stop what is left again (:meth:`stop_after_grace`) and wait
        ``force_grace`` s more. Returns the workers found at first."""
        workers = await self.workers(group)
        for w in workers:
            if w.status != "stopping":  # already draining: another SIGTERM would make it hand its jobs back
                await self.stop(group, w.id)
        if workers and not await self.wait_gone(group, grace):
            for w in await self.workers(group):
                await self.stop_after_grace(group, w.id)
            await self.wait_gone(group, force_grace)
        return workers

    async def stop_after_grace(self, group: Group, worker_id: str) -> None:
        """What ``destroy`` does to a worker still there after the grace: force it."""
        await self.stop(group, worker_id, force=True)

    async def clean_up(self, group: Group, drained: list[ProviderWorker]) -> None:
        """What ``destroy`` removes after the workers: whatever the provider keeps besides them."""
        return None


async def start_each(group: Group, ids: list[str], start_one: Callable[[str], Awaitable[str]]) -> list[str]:
    """Start the workers ``ids`` at once. When some fail, those that started run on (they carry labels: the next
    ``workers`` finds them), and the first failure is raised."""
    results = await asyncio.gather(*(start_one(i) for i in ids), return_exceptions=True)
    started = [r for r in results if isinstance(r, str)]
    failures = [r for r in results if isinstance(r, BaseException)]
    if failures:
        if started:
            log.warning("group %s: started %s, but %d failed", group.name, ", ".join(started), len(failures))
        raise failures[0]
    return started
