"""The server's collection schedule: young generations left to CPython, the whole heap on a timer, all undone after."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from scaleq.server.gcpolicy import NEVER, GcPolicy


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def make_cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


@pytest.fixture
def policy():
    pauses: list[float] = []
    p = GcPolicy(30.0, observe=pauses.append)
    before = gc.get_threshold()
    yield p, pauses, before
    p.uninstall()
    assert gc.get_threshold() == before


def test_install_freezes_start_up_and_turns_off_automatic_full_collections(policy) -> None:
    p, _, before = policy
    p.install()
    assert gc.get_threshold() == (before[0], before[1], NEVER)
    assert gc.get_freeze_count() > 0  # what start-up built is no longer scanned
    p.uninstall()
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_timed_collection_frees_cycles_and_reports_its_pause(policy) -> None:
    p, pauses, _ = policy
    p.install()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 2:
            raise asyncio.CancelledError

    p.sleep = sleep
    gc.disable()  # no automatic collection may free the cycle: only the policy's
    try:
        ref = make_cycle()
        assert ref() is not None
        with pytest.raises(asyncio.CancelledError):
            asyncio.run(p.run())
    finally:
        gc.enable()
    assert ref() is None  # the cycle was unreachable: the timed full collection freed it
    assert slept == [30.0, 30.0, 30.0]
    assert len(pauses) == 2 and all(x >= 0 for x in pauses)


def test_the_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="every"):
        GcPolicy(0)
