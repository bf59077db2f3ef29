"""Whether anything can run a job just submitted: a warning for the submitter, never a refusal.

A job nothing can run would wait in its queue forever without a word: a typo in the queue's name, a GPU job on a
queue whose groups have none, a tag no worker carries. At submit time the server looks at what it knows — the
workers registered on the queue, and the grid's groups when it runs the controller itself (``scaleq up``) — and when
none of them fits, says why in the answer (``warning``). The job is queued all the same: a worker started by hand, a
group added later, may still take it. With no grid in the process (``scaleq server``) and no worker on the queue,
the server cannot tell, and says nothing.

Answers are cached per (queue, requirements) for a few seconds: a batch of a thousand alike jobs costs one look.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from scaleq.jobs import JobDefinition
from scaleq.store.base import Store

CACHE_SECONDS = 5.0


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
        workers = await self.store.list_workers(queue=queue)
        offers = [(f"worker {w.id}", w.capabilities()) for w in workers if w.state == "active"]
        if self.groups is not None:
            offers += [(f"group {g.name}", g.capabilities()) for g in self.groups if g.queue == queue]
        elif not offers:
            return None  # an autoscaler elsewhere may have groups for it: cannot tell
        misfits = []
        for who, caps in offers:
            why = caps.misfit(definition)
            if why is None:
                return None
            misfits.append(f"{who} {why}")
        if not misfits:
            return (
                f"nothing here runs queue {queue!r}: no group of this grid and no worker takes it "
                "(it waits until one does)"
            )
        return f"nothing here can run this job yet: {'; '.join(misfits[:3])}" + (
            f"; and {len(misfits) - 3} more" if len(misfits) > 3 else ""
        )
