"""The store contract: every store dialect must pass these (parametrised over the stores available)."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from scaleq.doctor.checks import Check
from scaleq.jobs import Capabilities, JobDefinition, RuntimeKind, Worker, job_id
from scaleq.store.base import FinishResult, GroupStatus, NotFound, QueuePosition, StaleLease, Store, Submission
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore

T0 = 1_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "postgres":
        s: Store = PostgresStore(request.getfixturevalue("pg_url"))
    else:
        s = SQLiteStore(tmp_path / "contract.db")
    await s.open()
    yield s
    await s.close()


def definition(*cmd: str, **kw: object) -> JobDefinition:
    return JobDefinition(command=list(cmd) or ["true"], **kw)


async def worker(store: Store, wid: str = "w1", queue: str = "q", **caps: object) -> str:
    fields = {
        "runtimes": [RuntimeKind.process, RuntimeKind.docker],
        "cpus": 4.0,
        "memory": 8 << 30,
        "gpus": 0,
        "tags": [],
        "host_network": False,
    }
    fields.update(caps)
    await store.register_worker(Worker(id=wid, queue=queue, slots=4, started_at=T0, last_heartbeat=T0, **fields), T0)
    return wid


async def submit(store: Store, d: JobDefinition, queue: str = "q", **kw: object):
    opts = {"priority": 0, "max_attempts": 3, "rerun": False, "now": T0}
    opts.update(kw)
    return await store.submit(queue, d, **opts)


async def test_submit_is_idempotent_and_id_is_the_hash(store: Store) -> None:
    d = definition("echo", "a")
    job, created = await submit(store, d)
    again, created_again = await submit(store, d)
    assert created and not created_again
    assert job.id == again.id == job_id("q", d)
    other, _ = await submit(store, d, queue="other")
    assert other.id != job.id


async def test_submit_many_in_order_idempotent_and_rerun(store: Store) -> None:
    old, _ = await submit(store, definition("echo", "old"))
    subs = [Submission("q", definition("echo", str(i)), priority=i % 2) for i in range(5)]
    subs.append(Submission("q", definition("echo", "old")))
    done = await store.submit_many(subs, T0 + 1)
    assert [job.id for job, _ in done] == [job_id(s.queue, s.definition) for s in subs]
    assert [created for _, created in done] == [True] * 5 + [False]
    assert done[5][0].id == old.id and done[5][0].submitted_at == T0
    assert [j.priority for j, _ in done[:5]] == [0, 1, 0, 1, 0]
    again = await store.submit_many(subs[:2], T0 + 2)
    assert [created for _, created in again] == [False, False]
    twice = Submission("q", definition("echo", "twice"))
    assert [created for _, created in await store.submit_many([twice, twice], T0 + 2)] == [True, False]
    # a finished job comes back queued on rerun, within a batch too
    await worker(store)
    claims = await store.claim("w1", 10, T0 + 3, 10)
    first = next(c for c in claims if c.job.id == done[0][0].id)
    await store.finish(first.lease, FinishResult("success", 0), T0 + 4)
    (rerun,) = await store.submit_many([Submission("q", subs[0].definition, rerun=True)], T0 + 5)
    assert rerun[1] and rerun[0].state == "queued"


async def test_claim_is_fifo_within_priority_and_respects_n(store: Store) -> None:
    ids = [(await submit(store, definition("echo", str(i))))[0].id for i in range(5)]
    urgent, _ = await submit(store, definition("echo", "urgent"), priority=5)
    await worker(store)
    claims = await store.claim("w1", 3, T0 + 1, 10)
    assert [c.job.id for c in claims] == [urgent.id, ids[0], ids[1]]
    assert all(c.job.state == "running" and c.attempt == 1 for c in claims)
    assert len({c.lease for c in claims}) == 3


async def test_queue_position_counts_in_the_claims_order(store: Store) -> None:
    ids = [(await submit(store, definition("echo", str(i))))[0].id for i in range(5)]
    urgent, _ = await submit(store, definition("echo", "urgent"), priority=5)
    await submit(store, definition("echo", "elsewhere"), queue="other", priority=9)  # not in the queue
    positions = [await store.queue_position(i) for i in ids]
    assert [p.ahead for p in positions] == [1, 2, 3, 4, 5]
    assert {(p.higher, p.queued) for p in positions} == {(1, 6)}
    assert await store.queue_position(urgent.id) == QueuePosition(0, 0, 6)
    await worker(store)
    claims = await store.claim("w1", 2, T0 + 1, 10)
    assert [c.job.id for c in claims] == [urgent.id, ids[0]]  # the two counted first are the two claimed
    assert await store.queue_position(ids[4]) == QueuePosition(3, 0, 4)


async def test_claim_matches_requirements(store: Store) -> None:
    big, _ = await submit(store, definition("x", requirements={"cpus": 8}))
    gpu, _ = await submit(store, definition("y", requirements={"gpus": 1}))
    tagged, _ = await submit(store, definition("z", tags=["ssd"]))
    image, _ = await submit(store, definition("w", image="busybox"))
    host, _ = await submit(store, definition("v", network="host"))
    plain, _ = await submit(store, definition("u"))
    await worker(store, "small", runtimes=[RuntimeKind.process])
    assert [c.job.id for c in await store.claim("small", 10, T0, 10)] == [plain.id]
    await worker(store, "big", cpus=16.0, gpus=2, tags=["ssd"], host_network=True)
    got = {c.job.id for c in await store.claim("big", 10, T0, 10)}
    assert got == {big.id, gpu.id, tagged.id, image.id, host.id}


async def test_concurrent_claims_never_share_a_job(store: Store) -> None:
    for i in range(60):
        await submit(store, definition("echo", str(i)))
    for n in range(6):
        await worker(store, f"w{n}")
    results = await asyncio.gather(*(store.claim(f"w{n % 6}", 4, T0, 10) for n in range(30)))
    claimed = [c.job.id for batch in results for c in batch]
    assert len(claimed) == 60 and len(set(claimed)) == 60


async def test_finish_is_fenced_and_idempotent(store: Store) -> None:
    job, _ = await submit(store, definition("echo"))
    await worker(store)
    (claim,) = await store.claim("w1", 1, T0, 10)
    done = await store.finish(claim.lease, FinishResult("success", 0), T0 + 1)
    assert done.state == "finished" and done.reason == "success" and done.exit_code == 0
    again = await store.finish(claim.lease, FinishResult("success", 0), T0 + 2)
    assert again.finished_at == done.finished_at
    with pytest.raises(StaleLease):
        await store.finish(claim.lease, FinishResult("failed", 1), T0 + 3)
    with pytest.raises(StaleLease):
        await store.finish("nope", FinishResult("success", 0), T0 + 3)


async def test_worker_claim_records_the_finishes_riding_along_then_claims(store: Store) -> None:
    first, _ = await submit(store, definition("one"))
    second, _ = await submit(store, definition("two"))
    urgent, _ = await submit(store, definition("three"), priority=9)
    gpu, _ = await submit(store, definition("four", requirements={"gpus": 1}))  # this worker cannot run it
    await worker(store)
    got = await store.worker_claim("w1", 1, T0, 10)
    assert (got.queue, got.state, got.finished) == ("q", "active", [])
    assert [c.job.id for c in got.claims] == [urgent.id]
    lease = got.claims[0].lease
    ok = FinishResult("success", 0)
    got = await store.worker_claim("w1", 5, T0 + 1, 10, finishes=[(lease, ok), ("no-such-lease", ok)])
    done, stale = got.finished
    assert done is not None and done.id == urgent.id and done.state == "finished" and done.finished_at == T0 + 1
    assert stale is None
    assert [c.job.id for c in got.claims] == [first.id, second.id]  # FIFO, and never the gpu job
    assert [a.outcome for a in await store.list_attempts(urgent.id)] == ["success"]
    # finishing the same attempt again with the same result is harmless; with another result it is stale
    again = await store.worker_claim("w1", 0, T0 + 2, 10, finishes=[(lease, ok), (lease, FinishResult("failed", 1))])
    assert again.claims == [] and again.finished[0] is not None and again.finished[0].finished_at == T0 + 1
    assert again.finished[1] is None
    assert (await store.get_job(gpu.id)).state == "queued"


async def test_worker_claim_of_a_draining_or_unknown_worker(store: Store) -> None:
    job, _ = await submit(store, definition("one"))
    later, _ = await submit(store, definition("two"))
    await worker(store)
    (claim,) = (await store.worker_claim("w1", 1, T0, 10)).claims
    await store.set_worker_state("w1", "draining")
    got = await store.worker_claim("w1", 4, T0 + 1, 10, finishes=[(claim.lease, FinishResult("success", 0))])
    assert got.state == "draining" and got.claims == []  # a draining worker takes nothing new...
    assert got.finished[0] is not None and got.finished[0].reason == "success"  # ...but its results count
    assert (await store.get_job(later.id)).state == "queued"
    with pytest.raises(NotFound):
        await store.worker_claim("ghost", 1, T0, 10)


async def test_concurrent_worker_claims_never_share_a_job(store: Store) -> None:
    for i in range(60):
        await submit(store, definition("echo", str(i)))
    for n in range(6):
        await worker(store, f"w{n}")
    results = await asyncio.gather(*(store.worker_claim(f"w{n % 6}", 4, T0, 10) for n in range(30)))
    claimed = [c.job.id for r in results for c in r.claims]
    assert len(claimed) == 60 and len(set(claimed)) == 60
    finishes = [[(c.lease, FinishResult("success", 0)) for c in r.claims] for r in results]
    again = await asyncio.gather(*(store.finish_many(f, T0 + 1) for f in finishes))
    assert all(j is not None and j.reason == "success" for batch in again for j in batch)


async def test_expired_lease_goes_to_exactly_one_new_owner(store: Store) -> None:
    job, _ = await submit(store, definition("sleep"))
    await worker(store, "slow")
    (first,) = await store.claim("slow", 1, T0, 5)
    expired = await store.expire_leases(T0 + 6)
    assert [(e.job_id, e.state) for e in expired] == [(job.id, "queued")]
    for n in range(4):
        await worker(store, f"w{n}")
    results = await asyncio.gather(*(store.claim(f"w{n}", 1, T0 + 7, 5) for n in range(4)))
    owners = [c for batch in results for c in batch]
    assert len(owners) == 1 and owners[0].attempt == 2
    with pytest.raises(StaleLease):
        await store.finish(first.lease, FinishResult("success", 0), T0 + 8)
    final = await store.finish(owners[0].lease, FinishResult("success", 0), T0 + 8)
    assert final.reason == "success" and final.attempts == 2
    outcomes = [a.outcome for a in await store.list_attempts(job.id)]
    assert outcomes == ["lost", "success"]


async def test_retry_budget_ends_in_worker_lost(store: Store) -> None:
    job, _ = await submit(store, definition("x"), max_attempts=2)
    await worker(store)
    now = T0
    for _ in range(2):
        assert await store.claim("w1", 1, now, 1)
        now += 2
        await store.expire_leases(now)
    lost = await store.get_job(job.id)
    assert lost.state == "finished" and lost.reason == "worker_lost" and "lease lost" in (lost.error or "")


async def test_busy_workers_counts_workers_not_jobs(store: Store) -> None:
    """The heartbeat cadence's count (scaleq.server.cadence): a worker running three jobs beats once."""
    for w in ("w1", "w2", "idle"):
        await worker(store, w)
    for i in range(4):
        await submit(store, definition("job", str(i)))
    assert await store.busy_workers() == 0
    assert len(await store.claim("w1", 3, T0, 30)) == 3
    assert len(await store.claim("w2", 1, T0, 30)) == 1
    assert await store.busy_workers() == 2


