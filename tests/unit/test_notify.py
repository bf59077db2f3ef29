"""Parked claims are woken one at a time, oldest first; a wake passed on reaches each older claim once, and stops
after a run of claims that found nothing — or, when it stood for one job (this server's own), where that was taken."""

from __future__ import annotations

from scaleq.notify import MAX_EMPTY_PASSES, MISSED, Notifier


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


def test_a_local_wake_stands_for_its_job_and_is_spent_where_that_job_is_taken() -> None:
    """This server's submit notifies once per job: the claim that takes that job has nothing to pass on; one that
    took another (an older job, left without a wake) does not use it up."""
    n = Notifier()
    a = n.park("q")
    n.submitted("q", "job-1")
    assert a.event.is_set() and a.job == "job-1"
    assert n.spent(a, ["job-1"])
    assert not n.spent(a, ["job-0"])


def test_another_servers_wake_is_never_spent_by_a_claim_and_is_passed_on() -> None:
    n = Notifier()
    a, b = n.park("q"), n.park("q")
    n.deliver(("queue:q",))  # one NOTIFY for a batch of jobs
    assert a.event.is_set() and a.job is None and not n.spent(a, ["job-1"])
    a.handled = True
    n.unpark(a)
    assert n.pass_on(a, found=True) == 1 and b.event.is_set() and b.job is None


def test_a_local_wake_passed_on_keeps_standing_for_its_job() -> None:
    n = Notifier()
    a, b, c = n.park("q"), n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    a.handled = True
    n.unpark(a)
    assert n.pass_on(a, found=False) == 1 and b.event.is_set() and b.job == "job-1"
    n.unpark(b)  # woken, then gone without trying: the wake goes on, for the same job
    assert c.event.is_set() and c.job == "job-1"


def test_the_last_woken_claim_back_from_the_store_is_the_one_to_look_for_jobs_left_without_a_wake() -> None:
    n = Notifier()
    a, b, c = n.park("q"), n.park("q"), n.park("q")
    n.submitted("q", "job-1")
    n.submitted("q", "job-2")
    assert n.others_out(a) and n.others_out(b)  # both woken, neither back
    n.back(b)
    assert not n.others_out(a)
    a.handled = True
    n.back(a)
    n.unpark(b)  # woken, then gone without trying: its wake went on to c, which is out now
    assert c.event.is_set() and n.others_out(a)
    n.back(c)
    assert not n.others_out(a) and not n.others_out(c)


def test_notices_missed_while_not_listening_wake_the_oldest_claim_of_every_queue_and_count_as_news() -> None:
    n = Notifier()
    a1, a2, b1 = n.park("a"), n.park("a"), n.park("b")
    before = (n.generation("a"), n.generation("b"))
    n.deliver(("any", MISSED))
    assert [w.event.is_set() for w in (a1, a2, b1)] == [True, False, True]
    assert a1.job is None and b1.job is None  # as another server's notice: passed on while jobs wait
    assert n.generation("a") != before[0] and n.generation("b") != before[1]
    assert n.generation("c") != (0, 0)  # a queue with nobody parked: its workers' last empty tries are stale too


def test_missed_notices_wake_whoever_follows_a_job_and_no_worker_s_drain() -> None:
    """A job's end or its new logs that another server published while the listener was down: its followers read it
    again. A worker's drain is not guessed at here (waking every parked claim would be a store try each): the
    server's next touch of its parked workers finds it (scaleq.server.liveness)."""
    n = Notifier()
    end, logs, drain = n.event("job:j1"), n.event("logs:j1"), n.event("worker:w1")
    n.deliver(("any", MISSED))
    assert end.is_set() and logs.is_set()
    assert not drain.is_set()
    assert not n.event("job:j1").is_set()  # the next follower waits on a fresh event
