"""The event loop of the long-running commands (``up``, ``server``, ``worker``, ``autoscale``).

uvloop when it is installed (it comes with ``uvicorn[standard]``): the server spends a large share of each request
in the event loop itself (a profile of the claim path showed the pure-Python loop at about a fifth of the server's
time), and uvloop's loop does the same work in C. The short CLI commands keep ``asyncio.run``: they make a handful
of requests, where a faster loop changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(main)
    return uvloop.run(main)