async def test_worker_tallies_count_the_live_fleet_as_list_workers_does(store: Store) -> None:
    """What /metrics reports of the fleet, counted by the store: by queue and state, slots busy, and the free slots
    of active workers only; gone workers left out — the same numbers as counting list_workers by hand."""
    for w in ("w1", "w2", "drainer", "gone"):
        await worker(store, w)  # 4 slots each
    await worker(store, "other", queue="q2")
    for i in range(4):
        await submit(store, definition("job", str(i)))
    assert len(await store.claim("w1", 3, T0, 30)) == 3
    assert len(await store.claim("drainer", 1, T0, 30)) == 1
    await store.set_worker_state("drainer", "draining")
    await store.set_worker_state("gone", "gone")
    tallies = await store.worker_tallies()
    assert [(t.queue, t.state, t.workers, t.busy, t.idle) for t in tallies] == [
        ("q", "active", 2, 3, 5),  # w1: 3 busy, 1 free; w2: 4 free
        ("q", "draining", 1, 1, 0),  # a draining worker takes nothing: no free slot
        ("q2", "active", 1, 0, 4),
    ]
    by_hand: dict[tuple[str, str], list[int]] = {}
    for w in await store.list_workers():
        t = by_hand.setdefault((w.queue, w.state), [0, 0, 0])
        t[0] += 1
        t[1] += w.busy
        t[2] += max(w.slots - w.busy, 0) if w.state == "active" else 0
    assert {(t.queue, t.state): [t.workers, t.busy, t.idle] for t in tallies} == by_hand


