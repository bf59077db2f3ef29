"""``scaleq.loop.wait_set``: an event waited for with a timeout, and a cancel of the waiter that is never lost."""

from __future__ import annotations

import asyncio

from scaleq.loop import wait_set


async def test_it_says_whether_the_event_was_set_in_time() -> None:
    ev = asyncio.Event()
    assert await wait_set(ev, 0.01) is False
    asyncio.get_running_loop().call_later(0.01, ev.set)
    assert await wait_set(ev, 5) is True
    assert await wait_set(ev, 0) is True  # set already: no wait


async def test_a_loop_of_waits_stops_when_cancelled_as_the_event_is_set() -> None:
    # Python 3.11's wait_for(ev.wait(), t) returns when the waiter is cancelled in the same turn as the event is set:
    # the cancel is lost, and a loop of such waits (a worker's heartbeats, stopped at exit) never stops.
    ev = asyncio.Event()
    turns = 0

    async def beats() -> None:
        nonlocal turns
        while True:
            ev.clear()
            await wait_set(ev, 10)
            turns += 1

    task = asyncio.create_task(beats())
    await asyncio.sleep(0.01)  # waiting on the event
    ev.set()
    task.cancel()
    await asyncio.wait({task}, timeout=2)
    assert task.done() and task.cancelled()
    assert turns == 0
