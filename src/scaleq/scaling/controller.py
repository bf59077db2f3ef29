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
  The status also says what capacity is coming, for the start-time estimate of queued jobs (:mod:`scaleq.eta`):
  the group's slots, when each worker still starting was asked for, and the median of the last boots seen (from
  asking the provider to the worker's registration).
- **Hand back what preemption took.** A registered worker that holds jobs and has been silent for
  ``SILENT_AFTER`` seconds is a suspect; the provider is asked whether it took the machine back (``preempted``), and
  the jobs of those it did go back to their queues at once, attempts ending ``preempted`` and not counted — before
  their leases would expire and count each as a lost attempt. Each is an event (``preempted``) with the provider's
  words.

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
import functools
import logging
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Protocol

from scaleq.doctor.checks import Check
from scaleq.grid import Group
from scaleq.jobs import Worker
from scaleq.providers.base import CapacityRefused, Provider, ProviderWorker
from scaleq.scaling.policy import Decision, Demand, PolicyState, decide, worker_views
from scaleq.scaling.signal_checks import (
    DISAGREE_AFTER,
    agreement_check,
    agrees,
    reading_check,
    signal_fix,
    targets_check,
)
from scaleq.scaling.signals import SignalError, combine, describe, read_external
from scaleq.store.base import GroupStatus

log = logging.getLogger("scaleq.controller")
#: Seconds between rewrites of an unchanged group status.
STATUS_REFRESH = 5.0
#: A worker holding jobs that has not heartbeated for this long is asked about (provider.preempted): well inside a
#: lease (15 s by default), so that its jobs come back before the leases expire and count as lost.
SILENT_AFTER = 3.0
#: The same silent worker is asked about again after this long (the provider may not know yet).
ASK_AGAIN = 3.0
#: Boots remembered per group: their median is the group's typical boot in its status.
BOOTS_KEPT = 20