async def test_worker_offers_are_the_active_workers_of_a_queue_in_classes_alike(store: Store) -> None:
    """A submit's warning and a job's estimate read who could take a queue's jobs as classes of workers alike (group,
    slots, capabilities), each with its workers: a fleet of one machine type is one row."""
    for w in ("a1", "a2", "a3"):
        await worker(store, w)
    await worker(store, "gpu", gpus=1)
    await worker(store, "drainer")
    await worker(store, "elsewhere", queue="q2")
    await store.set_worker_state("drainer", "draining")
    offers = await store.worker_offers("q")
    assert [(o.ids, o.slots, o.capabilities.gpus, o.group) for o in offers] == [
        (("a1", "a2", "a3"), 4, 0, None),
        (("gpu",), 4, 1, None),
    ]
    assert offers[0].capabilities.cpus == 4.0 and offers[0].capabilities.memory == 8 << 30
    assert await store.worker_offers("nobody") == []


async def test_heartbeat_renews_and_reports_live_leases(store: Store) -> None:
    await submit(store, definition("a"))
    await submit(store, definition("b"))
    await worker(store)
    claims = await store.claim("w1", 2, T0, 5)
    state, live = await store.heartbeat("w1", T0 + 4, 5)
    assert state == "active" and live == {c.lease for c in claims}
    assert await store.expire_leases(T0 + 6) == []
    await store.cancel(claims[0].job.id, T0 + 7)
    _, live = await store.heartbeat("w1", T0 + 7, 5)
    assert live == {claims[1].lease}
    with pytest.raises(NotFound):
        await store.heartbeat("ghost", T0, 5)


async def test_heartbeat_renews_only_the_leases_the_worker_holds(store: Store) -> None:
    for name in ("a", "b"):
        await submit(store, definition(name))
    await worker(store)
    known, lost = await store.claim("w1", 2, T0, 5)  # say the answer naming ``lost`` never reached the worker
    state, live = await store.heartbeat("w1", T0 + 4, 5, held=[known.lease])
    assert live == {known.lease}
    expired = await store.expire_leases(T0 + 6)  # ``lost`` was not renewed: back to the queue
    assert [(e.job_id, e.state) for e in expired] == [(lost.job.id, "queued")]
    assert (await store.get_job(known.job.id)).state == "running"
    _, live = await store.heartbeat("w1", T0 + 7, 5, held=[])
    assert live == set()


