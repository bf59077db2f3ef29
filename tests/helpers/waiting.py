"""Waiting for a condition with a bound, instead of sleeping for a guessed time: :func:`eventually` on the event loop,
:func:`wait_for` from plain (thread or subprocess-driving) code. Both poll until the check returns something truthy
and return it, or fail naming what was awaited and the last value seen — so a loaded machine only makes a test
slower, never wrong."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any


async def eventually(
    check: Callable[[], Awaitable[Any]], timeout: float = 15.0, *, what: str = "condition", every: float = 0.1
) -> Any:
    """Poll ``check`` until it returns something truthy (returned), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        assert time.monotonic() < deadline, f"{what}: not reached in {timeout:g} s (last: {result!r})"
        await asyncio.sleep(every)


def wait_for(predicate: Callable[[], Any], timeout: float, interval: float = 0.2, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; that value, or fail naming ``what``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last: {last!r}")
        time.sleep(interval)
