"""A worker's empty store try stands for its next claim only while it is fresh and nothing was notified since."""

from __future__ import annotations

from scaleq.notify import Notifier
from scaleq.server.liveness import FRESH_SECONDS, OpenClaims
from tests.helpers.drivers import FakeClock


def test_an_empty_try_lets_the_next_claim_park_once() -> None:
    n, clock = Notifier(), FakeClock(100.0)
    claims = OpenClaims(clock)
    claims.found_nothing("w", n.generation("q"))
    clock.advance(FRESH_SECONDS / 2)
    assert claims.nothing_new("w", n.generation("q"))
    assert not claims.nothing_new("w", n.generation("q"))  # once: the claim after that one tries the store


def test_a_wake_of_the_queue_or_of_any_worker_since_the_try_means_try_again() -> None:
    n = Notifier()
    claims = OpenClaims(FakeClock(100.0))
    claims.found_nothing("w", n.generation("q"))
    n.submitted("q", "job-1")
    assert not claims.nothing_new("w", n.generation("q"))
    claims.found_nothing("w", n.generation("q"))
    n.notify("worker:other")  # a drain (of any worker: the count is one for all)
    assert not claims.nothing_new("w", n.generation("q"))
    claims.found_nothing("w", n.generation("q"))
    n.deliver(("queue:q",))  # another server's submit
    assert not claims.nothing_new("w", n.generation("q"))


def test_a_wake_of_another_queue_changes_nothing() -> None:
    n = Notifier()
    claims = OpenClaims(FakeClock(100.0))
    claims.found_nothing("w", n.generation("q"))
    n.submitted("other", "job-1")
    assert claims.nothing_new("w", n.generation("q"))


def test_an_empty_try_goes_stale_and_a_registration_forgets_it() -> None:
    n, clock = Notifier(), FakeClock(100.0)
    claims = OpenClaims(clock)
    claims.found_nothing("w", n.generation("q"))
    clock.advance(FRESH_SECONDS)
    assert not claims.nothing_new("w", n.generation("q"))  # a notice that never came costs one long-poll at most
    claims.found_nothing("w", n.generation("q"))
    claims.forget("w")
    assert not claims.nothing_new("w", n.generation("q"))
