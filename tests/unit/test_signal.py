"""``wait_any`` over :class:`Signal` s: one future for all of them, and nothing left behind whichever way it ends."""

from __future__ import annotations

import asyncio

import pytest

from scaleq.notify import Signal, wait_any


async def test_the_first_signal_set_wakes_the_waiter_and_both_let_go() -> None:
    a, b = Signal(), Signal()
    waiting = asyncio.create_task(wait_any((a, b), 60))
    await asyncio.sleep(0)
    assert len(a.listeners) == len(b.listeners) == 1  # one future, shared
    b.set()
    assert await waiting is True
    assert a.listeners == [] and b.listeners == []
    assert b.is_set() and not a.is_set()


async def test_no_signal_within_the_timeout_is_false_and_leaves_no_listener() -> None:
    a, b = Signal(), Signal()
    assert await wait_any((a, b), 0.01) is False
    assert a.listeners == [] and b.listeners == []


async def test_a_set_signal_or_no_time_answers_at_once() -> None:
    a, b = Signal(), Signal()
    assert await wait_any((a, b), 0) is False
    a.set()
    assert await wait_any((a, b), 0) is True
    assert a.listeners == [] and b.listeners == []


async def test_a_cancelled_waiter_leaves_no_listener() -> None:
    a = Signal()
    waiting = asyncio.create_task(wait_any((a,), 60))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert a.listeners == []
    a.set()  # setting it later resolves nothing stale


async def test_a_signal_is_still_an_event() -> None:
    a = Signal()
    waiter = asyncio.create_task(a.wait())
    await asyncio.sleep(0)
    a.set()
    assert await waiter is True
