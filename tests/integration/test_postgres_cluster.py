"""Several servers on one PostgreSQL, and a database restart under load: nothing lost, nothing run twice."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from scaleq.client import Client
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server.settings import ServerSettings
from scaleq.store.postgres import PostgresStore
from scaleq.worker.agent import WorkerAgent
from scaleq.worker.runtime.process import ProcessRuntime
from tests.helpers import LiveServer, serve
from tests.helpers.workers import agent
from tests.pg import Cluster

SETTINGS = ServerSettings(lease_seconds=10.0, sweep_interval=0.5, long_poll_max=5.0)


@contextlib.asynccontextmanager
async def server(url: str, tokens: dict[str, str] | None = None) -> AsyncIterator[LiveServer]:
    store = PostgresStore(url)
    await store.open()
    try:
        async with serve(store, SETTINGS, tokens=tokens) as live:
            yield live
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def workers(live: LiveServer, prefix: str, n: int, slots: int) -> AsyncIterator[list[WorkerAgent]]:
    runtimes = {"process": ProcessRuntime()}
    agents = [agent(live, f"{prefix}{i}", slots, runtimes=runtimes, cpus=4.0, server_grace=120) for i in range(n)]
    tasks = [asyncio.create_task(a.run()) for a in agents]
    try:
        yield agents
    finally:
        for a in agents:
            a.request_drain()
        await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 60)


async def submit_many(c: Client, n: int, tag: str, cmd: tuple[str, ...] = ("true",)) -> list[str]:
    ids = []
    for i in range(n):
        job, _ = await c.submit(
            SubmitRequest(queue="q", definition=JobDefinition(command=[*cmd], env={"N": f"{tag}{i}"}))
        )
        ids.append(job.id)
    return ids


async def all_finished(c: Client, ids: list[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    pending = set(ids)
    while pending:
        assert time.monotonic() < deadline, f"{len(pending)} jobs not finished"
        for job_id in list(pending):
            if (await c.get_job(job_id)).state == "finished":
                pending.discard(job_id)
        await asyncio.sleep(0.2)


@pytest.mark.timeout(400)
async def test_two_servers_share_one_database_and_each_job_runs_once(pg_url: str) -> None:
    async with server(pg_url) as a, server(pg_url, tokens=a.tokens) as b:
        async with workers(a, "wa", 2, 4), workers(b, "wb", 2, 4):
            ca, cb = a.client("submit"), b.client("submit")
            ids = (await submit_many(ca, 100, "a")) + (await submit_many(cb, 100, "b"))
            await all_finished(ca, ids, 300)
            for job_id in ids:
                job = await cb.get_job(job_id)
                assert job.reason == "success" and job.attempts == 1, job
            rows = await a.store._run(
                lambda: a.store.db.execute(
                    "SELECT job_id, count(*) AS n, count(*) FILTER (WHERE outcome = 'success') AS ok "
                    "FROM attempts GROUP BY job_id"
                ).fetchall()
            )
            assert len(rows) == 200 and all(r["n"] == 1 and r["ok"] == 1 for r in rows)
            served = {w.id: w for w in await ca.workers(include_gone=True)}
            assert {"wa0", "wa1", "wb0", "wb1"} <= set(served)
            await ca.close()
            await cb.close()


async def test_a_submit_on_one_server_wakes_a_claim_parked_on_another(pg_url: str) -> None:
    async with server(pg_url) as a, server(pg_url, tokens=a.tokens) as b:
        wb = b.client("worker")
        await wb.register({"id": "w", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})
        parked = asyncio.create_task(wb.claim("w", 1, wait=5))
        await asyncio.sleep(0.3)
        async with a.client("submit") as ca:
            job, _ = await ca.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
        claims, _, _ = await parked
        assert [c.job.id for c in claims] == [job.id]  # NOTIFY woke it: a claim whose wait runs out returns nothing
        await wb.close()


async def test_a_batch_on_one_server_wakes_as_many_claims_parked_on_another(pg_url: str) -> None:
    """Another server's NOTIFY names a queue once per batch, not once per job: the claim it wakes, having taken a
    job, passes the wake on, so every parked claim that can take one does, not only the first."""
    async with server(pg_url) as a, server(pg_url, tokens=a.tokens) as b:
        wb = b.client("worker")
        ids = [f"w{i}" for i in range(3)]
        for w in ids:
            await wb.register({"id": w, "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})
        # a long wait: a claim that nothing woke would answer empty, after the test's own timeout
        parked = [asyncio.create_task(wb.claim(w, 1, wait=60)) for w in ids]
        while b.app.state.notifier.parked("q") < len(ids):  # type: ignore[attr-defined]
            await asyncio.sleep(0.05)
        async with a.client("submit") as ca:
            reqs = [
                SubmitRequest(queue="q", definition=JobDefinition(command=["true"], env={"N": str(i)}))
                for i in range(3)
            ]
            jobs = {j.id for j, _ in await ca.submit_many(reqs)}
        got = await asyncio.wait_for(asyncio.gather(*parked), 30)
        assert {c.job.id for claims, _, _ in got for c in claims} == jobs
        await wb.close()


async def test_a_job_finished_through_one_server_wakes_its_follower_on_another(pg_url: str) -> None:
    async with server(pg_url) as a, server(pg_url, tokens=a.tokens) as b:
        wa = a.client("worker")
        await wa.register({"id": "w", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})
        async with b.client("submit") as cb:
            job, _ = await cb.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
            (claim,), _, _ = await wa.claim("w", 1, wait=5)
            # a follower on b waits for the job to leave "running"; the finish goes through a
            following = asyncio.create_task(cb.get_job(job.id, wait=5, state="running"))
            await asyncio.sleep(0.3)
            await wa.claim("w", 0, wait=0, finishes=[{"lease": claim.lease, "reason": "success", "exit_code": 0}])
            done = await following
            # the lazily published change woke it: a wait that runs out answers the job as it is, running
            assert done.state == "finished" and done.reason == "success"
        await wa.close()


async def test_database_restart_under_load_loses_nothing(pg_cluster: Cluster, pg_url: str) -> None:
    async with server(pg_url) as live, workers(live, "w", 2, 3):
        c = live.client("submit")
        ids = await submit_many(c, 60, "r", ("sh", "-c", "sleep 0.1"))
        await asyncio.sleep(1.0)  # work is under way
        pg_cluster.stop("fast")
        await asyncio.sleep(2.0)  # workers finish jobs and cannot report: they retry
        pg_cluster.start()
        await all_finished(c, ids, 120)
        for job_id in ids:
            job = await c.get_job(job_id)
            assert job.reason == "success", job
        after, _ = await c.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["echo", "after"])))
        await all_finished(c, [after.id], 30)
        await c.close()
