"""Whether anything can run a job just submitted: a warning for the submitter, never a refusal.

A job nothing can run would wait in its queue forever without a word: a typo in the queue's name, a GPU job on a
queue whose groups have none, a tag no worker carries. At submit time the server looks at what it knows — the
workers registered on the queue, and the grid's groups when it runs the controller itself (``scaleq up``) — and when
none of them fits, says why in the answer (``warning``). The job is queued all the same: a worker started by hand, a
group added later, may still take it. With no grid in the process (``scaleq server``) and no worker on the queue,
the server cannot tell, and says nothing.

Answers are cached per (queue, requirements) for a few seconds: a batch of a thousand alike jobs costs one look.

:func:`offers` (who could take a queue's jobs) and :func:`misfit_of` (why one cannot) are public: ``scaleq why``
(:mod:`scaleq.server.why`) explains a waiting job with the same look.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from scaleq.jobs import Capabilities, JobDefinition
from scaleq.store.base import Store

CACHE_SECONDS = 5.0


@dataclass(frozen=True)
class Offer:
    """Something that takes a queue's jobs: a registered, active worker or a group of the grid."""

    kind: str  # "worker" or "group"
    name: str
    capabilities: Capabilities

    @property
    def who(self) -> str:
        return f"{self.kind} {self.name}"


async def offers(store: Store, groups: Sequence[Any] | None, queue: str) -> list[Offer]:
    """The active workers registered on ``queue`` (one for each class of workers alike: a fleet of one machine type
    is one look, however large), then the grid's groups bound to it (``groups``: None when this process does not run
    the controller)."""
    found = [Offer("worker", o.name, o.capabilities) for o in await store.worker_offers(queue)]
    found += [Offer("group", g.name, g.capabilities()) for g in groups or () if g.queue == queue]
    return found


def misfit_of(offer: Offer, definition: JobDefinition) -> str | None:
    """Why ``offer`` cannot run the job, in words (the first reason), or None when it can."""
    return offer.capabilities.misfit(definition)


class RunnableCheck:
    def __init__(self, store: Store, groups: Sequence[Any] | None) -> None:
        self.store = store
        self.groups = groups  # scaleq.grid.Group, when this process runs the controller
        self._cache: dict[tuple[Any, ...], tuple[float, str | None]] = {}

    async def warning(self, queue: str, definition: JobDefinition) -> str | None:
        req = definition.requirements
        key = (queue, definition.runtime, req.cpus, req.memory, req.gpus, definition.network, *sorted(definition.tags))
        hit = self._cache.get(key)
        if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
            return hit[1]
        found = await self._look(queue, definition)
        if len(self._cache) > 1000:
            self._cache.clear()
        self._cache[key] = (time.monotonic(), found)
        return found

    async def _look(self, queue: str, definition: JobDefinition) -> str | None:
        found = await offers(self.store, self.groups, queue)
        if self.groups is None and not found:
            return None  # an autoscaler elsewhere may have groups for it: cannot tell
        misfits = []
        for offer in found:
            why = misfit_of(offer, definition)
            if why is None:
                return None
            misfits.append(f"{offer.who} {why}")
        if not misfits:
            return (
                f"nothing here runs queue {queue!r}: no group of this grid and no worker takes it "
                "(it waits until one does)"
            )
        return f"nothing here can run this job yet: {'; '.join(misfits[:3])}" + (
            f"; and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        )
