"""How late the server's event loop runs: the one number that says whether a server keeps up with its fleet.

Everything a server does for its workers — answering claims, renewing leases, waking parked claims — waits its turn
on one event loop. When the loop falls behind (too many requests for one core, a long garbage collection, a slow
call made on the loop by mistake), every answer is late by as much, and a worker's lease comes that much closer to
expiring. :func:`watch` asks for a wake-up every ``interval`` and records how much later than asked it came, into
``scaleq_event_loop_lag_seconds`` on ``/metrics``: its high buckets filling is the first sign a server carries more
workers than it should (see docs/benchmarks.md, "Fleet scale", for what one server carries).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

INTERVAL = 0.1


async def watch(
    observe: Callable[[float], None],
    interval: float = INTERVAL,
    *,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    timer: Callable[[], float] = time.perf_counter,
) -> None:
    """Observe the loop's lag every ``interval`` seconds, until cancelled."""
    while True:
        asked = timer()
        await sleep(interval)
        observe(max(0.0, timer() - asked - interval))
