"""The controller: observe → decide → act → record, per group.

Design:

- **Observe** the group's demand from the queue server (the single source of truth, available at zero workers), the
  workers the provider has (by label) and what each registered worker is doing (idle, busy, draining).
- **Decide** with :func:`scaleq.scaling.policy.decide` — the same pure function ``plan`` and the simulator use.
- **Act**: ask the provider for new workers; drain idle ones through the server (the worker stops claiming and exits
  by itself, so scale-in never interrupts a job); stop the workers that did not register within ``startup_grace``
  (the policy names them ``lapsed``) and delete their machines, recording why in the provider's words
  (``why_not_up``: an image that cannot be pulled, a quota, a machine that exited). The policy counts every
  machine toward ``max_workers``, so workers that never come up are replaced as their machines go, never piled up.
- **Record** every change as an event with the policy's reason, and the group's current/desired counts.

It wakes on job events (a submit to an empty queue reaches the provider in milliseconds, not a poll interval) and on a
timer (idle timeouts, missed events). A provider error is recorded, retried with backoff, and never stops the other
groups or the server; it is also the group's *state* in its status (``quota`` or ``rate_limited`` when the provider
refused for a quota or a rate limit -- :class:`~scaleq.providers.base.CapacityRefused` -- else ``error``), with the
provider's message and since when, until a step succeeds. At start it adopts what the provider already runs for the
group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from scaleq.grid import Group
from scaleq.jobs import Worker
from scaleq.providers.base import CapacityRefused, Provider, ProviderWorker
from scaleq.scaling.policy import Decision, Demand, PolicyState, decide, worker_views
from scaleq.scaling.signals import SignalError, describe, read_external
from scaleq.store.base import GroupStatus

log = logging.getLogger("scaleq.controller")
#: Seconds between rewrites of an unchanged group status.
STATUS_REFRESH = 5.0


class Observer(Protocol):
    """Where the controller reads signals and writes what it did (the store in-process, the API remotely)."""

    async def demand(self, group: Group) -> Demand: ...
    async def registered(self, group: Group) -> list[Worker]:
        """The group's workers as the server knows them, gone ones included (it keeps them a while)."""
        ...

    async def drain(self, worker_id: str) -> None: ...
    async def record(
        self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str
    ) -> None: ...
    async def status(self, status: GroupStatus) -> None: ...
    async def wait_for_change(self, timeout: float) -> None: ...


@dataclass
class GroupLoop:
    group: Group
    provider: Provider
    state: PolicyState = field(default_factory=PolicyState)
    last_desired: int | None = None
    failures: int = 0
    retry_at: float = 0.0
    last: Decision | None = None
    pending: dict[str, float] = field(default_factory=dict)  # started, not registered yet
    early_exits: int = 0  # started workers that vanished without ever registering, in a row
    known: set[str] = field(default_factory=set)  # listed workers seen registered (not gone) with the server
    crash_backoff: float = 5.0
    recorded: tuple[int, int, str] | None = None  # (current, desired, state) last written as the group's status
    trouble: tuple[str, str, float] | None = None  # (state, message, since) while steps fail
    recorded_at: float = float("-inf")
    lapsed: set[str] = field(default_factory=set)  # workers stopped for not registering in time, while listed