async def test_heartbeats_at_once_are_each_answered_as_if_alone(store: Store) -> None:
    """A fleet beating at the same moment (PostgreSQL writes them as one statement: store/heartbeats.py): each
    worker renews its own leases and hears of its own, an unknown worker is refused, and the same worker twice is
    answered twice."""
    for i in range(20):
        await worker(store, f"w{i}")
        await submit(store, definition("job", str(i)))
    leases = {f"w{i}": (await store.claim(f"w{i}", 1, T0, 5))[0].lease for i in range(20)}

    async def beat(worker_id: str, held: list[str] | None) -> tuple[str, set[str]]:
        return await store.heartbeat(worker_id, T0 + 4, 5, held=held)

    calls = [beat(w, [lease] if i % 2 else None) for i, (w, lease) in enumerate(leases.items())]
    calls += [beat("w0", []), beat("ghost", None)]
    answers = await asyncio.gather(*calls, return_exceptions=True)
    assert answers[:20] == [("active", {lease}) for lease in leases.values()]
    assert answers[20] == ("active", set())  # w0 again, holding nothing it says: its lease is not renewed by this one
    assert isinstance(answers[21], NotFound)
    assert await store.expire_leases(T0 + 8.9) == []  # every lease renewed to T0 + 4 + 5 (or later)


async def test_restarts_grant_a_dead_workers_lease_one_grace_only(store: Store) -> None:
    """Every server start calls extend_leases: a dead worker's job must still come back after one lease + one grace,
    however often servers restart; a live worker's job gets a grace at each restart that follows its heartbeat."""
    await submit(store, definition("dead"))
    await submit(store, definition("live"))
    await worker(store, "dead")
    await worker(store, "live")
    (dead,) = await store.claim("dead", 1, T0, 5)
    (live,) = await store.claim("live", 1, T0, 5)
    await store.heartbeat("dead", T0 + 1, 5)  # its last word: the lease ends at T0 + 6
    await store.heartbeat("live", T0 + 1, 5)
    for restart in (T0 + 2, T0 + 4, T0 + 5.5):
        await store.extend_leases(restart, 5)  # a server (re)starts
        await store.heartbeat("live", restart + 0.1, 5)
    # the dead worker's lease got one grace (T0 + 2 + 5) and no more; one lease + one grace after its last word
    assert await store.expire_leases(T0 + 6.9) == []
    expired = await store.expire_leases(T0 + 7.1)
    assert [(e.job_id, e.state) for e in expired] == [(dead.job.id, "queued")]
    assert (await store.get_job(live.job.id)).state == "running"
    # a restart while the live worker cannot reach it: one grace past the lease its last heartbeat gave
    await store.extend_leases(T0 + 10, 5)
    assert await store.expire_leases(T0 + 14.9) == []
    await store.extend_leases(T0 + 12, 5)  # not heard from since the last grace: no second one
    assert [e.job_id for e in await store.expire_leases(T0 + 15.1)] == [live.job.id]


async def test_no_start_up_grace_for_a_worker_marked_gone(store: Store) -> None:
    await submit(store, definition("a"))
    await worker(store)
    (claim,) = await store.claim("w1", 1, T0, 5)
    assert await store.mark_gone_workers(T0 + 1, T0 - 1) == ["w1"]
    await store.extend_leases(T0 + 2, 5)
    assert [e.job_id for e in await store.expire_leases(T0 + 5.1)] == [claim.job.id]


async def test_cancel_queued_running_and_finished(store: Store) -> None:
    queued, _ = await submit(store, definition("q"))
    cancelled = await store.cancel(queued.id, T0)
    assert cancelled.state == "finished" and cancelled.reason == "cancelled"
    await worker(store)
    assert await store.claim("w1", 1, T0, 5) == []  # a cancelled job is never claimed
    running, _ = await submit(store, definition("r"))
    (claim,) = await store.claim("w1", 1, T0, 5)
    await store.cancel(running.id, T0 + 1)
    with pytest.raises(StaleLease):
        await store.append_logs(claim.lease, [("stdout", b"x")], T0 + 2)
    with pytest.raises(StaleLease):
        await store.finish(claim.lease, FinishResult("success", 0), T0 + 2)
    assert (await store.cancel(running.id, T0 + 3)).reason == "cancelled"


async def test_rerun_requeues_a_finished_job_with_a_new_attempt_number(store: Store) -> None:
    d = definition("again")
    job, _ = await submit(store, d)
    await worker(store)
    (c1,) = await store.claim("w1", 1, T0, 5)
    await store.finish(c1.lease, FinishResult("failed", 3), T0 + 1)
    same, created = await submit(store, d)
    assert not created and same.reason == "failed"
    rerun, created = await submit(store, d, rerun=True)
    assert created and rerun.state == "queued" and rerun.exit_code is None
    (c2,) = await store.claim("w1", 1, T0 + 2, 5)
    assert c2.attempt == 2 and c2.job.attempts == 1


async def test_release_hands_back_without_spending_an_attempt(store: Store) -> None:
    job, _ = await submit(store, definition("x"), max_attempts=1)
    await worker(store)
    (claim,) = await store.claim("w1", 1, T0, 5)
    released = await store.release(claim.lease, T0 + 1)
    assert released is not None and released.state == "queued" and released.attempts == 0
    assert await store.release(claim.lease, T0 + 2) is None
    (again,) = await store.claim("w1", 1, T0, 5)
    assert again.job.id == job.id


