"""A parked claim is a worker's heartbeat (issue 11): idle workers stay alive on their open claims alone.

The server's clock is a fake one moved by the test, and housekeeping is driven a tick at a time
(:func:`scaleq.server.housekeeping.tick`, what the server's timer runs), so "45 s of silence" takes no time. The
protocol runs over real HTTP against a live server on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.notify import MAX_EMPTY_PASSES, Notifier
from scaleq.server import housekeeping, liveness
from scaleq.server.liveness import OpenClaims
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from tests.helpers import LiveServer, eventually, housekept, serve
from tests.helpers.workers import agent, running

GONE_AFTER = 45.0
LONG_POLL = 600.0


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def settings() -> ServerSettings:
    # the timer's own ticks are an hour apart: the test drives housekeeping itself, on the fake clock; and the
    # long-polls (on the real clock) outlast any test, which expects its parked claims to stay parked
    return ServerSettings(
        lease_seconds=15.0, long_poll_max=LONG_POLL, sweep_interval=3600.0, worker_gone_after=GONE_AFTER
    )


@pytest.fixture
async def fleet(any_store: Store) -> AsyncIterator[tuple[LiveServer, Clock]]:
    clock = Clock()
    async with serve(any_store, settings(), clock=clock) as live:
        await housekept(live)  # its start-up round is done before the test moves the clock
        yield live, clock


def registration(wid: str) -> dict[str, Any]:
    return {"id": wid, "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1.0}


@contextlib.asynccontextmanager
async def http(live: LiveServer, role: str = "worker") -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {live.tokens[role]}"}
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx.AsyncClient(base_url=live.url + "/api/v1", headers=headers, limits=limits, timeout=120) as client:
        yield client


async def register(client: httpx.AsyncClient, wid: str) -> dict[str, Any]:
    r = await client.post("/workers", json=registration(wid))
    assert r.status_code == 200, r.text
    return r.json()


def notifier(live: LiveServer) -> Notifier:
    return live.app.state.notifier  # type: ignore[attr-defined, no-any-return]


def parked(live: LiveServer) -> OpenClaims:
    return live.app.state.open_claims  # type: ignore[attr-defined, no-any-return]


async def park(client: httpx.AsyncClient, live: LiveServer, wids: list[str]) -> list[asyncio.Task[httpx.Response]]:
    """Open a long-poll claim for each worker and wait until the server holds all of them, each inside its wait (past
    its store tries: a claim counts as open from its request's start). The claims go out together, so the order they
    park in is the network's: a test that needs an order parks them one call at a time."""
    tasks = [asyncio.create_task(client.post(f"/workers/{w}/claim", json={"max": 1, "wait": LONG_POLL})) for w in wids]

    def waiting() -> bool:
        ids = parked(live).ids()
        return set(wids) <= set(ids) and notifier(live).waiting("q") == len(ids)

    await eventually(lambda: asyncio.sleep(0, waiting()), 60, what="the claims parked")
    return tasks


async def unpark(client: httpx.AsyncClient, wids: list[str], tasks: list[asyncio.Task[httpx.Response]]) -> None:
    """End the parked claims the way a worker does: a draining heartbeat, which answers its claim at once."""
    for w in wids:
        r = await client.post(f"/workers/{w}/heartbeat", json={"draining": True, "leases": []})
        assert r.status_code == 200, r.text
    for r in await asyncio.gather(*tasks):
        assert r.status_code == 200, r.text


def counting_tries(live: LiveServer, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """From now on, count the claims' store tries (one-element list: the count)."""
    tries = [0]
    worker_claim = live.store.worker_claim

    async def counted(*args: Any, **kwargs: Any) -> Any:
        tries[0] += 1
        return await worker_claim(*args, **kwargs)

    monkeypatch.setattr(live.store, "worker_claim", counted)
    return tries


async def settle(tries: list[int], at_least: int, what: str) -> None:
    """Wait until the claims have made ``at_least`` store tries and then none for half a second: each is parked
    and waits, so only a wake, a drain notice or its long-poll's end makes it try again."""

    async def settled() -> bool:
        before = tries[0]
        await asyncio.sleep(0.5)
        return tries[0] == before and tries[0] >= at_least

    await eventually(settled, 30, what=what)


async def states(live: LiveServer) -> dict[str, str]:
    async with http(live, "admin") as admin:
        r = await admin.get("/workers", params={"all": "true"})
        return {w["id"]: w["state"] for w in r.json()}


async def tick(live: LiveServer, clock: Clock) -> list[str]:
    app: Any = live.app
    return await housekeeping.tick(live.store, app.state.notifier, app.state.settings, clock(), parked(live))


async def test_registration_says_a_claim_is_a_heartbeat(fleet: tuple[LiveServer, Clock]) -> None:
    live, _ = fleet
    async with http(live) as client:
        answer = await register(client, "w-reg")
    assert answer["claim_is_heartbeat"] is True


async def test_a_parked_claim_keeps_its_worker_alive_and_silence_does_not(fleet: tuple[LiveServer, Clock]) -> None:
    live, clock = fleet
    async with http(live) as client:
        await register(client, "parked")
        await register(client, "silent")
        tasks = await park(client, live, ["parked"])
        for _ in range(4):  # a minute and a half of the server's time, no heartbeat from either
            clock.t += GONE_AFTER / 2
            await tick(live, clock)
        found = await states(live)
        assert found["parked"] == "active"
        assert found["silent"] == "gone"
        await unpark(client, ["parked"], tasks)


@pytest.mark.parametrize("state", ["draining", "gone"])
async def test_a_change_of_state_the_server_did_not_hear_of_answers_the_claim_at_its_next_touch(
    fleet: tuple[LiveServer, Clock], state: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A drain another server sent while this one's listener was down, or another server marking the worker gone,
    changes the store only: the next tick's touch finds it and answers the worker's claim (not its long-poll's end)."""
    live, clock = fleet
    tries = counting_tries(live, monkeypatch)
    async with http(live) as client:
        await register(client, "told")
        await register(client, "untold")
        tasks = await park(client, live, ["told", "untold"])
        await settle(tries, 4, "the claims parked after their tries (two each: their queue was not known)")
        await live.store.set_worker_state("told", state)  # no notice of it reaches this server
        clock.t += 5.0
        await tick(live, clock)
        answer = await asyncio.wait_for(tasks[0], 30)  # bounds a hang: the long-poll itself would take 60 s
        assert answer.status_code == 200, answer.text
        assert answer.json()["state"] == state and answer.json()["claims"] == []
        assert tries[0] == 5  # the touch's wake bought one try, for "told" alone
        assert "untold" in parked(live).ids() and not tasks[1].done()
        await unpark(client, ["untold"], tasks[1:])


async def test_a_parked_claim_does_not_renew_leases(fleet: tuple[LiveServer, Clock]) -> None:
    """Only a heartbeat renews a lease: a worker parked for more jobs must still beat for the ones it runs."""
    live, clock = fleet
    async with live.client("submit") as submitter:
        job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
    async with http(live) as client:
        r = await client.post("/workers", json={**registration("two-slots"), "slots": 2})
        assert r.status_code == 200, r.text
        r = await client.post("/workers/two-slots/claim", json={"max": 1, "wait": 0})
        assert [c["job"]["id"] for c in r.json()["claims"]] == [job.id]
        tasks = await park(client, live, ["two-slots"])
        clock.t += 16.0  # past the lease, no heartbeat
        await tick(live, clock)
        assert (await states(live))["two-slots"] == "active"
        async with live.client("read") as reader:
            first = (await reader.attempts(job.id))[0]
        assert first["outcome"] == "lost"  # its lease expired and the job went back to the queue
        await unpark(client, ["two-slots"], tasks)


async def test_an_agent_without_the_flag_keeps_itself_alive_by_heartbeats(fleet: tuple[LiveServer, Clock]) -> None:
    """A worker from before ``claim_is_heartbeat`` (it never reads it) beats and claims as it always did."""
    live, clock = fleet
    async with live.client("submit") as submitter:
        job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
    async with http(live) as client:
        await register(client, "old")
        r = await client.post("/workers/old/claim", json={"max": 1, "wait": 0})
        lease = r.json()["claims"][0]["lease"]
        for _ in range(6):  # 60 s of the server's time: longer than the lease and than worker_gone_after
            clock.t += 10.0
            r = await client.post("/workers/old/heartbeat", json={"leases": [lease]})
            assert r.json()["leases"] == [lease]
            await tick(live, clock)
        assert (await states(live))["old"] == "active"
        r = await client.post("/leases/finish", json={"lease": lease, "reason": "success", "exit_code": 0})
        assert r.status_code == 200, r.text
        assert r.json()["reason"] == "success"


async def test_the_agent_skips_heartbeats_only_while_idle_and_parked(sqlite_live: LiveServer) -> None:
    """The real agent: told a claim is a heartbeat, it needs no beat while its claim is parked, and beats again
    as soon as it runs a job (only a heartbeat renews the lease)."""
    a = agent(sqlite_live, "skipper", slots=1)
    async with running(a):
        await eventually(
            lambda: asyncio.sleep(0, "skipper" in parked(sqlite_live).ids()), 30, what="the agent's claim parked"
        )
        assert a.claim_is_heartbeat is True
        assert a.parked_idle()
        async with sqlite_live.client("submit") as submitter:
            req = SubmitRequest(queue="q", definition=JobDefinition(command=["sleep", "30"]))
            job, _ = await submitter.submit(req)
        await eventually(lambda: asyncio.sleep(0, bool(a.running)), 30, what="the job running")
        assert not a.parked_idle()
        async with sqlite_live.client("admin") as admin:
            await admin.cancel(job.id)


async def test_nothing_expires_under_a_fleet_of_parked_and_busy_workers(fleet: tuple[LiveServer, Clock]) -> None:
    """200 idle workers on their claims alone, 10 busy ones beating for their leases, over five minutes of the
    server's time: no worker marked gone, no lease lost."""
    live, clock = fleet
    idle = [f"idle-{i}" for i in range(200)]
    busy = [f"busy-{i}" for i in range(10)]
    async with live.client("submit") as submitter:
        for i in range(len(busy)):
            await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true", str(i)])))
    async with http(live) as client:
        for w in busy:
            await register(client, w)
        leases = {}
        for w in busy:
            r = await client.post(f"/workers/{w}/claim", json={"max": 1, "wait": 0})
            leases[w] = r.json()["claims"][0]["lease"]
        for w in idle:
            await register(client, w)
        tasks = await park(client, live, idle)
        for _ in range(60):  # 5 minutes in steps of 5 s (the agent's heartbeat period at the default lease)
            clock.t += 5.0
            beats = await asyncio.gather(
                *(client.post(f"/workers/{w}/heartbeat", json={"leases": [leases[w]]}) for w in busy)
            )
            assert all(b.json()["leases"] == [leases[w]] for b, w in zip(beats, busy, strict=True))
            assert await tick(live, clock) == []
        found = await states(live)
        assert {w: found[w] for w in idle + busy} == dict.fromkeys(idle + busy, "active")
        for w in busy:
            r = await client.post("/leases/finish", json={"lease": leases[w], "reason": "success", "exit_code": 0})
            assert r.status_code == 200, r.text
        await unpark(client, idle, tasks)
    async with live.client("read") as reader:
        jobs = await reader.list_jobs(queue="q")
    assert [j.reason for j in jobs] == ["success"] * len(busy)
    assert all(j.attempts == 1 for j in jobs)


async def test_a_submit_wakes_one_parked_claim_not_all(fleet: tuple[LiveServer, Clock]) -> None:
    live, _ = fleet
    wids = [f"w{i}" for i in range(20)]
    async with http(live) as client:
        for w in wids:
            await register(client, w)
        tasks = await park(client, live, wids)
        app: Any = live.app
        async with live.client("submit") as submitter:
            job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
        answered = await eventually(
            lambda: asyncio.sleep(0, [t for t in tasks if t.done()]), 30, what="a claim answered"
        )
        assert [c["job"]["id"] for c in answered[0].result().json()["claims"]] == [job.id]
        # the others stay parked: the submit woke one claim (each other one would have cost a store round trip)
        assert app.state.notifier.parked("q") == len(wids) - 1
        assert sum(t.done() for t in tasks) == 1
        rest = [w for w, t in zip(wids, tasks, strict=True) if not t.done()]
        await unpark(client, rest, [t for t in tasks if not t.done()])


async def test_a_wake_the_first_in_line_cannot_use_reaches_one_that_can(fleet: tuple[LiveServer, Clock]) -> None:
    """The oldest parked claims are workers too small for the job: the wake is passed on until a worker that can
    run it claims it."""
    live, _ = fleet
    small = [f"small-{i}" for i in range(5)]
    async with http(live) as client:
        for w in small:
            await register(client, w)
        r = await client.post("/workers", json={**registration("big"), "cpus": 8.0})
        assert r.status_code == 200, r.text
        small_tasks = await park(client, live, small)
        (big_task,) = await park(client, live, ["big"])
        async with live.client("submit") as submitter:
            req = SubmitRequest(queue="q", definition=JobDefinition(command=["true"], requirements={"cpus": 4.0}))
            job, _ = await submitter.submit(req)
        answer = await asyncio.wait_for(big_task, 30)
        assert [c["job"]["id"] for c in answer.json()["claims"]] == [job.id]
        assert not any(t.done() for t in small_tasks)
        await unpark(client, small, small_tasks)


async def test_a_claim_carrying_results_is_answered_at_once_when_nothing_is_runnable(
    fleet: tuple[LiveServer, Clock],
) -> None:
    """Until its claim is answered a worker must renew the leases of the results riding along; so that claim does not
    park (the worker's next one, without them, does)."""
    live, _ = fleet
    async with live.client("submit") as submitter:
        job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
    async with http(live) as client:
        await register(client, "finisher")
        r = await client.post("/workers/finisher/claim", json={"max": 1, "wait": 0})
        lease = r.json()["claims"][0]["lease"]
        finish = {"lease": lease, "reason": "success", "exit_code": 0}
        # a 60 s long-poll on an empty queue: parked, it would outlast the bound below
        r = await asyncio.wait_for(
            client.post("/workers/finisher/claim", json={"max": 1, "wait": 60.0, "finishes": [finish]}), 30
        )
        assert r.json()["claims"] == [] and r.json()["finished"] == [{"lease": lease, "ok": True, "detail": None}]
        tasks = await park(client, live, ["finisher"])  # without results, the next claim parks
        await unpark(client, ["finisher"], tasks)
    async with live.client("read") as reader:
        assert (await reader.get_job(job.id)).reason == "success"


async def test_a_job_no_parked_worker_can_run_costs_a_bounded_number_of_store_tries(
    fleet: tuple[LiveServer, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job the idle fleet cannot run (it asks for more cpus than any has) wakes one claim, which passes the wake on
    while jobs wait; the chain stops after a run of claims that found nothing, not after every parked claim."""
    live, _ = fleet
    wids = [f"idle-{i:03d}" for i in range(MAX_EMPTY_PASSES * 2)]
    tries = counting_tries(live, monkeypatch)
    async with http(live) as client:
        await asyncio.gather(*(register(client, w) for w in wids))
        tasks = await park(client, live, wids)
        await settle(tries, 2 * len(wids), "the claims parked after their tries (two each: their queue was not known)")
        tries[0] = 0
        async with live.client("submit") as submitter:
            req = SubmitRequest(queue="q", definition=JobDefinition(command=["big"], requirements={"cpus": 64.0}))
            await submitter.submit(req)
        await settle(tries, MAX_EMPTY_PASSES, "the chain of passed wakes to end")
        assert tries[0] == MAX_EMPTY_PASSES  # not one per parked claim (100)
        assert not any(t.done() for t in tasks)  # every claim still parked, none answered
        await unpark(client, wids, tasks)


async def finish_empty(client: httpx.AsyncClient, live: LiveServer) -> None:
    """The worker "finisher" takes a job, then sends its result riding along with a claim: answered at once, empty."""
    async with live.client("submit") as submitter:
        await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
    await register(client, "finisher")
    r = await client.post("/workers/finisher/claim", json={"max": 1, "wait": 0})
    finish = {"lease": r.json()["claims"][0]["lease"], "reason": "success", "exit_code": 0}
    r = await client.post("/workers/finisher/claim", json={"max": 1, "wait": 60.0, "finishes": [finish]})
    assert r.json()["claims"] == [] and r.json()["finished"][0]["ok"]


async def test_the_claim_after_an_empty_answer_parks_without_a_store_try_and_is_woken_as_any(
    fleet: tuple[LiveServer, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim that follows a result's empty answer (a busy queue's every job) parks at once: its worker's try a
    moment ago found nothing and nothing was queued since. A submit then wakes it, and it takes the job."""
    live, _ = fleet
    async with http(live) as client:
        await finish_empty(client, live)
        # "a moment ago" is FRESH_SECONDS of real time: a loaded machine's pause between the two requests must not
        # make the claim try the store
        monkeypatch.setattr(liveness, "FRESH_SECONDS", 60.0)
        tries = counting_tries(live, monkeypatch)
        (task,) = await park(client, live, ["finisher"])
        assert tries[0] == 0
        async with live.client("submit") as submitter:
            job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["next"])))
            assert job.state == "queued"  # (a job's id is its definition's: a new command, a new job)
        answer = await asyncio.wait_for(task, 30)
        assert [c["job"]["id"] for c in answer.json()["claims"]] == [job.id]
        assert tries[0] == 1


async def test_a_job_queued_between_an_empty_answer_and_the_next_claim_is_taken_by_it(
    fleet: tuple[LiveServer, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    live, _ = fleet
    async with http(live) as client:
        await finish_empty(client, live)
        tries = counting_tries(live, monkeypatch)
        async with live.client("submit") as submitter:  # nobody is parked to be woken: only the next claim's try
            job, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["next"])))
        r = await asyncio.wait_for(client.post("/workers/finisher/claim", json={"max": 1, "wait": 60.0}), 30)
        assert [c["job"]["id"] for c in r.json()["claims"]] == [job.id]
        assert tries[0] == 1


async def test_a_wake_spent_on_an_older_job_left_without_one_is_passed_on(fleet: tuple[LiveServer, Clock]) -> None:
    """A job queued without a wake (here: written to the store directly, as a wake lost on the way) is older than the
    next submit's, so the claim that next submit wakes takes it; its wake, which stood for the newer job, goes on to
    the next claim parked, which takes that one — not left for a re-poll."""
    live, clock = fleet
    async with http(live) as client:
        for w in ("w1", "w2"):
            await register(client, w)
        tasks = [*await park(client, live, ["w1"]), *await park(client, live, ["w2"])]  # w1 first in line
        older, _ = await live.store.submit(
            "q", JobDefinition(command=["older"]), priority=0, max_attempts=1, rerun=False, now=clock()
        )
        async with live.client("submit") as submitter:
            newer, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["newer"])))
        answers = await asyncio.wait_for(asyncio.gather(*tasks), 30)
        taken = {w: [c["job"]["id"] for c in r.json()["claims"]] for w, r in zip(("w1", "w2"), answers, strict=True)}
        assert taken == {"w1": [older.id], "w2": [newer.id]}