class Controller:
    def __init__(
        self,
        groups: list[tuple[Group, Provider]],
        observer: Observer,
        *,
        tick: float = 1.0,
        min_interval: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.loops = [GroupLoop(g, p) for g, p in groups]
        self.observer = observer
        self.tick = tick
        self.min_interval = min_interval
        self.clock = clock

    async def run(self) -> None:
        for loop in self.loops:
            with contextlib.suppress(Exception):
                adopted = await loop.provider.workers(loop.group)
                if adopted:
                    await self.observer.record(
                        loop.group.name,
                        "adopt",
                        None,
                        len(adopted),
                        f"adopted {len(adopted)} running worker(s) found by the provider's labels",
                    )
        while True:
            await self.step()
            # react at once to the first event, but at most every min_interval under a storm of them
            await asyncio.sleep(self.min_interval)
            await self.observer.wait_for_change(self.tick)

    async def step(self) -> None:
        await asyncio.gather(*(self.step_group(loop) for loop in self.loops))

    async def step_group(self, loop: GroupLoop) -> Decision | None:
        g, now = loop.group, self.clock()
        if now < loop.retry_at:
            if loop.trouble is not None and loop.recorded is not None:  # backing off: the state stays fresh
                with contextlib.suppress(Exception):
                    await self._status(loop, *loop.recorded[:2], now)
            return None
        try:
            demand = await self.observer.demand(g) if g.signal.kind == "server" else await read_external(g.signal)
            provider_workers = await loop.provider.workers(g)
            registered = await self.observer.registered(g)
            if left := self._left(loop, provider_workers, registered):
                reaped = await loop.provider.reap(g, left)
                provider_workers = [replace(w, status="stopping") if w.id in reaped else w for w in provider_workers]
            if await self._crash_looping(loop, provider_workers, registered, now):
                return None
            views = worker_views(provider_workers, registered)
            decision = decide(demand, views, g.policy(), loop.state, now)
            loop.state, loop.last = decision.state, decision
            current = sum(1 for v in views if v.state != "draining")
            loop.lapsed &= {w.id for w in provider_workers}
            if fresh := [i for i in decision.lapsed if i not in loop.lapsed]:
                await self._stop_lapsed(loop, fresh)
            if decision.start:
                started = await loop.provider.start(g, decision.start)
                loop.pending.update(dict.fromkeys(started, now))
                log.info("group %s: started %s", g.name, ", ".join(started))
            for worker_id in decision.drain:
                await self.observer.drain(worker_id)
            if decision.start or decision.drain or decision.desired != loop.last_desired:
                kind = "scale_up" if decision.start else "scale_down" if decision.drain else "desired"
                reason = decision.reason
                if g.signal.kind != "server":
                    reason = f"{describe(g.signal)} reads {demand.queued}: {reason}"
                await self.observer.record(g.name, kind, current, decision.desired, reason)
                loop.last_desired = decision.desired
            loop.trouble = None
            await self._status(loop, current + decision.start - len(decision.drain), decision.desired, now)
            if loop.failures:
                await self.observer.record(g.name, "recovered", None, None, "signal and provider answer again")
            loop.failures = 0
            return decision
        except Exception as exc:  # one group's trouble must not stop the others
            loop.failures += 1
            backoff = min(2.0**loop.failures, 60.0)
            loop.retry_at = now + backoff
            what = f"signal {g.signal.kind}" if isinstance(exc, SignalError) else f"provider {g.provider}"
            log.warning("group %s: %s failed: %s; retrying in %.0f s", g.name, what, exc, backoff)
            state = exc.state if isinstance(exc, CapacityRefused) else "error"
            verb = "refused" if isinstance(exc, CapacityRefused) else "failed"
            if loop.trouble is None or loop.trouble[0] != state:
                loop.trouble = (state, "", now)
            loop.trouble = (state, f"{what} {verb}: {exc}", loop.trouble[2])
            with contextlib.suppress(Exception):
                await self.observer.record(
                    g.name,
                    "error",
                    None,
                    None,
                    f"{what} {verb} ({type(exc).__name__}: {exc}); retry {loop.failures} in {backoff:.0f} s",
                )
            with contextlib.suppress(Exception):
                current, desired = loop.recorded[:2] if loop.recorded else (0, loop.last_desired or 0)
                await self._status(loop, current, desired, now)
            return None

    async def _status(self, loop: GroupLoop, current: int, desired: int, now: float) -> None:
        """Write the group's status when it changes. Under a stream of jobs the controller steps up to 20 times a
        second: the status is a store write, so it is otherwise refreshed every STATUS_REFRESH seconds (its age is
        how the dashboard and doctor tell a live controller from a stopped one)."""
        g = loop.group
        state, message, since = loop.trouble or ("ok", "", None)
        key = (current, desired, state)
        if key != loop.recorded or now - loop.recorded_at >= STATUS_REFRESH:
            bounds = (g.min_workers, g.max_workers)
            await self.observer.status(
                GroupStatus(g.name, g.queue, g.provider, *bounds, current, desired, now, state, message, since)
            )
            loop.recorded, loop.recorded_at = key, now

    async def _stop_lapsed(self, loop: GroupLoop, worker_ids: list[str]) -> None:
        """Stop workers that did not register within startup_grace, deleting their machines, and say why."""
        g = loop.group
        try:
            why = await loop.provider.why_not_up(g, worker_ids)
        except Exception as exc:  # the reason is a courtesy: the machine goes regardless
            log.warning("group %s: could not ask provider %s why workers did not start: %s", g.name, g.provider, exc)
            why = {}
        for worker_id in worker_ids:
            await loop.provider.stop(g, worker_id, force=True)
            loop.pending.pop(worker_id, None)  # stopped here: its vanishing is no early exit
            loop.lapsed.add(worker_id)
            said = why.get(worker_id) or f"provider {g.provider} says nothing more (see the worker's log)"
            reason = (
                f"worker {worker_id} did not register within startup_grace ({g.startup_grace:g} s): {said}; "
                "stopped it and deleting its machine"
            )
            log.warning("group %s: %s", g.name, reason)
            await self.observer.record(g.name, "not_registered", None, None, reason)

    async def _note_crash_loop(self, loop: GroupLoop, now: float) -> None:
        g = loop.group
        loop.retry_at = now + loop.crash_backoff
        reason = (
            f"{loop.early_exits} workers in a row exited before registering with the server (a refused worker "
            f"token, a wrong server URL, a broken worker image?): see the workers' logs on provider {g.provider}; "
            f"trying again in {loop.crash_backoff:.0f} s"
        )
        log.warning("group %s: %s", g.name, reason)
        loop.crash_backoff = min(loop.crash_backoff * 2, 300.0)
        loop.early_exits = 2  # one more early exit after the pause trips this again
        await self.observer.record(g.name, "error", None, None, reason)

    @staticmethod
    def _left(loop: GroupLoop, provider_workers: list[ProviderWorker], registered: list[Worker]) -> set[str]:
        """The listed workers that have left the server: marked gone, or seen registered and forgotten since. The
        provider is told (``reap``): where a machine outlives its worker, only the controller knows it is empty."""
        listed = {w.id for w in provider_workers}
        states = {w.id: w.state for w in registered}
        loop.known = (loop.known | {i for i, state in states.items() if state != "gone"}) & listed
        return {i for i in listed if states.get(i) == "gone" or (i in loop.known and i not in states)}

    async def _crash_looping(
        self, loop: GroupLoop, provider_workers: list[ProviderWorker], registered: list[Worker], now: float
    ) -> bool:
        """Track started workers until they register; True (and pause the group) when they keep dying first."""
        listed = {w.id for w in provider_workers}
        known = {w.id for w in registered if w.state != "gone"}
        for worker_id in list(loop.pending):
            if worker_id in known:
                del loop.pending[worker_id]
                loop.early_exits, loop.crash_backoff = 0, 5.0
            elif worker_id not in listed:
                del loop.pending[worker_id]
                loop.early_exits += 1
        if loop.early_exits >= 3:
            await self._note_crash_loop(loop, now)
            return True
        return False