class Observer(Protocol):
    """Where the controller reads signals and writes what it did (the store in-process, the API remotely)."""

    async def demand(self, group: Group) -> Demand: ...
    async def registered(self, group: Group) -> list[Worker]:
        """The group's workers as the server knows them, gone ones included (it keeps them a while)."""
        ...

    async def queued(self, queue: str) -> int: ...  # every queued job of the queue, runnable by the group or not
    async def drain(self, worker_id: str) -> None: ...
    async def release_worker(self, worker_id: str) -> list[str]:
        """Hand the worker's running jobs back (its provider reports it preempted); their ids."""
        ...

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
    # (current, desired, note, state, workers starting) last written as the status
    recorded: tuple[int, int, str, str, int] | None = None
    recorded_at: float = float("-inf")
    checks: tuple[Check, ...] = ()  # the signal checks last written with the status
    trouble: tuple[str, str, float] | None = None  # (state, message, since) while steps fail
    lapsed: set[str] = field(default_factory=set)  # workers stopped for not registering in time, while listed
    signal_error: str | None = None  # the external signal's error while the server's own count stands in for it
    disagree_since: float | None = None  # the external signal has read other than the server's count since then
    own: Demand | None = None  # the server's own count at the last external reading
    targets: tuple[float, Check] | None = None  # the last scrape-targets check of a promql signal, and when
    unrunnable: int = 0  # queued jobs of the group's queue that it cannot run, at the last status refresh
    asked: dict[str, float] = field(default_factory=dict)  # silent workers asked about (provider.preempted), when
    # for the start-time estimate of queued jobs (scaleq.eta), written with the status: the last boots seen (seconds
    # from asking the provider to registration) and when each worker still starting was asked for
    boots: deque[float] = field(default_factory=lambda: deque(maxlen=BOOTS_KEPT))
    starting: tuple[float, ...] = ()


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
        try:
            while True:
                await self.step()
                # react at once to the first event, but at most every min_interval under a storm of them
                await asyncio.sleep(self.min_interval)
                await self.observer.wait_for_change(self.tick)
        finally:
            # say so, or plan/destroy and doctor would take the last status for a live controller for a while
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._stopped(), 2.0)

    async def _stopped(self) -> None:
        for loop in self.loops:
            if loop.recorded is not None:
                current, desired, note = loop.recorded[:3]
                await self.observer.status(
                    self._group_status(loop, current, desired, note, self.clock(), reporter="stopped")
                )

    async def step(self) -> None:
        await asyncio.gather(*(self.step_group(loop) for loop in self.loops))

    async def step_group(self, loop: GroupLoop) -> Decision | None:
        g, now = loop.group, self.clock()
        if now < loop.retry_at:
            if loop.trouble is not None and loop.recorded is not None:  # backing off: the state stays fresh
                with contextlib.suppress(Exception):
                    await self._status(loop, *loop.recorded[:3], now)
            return None
        try:
            demand, reading, signal_error = await self._demand(loop)
            provider_workers = await loop.provider.workers(g)
            registered = await self.observer.registered(g)
            if left := self._left(loop, provider_workers, registered):
                reaped = await loop.provider.reap(g, left)
                provider_workers = [replace(w, status="stopping") if w.id in reaped else w for w in provider_workers]
            await self._hand_back_preempted(loop, registered, now)
            if await self._crash_looping(loop, provider_workers, registered, now):
                return None
            views = worker_views(provider_workers, registered)
            decision = decide(demand, views, g.policy(), loop.state, now)
            loop.state, loop.last = decision.state, decision
            current = sum(1 for v in views if v.state != "draining")
            loop.lapsed &= {w.id for w in provider_workers}
            if fresh := [i for i in decision.lapsed if i not in loop.lapsed]:
                await self._stop_lapsed(loop, fresh)
            booting = [v.started_at for v in views if v.state == "starting" and v.id not in decision.lapsed]
            if decision.start:
                started = await loop.provider.start(g, decision.start)
                loop.pending.update(dict.fromkeys(started, now))
                booting += [now] * len(started)
                log.info("group %s: started %s", g.name, ", ".join(started))
            loop.starting = tuple(sorted(booting))
            for worker_id in decision.drain:
                await self.observer.drain(worker_id)
            if decision.start or decision.drain or decision.desired != loop.last_desired:
                kind = "scale_up" if decision.start else "scale_down" if decision.drain else "desired"
                reason = decision.reason
                if signal_error is not None:
                    reason = f"{describe(g.signal)} failed, sized on the server's own count: {reason}"
                elif reading is not None:
                    added = f" (+ {demand.running} running, the server's count)" if g.signal.counts == "queued" else ""
                    reason = f"{describe(g.signal)} reads {reading.queued}{added}: {reason}"
                await self.observer.record(g.name, kind, current, decision.desired, reason)
                loop.last_desired = decision.desired
            loop.trouble = None
            if now - loop.recorded_at >= STATUS_REFRESH:
                await self._unrunnable(loop, demand, own_queued=demand.queued if reading is None else None)
            note = self._note(loop, demand)
            after = current + decision.start - len(decision.drain)
            checks = functools.partial(self._signal_checks, loop, reading, demand, now)
            await self._status(loop, after, decision.desired, note, now, checks)
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
                current, desired, note = loop.recorded[:3] if loop.recorded else (0, loop.last_desired or 0, "")
                await self._status(loop, current, desired, note, now)
            return None

    async def _status(
        self,
        loop: GroupLoop,
        current: int,
        desired: int,
        note: str,
        now: float,
        checks: Callable[[], Awaitable[tuple[Check, ...]]] | None = None,
    ) -> None:
        """Write the group's status when it changes. Under a stream of jobs the controller steps up to 20 times a
        second: the status is a store write, so it is otherwise refreshed every STATUS_REFRESH seconds (its age is
        how the dashboard and doctor tell a live controller from a stopped one). ``checks`` reads the signal checks
        afresh when the status is written; without it (a failing step) the last ones stand."""
        state = loop.trouble[0] if loop.trouble else "ok"
        key = (current, desired, note, state, len(loop.starting))
        if key != loop.recorded or now - loop.recorded_at >= STATUS_REFRESH:
            if checks is not None:
                loop.checks = await checks()
            await self.observer.status(self._group_status(loop, current, desired, note, now))
            loop.recorded, loop.recorded_at = key, now

    @staticmethod
    def _group_status(
        loop: GroupLoop, current: int, desired: int, note: str, at: float, reporter: str = "controller"
    ) -> GroupStatus:
        g = loop.group
        state, message, since = loop.trouble or ("ok", "", None)
        return GroupStatus(
            g.name,
            g.queue,
            g.provider,
            g.min_workers,
            g.max_workers,
            current,
            desired,
            at,
            note,
            loop.checks,
            reporter,
            state=state,
            message=message,
            state_since=since,
            price_per_hour=g.price_per_hour,
            slots=g.slots,
            boot_seconds=statistics.median(loop.boots) if loop.boots else None,
            starting=loop.starting,
        )

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

    async def _demand(self, loop: GroupLoop) -> tuple[Demand, Demand | None, str | None]:
        """The group's demand, the external signal's reading (None for the server signal or when it failed) and
        its error. A failing external signal is never read as 0: the server's own count stands in, and the change
        either way is recorded as an event (``fallback`` / ``recovered``)."""
        g = loop.group
        own = await self.observer.demand(g)
        if g.signal.kind == "server":
            return own, None, None
        try:
            reading = await read_external(g.signal)
        except SignalError as exc:
            if loop.signal_error is None:
                log.warning("group %s: signal failed, using the server's own count: %s", g.name, exc)
                await self.observer.record(
                    g.name,
                    "fallback",
                    None,
                    None,
                    f"{describe(g.signal)} failed ({exc}); sizing the group on the server's own count "
                    f"({own.queued} queued, {own.running} running) until it answers again",
                )
            loop.signal_error, loop.disagree_since = str(exc), None
            return own, None, str(exc)
        if loop.signal_error is not None:
            await self.observer.record(
                g.name, "recovered", None, None, f"{describe(g.signal)} answers again: reads {reading.queued}"
            )
            loop.signal_error = None
        if agrees(g.signal, reading, own):
            loop.disagree_since = None
        elif loop.disagree_since is None:
            loop.disagree_since = self.clock()
        loop.own = own
        return combine(g.signal, reading, own), reading, None

    async def _unrunnable(self, loop: GroupLoop, demand: Demand, own_queued: int | None) -> None:
        """Count the queue's jobs the group cannot run (a runtime, resources or tags its workers lack), and record
        an event when some appear: otherwise its decisions say "0 jobs waiting" while 'scaleq queues' shows them."""
        g = loop.group
        if own_queued is None:  # an external signal: the server's own count of what the group can run
            own_queued = loop.own.queued if loop.own is not None else 0
        if demand.capped or (loop.own is not None and loop.own.capped):
            return  # counted only up to what the group can run at once: the rest is unknown, and needs no words
        unrunnable = max(0, await self.observer.queued(g.queue) - own_queued)
        if unrunnable and not loop.unrunnable:
            await self.observer.record(
                g.name,
                "unrunnable",
                None,
                None,
                f"{unrunnable} job(s) queued on queue {g.queue} that this group cannot run (they ask for a runtime, "
                f"resources or tags its workers lack), so it does not count them; 'scaleq jobs --queue {g.queue} "
                "--state queued' lists them",
            )
        loop.unrunnable = unrunnable

    def _note(self, loop: GroupLoop, demand: Demand) -> str:
        """What the group's status says in words: at max_workers with more wanted, a signal fallen back from."""
        g, parts = loop.group, []
        need = -(-(demand.queued + demand.running) // g.slots)
        if need > g.max_workers or (demand.capped and need >= g.max_workers):
            wanted = "more" if demand.capped else str(need)
            parts.append(f"capped at max_workers {g.max_workers} ({wanted} wanted)")
        if loop.signal_error is not None:
            parts.append(f"{describe(g.signal)} failing: sized on the server's own count")
        if loop.unrunnable:
            parts.append(f"{loop.unrunnable} queued job(s) on queue {g.queue} it cannot run")
        return "; ".join(parts)

    async def _signal_checks(
        self, loop: GroupLoop, reading: Demand | None, demand: Demand, now: float
    ) -> tuple[Check, ...]:
        """The controller's checks of an external signal, written with the group's status."""
        g = loop.group
        if g.signal.kind == "server":
            return ()
        checks = [reading_check(g, reading, loop.signal_error, signal_fix(g), fallback=True)]
        if g.signal.kind == "promql":
            # a status is written on every change under a stream of jobs: ask Prometheus every STATUS_REFRESH only
            if loop.targets is None or now - loop.targets[0] >= STATUS_REFRESH:
                loop.targets = (now, await targets_check(g))
            checks.append(loop.targets[1])
        if reading is not None and loop.own is not None:
            checks.append(
                agreement_check(g, reading, loop.own, since=loop.disagree_since, now=now, tolerate=DISAGREE_AFTER)
            )
        return tuple(checks)

    async def _hand_back_preempted(self, loop: GroupLoop, registered: list[Worker], now: float) -> None:
        """Ask the provider about the silent workers that hold jobs; hand back the jobs of those it took back."""
        silent = {w.id for w in registered if w.busy and now - w.last_heartbeat >= SILENT_AFTER}
        loop.asked = {i: at for i, at in loop.asked.items() if i in silent}
        ask = sorted(i for i in silent if now - loop.asked.get(i, float("-inf")) >= ASK_AGAIN)
        if not ask:
            return
        loop.asked.update(dict.fromkeys(ask, now))
        for worker_id, why in sorted((await loop.provider.preempted(loop.group, ask)).items()):
            jobs = await self.observer.release_worker(worker_id)
            reason = (
                f"worker {worker_id} was preempted ({why}): {len(jobs)} job(s) back in the queue without spending "
                "an attempt"
            )
            log.warning("group %s: %s", loop.group.name, reason)
            await self.observer.record(loop.group.name, "preempted", None, None, reason)

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
                loop.boots.append(max(0.0, now - loop.pending.pop(worker_id)))
                loop.early_exits, loop.crash_backoff = 0, 5.0
            elif worker_id not in listed:
                del loop.pending[worker_id]
                loop.early_exits += 1
        if loop.early_exits >= 3:
            await self._note_crash_loop(loop, now)
            return True
        return False
