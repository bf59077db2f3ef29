"""Parked claims are woken one at a time, oldest first; a wake passed on reaches each older claim once, and stops
after a run of claims that found nothing — or, when it stood for one job (this server's own), where that was taken."""

from __future__ import annotations

from scaleq.notify import MAX_EMPTY_PASSES, Notifier


def test_a_submit_wakes_one_claim_the_oldest() -> None:
    n = Notifier()
    old, new = n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    assert old.event.is_set() and not new.event.is_set()
    assert n.parked("q") == 1


def test_a_wake_passed_on_reaches_each_claim_parked_before_it_once_then_ends() -> None:
    n = Notifier()
    a, b = n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    late = n.park("q")  # parked after the wake: a pass of it never reaches this one
    assert [w.event.is_set() for w in (a, b, late)] == [True, False, False]
    # a tries the store and finds nothing it can run: it parks again and passes the wake on
    a.handled = True
    n.unpark(a)
    a2 = n.park("q")
    assert n.wake_claims("q", 1, before=a.mark) == 1 and b.event.is_set()
    b.handled = True
    n.unpark(b)
    assert n.wake_claims("q", 1, before=a.mark) == 0  # every claim parked before the wake has tried: the chain ends
    assert not late.event.is_set() and not a2.event.is_set()


def test_a_wake_not_acted_on_goes_to_the_next_claim_in_line() -> None:
    n = Notifier()
    first, second = n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    n.unpark(first)  # woken, then gone (its worker left) without trying the store
    assert second.event.is_set()


def test_a_wake_stops_after_a_run_of_claims_that_found_nothing() -> None:
    """One job no parked worker can run must not cost a store try for every parked claim."""
    n = Notifier()
    parked = [n.park("q") for _ in range(MAX_EMPTY_PASSES + 20)]
    n.submitted("q", "job-1")
    tried = 0
    while (woken := next((w for w in parked if w.event.is_set() and not w.handled), None)) is not None:
        tried += 1  # it tries the store and finds nothing it can run
        woken.handled = True
        n.unpark(woken)
        n.pass_on(woken, found=False)
    assert tried == MAX_EMPTY_PASSES
    assert n.parked("q") == 20  # the rest were never woken: their next claims will look for themselves


def test_a_claim_that_took_a_job_starts_the_count_of_empty_ones_over() -> None:
    n = Notifier()
    parked = [n.park("q") for _ in range(MAX_EMPTY_PASSES * 2)]
    n.deliver(("queue:q",))  # another server's wake: it may stand for many jobs, so a claim that took one passes it
    tried = 0
    while (woken := next((w for w in parked if w.event.is_set() and not w.handled), None)) is not None:
        tried += 1
        woken.handled = True
        n.unpark(woken)
        n.pass_on(woken, found=tried == MAX_EMPTY_PASSES - 1)  # one of them, late in the run, took a job
    assert tried == (MAX_EMPTY_PASSES - 1) + MAX_EMPTY_PASSES


def test_a_local_wake_stands_for_one_job_and_stops_where_it_is_taken() -> None:
    """This server's submit notifies once per job: the claim that takes it has nothing to pass on."""
    n = Notifier()
    a, b = n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    assert a.event.is_set() and a.single
    a.handled = True
    n.unpark(a)
    assert n.pass_on(a, found=True) == 0 and not b.event.is_set()


def test_another_servers_wake_is_passed_on_after_a_claim_takes_all_it_asked_for() -> None:
    n = Notifier()
    a, b = n.park("q"), n.park("q")
    n.deliver(("queue:q",))  # one NOTIFY for a batch of jobs
    assert a.event.is_set() and not a.single
    a.handled = True
    n.unpark(a)
    assert n.pass_on(a, found=True) == 1 and b.event.is_set() and not b.single


def test_a_single_wake_that_finds_nothing_is_passed_on_and_stays_single() -> None:
    n = Notifier()
    a, b, c = n.park("q"), n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    a.handled = True
    n.unpark(a)
    assert n.pass_on(a, found=False) == 1 and b.event.is_set() and b.single
    b.handled = True
    n.unpark(b)
    assert n.pass_on(b, found=True) == 0 and not c.event.is_set()
