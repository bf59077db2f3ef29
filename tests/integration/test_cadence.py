"""The grid's heartbeat cadence over the real protocol (:mod:`scaleq.server.cadence`): housekeeping counts the running
jobs, registrations and heartbeats answer with the interval that count asks for, a lease lasts three of its beats,
health judges beats by it, and the real agent takes the interval up.

The server's clock is a fake one moved by the test and housekeeping is driven a tick at a time, as in
test_fleet_liveness; the store is SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server import housekeeping, metrics
from scaleq.server.cadence import Cadence
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from tests.helpers import LiveServer, eventually, housekept, serve
from tests.helpers.workers import agent, running
from tests.integration.test_fleet_liveness import Clock, http, register, states

BUSY = 10


@pytest.fixture
async def grid(any_store: Store) -> AsyncIterator[tuple[LiveServer, Clock]]:
    clock = Clock()
    # a budget of 1 beat a second: 10 busy workers beat every 10 s, and a lease lasts 30 s
    settings = ServerSettings(lease_seconds=15.0, heartbeat_budget=1.0, long_poll_max=60.0, sweep_interval=3600.0)
    async with serve(any_store, settings, clock=clock) as live:
        await housekept(live)  # its start-up round is done before the test moves the clock
        yield live, clock


@pytest.fixture
async def agents_grid(sqlite_store: Store) -> AsyncIterator[LiveServer]:
    """For the real agent (real time): the settings' lease, and housekeeping that counts once, at start, so that the
    cadence stays what the test sets."""
    settings = ServerSettings(lease_seconds=15.0, long_poll_max=20.0, sweep_interval=3600.0)
    async with serve(sqlite_store, settings) as live:
        await housekept(live)
        yield live


def cadence(live: LiveServer) -> Cadence:
    return live.app.state.cadence  # type: ignore[attr-defined, no-any-return]


async def tick(live: LiveServer, clock: Clock) -> None:
    app: Any = live.app
    await housekeeping.tick(live.store, app.state.notifier, app.state.settings, clock(), cadence=cadence(live))


async def test_the_beat_slows_with_the_busy_workers_and_leases_survive_it(grid: tuple[LiveServer, Clock]) -> None:
    live, clock = grid
    async with live.client("submit") as submitter:
        for i in range(BUSY):
            await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true", str(i)])))
    async with http(live) as client:
        first = await register(client, "w0")
        assert first["heartbeat_seconds"] == 2.0  # nothing runs yet: the settings' interval
        leases = {}
        for i in range(BUSY):
            await register(client, f"w{i}")
            r = await client.post(f"/workers/w{i}/claim", json={"max": 1, "wait": 0})
            leases[f"w{i}"] = r.json()["claims"][0]["lease"]
        await tick(live, clock)
        assert cadence(live).busy == BUSY
        late = await register(client, "late")  # the settings' beat (a worker from before the cadence keeps it)
        assert (late["heartbeat_seconds"], late["lease_seconds"]) == (2.0, 15.0)
        for beat in range(4):  # then 75 s of the server's time, each worker beating every 25 s: two beats missed
            if beat:  # (past the settings' 15 s lease each time: only the cadence's 30 s, granted at the first
                clock.t += 25.0  # beat after the count, keeps the jobs)
                await tick(live, clock)
            for wid, lease in leases.items():
                r = await client.post(f"/workers/{wid}/heartbeat", json={"leases": [lease]})
                assert r.json() == {"state": "active", "leases": [lease], "heartbeat_seconds": 10.0}
            r = await client.post("/workers/late/heartbeat", json={"leases": []})
        assert set((await states(live)).values()) == {"active"}
        clock.t += 15.0  # two beats missed at the settings' 2 s, not at the 10 s asked
        async with http(live, "admin") as admin:
            health = (await admin.get("/health")).json()
        assert (health["heartbeat_seconds"], health["lease_seconds"]) == (10.0, 30.0)
        beating = [c for c in health["checks"] if c["name"] == "workers heartbeating"]
        assert beating and all(c["ok"] for c in beating), beating
        for wid, lease in leases.items():  # each result rides along a claim that finds nothing more
            body = {"max": 1, "wait": 0, "finishes": [{"lease": lease, "reason": "success", "exit_code": 0}]}
            r = await client.post(f"/workers/{wid}/claim", json=body)
            assert r.json()["finished"] == [{"lease": lease, "ok": True, "detail": None}]
        await tick(live, clock)
        assert cadence(live).busy == 0
        r = await client.post("/workers/w0/heartbeat", json={"leases": []})
        assert r.json()["heartbeat_seconds"] == 2.0
    async with live.client("read") as reader:
        attempts = [a for i in range(BUSY) for a in await reader.attempts(await job_id(live, i))]
    assert [a["outcome"] for a in attempts] == ["success"] * BUSY  # no lease was lost at the slower beat


async def test_a_busy_worker_is_given_up_on_after_three_of_its_leases(
    grid: tuple[LiveServer, Clock], caplog: pytest.LogCaptureFixture
) -> None:
    """Beating every 10 s under 30 s leases, a worker is not marked gone at the settings' 45 s of silence (an
    overloaded server's beats come late), but after three leases, 90 s; the log says how long it was silent."""
    live, clock = grid
    async with http(live) as client:
        await register(client, "quiet")
        cadence(live).count(BUSY)  # as housekeeping counts 10 running jobs: 10 s beats, 30 s leases
        app: Any = live.app
        for silence, state in ((60.0, "active"), (95.0, "gone")):
            clock.t += silence - (clock.t - 1_000_000.0)
            # (no recount: nothing runs here, and the count stands for ten busy workers)
            await housekeeping.tick(
                live.store, app.state.notifier, app.state.settings, clock(), touch=False, cadence=cadence(live)
            )
            assert (await states(live))["quiet"] == state
    assert "worker quiet stopped heartbeating (silent for over 90 s); marked gone" in caplog.text


