"""In-process wake-ups: a submit wakes the claims waiting on its queue, a finish wakes whoever follows the job.

Keys are plain strings (``queue:<name>``, ``job:<id>``, ``any``). A waiter takes the key's current event *before*
it checks its condition, then waits on it, so a notify between the check and the wait is never lost. Events live
only while someone holds them (weak values), so idle keys cost nothing. Across servers (PostgreSQL) the same
``notify`` is fed by LISTEN/NOTIFY. The server's routes wait on it and so does the controller running in the same
process (``scaleq up``), which wakes on every job event: that is why it sits below both.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable


class Notifier:
    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, asyncio.Event] = weakref.WeakValueDictionary()
        #: called with the keys of every local notify, to tell other servers (PostgreSQL NOTIFY)
        self.forward: Callable[[tuple[str, ...]], None] | None = None

    def event(self, key: str) -> asyncio.Event:
        ev = self._events.get(key)
        if ev is None:
            ev = asyncio.Event()
            self._events[key] = ev
        return ev

    def notify(self, *keys: str) -> None:
        self.deliver(keys)
        if self.forward is not None:
            self.forward(keys)

    def deliver(self, keys: tuple[str, ...]) -> None:
        """Wake the local waiters of ``keys`` (what another server published arrives here)."""
        for key in keys:
            ev = self._events.pop(key, None)
            if ev is not None:
                ev.set()

    def submitted(self, queue: str, job_id: str) -> None:
        self.notify(f"queue:{queue}", f"job:{job_id}", "any")

    def changed(self, job_id: str) -> None:
        self.notify(f"job:{job_id}", "any")


async def wait(ev: asyncio.Event, timeout: float) -> bool:
    """Wait for ``ev`` up to ``timeout`` seconds; True when it fired."""
    if timeout <= 0:
        return ev.is_set()
    try:
        await asyncio.wait_for(ev.wait(), timeout)
    except TimeoutError:
        return False
    return True


async def wait_any(events: tuple[asyncio.Event, ...], timeout: float) -> bool:
    """Wait until any of ``events`` fires, up to ``timeout`` seconds; True when one did."""
    if any(ev.is_set() for ev in events):
        return True
    if timeout <= 0:
        return False
    tasks = [asyncio.ensure_future(ev.wait()) for ev in events]
    done, pending = await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    for t in pending:
        t.cancel()
    return bool(done)
