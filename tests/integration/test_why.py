"""``GET /jobs/{id}/why`` (scaleq.server.why) on a real server: the chain of reasons for a queued job — its place in
its queue, what serves the queue and what cannot run it, a group capped, starting, refused by its provider and
backing off, with the group's state written by the real controller over the Fly stand-in — and for a job that ran,
its attempts (lost, preempted, failed, retried) as the store's own transitions left them."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from scaleq.client import ApiError
from scaleq.grid import FlySettings, Group
from scaleq.jobs import JobDefinition, Requirements, RuntimeKind, SubmitRequest, Worker
from scaleq.notify import Notifier
from scaleq.providers.fly import FlyProvider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.server.settings import ServerSettings
from scaleq.store.base import FinishResult, Store
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve
from tests.helpers.drivers import FakeClock
from tests.helpers.groups import fast_group
from tests.standins.fly_machines import FlyMachines, serve_fly


def kinds(answer: dict[str, Any]) -> list[str]:
    return [s["kind"] for s in answer["chain"]]


def step(answer: dict[str, Any], kind: str, who: str | None = None) -> dict[str, Any]:
    """The one step of ``kind`` (about group or worker ``who``, when given)."""
    found = [
        s
        for s in answer["chain"]
        if s["kind"] == kind and (who is None or who in (s["numbers"].get("group"), s["numbers"].get("worker")))
    ]
    assert len(found) == 1, f"one {kind} step{f' of {who}' if who else ''} in {answer['chain']}"
    return found[0]


async def submit(live: LiveServer, queue: str, priority: int = 0, **definition: Any) -> str:
    body = {"command": ["echo", str(time.monotonic_ns())], **definition}
    req = SubmitRequest(queue=queue, definition=JobDefinition.model_validate(body), priority=priority)
    async with live.client("submit") as c:
        job, _ = await c.submit(req)
    return job.id


async def why(live: LiveServer, job_id: str) -> dict[str, Any]:
    async with live.client("read") as c:
        return await c.why(job_id)


async def test_a_queued_job_says_how_many_are_ahead_of_it_by_priority(live: LiveServer) -> None:
    first, second = await submit(live, "q"), await submit(live, "q")
    urgent = await submit(live, "q", priority=5)
    mine = await submit(live, "q")
    last = await submit(live, "q")
    await submit(live, "other", priority=9)  # another queue is not ahead
    answer = await why(live, mine[:10])  # a unique prefix, as the other job routes take
    assert (answer["job_id"], answer["state"]) == (mine, "queued")
    position = step(answer, "position")
    assert position["numbers"] == {"ahead": 3, "higher_priority": 1, "queued": 5, "priority": 0}
    assert position["text"].startswith("3 jobs ahead of it in queue q, 1 of them at a higher priority")
    assert step(await why(live, urgent), "position")["numbers"]["ahead"] == 0
    assert step(await why(live, last), "position")["numbers"]["ahead"] == 4
    assert step(await why(live, first), "position")["numbers"]["ahead"] == 1  # behind the urgent one only
    assert step(await why(live, second), "position")["numbers"]["higher_priority"] == 1
    # nothing serves queue q: the estimator cannot tell, and says why
    assert answer["estimated_start"] is None and answer["estimate_basis"]


async def test_a_queue_nothing_serves_is_named(sqlite_live: LiveServer) -> None:
    job_id = await submit(sqlite_live, "defualt")
    answer = await why(sqlite_live, job_id)
    assert kinds(answer) == ["position", "unserved"]
    assert "nothing serves queue defualt: no group is bound to it and no worker takes it" in answer["chain"][1]["text"]


async def test_bad_and_unknown_ids_are_refused(sqlite_live: LiveServer) -> None:
    job_id = await submit(sqlite_live, "q")
    async with sqlite_live.client("read") as c:
        with pytest.raises(ApiError) as unknown:
            await c.why("abcdef0123")
        assert (unknown.value.status, unknown.value.detail) == (404, "no job abcdef0123")
    async with sqlite_live.client("worker") as c:  # a worker token reads no jobs
        with pytest.raises(ApiError) as refused:
            await c.why(job_id)
        assert refused.value.status == 403


@pytest.fixture
def grid_groups() -> list[Group]:
    return [fast_group("cpu", resources=Requirements(cpus=2), tags=["ssd"]), fast_group("other", queue="elsewhere")]


async def test_a_group_that_cannot_run_the_job_says_what_is_missing(
    sqlite_store: SQLiteStore, settings: ServerSettings, grid_groups: list[Group]
) -> None:
    async with serve(sqlite_store, settings, groups=grid_groups) as live:
        gpu = await why(live, await submit(live, "q", requirements={"gpus": 1}))
        cannot = step(gpu, "cannot_run", "cpu")
        assert cannot["text"] == "group cpu cannot run it: it offers gpus 0, the job needs 1"
        assert (cannot["numbers"]["gpus_needed"], cannot["numbers"]["gpus_offered"]) == (1, 0)
        assert kinds(gpu)[-1] == "nothing_fits"  # group "other" serves another queue: not named

        tagged = await why(live, await submit(live, "q", tags=["ssd", "fast"]))
        assert step(tagged, "cannot_run", "cpu")["numbers"]["tags_missing"] == "fast"
        assert "lacks the tag fast" in step(tagged, "cannot_run", "cpu")["text"]

        docker = await why(live, await submit(live, "q", image="alpine:3"))
        runtime = step(docker, "cannot_run", "cpu")
        assert runtime["text"] == "group cpu cannot run it: it runs process jobs, not docker"
        assert (runtime["numbers"]["runtime"], runtime["numbers"]["runtimes_offered"]) == ("docker", "process")

        big = await why(live, await submit(live, "q", requirements={"cpus": 4}))
        assert "offers cpus 2, the job needs 4" in step(big, "cannot_run", "cpu")["text"]

        fits = await why(live, await submit(live, "q", tags=["ssd"]))
        assert step(fits, "can_run", "cpu")["text"] == "group cpu can run it"
        assert "no controller has reported it yet" in step(fits, "no_controller", "cpu")["text"]
        assert "nothing_fits" not in kinds(fits)

        # a worker started by hand on the queue, outside the groups, is weighed too
        now = time.time()
        hand = Worker(id="by-hand", queue="q", slots=1, runtimes=[RuntimeKind.docker], cpus=8.0, started_at=now,
                      last_heartbeat=now)  # fmt: skip
        await sqlite_store.register_worker(hand, now)
        docker = await why(live, docker["job_id"])
        assert step(docker, "worker_can_run", "by-hand")["text"] == "worker by-hand can run it: 1 of 1 slots free"
        assert "nothing_fits" not in kinds(docker)


# -- the real controller over the Fly stand-in ---------------------------------------------------------------


@pytest.fixture
def fly(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FlyMachines]:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with serve_fly(start_delay=0.2) as standin:
        monkeypatch.setenv("FLY_API_TOKEN", standin.token)
        yield standin
        assert standin.problems == []


def fly_group(standin: FlyMachines, **kw: Any) -> Group:
    settings = FlySettings(app="scaleq-test", region="ams", cpus=1, memory_mb=512, api_url=standin.url)
    fields = {"provider": "fly", "image": "registry.fly.io/scaleq-test:worker-1", "fly": settings}
    return fast_group("fly", resources=Requirements(cpus=1), **{**fields, **kw})


def controller(g: Group, store: Store, clock: FakeClock, **provider: Any) -> Controller:
    p = FlyProvider(grid="t", server="https://grid.example.com", token="w", settings=g.fly, backoff=0.01, **provider)
    return Controller([(g, p)], StoreObserver(store, Notifier(), clock), clock=clock)


async def test_capped_at_max_workers_and_workers_starting_into_a_typical_boot(
    fly: FlyMachines, sqlite_store: SQLiteStore, settings: ServerSettings
) -> None:
    g = fly_group(fly, max_workers=2)
    clock = FakeClock(time.time())
    async with serve(sqlite_store, settings, groups=[g]) as live:
        live.app.state.clock = clock  # type: ignore[attr-defined]
        jobs = [await submit(live, "q") for _ in range(3)]
        await controller(g, sqlite_store, clock).step()  # starts 2 machines: all max_workers allows
        (machine, _) = [m.name for m in fly.live()]
        clock.advance(40.0)  # the first machine's worker registers 40 s after the scale-up, and claims a job
        first = Worker(id=machine, queue="q", group="fly", slots=1, runtimes=[RuntimeKind.process], cpus=1.0,
                       started_at=clock.now, last_heartbeat=clock.now)  # fmt: skip
        await sqlite_store.register_worker(first, clock.now)
        (claimed,) = await sqlite_store.claim(machine, 1, clock.now, 60.0)
        assert claimed.job.id == jobs[0]
        clock.advance(12.0)
        answer = await why(live, jobs[2])
    assert step(answer, "position")["numbers"]["ahead"] == 1
    assert step(answer, "can_run", "fly")["text"] == "group fly can run it"
    capped = step(answer, "capped", "fly")
    assert capped["text"].startswith("group fly is capped at max_workers 2 (more wanted): 2 running or starting")
    assert capped["numbers"].items() >= {"current": 2, "desired": 2, "max_workers": 2}.items()
    starting = step(answer, "starting", "fly")
    assert starting["text"] == "1 worker of group fly starting: 52 s into a typical boot of 40 s"
    assert starting["numbers"].items() >= {"starting": 1, "seconds_into_boot": 52.0, "typical_boot": 40.0}.items()
    busy = step(answer, "busy", "fly")
    assert busy["text"] == "the workers of group fly are busy: 1 of 1 slots taken on 1 worker"


async def test_a_provider_refusal_says_since_when_and_the_backoff(
    fly: FlyMachines, sqlite_store: SQLiteStore, settings: ServerSettings
) -> None:
    g = fly_group(fly, max_workers=2)
    clock = FakeClock(time.time())
    async with serve(sqlite_store, settings) as live:  # `scaleq server`, its controller elsewhere: no grid here
        live.app.state.clock = clock  # type: ignore[attr-defined]
        job_id = await submit(live, "q")
        fly.rate_limit(50, method="POST")
        refused_at = clock.now
        await controller(g, sqlite_store, clock, retries=2).step()
        clock.advance(1.0)
        answer = await why(live, job_id)
        # once a worker of the group registers, what the group offers is known from it
        w = Worker(id="t-fly-one", queue="q", group="fly", slots=1, runtimes=[RuntimeKind.process], cpus=1.0,
                   started_at=clock.now, last_heartbeat=clock.now)  # fmt: skip
        await sqlite_store.register_worker(w, clock.now)
        gpu = await why(live, await submit(live, "q", requirements={"gpus": 1}))
    assert step(gpu, "cannot_run", "fly")["text"] == "group fly cannot run it: it offers gpus 0, the job needs 1"
    unknown = step(answer, "group_unknown", "fly")  # no worker of it registered: what it offers is not known
    assert unknown["text"] == "group fly serves the queue; what its workers offer is not known here until one registers"
    assert "nothing_fits" not in kinds(answer)
    error = step(answer, "provider_error", "fly")
    assert error["text"].startswith("group fly: the provider refused more calls (rate limited) for 1 s: ")
    assert "429 rate limit exceeded" in error["text"]
    assert error["numbers"].items() >= {"state": "rate_limited", "since": refused_at, "seconds": 1.0}.items()
    backoff = step(answer, "backing_off", "fly")
    assert backoff["numbers"].items() >= {"failures": 1, "backoff": 2.0, "retry_at": refused_at + 2.0}.items()
    assert backoff["text"] == "its controller backs off: failure 1 in a row, next try in 1 s (back-off 2 s)"


# -- attempts ------------------------------------------------------------------------------------------------


async def test_a_finished_job_explains_its_lost_preempted_and_failed_attempts(
    sqlite_live: LiveServer,
) -> None:
    store, now = sqlite_live.store, time.time()
    job_id = await submit(sqlite_live, "q")
    w = Worker(id="w1", queue="q", slots=1, runtimes=[RuntimeKind.process], cpus=1.0, started_at=now,
               last_heartbeat=now)  # fmt: skip
    await store.register_worker(w, now)
    await store.claim("w1", 1, now, 5.0)
    await store.expire_leases(now + 10)  # the worker stopped renewing: lost, counted
    await store.claim("w1", 1, now + 20, 60.0)
    await store.release_worker("w1", now + 50)  # its provider took the machine back: not counted
    (claim,) = await store.claim("w1", 1, now + 60, 60.0)
    await store.finish(claim.lease, FinishResult("failed", exit_code=3), now + 63)
    answer = await why(sqlite_live, job_id)
    assert (answer["state"], answer["reason"]) == ("finished", "failed")
    assert kinds(answer) == ["attempt", "attempt", "attempt", "finished"]
    lost, preempted, failed, finished = (s["text"] for s in answer["chain"])
    assert lost.startswith("attempt 1 on worker w1: lost after 10 s (its worker stopped renewing the lease)")
    assert "the infrastructure budget counts it (1 of max_attempts 3); queued again" in lost
    assert preempted.startswith("attempt 2 on worker w1: preempted after 30 s") and "not counted" in preempted
    assert failed == "attempt 3 on worker w1: failed after 3 s with exit code 3"
    assert finished == "finished: failed with exit code 3; it retries no failures (retries 0)"
    assert [s["numbers"]["outcome"] for s in answer["chain"][:3]] == ["lost", "preempted", "failed"]


async def test_a_retried_failure_names_the_program_budget(sqlite_live: LiveServer) -> None:
    store, now = sqlite_live.store, time.time()
    req = SubmitRequest(queue="q", definition=JobDefinition(command=["flaky"]), retries=2)
    async with sqlite_live.client("submit") as c:
        job, _ = await c.submit(req)
    w = Worker(id="w1", queue="q", slots=1, runtimes=[RuntimeKind.process], cpus=1.0, started_at=now,
               last_heartbeat=now)  # fmt: skip
    await store.register_worker(w, now)
    (claim,) = await store.claim("w1", 1, now, 60.0)
    await store.finish(claim.lease, FinishResult("failed", exit_code=7), now + 1)
    queued = await why(sqlite_live, job.id)
    assert queued["state"] == "queued"
    assert "position" in kinds(queued)
    assert step(queued, "attempt")["text"].endswith("retried by the program budget (1 of retries 2)")
    (claim,) = await store.claim("w1", 1, now + 2, 60.0)
    (running,) = [s for s in (await why(sqlite_live, job.id))["chain"] if s["numbers"].get("outcome") is None]
    assert running["text"].startswith("attempt 2 on worker w1: running for")
    await store.finish(claim.lease, FinishResult("success", exit_code=0), now + 5)
    done = await why(sqlite_live, job.id)
    assert [s["text"] for s in done["chain"]][-2:] == [
        "attempt 2 on worker w1: succeeded after 3 s",
        "finished: succeeded",
    ]