async def job_id(live: LiveServer, i: int) -> str:
    async with live.client("read") as reader:
        jobs = await reader.list_jobs(queue="q")
    return next(j.id for j in jobs if j.definition.command == ["true", str(i)])


def beats_answered(live: LiveServer) -> float:
    route = "/api/v1/workers/{worker_id}/heartbeat"
    return float(metrics.of(live.app).http_requests.labels(route, "200")._value.get())  # type: ignore[arg-type]


async def test_the_agent_takes_up_the_cadence_from_its_beats(agents_grid: LiveServer) -> None:
    a = agent(agents_grid, "follower", slots=1)
    async with running(a):
        async with agents_grid.client("submit") as submitter:
            req = SubmitRequest(queue="q", definition=JobDefinition(command=["sleep", "60"]))
            job, _ = await submitter.submit(req)
        await eventually(lambda: asyncio.sleep(0, bool(a.running)), 30, what="the job running")
        assert a.heartbeat_seconds == 2.0  # the settings' beat
        cadence(agents_grid).count(1_000_000)  # as housekeeping would count a fleet far past the budget
        await eventually(lambda: asyncio.sleep(0, a.heartbeat_seconds == 15.0), 30, what="the slower beat")
        async with agents_grid.client("admin") as admin:
            await admin.cancel(job.id)


async def test_a_claim_under_a_quicker_beat_cuts_the_agents_sleep(
    agents_grid: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease lasts three of the beats asked for when it was claimed: a worker told of a slow beat before, that
    claims under a quick one, must not sleep out the slow one (its new lease would expire first). And a claim's
    answer never slows the beat: only a heartbeat's, which renewed every lease held at the new term."""
    asked = cadence(agents_grid)
    asked.count(1_000_000)  # 15 s beats, 45 s leases
    a = agent(agents_grid, "quickened", slots=2)
    # The agent's heartbeats wait until the claim's answer has been looked at: a beat sent once the job runs is
    # answered 15 s and rightly slows the beat, so, let through, it could land before the look (1 run in ~40).
    beats_held = asyncio.Event()
    heartbeat = a.client.heartbeat

    async def held(*args: Any, **kwargs: Any) -> Any:
        await beats_held.wait()
        return await heartbeat(*args, **kwargs)

    monkeypatch.setattr(a.client, "heartbeat", held)
    async with running(a), agents_grid.client("submit") as submitter:
        first, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["sleep", "60"])))
        await eventually(lambda: asyncio.sleep(0, len(a.running) == 1), 30, what="the first job running")
        assert a.heartbeat_seconds == 2.0  # the registration's, kept: the claim's answer (15 s) may only quicken it
        beats_held.set()
        await eventually(lambda: asyncio.sleep(0, a.heartbeat_seconds == 15.0), 30, what="a beat's answer")
        asked.count(0)  # the fleet shrank: 2 s beats, 15 s leases from now on
        before = beats_answered(agents_grid)
        second, _ = await submitter.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["sleep", "61"])))
        await eventually(lambda: asyncio.sleep(0, len(a.running) == 2), 30, what="the second job running")
        claimed = time.monotonic()
        assert a.heartbeat_seconds == 2.0  # from the claim's answer, not from a beat up to 15 s away
        await eventually(lambda: asyncio.sleep(0, beats_answered(agents_grid) > before), 30, what="the next beat")
        # within the quicker beat (2 s), not what was left of the slow one (at least 11 s: 75 % of 15 s, begun
        # moments before the claim); the margin is for a loaded machine
        assert time.monotonic() - claimed < 6.0
        async with agents_grid.client("admin") as admin:
            await admin.cancel(first.id)
            await admin.cancel(second.id)
