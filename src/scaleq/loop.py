"""The event loop of the long-running commands (``up``, ``server``, ``worker``, ``autoscale``).

uvloop when it is installed (it comes with ``uvicorn[standard]``): the server spends a large share of each request
in the event loop itself (a profile of the claim path showed the pure-Python loop at about a fifth of the server's
time), and uvloop's loop does the same work in C. The short CLI commands keep ``asyncio.run``: they make a handful
of requests, where a faster loop changes nothing.

It also holds the one way scaleq runs a blocking call that may hang off the event loop (:func:`in_daemon_thread`),
shared by the worker's docker runtime and the providers, and the one way it waits for an event with a timeout
(:func:`wait_set`).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvicorn[standard] brings it
        return asyncio.run(main)
    return uvloop.run(main)


async def wait_set(ev: asyncio.Event, timeout: float) -> bool:
    """Wait for ``ev`` up to ``timeout`` seconds; True when it is set.

    Not ``asyncio.wait_for(ev.wait(), timeout)``: on Python 3.11, when the waiting task is cancelled just as the event
    is set, ``wait_for`` returns and the cancel is lost. A loop of such waits then never stops, and whoever awaits it
    waits for ever: a worker cancelling its heartbeats at exit as an answer quickened its beat hung there (the fleet
    bench's leaving workers did, a few in a hundred). ``asyncio.timeout`` keeps the cancel."""
    if ev.is_set():
        return True
    if timeout <= 0:
        return False
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(timeout):
            await ev.wait()
            return True
    return ev.is_set()  # (set in the very turn the timeout came)


def spawn_daemon(
    fn: Callable[[], T], loop: asyncio.AbstractEventLoop, future: asyncio.Future[T], name: str = "scaleq-call"
) -> None:
    """Run a blocking call on a daemon thread of its own; its outcome settles ``future`` (made beforehand in ``loop``).

    For calls that may block for long or hang: a daemon thread does not hold up the interpreter's exit, and a thread
    nobody waits for any more is simply left behind (the default executor's threads would be joined at shutdown).
    Callable from any thread."""

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def target() -> None:
        value: Any
        try:
            ok, value = True, fn()
        except BaseException as exc:
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            loop.call_soon_threadsafe(settle, ok, value)

    threading.Thread(target=target, daemon=True, name=name).start()


async def in_daemon_thread(fn: Callable[[], T], timeout: float | None = None, name: str = "scaleq-call") -> T:
    """Await ``fn()`` run on a daemon thread (:func:`spawn_daemon`), for at most ``timeout`` seconds."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()
    spawn_daemon(fn, loop, future, name)
    async with asyncio.timeout(timeout):  # (not wait_for, which can lose a cancel: see wait_set)
        return await future