async def test_program_failures_are_retried_within_their_own_budget(store: Store) -> None:
    job, _ = await submit(store, definition("flaky"), retries=2)
    assert (job.retries, job.failures, job.retry_on_exit_codes) == (2, 0, None)
    await worker(store)
    (c1,) = await store.claim("w1", 1, T0, 5)
    again = await store.finish(c1.lease, FinishResult("failed", 1, "exit 1"), T0 + 1)
    assert (again.state, again.reason, again.failures, again.attempts) == ("queued", None, 1, 0)
    assert again.exit_code == 1 and again.worker_id is None and again.finished_at is None
    # a repeated finish of the retried attempt is harmless; its lease owns nothing any more
    assert (await store.finish_many([(c1.lease, FinishResult("failed", 1, "exit 1"))], T0 + 2))[0] is not None
    with pytest.raises(StaleLease):
        await store.append_logs(c1.lease, [("stdout", b"x")], T0 + 2)
    # the second failure (a timeout) rides along with a claim, which takes the job again in the next call
    got = await store.worker_claim("w1", 0, T0 + 3, 5)
    (c2,) = await store.claim("w1", 1, T0 + 3, 5)
    assert c2.attempt == 2
    got = await store.worker_claim("w1", 0, T0 + 4, 5, finishes=[(c2.lease, FinishResult("timed_out"))])
    (retried,) = got.finished
    assert retried is not None and (retried.state, retried.failures) == ("queued", 2)
    (c3,) = await store.claim("w1", 1, T0 + 5, 5)
    spent = await store.finish(c3.lease, FinishResult("failed", 1, "exit 1"), T0 + 6)
    assert (spent.state, spent.reason, spent.failures) == ("finished", "failed", 2)
    assert [a.outcome for a in await store.list_attempts(job.id)] == ["failed", "timed_out", "failed"]
    # a rerun starts a fresh budget, with the settings it is given
    rerun, created = await submit(store, definition("flaky"), rerun=True, retries=1, retry_on_exit_codes=[7])
    assert created and (rerun.failures, rerun.retries, rerun.retry_on_exit_codes) == (0, 1, [7])


async def test_retry_on_exit_codes_retries_only_those_exits(store: Store) -> None:
    await worker(store)
    codes = {"retries": 3, "retry_on_exit_codes": [3, 75]}
    cases = [
        ("failed", 3, "queued"),
        ("failed", 75, "queued"),
        ("failed", 4, "finished"),
        ("timed_out", None, "finished"),
    ]
    for n, (reason, code, state) in enumerate(cases):
        job, _ = await submit(store, definition("exit", str(n)), **codes)
        (claim,) = await store.claim("w1", 1, T0, 5)
        assert claim.job.id == job.id
        (done,) = await store.finish_many([(claim.lease, FinishResult(reason, code))], T0 + 1)
        assert done is not None and done.state == state, (reason, code)
        if state == "queued":
            await store.cancel(job.id, T0 + 2)
    success, _ = await submit(store, definition("fine"), **codes)
    (claim,) = await store.claim("w1", 1, T0, 5)
    assert (await store.finish(claim.lease, FinishResult("success", 0), T0 + 1)).reason == "success"


async def test_only_a_program_failure_with_retries_left_goes_back_to_the_queue(store: Store) -> None:
    """The retry rule, decided by each dialect's finish statement: failed and timed_out are the program's failures;
    success and cancelled end the job whatever its retries; no retries (the default) ends it at the first failure;
    with exit codes listed, only a failure with one of them is retried. (A spent budget: the test above.)"""
    await worker(store)
    cases = [
        ({}, "failed", 1, "finished"),
        ({}, "timed_out", None, "finished"),
        ({"retries": 5}, "cancelled", None, "finished"),
        ({"retries": 5}, "success", 0, "finished"),
        ({"retries": 5}, "failed", None, "queued"),
        ({"retries": 5}, "timed_out", None, "queued"),
        ({"retries": 1, "retry_on_exit_codes": [3]}, "failed", None, "finished"),
        ({"retries": 1, "retry_on_exit_codes": [3]}, "failed", 3, "queued"),
        ({"retries": 1, "retry_on_exit_codes": [3]}, "timed_out", None, "finished"),
    ]
    for n, (retries, reason, code, state) in enumerate(cases):
        job, _ = await submit(store, definition("rule", str(n)), **retries)
        (claim,) = await store.claim("w1", 1, T0, 5)
        done = await store.finish(claim.lease, FinishResult(reason, code), T0 + 1)
        assert (done.id, done.state, done.exit_code) == (job.id, state, code), (retries, reason, code)
        if state == "queued":  # back at its place: a failure counted, no attempt spent, nobody running it
            assert (done.reason, done.finished_at, done.started_at, done.worker_id) == (None, None, None, None)
            assert (done.failures, done.attempts) == (1, 0)
        else:
            assert (done.reason, done.finished_at, done.started_at, done.worker_id) == (reason, T0 + 1, T0, "w1")
            assert (done.failures, done.attempts) == (0, 1)
        assert [a.outcome for a in await store.list_attempts(job.id)] == [reason]
        if state == "queued":
            await store.cancel(job.id, T0 + 2)


