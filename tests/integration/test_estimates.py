"""A queued job's estimated start, served by a real server on SQLite (scaleq.server.estimates, GET /jobs/{id},
``scaleq job``).

The server's clock is a fake one, set far past the wall clock so that its own sweeps (which run on the wall clock)
never expire the leases the test takes; the group's status is written over the API, as a remote controller does.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from typer.testing import CliRunner

from scaleq.cli import app
from scaleq.client import Client
from scaleq.eta import DEFAULT_BOOT
from scaleq.grid import Group
from scaleq.jobs import JobDefinition, RuntimeKind, SubmitRequest, Worker
from scaleq.store.base import FinishResult
from tests.helpers import LiveServer

runner = CliRunner()
T = time.time() + 100_000
LEASE = 10_000.0


def definition(n: int, **kw: object) -> JobDefinition:
    return JobDefinition(command=["sleep", str(n)], **kw)  # type: ignore[arg-type]


def worker(wid: str, queue: str, slots: int, group: str | None = None, gpus: int = 0) -> Worker:
    return Worker(
        id=wid, queue=queue, group=group, slots=slots, runtimes=[RuntimeKind.process], cpus=4.0, gpus=gpus,
        started_at=T, last_heartbeat=T,
    )  # fmt: skip


def status(**kw: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "g", "queue": "q", "provider": "local", "min": 0, "max": 1}
    return base | kw


async def get(client: Client, path: str) -> Any:
    r = await client.request("GET", path)
    assert r.status_code == 200, r.text
    return r.json()


def cli(live: LiveServer, *args: str) -> object:
    return runner.invoke(app, [*args, "--server", live.url, "--token", live.tokens["read"]], env={"COLUMNS": "300"})


async def test_queued_jobs_get_the_start_the_queue_capacity_and_run_times_give(sqlite_live: LiveServer) -> None:
    live, store = sqlite_live, sqlite_live.store
    clock = [T]
    live.app.state.clock = lambda: clock[0]  # type: ignore[attr-defined]
    async with live.client() as c:
        # a group at zero, one worker of 2 slots asked for 4 s ago, boots seen to take 10 s
        await c.put_group(status(current=1, desired=1, slots=2, boot_seconds=10.0, starting=[T - 4]))
        first = [(await c.submit(SubmitRequest(queue="q", definition=definition(i))))[0] for i in range(3)]
        page = await get(c, f"/jobs/{first[0].id}")
        assert page["estimated_start"] == T + 6
        assert page["estimate_basis"] == (
            "0 ahead, 0 workers x 2 slots (at max 1), 1 worker starting (typical boot 10 s, 4 s in)"
        )
        assert (await get(c, f"/jobs/{first[1].id}"))["estimated_start"] == T + 6
        third = await get(c, f"/jobs/{first[2].id}")  # behind two runs nobody has timed yet
        assert third["estimated_start"] is None
        assert "no run of its queue finished yet" in third["estimate_basis"]

        # the worker registers and runs two of them for 40 s: runs are timed now
        await store.register_worker(worker("w1", "q", 2, group="g"), T)
        claims = await store.claim("w1", 2, T, LEASE)
        assert {cl.job.id for cl in claims} == {first[0].id, first[1].id}
        for cl in claims:
            await store.finish(cl.lease, FinishResult("success", 0), T + 40)
        await c.put_group(status(current=1, desired=1, slots=2, boot_seconds=10.0))
        # two more; then the worker takes two (at T + 50), leaving two queued, and a later job of higher priority
        more = [(await c.submit(SubmitRequest(queue="q", definition=definition(10 + i))))[0] for i in range(2)]
        claims = await store.claim("w1", 2, T + 50, LEASE)
        assert {cl.job.id for cl in claims} == {first[2].id, more[0].id}
        urgent, _ = await c.submit(SubmitRequest(queue="q", definition=definition(99), priority=5))
        clock[0] = T + 60  # the runs began 10 s ago: 30 s of a typical 40 s left

        got = await get(c, f"/jobs/{urgent.id}")
        assert got["estimated_start"] == T + 90
        assert got["estimate_basis"] == "0 ahead, 1 worker x 2 slots (at max 1), median run 40 s"
        behind = await get(c, f"/jobs/{more[1].id}")
        assert behind["estimated_start"] == T + 90  # the urgent job takes one slot at +90, this one the other
        assert behind["estimate_basis"].startswith("1 ahead, ")
        why = await get(c, f"/jobs/{more[1].id}/why")  # `scaleq why` says the same
        assert (why["estimated_start"], why["estimate_basis"]) == (behind["estimated_start"], behind["estimate_basis"])

        # running and finished jobs have none; the job lists never carry it
        running = await get(c, f"/jobs/{more[0].id}")
        assert (running["state"], running["estimated_start"], running["estimate_basis"]) == ("running", None, None)
        listed = await get(c, "/jobs?queue=q")
        assert listed and all("estimated_start" not in j for j in listed)

    shown = await asyncio.to_thread(cli, live, "job", more[1].id, "--output", "json")
    assert shown.exit_code == 0, shown.output  # type: ignore[attr-defined]
    data = json.loads(shown.output)  # type: ignore[attr-defined]
    assert data["estimated_start"] == T + 90 and data["estimate_basis"].startswith("1 ahead, ")
    table = await asyncio.to_thread(cli, live, "job", more[1].id)
    line = next(ln for ln in table.output.splitlines() if "starts" in ln)  # type: ignore[attr-defined]
    assert "in ~" in line and "(at " in line and "1 ahead, 1 worker x 2 slots (at max 1), median run 40 s" in line


async def test_nothing_that_can_run_it_says_so(sqlite_live: LiveServer) -> None:
    live = sqlite_live
    live.app.state.clock = lambda: T  # type: ignore[attr-defined]
    await live.store.register_worker(worker("cpu-only", "gq", 1), T)
    async with live.client() as c:
        gpu, _ = await c.submit(SubmitRequest(queue="gq", definition=definition(1, requirements={"gpus": 1})))
        page = await get(c, f"/jobs/{gpu.id}")
        assert page["estimated_start"] is None
        assert page["estimate_basis"] == "nothing can run it: worker cpu-only offers gpus 0, the job needs 1"
        lonely, _ = await c.submit(SubmitRequest(queue="nobody", definition=definition(1)))
        page = await get(c, f"/jobs/{lonely.id}")
        assert page["estimate_basis"] == "nothing can run it: no group and no worker serves its queue"
        # a group whose controller stopped scales nothing: with no worker up, nothing will run it
        await c.put_group(status(queue="nobody", current=0, desired=0, reporter="stopped"))
        page = await get(c, f"/jobs/{lonely.id}")
        assert page["estimated_start"] is None and "no worker up or to start" in page["estimate_basis"]


async def test_without_the_grid_a_group_is_judged_by_its_registered_workers(sqlite_live: LiveServer) -> None:
    """On ``scaleq server`` (no grid in process): a group whose workers cannot run the job is not counted as
    capacity, as ``scaleq why`` says "cannot run it" of it -- the two answers agree."""
    live = sqlite_live
    live.app.state.clock = lambda: T  # type: ignore[attr-defined]
    async with live.client() as c:
        await c.put_group(status(name="cpu", queue="gq2", current=1, desired=1, max=3, slots=1, reporter="controller"))
        await live.store.register_worker(worker("cpu-1", "gq2", 1, group="cpu"), T)
        gpu, _ = await c.submit(SubmitRequest(queue="gq2", definition=definition(2, requirements={"gpus": 1})))
        page = await get(c, f"/jobs/{gpu.id}")
        assert page["estimated_start"] is None
        assert page["estimate_basis"] == "nothing can run it: worker cpu-1 offers gpus 0, the job needs 1"
        why = await get(c, f"/jobs/{gpu.id}/why")
        assert any(s["kind"] == "cannot_run" for s in why["chain"]), why["chain"]
        assert (why["estimated_start"], why["estimate_basis"]) == (None, page["estimate_basis"])


async def test_with_the_grid_in_process_a_group_that_does_not_fit_is_left_out(sqlite_live: LiveServer) -> None:
    """As under ``scaleq up``: the server knows its groups' capabilities and names the one that cannot run the job."""
    live = sqlite_live
    live.app.state.clock = lambda: T  # type: ignore[attr-defined]
    cpu = Group(name="cpu", queue="mixed", provider="local", runtimes=[RuntimeKind.process], max_workers=2)
    gpu = Group(
        name="gpu", queue="mixed", provider="local", runtimes=[RuntimeKind.process], max_workers=1,
        resources={"gpus": 1},
    )  # fmt: skip
    live.app.state.runnable.groups = [cpu, gpu]  # type: ignore[attr-defined]
    async with live.client() as c:
        for g in (cpu, gpu):
            await c.put_group(status(name=g.name, queue="mixed", max=g.max_workers, current=0, desired=0))
        job, _ = await c.submit(SubmitRequest(queue="mixed", definition=definition(1, requirements={"gpus": 1})))
        page = await get(c, f"/jobs/{job.id}")
        # the gpu group starts one worker for it (boot not seen yet: assumed); the cpu group is named as unfit
        assert page["estimated_start"] == T + DEFAULT_BOOT
        assert page["estimate_basis"] == (
            f"0 ahead, 0 workers x 1 slot, 1 worker starting (boot assumed {DEFAULT_BOOT:.0f} s), "
            "not counted: group cpu offers gpus 0, the job needs 1"
        )
