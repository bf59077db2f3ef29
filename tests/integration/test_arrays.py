"""Arrays and cost: the store contract on both dialects, the API, and the CLI against a live server.

An array is the jobs of one submit-many; its members' ids include the array and their index (the same line twice
is two jobs), submitting the same lines again is the same array and the same jobs, progress is one grouped count.
Cost is worker-seconds: worker lives per group and queue (a ledger that outlives forgotten workers), each
attempt's run time times its share of its worker per array and job; money at the group's price per hour.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from scaleq.cli import app
from scaleq.client import ApiError
from scaleq.jobs import JobDefinition, RuntimeKind, SubmitRequest, Worker, array_id, job_id
from scaleq.store.base import ArrayRecord, FinishResult, GroupStatus, NotFound, Store, Submission
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer

T0 = 1_000_000.0
runner = CliRunner()


def d(*cmd: str, cpus: float = 1.0) -> JobDefinition:
    return JobDefinition(command=list(cmd) or ["true"], requirements={"cpus": cpus})


def members(aid: str, defs: list[JobDefinition], queue: str = "q", start: int = 0) -> list[Submission]:
    return [Submission(queue, x, array_id=aid, array_index=start + i) for i, x in enumerate(defs)]


async def make_array(
    store: Store, defs: list[JobDefinition], name: str | None = None, now: float = T0
) -> tuple[str, list[str]]:
    aid = array_id("q", defs)
    done = await store.submit_many(members(aid, defs), now, ArrayRecord(aid, "q", name, len(defs), now))
    return aid, [job.id for job, _ in done]


async def worker(store: Store, wid: str = "w1", group: str | None = "g", slots: int = 4, cpus: float = 4.0) -> None:
    w = Worker(
        id=wid,
        queue="q",
        group=group,
        slots=slots,
        cpus=cpus,
        runtimes=[RuntimeKind.process],
        started_at=T0,
        last_heartbeat=T0,
    )
    await store.register_worker(w, T0)


# -- the store ------------------------------------------------------------------------------------------------------


async def test_an_array_numbers_its_jobs_and_the_same_lines_again_are_the_same_array(any_store: Store) -> None:
    defs = [d("train"), d("train"), d("train"), d("eval")]
    aid, ids = await make_array(any_store, defs, name="sweep")
    # the same line twice is two jobs: each sees its own index
    assert ids == [job_id("q", x, aid, i) for i, x in enumerate(defs)] and len(set(ids)) == 4
    assert job_id("q", defs[0]) not in ids  # a member is not the same job as the definition submitted alone
    jobs = [await any_store.get_job(i) for i in ids]
    assert [(j.array_id, j.array_index) for j in jobs] == [(aid, i) for i in range(4)]
    # the same lines again (another name given): the same array and jobs, found, not queued twice
    again = await any_store.submit_many(members(aid, defs), T0 + 5, ArrayRecord(aid, "q", "other", 4, T0 + 5))
    assert [(j.id, created) for j, created in again] == [(i, False) for i in ids]
    status = await any_store.get_array(aid[:8])
    assert (status.array.name, status.array.size, status.array.created_at) == ("sweep", 4, T0)
    assert (status.queued, status.running, status.finished) == (4, 0, {})
    # an array in another order is another array
    assert array_id("q", defs[::-1]) != aid and array_id("other", defs) != aid


async def test_progress_cancel_and_rerun_of_the_failed(any_store: Store) -> None:
    aid, ids = await make_array(any_store, [d("job", str(i)) for i in range(6)])
    await worker(any_store)
    claims = await any_store.claim("w1", 4, T0 + 10, 60)
    assert [c.job.array_index for c in claims] == [0, 1, 2, 3]  # in the array's order
    results = [FinishResult("success", 0), FinishResult("failed", 1), FinishResult("timed_out")]
    for claim, result in zip(claims, results, strict=False):
        await any_store.finish(claim.lease, result, T0 + 20)
    status = await any_store.get_array(aid)
    assert (status.queued, status.running, status.finished) == (2, 1, {"success": 1, "failed": 1, "timed_out": 1})
    # cancel: what is left (queued and running) finishes cancelled; the running attempt ends
    status, cancelled = await any_store.cancel_array(aid, T0 + 30)
    assert sorted(i for i, _ in cancelled) == sorted(ids[3:])
    assert status.finished == {"success": 1, "failed": 1, "timed_out": 1, "cancelled": 3} and status.done == 6
    assert (await any_store.list_attempts(ids[3]))[0].outcome == "cancelled"
    assert (await any_store.cancel_array(aid, T0 + 31))[1] == []  # nothing left to cancel
    # rerun the failed: all but the one that succeeded, queued again in the array's order
    status, queued = await any_store.rerun_array(aid, True, T0 + 40)
    assert sorted(i for i, _ in queued) == sorted(ids[1:]) and status.queued == 5
    assert status.finished == {"success": 1}
    again = await any_store.claim("w1", 10, T0 + 50, 60)
    assert [c.job.array_index for c in again] == [1, 2, 3, 4, 5]
    assert [c.attempt for c in again][:3] == [2, 2, 2]  # a new attempt; the first ones' logs are kept
    for c in again:
        await any_store.finish(c.lease, FinishResult("success", 0), T0 + 60)
    # rerun all: every finished job
    status, queued = await any_store.rerun_array(aid, False, T0 + 70)
    assert len(queued) == 6 and (status.queued, status.finished) == (6, {})


async def test_a_few_thousand_jobs_list_with_their_progress(any_store: Store) -> None:
    defs = [d("step", str(i)) for i in range(3000)]
    aid = array_id("q", defs)
    record = ArrayRecord(aid, "q", "big", len(defs), T0)
    for start in range(0, 3000, 1000):
        await any_store.submit_many(members(aid, defs[start : start + 1000], start=start), T0, record)
    small, _ = await make_array(any_store, [d("small")], now=T0 + 1)
    await worker(any_store, slots=200, cpus=200)
    claims = await any_store.claim("w1", 200, T0 + 2, 60)
    for c in claims[:50]:
        await any_store.finish(c.lease, FinishResult("failed", 2), T0 + 3)
    found = await any_store.list_arrays(queue=None, limit=10)
    assert [a.array.id for a in found] == [small, aid]  # newest first
    assert (found[1].queued, found[1].running, found[1].finished) == (2800, 150, {"failed": 50})
    assert (found[0].queued, found[0].done) == (1, 0)
    assert await any_store.list_arrays(queue="elsewhere", limit=10) == []
    assert [a.array.id for a in await any_store.list_arrays(queue="q", limit=1)] == [small]


async def test_progress_is_one_count_from_the_array_index(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "plan.db")
    await store.open()
    await store.close()
    conn = sqlite3.connect(tmp_path / "plan.db")
    query = "SELECT state, reason, count(*) AS n FROM jobs WHERE array_id = ? GROUP BY state, reason"
    plan = " ".join(str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {query}", ("x",)))
    conn.close()
    assert "COVERING INDEX jobs_array" in plan  # the rows themselves are never read


async def test_an_unknown_array_is_not_found(any_store: Store) -> None:
    for wrong in ("f" * 64, "abcdef12", "xyz"):
        with pytest.raises(NotFound, match="no array"):
            await any_store.get_array(wrong)
    with pytest.raises(NotFound):
        await any_store.cancel_array("f" * 64, T0)
    with pytest.raises(NotFound):
        await any_store.rerun_array("f" * 64, True, T0)


async def test_worker_seconds_per_job_array_group_and_queue(any_store: Store) -> None:
    aid, ids = await make_array(any_store, [d("a", cpus=1), d("b", cpus=2), d("c", cpus=4)])
    await worker(any_store, slots=4, cpus=4)  # group g; one slot is a quarter of the worker
    claims = await any_store.claim("w1", 3, T0 + 10, 60)
    for c in claims:
        await any_store.finish(c.lease, FinishResult("success", 0), T0 + 30)
    # a job's share: the larger of one slot and its cpus over the worker's: 1/4, 2/4, 4/4 of 20 s
    per_job = [(await any_store.usage("job", 0, T0 + 100, key=i))[0] for i in ids]
    assert [(u.group, u.worker_seconds) for u in per_job] == [("g", 5.0), ("g", 10.0), ("g", 20.0)]
    (per_array,) = await any_store.usage("array", 0, T0 + 100)
    assert (per_array.key, per_array.group, per_array.worker_seconds) == (aid, "g", 35.0)
    assert (await any_store.usage("array", T0 + 25, T0 + 100, key=aid))[0].worker_seconds == 8.75  # since: clipped
    # a running attempt counts up to now
    (running,) = await any_store.submit_many([Submission("q", d("running"))], T0 + 40)
    (claim,) = await any_store.claim("w1", 1, T0 + 40, 60)
    assert (await any_store.usage("job", 0, T0 + 48, key=claim.job.id))[0].worker_seconds == 2.0
    # the worker's life: registration to last heartbeat, per group and per queue
    await any_store.heartbeat("w1", T0 + 100, 60)
    await worker(any_store, "w2", group=None)
    await any_store.heartbeat("w2", T0 + 10, 60)
    by_group = {u.key: u.worker_seconds for u in await any_store.usage("group", 0, T0 + 200)}
    assert by_group == {"g": 100.0, None: 10.0}
    assert [(u.key, u.worker_seconds) for u in await any_store.usage("group", T0 + 60, T0 + 200) if u.key] == [
        ("g", 40.0)
    ]
    by_queue = {(u.key, u.group): u.worker_seconds for u in await any_store.usage("queue", 0, T0 + 200)}
    assert by_queue == {("q", "g"): 100.0, ("q", None): 10.0}
    # gone and forgotten, the worker still counts
    await any_store.mark_gone_workers(T0 + 500, T0 + 500)
    assert await any_store.list_workers(include_gone=True) == []
    by_group = {u.key: u.worker_seconds for u in await any_store.usage("group", 0, T0 + 900)}
    assert by_group == {"g": 100.0, None: 10.0}
    with pytest.raises(ValueError, match="usage by 'job'"):
        await any_store.usage("job", 0, T0)


async def test_a_group_keeps_its_price(any_store: Store) -> None:
    await any_store.put_group(GroupStatus("g", "q", "local", 0, 2, 1, 1, T0, price_per_hour=0.25))
    await any_store.put_group(GroupStatus("h", "q", "local", 0, 2, 1, 1, T0))
    assert [(g.name, g.price_per_hour) for g in await any_store.list_groups()] == [("g", 0.25), ("h", None)]


# -- the API --------------------------------------------------------------------------------------------------------


def batch(*cmds: str, queue: str = "q") -> list[dict[str, Any]]:
    return [SubmitRequest(queue=queue, definition=d(c)).model_dump(mode="json") for c in cmds]


async def post_batch(live: LiveServer, jobs: list[dict[str, Any]], array: dict[str, Any] | None) -> Any:
    async with live.client("submit") as c:
        body: dict[str, Any] = {"jobs": jobs} | ({"array": array} if array is not None else {})
        return (await c.request("POST", "/jobs/batch", json=body)).json()


async def test_batch_submit_makes_an_array_and_checks_what_names_one(live: LiveServer) -> None:
    done = await post_batch(live, batch("a", "b", "a"), {"name": "mine"})
    array = done["array"]
    assert array["id"] == array_id("q", [d("a"), d("b"), d("a")]) and (array["name"], array["size"]) == ("mine", 3)
    assert [s["job"]["array_index"] for s in done["submitted"]] == [0, 1, 2]
    assert (await post_batch(live, batch("plain"), None))["array"] is None  # without array: as before
    # an array in two batches: id and size in each
    aid = array_id("q", [d("x"), d("y"), d("z")])
    first = await post_batch(live, batch("x", "y"), {"id": aid, "size": 3})
    second = await post_batch(live, batch("z"), {"id": aid, "size": 3, "start": 2})
    assert [s["job"]["array_index"] for s in first["submitted"] + second["submitted"]] == [0, 1, 2]
    async with live.client("read") as c:
        shown = await c.array(aid[:10])
        assert (shown["size"], shown["submitted"], shown["queued"], shown["percent"]) == (3, 3, 3, 0.0)
        assert [a["id"] for a in await c.arrays()] == [aid, array["id"]]
    # what is refused, naming the field
    async with live.client("submit") as c:
        for jobs, spec, where in [
            (batch("x") + batch("y", queue="other"), {}, "jobs.1.queue"),
            (batch("x"), {"start": 1}, "array.id"),
            (batch("x"), {"id": aid}, "array.size"),
            (batch("x"), {"id": aid, "size": 3, "start": 3}, "array.start"),
            (batch("x"), {"id": "e" * 64, "size": 1}, "array.id"),  # a whole array whose id is not its jobs'
            (batch("x"), {"id": aid, "size": 4}, "array.id"),  # the array exists with 3 jobs
            (batch("x"), {"name": "\x1b[2J"}, "array.name"),
        ]:
            with pytest.raises(ApiError) as refused:
                await c.request("POST", "/jobs/batch", json={"jobs": jobs, "array": spec})
            assert refused.value.status == 422 and where in str(refused.value), (spec, str(refused.value))
        with pytest.raises(ApiError) as missing:
            await c.array("f" * 64)
        assert missing.value.status == 404 and "no array" in str(missing.value)


async def test_array_long_poll_cancel_rerun_and_cost_over_http(live: LiveServer) -> None:
    # the requests read this clock, housekeeping the real one: far ahead of it, no lease looks expired to the sweep
    # (a start only as late as now left the test about a second before the 2 s leases expired on a slow machine)
    start = float(int(time.time())) + 100_000
    clock = [start]
    live.app.state.clock = lambda: clock[0]  # type: ignore[attr-defined]
    aid = (await post_batch(live, batch("a", "b", "c"), {}))["array"]["id"]
    async with live.client("admin") as admin, live.client("worker") as w, live.client("read") as r:
        await admin.put_group(
            {"name": "g", "queue": "q", "provider": "local", "min": 0, "max": 1, "current": 1, "desired": 1}
            | {"price_per_hour": 7.2}
        )
        await w.register({"id": "w1", "queue": "q", "group": "g", "slots": 2, "runtimes": ["process"], "cpus": 2})
        claims, _, _ = await w.claim("w1", 2, wait=0)
        seen = await r.array(aid)
        assert (seen["queued"], seen["running"]) == (1, 2)
        # a long-poll answers when the progress moves
        key = f"{seen['queued']}/{seen['running']}/{seen['done']}"
        polled = asyncio.create_task(r.array(aid, wait=10, seen=key))
        await asyncio.sleep(0.2)
        assert not polled.done()
        clock[0] = start + 100
        await w.finish({"lease": claims[0].lease, "reason": "success", "exit_code": 0})
        moved = await asyncio.wait_for(polled, 10)
        assert (moved["running"], moved["succeeded"]) == (1, 1)
        # two jobs ran 100 s (one still runs) on half the worker each: 100 worker-seconds at 7.2 an hour
        assert moved["cost"]["worker_seconds"] == 100.0 and moved["cost"]["cost"] == pytest.approx(0.2)
        await w.finish({"lease": claims[1].lease, "reason": "failed", "exit_code": 1})
        await w.heartbeat("w1")
        by_group = await r.cost(by="group")
        assert [(u["key"], u["worker_seconds"], u["cost"]) for u in by_group] == [("g", 100.0, pytest.approx(0.2))]
        assert [(u["key"], u["group"]) for u in await r.cost(by="array")] == [(aid, "g")]
        cancelled = await admin.cancel_array(aid)
        assert (cancelled["other"], cancelled["done"], cancelled["percent"]) == ({"cancelled": 1}, 3, 100.0)
        again = await admin.rerun_array(aid, failed=True)
        assert (again["queued"], again["succeeded"]) == (2, 1)
        with pytest.raises(ApiError) as forbidden:
            await r.cancel_array(aid)
        assert forbidden.value.status == 403


# -- the CLI --------------------------------------------------------------------------------------------------------


def cli(live: LiveServer, *args: str) -> Any:
    return runner.invoke(app, [*args, "--server", live.url, "--token", live.tokens["admin"]])


async def test_cli_submit_many_array_arrays_cancel_rerun_and_cost(live: LiveServer, tmp_path: Path) -> None:
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("\n".join(json.dumps({"command": ["train", "--seed", str(i % 2)]}) for i in range(4)) + "\n")
    done = await asyncio.to_thread(cli, live, "submit-many", "q", str(sweep), "--name", "seeds")
    assert done.exit_code == 0, done.output
    aid = array_id("q", [d("train", "--seed", str(i % 2)) for i in range(4)])
    assert f"array {aid[:12]} (seeds)" in done.stderr and len(done.stdout.split()) == 4
    again = await asyncio.to_thread(cli, live, "submit-many", "q", str(sweep), "--output", "json")
    assert {(j["array_id"], j["created"]) for j in json.loads(again.stdout)} == {(aid, False)}

    shown = await asyncio.to_thread(cli, live, "array", aid[:12], "--output", "json")
    assert shown.exit_code == 0 and json.loads(shown.stdout)["queued"] == 4
    table = await asyncio.to_thread(cli, live, "array", aid[:12])
    assert "0/4 done (0 succeeded, 0 failed), 0 running, 4 queued" in table.stdout and "seeds" in table.stdout
    listed = await asyncio.to_thread(cli, live, "arrays", "--output", "json")
    assert [a["id"] for a in json.loads(listed.stdout)] == [aid]

    cancelled = await asyncio.to_thread(cli, live, "cancel", "--array", aid[:12])
    assert cancelled.exit_code == 0 and "4 cancelled" in cancelled.stdout
    # --wait on a finished array: one plain line off a terminal; exit 1 as not all succeeded
    waited = await asyncio.to_thread(cli, live, "array", aid[:12], "--wait")
    assert waited.exit_code == 1 and "4/4 done (0 succeeded, 0 failed, 4 cancelled)" in waited.stderr
    rerun = await asyncio.to_thread(cli, live, "array", aid[:12], "--rerun", "--failed", "--output", "json")
    assert rerun.exit_code == 0 and json.loads(rerun.stdout)["queued"] == 4

    costs = await asyncio.to_thread(cli, live, "cost", "--by", "queue", "--since", "1d", "--output", "json")
    assert costs.exit_code == 0 and json.loads(costs.stdout) == []
    # bad input: exit 2 naming what is wrong; an unknown array as an unknown job is (the server's 404)
    for args, code, says in [
        (("array", aid[:12], "--failed"), 2, "--failed goes with --rerun"),
        (("cancel",), 2, "give a job id, or --array ID"),
        (("cancel", "abcdef", "--array", aid[:12]), 2, "not both"),
        (("cost", "--since", "last tuesday"), 2, "--since"),
        (("submit-many", "q", str(sweep), "--name", "x" * 201), 2, "--name"),
        (("array", "f" * 64), (await asyncio.to_thread(cli, live, "job", "f" * 64)).exit_code, "no array"),
    ]:
        r = await asyncio.to_thread(cli, live, *args)
        assert r.exit_code == code and says in r.output, (args, r.output)
