"""The server's collection schedule: young generations left to CPython, the whole heap when due, all undone after."""

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
    p.clock = lambda: sum(slept)
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
    # collected at 30 s; finding little, the next is due 60 s later: not within the three sleeps
    assert len(pauses) == 1 and pauses[0] >= 0


class Heap:
    """What the policy sees of the process: a fake clock, the peak memory and the garbage each collection finds."""

    def __init__(self) -> None:
        self.now = 0.0
        self.peak = 100
        self.garbage = 0
        self.collected_at: list[float] = []

    def collect(self) -> int:
        self.collected_at.append(self.now)
        found, self.garbage = self.garbage, 0
        return found


def run_for(p: GcPolicy, heap: Heap, seconds: float, each_minute=lambda heap: None) -> None:
    """Run ``p`` on ``heap``'s fake clock for ``seconds``; ``each_minute`` changes the heap before each check."""

    async def sleep(dt: float) -> None:
        heap.now += dt
        if heap.now > seconds:
            raise asyncio.CancelledError
        each_minute(heap)

    p.sleep = sleep
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(p.run())


def policy_on(heap: Heap) -> GcPolicy:
    return GcPolicy(60.0, longest=960.0, clock=lambda: heap.now, memory=lambda: heap.peak, collect=heap.collect)


def test_collections_that_find_little_make_the_next_wait_longer_up_to_the_longest() -> None:
    heap = Heap()
    run_for(policy_on(heap), heap, 4000)
    assert heap.collected_at == [60, 180, 420, 900, 1860, 2820, 3780]  # 60, 120, 240, 480, then 960 s apart


def test_a_collection_that_finds_garbage_brings_the_wait_back_to_the_shortest() -> None:
    heap = Heap()

    def garbage_from_1000_s(heap: Heap) -> None:
        if 1000 <= heap.now <= 2000:
            heap.garbage += 20_000  # cycles outliving the young generations: 20,000 objects a minute

    run_for(policy_on(heap), heap, 2600, garbage_from_1000_s)
    # backing off until 900; the one at 1860 finds garbage, so a minute later again while it keeps coming; then
    # backing off once more
    assert heap.collected_at == [60, 180, 420, 900, 1860, 1920, 1980, 2040, 2160, 2400]


def test_the_heap_growing_by_a_quarter_collects_at_once_whatever_the_wait() -> None:
    heap = Heap()

    def grows_at_1000_s(heap: Heap) -> None:
        if heap.now == 1020:
            heap.peak = 126  # a quarter and more above the peak at the last collection

    run_for(policy_on(heap), heap, 1200, grows_at_1000_s)
    # at once, starting over from the shortest wait (which that collection, finding nothing, doubles)
    assert heap.collected_at == [60, 180, 420, 900, 1020, 1140]


def test_the_interval_must_be_positive_and_the_longest_no_shorter() -> None:
    with pytest.raises(ValueError, match="every"):
        GcPolicy(0)
    with pytest.raises(ValueError, match="longest"):
        GcPolicy(60, longest=30)