async def test_program_failures_do_not_spend_the_infrastructure_budget(store: Store) -> None:
    job, _ = await submit(store, definition("both"), max_attempts=2, retries=2)
    await worker(store)
    now = T0
    for _ in range(2):  # two failures, retried
        (claim,) = await store.claim("w1", 1, now, 5)
        await store.finish(claim.lease, FinishResult("failed", 1), now + 1)
        now += 2
    assert await store.claim("w1", 1, now, 1)  # then lost once: one of two attempts spent, so queued again
    now += 2
    assert [(e.job_id, e.state) for e in await store.expire_leases(now)] == [(job.id, "queued")]
    assert (await store.get_job(job.id)).attempts == 1
    (claim,) = await store.claim("w1", 1, now, 5)
    assert claim.attempt == 4
    done = await store.finish(claim.lease, FinishResult("success", 0), now + 1)
    assert (done.reason, done.failures, done.attempts) == ("success", 2, 2)
    assert [a.outcome for a in await store.list_attempts(job.id)] == ["failed", "failed", "lost", "success"]


async def test_release_and_release_worker_record_preempted_without_spending_an_attempt(store: Store) -> None:
    for name in ("a", "b", "c"):
        await submit(store, definition(name), max_attempts=1)
    await worker(store, "w1")
    await worker(store, "w2")
    first, second = await store.claim("w1", 2, T0, 5)
    (other,) = await store.claim("w2", 1, T0, 5)
    released = await store.release(first.lease, T0 + 1, "preempted")
    assert released is not None and released.state == "queued" and released.attempts == 0
    back = await store.release_worker("w1", T0 + 2)
    assert [(e.job_id, e.queue, e.state) for e in back] == [(second.job.id, "q", "queued")]
    assert await store.release_worker("w1", T0 + 3) == []
    for claim in (first, second):
        job = await store.get_job(claim.job.id)
        assert (job.state, job.attempts, job.worker_id) == ("queued", 0, None)
        assert [a.outcome for a in await store.list_attempts(claim.job.id)] == ["preempted"]
    assert (await store.get_job(other.job.id)).state == "running"  # another worker's job is untouched
    with pytest.raises(StaleLease):
        await store.finish(second.lease, FinishResult("success", 0), T0 + 4)
    assert len(await store.claim("w2", 2, T0 + 5, 5)) == 2  # max_attempts 1, and yet claimed again


async def test_logs_outputs_and_blobs(store: Store) -> None:
    job, _ = await submit(store, definition("x"))
    await worker(store)
    (claim,) = await store.claim("w1", 1, T0, 5)
    assert await store.append_logs(claim.lease, [("stdout", b"one\n"), ("stderr", b"two\n")], T0) == job.id
    chunks = await store.read_logs(job.id, 1, 0, 100)
    assert [(c.stream, c.data) for c in chunks] == [("stdout", b"one\n"), ("stderr", b"two\n")]
    assert await store.read_logs(job.id, 1, chunks[0].seq, 100) == chunks[1:]
    await store.put_outputs(claim.lease, [("a/b.txt", b"hello"), ("c", b"")])
    outs = await store.list_outputs(job.id)
    assert [(o.path, o.size) for o in outs] == [("a/b.txt", 5), ("c", 0)]
    assert await store.get_blob(outs[0].sha256) == b"hello"
    assert await store.missing_blobs([outs[0].sha256, "0" * 64]) == ["0" * 64]
    with pytest.raises(NotFound):
        await store.get_blob("f" * 64)


async def test_purge_removes_old_finished_jobs_and_only_what_nothing_else_uses(store: Store) -> None:
    shared, own = b"shared input", b"only the old job's input"
    ins = {}
    for data in (shared, own):
        sha = hashlib.sha256(data).hexdigest()
        await store.put_blob(sha, data)
        ins[data] = {"path": f"{sha[:6]}.txt", "sha256": sha, "size": len(data)}
    old, _ = await submit(store, definition("old", inputs=[ins[shared], ins[own]]))
    other_queue, _ = await submit(store, definition("old"), queue="keep")
    recent, _ = await submit(store, definition("recent"))
    queued, _ = await submit(store, definition("queued", inputs=[ins[shared]]))  # still needs the shared bytes
    await worker(store)
    await worker(store, "wk", queue="keep")
    claims = {c.job.id: c for c in await store.claim("w1", 2, T0, 100)}
    (keep_claim,) = await store.claim("wk", 1, T0, 100)
    for c in (claims[old.id], keep_claim):
        await store.append_logs(c.lease, [("stdout", b"log\n")], T0)
        await store.put_outputs(c.lease, [("out.txt", b"old output")])
        await store.finish(c.lease, FinishResult("success", 0), T0 + 10)
    await store.finish(claims[recent.id].lease, FinishResult("success", 0), T0 + 500)
    await store.record_event("g", "scale_up", 0, 1, "old news", T0)
    await store.record_event("g", "scale_up", 1, 2, "recent", T0 + 600)

    purged = await store.purge(T0 + 100, queue="q")
    assert (purged.jobs, purged.log_chunks, purged.outputs, purged.events) == (1, 1, 1, 1)
    with pytest.raises(NotFound):
        await store.get_job(old.id)
    for kept in (other_queue, recent, queued):  # another queue, finished too recently, not finished
        assert (await store.get_job(kept.id)).id == kept.id
    assert await store.read_logs(old.id, 1, 0, 100) == []
    assert await store.list_outputs(old.id) == []
    # the old job's own input went; the shared one (a queued job needs it) and "old output" (the job on queue
    # "keep" wrote the same bytes) stayed
    assert purged.blobs == 1
    assert await store.missing_blobs([ins[own]["sha256"], ins[shared]["sha256"]]) == [ins[own]["sha256"]]
    assert len(await store.list_outputs(other_queue.id)) == 1
    assert [e.reason for e in await store.list_events(None, 0, 10)] == ["recent"]
    assert (await store.purge(T0 + 100, queue="q")).jobs == 0  # nothing more to do
    assert (await store.purge(T0 + 1000)).jobs == 2  # every queue


