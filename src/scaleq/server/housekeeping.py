"""The server's timer: put expired leases back in their queues, keep workers with parked claims alive, and mark
silent workers gone.

Leases expire on the store's clock, checked once per ``sweep_interval``; a requeued job wakes the claims waiting on
its queue at once. At start-up the running leases of workers not marked gone get a fresh ``lease_seconds`` of
grace, so a server restart (or ``kill -9``) does not expire the jobs of workers that were merely unable to reach it
(a worker whose beat failed tries again at the settings' beat, not at a large fleet's slower one).
Every ``heartbeat_seconds`` the workers whose claims are parked here are marked heard from, in one round trip
(:mod:`scaleq.server.liveness`): an idle worker needs no heartbeat of its own; and the busy workers are counted,
which sets how often they beat and how long their leases last (:mod:`scaleq.server.cadence`).
A lease gets that grace once until its worker is heard from again: servers restarting in a loop (or, on PostgreSQL,
any of several servers restarting) cannot keep a dead worker's job from going back to its queue.

Each round's duration goes to ``scaleq_housekeeping_seconds`` on ``/metrics``, and a round slower than
``SLOW_ROUNDS`` heartbeats is logged: its touches of the parked workers were late by as much, and with several
servers on one database another server marks a worker gone once it has gone ``worker_gone_after`` untouched.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from scaleq.notify import Notifier
from scaleq.server.cadence import Cadence
from scaleq.server.liveness import OpenClaims, touch_parked
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store

log = logging.getLogger("scaleq.server")

#: A round of housekeeping longer than this many heartbeats is logged as slow.
SLOW_ROUNDS = 5


async def sweep_once(store: Store, notifier: Notifier, settings: ServerSettings, now: float) -> int:
    expired = await store.expire_leases(now)
    for e in expired:
        if e.state == "queued":
            notifier.submitted(e.queue, e.job_id)
            log.info("lease of job %s expired; back in queue %s", e.job_id[:12], e.queue)
        else:
            notifier.changed(e.job_id)
            log.warning("job %s lost its worker too often; finished as worker_lost", e.job_id[:12])
    return len(expired)


async def tick(
    store: Store,
    notifier: Notifier,
    settings: ServerSettings,
    now: float,
    open_claims: OpenClaims | None = None,
    *,
    touch: bool = True,
    mark_gone: bool = True,
    cadence: Cadence | None = None,
) -> list[str]:
    """One round of housekeeping at ``now``: the workers parked here heard from (``touch``), expired leases swept,
    the queue counts' deltas folded, the busy workers counted into ``cadence`` (with ``touch``), silent workers
    marked gone (``mark_gone``). The workers marked gone."""
    if touch and open_claims is not None:
        await touch_parked(store, open_claims, notifier, now)
    await sweep_once(store, notifier, settings, now)
    await store.fold_queue_counts()
    if cadence is not None and touch:
        cadence.count(await store.busy_workers())
    if not mark_gone:
        return []
    silent = cadence.gone_after() if cadence is not None else settings.worker_gone_after
    gone = await store.mark_gone_workers(now - silent, now - settings.worker_forget_after)
    for worker_id in gone:
        log.warning("worker %s stopped heartbeating (silent for over %.0f s); marked gone", worker_id, silent)
    if gone:
        notifier.notify("any")
    return gone


async def run(
    store: Store,
    notifier: Notifier,
    settings: ServerSettings,
    clock: Callable[[], float],
    open_claims: OpenClaims | None = None,
    on_gone: Callable[[str], None] = lambda worker_id: None,
    observe: Callable[[float], None] = lambda seconds: None,
    cadence: Cadence | None = None,
) -> None:
    """``on_gone``: told each worker this server marks gone (the server drops what it remembers of it); ``observe``:
    told each round's duration in seconds; ``cadence``: kept to the busy workers' count."""
    await store.extend_leases(clock(), settings.lease_seconds)
    ticks = 0
    touch_every = max(1, int(settings.heartbeat_seconds / settings.sweep_interval))
    while True:
        began = time.perf_counter()
        try:
            gone = await tick(
                store,
                notifier,
                settings,
                clock(),
                open_claims,
                touch=ticks % touch_every == 0,
                mark_gone=ticks % 10 == 0,
                cadence=cadence,
            )
            for worker_id in gone:
                on_gone(worker_id)
        except Exception:  # a sweep must never stop sweeping
            log.exception("housekeeping failed; retrying")
        took = time.perf_counter() - began
        observe(took)
        if took > SLOW_ROUNDS * settings.heartbeat_seconds:
            log.warning(
                "housekeeping took %.1f s (the workers parked here were touched that late: %d parked)",
                took,
                len(open_claims) if open_claims is not None else 0,
            )
        ticks += 1
        await asyncio.sleep(settings.sweep_interval)