async def test_get_job_by_prefix(store: Store) -> None:
    job, _ = await submit(store, definition("p"))
    assert (await store.get_job(job.id[:8])).id == job.id
    with pytest.raises(NotFound):
        await store.get_job("abc")
    with pytest.raises(NotFound):
        await store.get_job("0" * 64)


async def test_demand_counts_only_what_a_group_can_run(store: Store) -> None:
    await submit(store, definition("a"))
    await submit(store, definition("b", image="busybox"))
    await submit(store, definition("c", requirements={"gpus": 1}))
    caps = Capabilities(runtimes=[RuntimeKind.process], cpus=2)
    assert await store.demand("q", caps) == (1, 0)
    assert await store.demand("q", Capabilities(runtimes=[RuntimeKind.process, RuntimeKind.docker], gpus=1)) == (3, 0)


async def test_demand_counts_queued_jobs_up_to_a_limit(store: Store) -> None:
    for i in range(7):
        await submit(store, definition("echo", str(i)))
    await worker(store)
    await store.claim("w1", 2, T0, 10)
    caps = Capabilities(runtimes=[RuntimeKind.process])
    assert await store.demand("q", caps) == (5, 2)
    assert await store.demand("q", caps, limit=3) == (3, 2)  # running is always counted whole
    assert await store.demand("q", caps, limit=0) == (0, 2)
    assert await store.demand("q", caps, limit=50) == (5, 2)


async def test_workers_idle_since_busy_and_gone(store: Store) -> None:
    await submit(store, definition("a"))
    await worker(store)
    (w,) = await store.list_workers()
    assert w.busy == 0 and w.idle_since == T0
    (claim,) = await store.claim("w1", 1, T0 + 1, 5)
    assert (await store.get_worker("w1")).busy == 1
    await store.finish(claim.lease, FinishResult("success", 0), T0 + 3)
    w = await store.get_worker("w1")
    assert w.busy == 0 and w.idle_since == T0 + 3
    assert await store.mark_gone_workers(T0 + 100, T0) == ["w1"]
    assert await store.list_workers() == []
    assert await store.list_workers(include_gone=True) == [await store.get_worker("w1")]  # one worker, as listed
    with pytest.raises(NotFound):
        await store.get_worker("nobody")


async def test_tokens_are_found_by_hash_and_revocable(store: Store) -> None:
    await store.create_token("id1", "ci", "submit", "h" * 64, T0)
    found = await store.find_token("h" * 64)
    assert found is not None and found.role == "submit"
    assert await store.revoke_token("id1", T0 + 1)
    assert await store.find_token("h" * 64) is None
    assert not await store.revoke_token("id1", T0 + 2)


async def test_durable_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "reopen.db"
    s = SQLiteStore(path)
    await s.open()
    job, _ = await s.submit("q", definition("keep"), priority=0, max_attempts=3, rerun=False, now=T0)
    await s.close()
    s2 = SQLiteStore(path)
    await s2.open()
    assert (await s2.get_job(job.id)).state == "queued"
    await s2.close()


async def test_jobs_are_listed_by_finished_reason(store: Store) -> None:
    cancelled, _ = await submit(store, definition("c"))
    await store.cancel(cancelled.id, T0)
    queued, _ = await submit(store, definition("q"))
    found = await store.list_jobs(queue=None, state="finished", reason="cancelled", limit=10)
    assert [j.id for j in found] == [cancelled.id]
    assert await store.list_jobs(queue=None, state="finished", reason="failed", limit=10) == []
    assert {j.id for j in await store.list_jobs(queue=None, state=None, limit=10)} == {cancelled.id, queued.id}


async def test_group_status_keeps_its_note_checks_and_reporter(store: Store) -> None:
    check = Check("group g", "signal", False, "no series", "fix it")
    await store.put_group(
        GroupStatus("g", "q", "local", 0, 2, 1, 2, T0, "capped at max_workers 2", (check,), "stopped")
    )
    (status,) = await store.list_groups()
    assert (status.note, status.checks, status.reporter) == ("capped at max_workers 2", (check,), "stopped")


async def test_group_status_keeps_its_state_beside_its_note(store: Store) -> None:
    refused = GroupStatus(
        "g",
        "q",
        "gcp",
        0,
        2,
        0,
        2,
        T0,
        "capped at max_workers 2",
        state="quota",
        message="QUOTA_EXCEEDED: CPUS",
        state_since=T0 - 5,
    )
    await store.put_group(refused)
    (status,) = await store.list_groups()
    assert status == refused
    await store.put_group(GroupStatus("g", "q", "gcp", 0, 2, 1, 2, T0 + 60))  # it recovered: ok, nothing to say
    (status,) = await store.list_groups()
    assert (status.state, status.message, status.state_since, status.note) == ("ok", "", None, "")


async def _counted(store: Store) -> dict[str, tuple[int, int, int, int, int, float | None]]:
    """What queue_stats must say, counted from the jobs themselves."""
    jobs = await store.list_jobs(queue=None, state=None, limit=10_000)
    truth: dict[str, tuple[int, int, int, int, int, float | None]] = {}
    for q in sorted({j.queue for j in jobs}):
        mine = [j for j in jobs if j.queue == q]
        done = [j for j in mine if j.state == "finished"]
        ok = sum(1 for j in done if j.reason == "success")
        queued = [j.submitted_at for j in mine if j.state == "queued"]
        running = sum(1 for j in mine if j.state == "running")
        truth[q] = (len(queued), running, len(done), ok, len(done) - ok, min(queued, default=None))
    return truth


async def _stats(store: Store) -> dict[str, tuple[int, int, int, int, int, float | None]]:
    return {
        s.queue: (s.queued, s.running, s.finished, s.succeeded, s.unsuccessful, s.oldest_queued_at)
        for s in await store.queue_stats()
    }


@pytest.mark.parametrize("fold", [False, True], ids=["unfolded", "folded"])
async def test_queue_counts_follow_every_transition_folded_or_not(store: Store, fold: bool) -> None:
    """The counts kept by migration 0011 match the jobs after every kind of change, read before or after a fold."""

    async def check(step: str) -> None:
        if fold:
            await store.fold_queue_counts()
        assert await _stats(store) == await _counted(store), step

    await worker(store, "w1", "q")
    await worker(store, "w2", "other")
    await check("empty")
    one, _ = await submit(store, definition("echo", "1"), now=T0 + 1)
    await store.submit_many([Submission("q", definition("echo", str(n))) for n in range(2, 8)], T0 + 2)
    await submit(store, definition("echo", "o"), queue="other", now=T0 + 3)
    await check("submitted")
    claims = await store.claim("w1", 5, T0 + 4, 10)
    await check("claimed")
    await store.finish(claims[0].lease, FinishResult("success", 0), T0 + 5)
    await store.finish(claims[1].lease, FinishResult("failed", 1), T0 + 5)
    await check("finished")
    await store.release(claims[2].lease, T0 + 6)
    await store.cancel(claims[3].job.id, T0 + 6)
    await check("released and cancelled")
    await store.expire_leases(T0 + 30)
    await check("expired")
    again = await store.claim("w1", 2, T0 + 31, 10)
    assert again
    await store.release_worker("w1", T0 + 32)
    await check("worker released")
    await store.submit_many([Submission("q", definition("echo", "1"), rerun=True)], T0 + 33)
    assert (await store.get_job(one.id)).state == "queued"
    await check("rerun")
    (last,) = await store.claim("w2", 1, T0 + 34, 10)
    await store.finish(last.lease, FinishResult("success", 0), T0 + 35)
    await store.purge(T0 + 100, queue="other")
    await check("purged")
    assert "other" not in await _stats(store)  # a queue with no jobs left is not listed, as before


async def test_folding_while_jobs_change_loses_no_count(store: Store) -> None:
    """Folds racing submits, claims and finishes (and each other) neither lose nor double a delta."""
    await worker(store, "w1", "q")

    async def churn(n: int) -> None:
        await store.submit_many([Submission("q", definition("echo", f"{n}-{i}")) for i in range(5)], T0 + n)
        for c in await store.claim("w1", 3, T0 + n, 10):
            await store.finish(c.lease, FinishResult("success" if n % 2 else "failed", 0), T0 + n)

    async def folds() -> None:
        for _ in range(20):
            await store.fold_queue_counts()
            await asyncio.sleep(0)

    await asyncio.gather(*(churn(n) for n in range(20)), folds(), folds())
    assert await _stats(store) == await _counted(store)
    await store.fold_queue_counts()
    assert await _stats(store) == await _counted(store)


async def test_touching_parked_workers_marks_the_live_ones_heard_from_and_names_those_not_active(store: Store) -> None:
    """The server's touch of the workers parked on it: the active and draining ones are heard from now, a gone one
    stays gone; the answer names every one the store does not hold active (drained, gone, or not known at all), whose
    claims the server then answers (scaleq.server.liveness)."""
    for w in ("active", "drainer", "gone"):
        await worker(store, w)
    await store.set_worker_state("drainer", "draining")
    await store.set_worker_state("gone", "gone")
    not_active = await store.touch_workers(["active", "drainer", "gone", "forgotten"], T0 + 10)
    assert sorted(not_active) == ["drainer", "forgotten", "gone"]
    seen = {w.id: (w.state, w.last_heartbeat) for w in await store.list_workers(include_gone=True)}
    assert seen == {"active": ("active", T0 + 10), "drainer": ("draining", T0 + 10), "gone": ("gone", T0)}
    assert await store.touch_workers(["active"], T0 + 20) == []
