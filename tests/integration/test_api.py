"""The HTTP API against a live server: auth and roles, validation at the edge, long-polls, fencing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import time

import httpx
import pytest

from scaleq.client import ApiError
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LONG_LEASES, LiveServer, serve


def req(*cmd: str, queue: str = "q", **kw: object) -> SubmitRequest:
    return SubmitRequest(queue=queue, definition=JobDefinition(command=list(cmd), **kw))


async def register(live: LiveServer, wid: str = "w1", queue: str = "q") -> None:
    async with live.client("worker") as c:
        await c.register({"id": wid, "queue": queue, "slots": 2, "runtimes": ["process"], "cpus": 2})


async def test_every_route_needs_a_token_of_the_right_role(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url) as raw:
        for method, path in [
            ("GET", "/api/v1/jobs"),
            ("POST", "/api/v1/jobs"),
            ("GET", "/api/v1/queues"),
            ("GET", "/api/v1/workers"),
            ("GET", "/api/v1/tokens"),
            ("POST", "/api/v1/workers/x/claim"),
        ]:
            r = await raw.request(method, path)
            assert r.status_code == 401, (method, path)
            r = await raw.request(method, path, headers={"Authorization": "Bearer sq_bogus"})
            assert r.status_code == 401, (method, path)
            assert "jobs" not in r.text.lower() or "token" in r.text.lower()
    async with live.client("read") as c:
        with pytest.raises(ApiError) as e:
            await c.submit(req("true"))
        assert e.value.status == 403
        await c.list_jobs()
    async with live.client("submit") as c:
        await c.submit(req("true"))
        with pytest.raises(ApiError) as e:
            await c.list_tokens()
        assert e.value.status == 403
        with pytest.raises(ApiError) as e:
            await c.claim("w1", 1, wait=0)
        assert e.value.status == 403
    async with live.client("worker") as c:
        with pytest.raises(ApiError) as e:
            await c.submit(req("true"))
        assert e.value.status == 403


async def test_tokens_are_stored_hashed_and_revocation_bites(live: LiveServer) -> None:
    async with live.client("admin") as admin:
        created = await admin.create_token("submit", "ci")
        token = created["token"]
        rows = await live.store._run(lambda: live.store.db.execute("SELECT hash FROM tokens").fetchall())
        hashes = {r["hash"] for r in rows}
        assert all(token not in h for h in hashes)
        assert hashlib.sha256(token.encode()).hexdigest() in hashes
        async with type(admin)(live.url, token) as c:
            await c.list_jobs()
            await admin.revoke_token(created["id"])
            with pytest.raises(ApiError) as e:
                await c.list_jobs()
            assert e.value.status == 401


async def test_malformed_submit_is_422_naming_the_field_and_stores_nothing(live: LiveServer) -> None:
    bad_bodies = {
        "definition.max_duration": {"queue": "q", "definition": {"command": ["x"], "max_duration": -5}},
        "definition.command": {"queue": "q", "definition": {"image": "busybox"}},
        "definition.env": {"queue": "q", "definition": {"command": ["x"], "env": {"1BAD": "v"}}},
        "definition.requirments": {"queue": "q", "definition": {"command": ["x"], "requirments": {}}},
        "definition.requirements.memory": {
            "queue": "q",
            "definition": {"command": ["x"], "requirements": {"memory": "lots"}},
        },
        "queue": {"queue": "no spaces", "definition": {"command": ["x"]}},
    }
    async with httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {live.tokens['submit']}"}) as r:
        for field, body in bad_bodies.items():
            resp = await r.post("/api/v1/jobs", json=body)
            assert resp.status_code == 422, field
            locs = [".".join(str(p) for p in d["loc"][1:]) for d in resp.json()["detail"]]
            assert any(loc.startswith(field) for loc in locs), (field, locs)
    assert await live.store.list_jobs(queue=None, state=None, limit=10) == []


async def test_inputs_must_come_with_their_bytes(live: LiveServer) -> None:
    data = b"hello"
    sha = hashlib.sha256(data).hexdigest()
    d = JobDefinition(command=["cat"], inputs=[{"path": "a.txt", "sha256": sha, "size": 5}])
    async with live.client("submit") as c:
        with pytest.raises(ApiError) as e:
            await c.submit(SubmitRequest(queue="q", definition=d))
        assert e.value.status == 422 and "inputs" in str(e.value)
        with pytest.raises(ApiError) as e:
            await c.submit(SubmitRequest(queue="q", definition=d, blobs={sha: base64.b64encode(b"other").decode()}))
        assert e.value.status == 422
        job, created = await c.submit(
            SubmitRequest(queue="q", definition=d, blobs={sha: base64.b64encode(data).decode()})
        )
        assert created
        # once the server has the bytes, a resubmit may omit them
        again, created = await c.submit(SubmitRequest(queue="q", definition=d))
        assert again.id == job.id and not created
    await register(live)
    async with live.client("worker") as w:
        with pytest.raises(ApiError) as e:  # a worker token reads the inputs of the jobs its workers hold only
            await w.blob(sha)
        assert e.value.status == 403
        claims, _, _ = await w.claim("w1", 1, wait=0)
        assert [cl.job.id for cl in claims] == [job.id]
        assert await w.blob(sha) == data


async def test_batch_submit_answers_in_order_and_is_all_or_nothing(live: LiveServer) -> None:
    data = b"shared input"
    sha = hashlib.sha256(data).hexdigest()
    reads = {"path": "in.txt", "sha256": sha, "size": len(data)}
    reqs = [SubmitRequest(queue="q", definition=JobDefinition(command=["echo", str(i)])) for i in range(3)]
    # two jobs name the same input; its bytes travel once, with the second
    reqs += [
        SubmitRequest(queue="q", definition=JobDefinition(command=["cat", "a"], inputs=[reads])),
        SubmitRequest(
            queue="q2",
            definition=JobDefinition(command=["cat", "b"], inputs=[reads]),
            blobs={sha: base64.b64encode(data).decode()},
        ),
    ]
    headers = {"Authorization": f"Bearer {live.tokens['submit']}"}
    async with live.client("submit") as c, httpx.AsyncClient(base_url=live.url, headers=headers) as r:
        bad = [req.model_dump(mode="json") for req in reqs]
        bad[3]["definition"]["max_duration"] = -1
        resp = await r.post("/api/v1/jobs/batch", json={"jobs": bad})
        assert resp.status_code == 422
        assert [d["loc"][1:4] for d in resp.json()["detail"]] == [["jobs", 3, "definition"]]
        missing = [req.model_dump(mode="json") for req in reqs[:4]]  # the bytes were in the fifth
        resp = await r.post("/api/v1/jobs/batch", json={"jobs": missing})
        assert resp.status_code == 422 and resp.json()["detail"][0]["loc"][1:5] == ["jobs", 3, "definition", "inputs"]
        assert (await r.post("/api/v1/jobs/batch", json={"jobs": []})).status_code == 422
        assert await live.store.list_jobs(queue=None, state=None, limit=10) == []  # nothing of the above stayed
        done = await c.submit_many(reqs)
        assert [job.definition.command for job, _ in done] == [req.definition.command for req in reqs]
        assert [created for _, created in done] == [True] * 5 and done[4][0].queue == "q2"
        again = await c.submit_many(reqs[:2])
        assert [(job.id, created) for job, created in again] == [(done[0][0].id, False), (done[1][0].id, False)]
    await register(live, queue="q2")
    async with live.client("worker") as w:
        claims, _, _ = await w.claim("w1", 1, wait=0)  # the job of q2, which reads the input
        assert [cl.job.id for cl in claims] == [done[4][0].id]
        assert await w.blob(sha) == data


async def test_a_body_over_max_submit_bytes_is_refused_with_413(sqlite_store: SQLiteStore) -> None:
    settings = ServerSettings(lease_seconds=2.0, max_submit_bytes=4096)
    async with serve(sqlite_store, settings) as small:
        headers = {"Authorization": f"Bearer {small.tokens['submit']}"}
        fits = {"queue": "q", "definition": {"command": ["echo", "x" * 1000]}}
        too_big = {"queue": "q", "definition": {"command": ["echo", "x" * 5000]}}
        async with httpx.AsyncClient(base_url=small.url, headers=headers) as r:
            assert (await r.post("/api/v1/jobs", json=fits)).status_code == 201
            assert (await r.post("/api/v1/jobs", json=too_big)).status_code == 413
            assert (await r.post("/api/v1/jobs/batch", json={"jobs": [fits] * 5})).status_code == 413
        assert len(await sqlite_store.list_jobs(queue=None, state=None, limit=10)) == 1


@pytest.mark.parametrize("settings", [LONG_LEASES])  # the held job's lease outlasts the test (expired: claimed again)
async def test_claim_long_poll_wakes_on_submit(live: LiveServer) -> None:
    await register(live)
    async with live.client("worker") as w, live.client("submit") as s:
        poll = asyncio.create_task(w.claim("w1", 2, wait=4))
        await asyncio.sleep(0.3)
        assert not poll.done()
        job, _ = await s.submit(req("echo", "hi"))
        claims, _, state = await poll
        # woken by the submit: a claim whose wait runs out returns nothing
        assert [c.job.id for c in claims] == [job.id] and state == "active"
        empty, _, _ = await w.claim("w1", 2, wait=0.2)
        assert empty == []


@pytest.mark.parametrize("settings", [LONG_LEASES])  # its leases are finished without a heartbeat
async def test_finish_rides_along_and_stale_finish_is_refused(live: LiveServer) -> None:
    await register(live)
    async with live.client("worker") as w, live.client("submit") as s:
        a, _ = await s.submit(req("a"))
        b, _ = await s.submit(req("b"))
        (first,), _, _ = await w.claim("w1", 1, wait=1)
        f = {"lease": first.lease, "reason": "success", "exit_code": 0}
        (second,), outcomes, _ = await w.claim("w1", 1, wait=1, finishes=[f])
        assert outcomes == [{"lease": first.lease, "ok": True, "detail": None}]
        assert (await s.get_job(first.job.id)).reason == "success"
        await s.cancel(second.job.id)
        with pytest.raises(ApiError) as e:
            await w.finish({"lease": second.lease, "reason": "success", "exit_code": 0})
        assert e.value.stale
        assert (await s.get_job(second.job.id)).reason == "cancelled"


@pytest.mark.parametrize("settings", [LONG_LEASES])  # its lease is finished without a heartbeat
async def test_job_wait_and_log_follow_long_polls(live: LiveServer) -> None:
    await register(live)
    async with live.client("worker") as w, live.client("submit") as s:
        job, _ = await s.submit(req("x"))
        waiting = asyncio.create_task(s.get_job(job.id, wait=4, state="queued"))
        following = asyncio.create_task(s.logs(job.id, wait=4))
        await asyncio.sleep(0.2)
        (claim,), _, _ = await w.claim("w1", 1, wait=1)
        assert (await waiting).state == "running"
        await w.append_logs(claim.lease, [("stdout", b"line 1\n")])
        page = await following
        assert [c["data"] for c in page["chunks"]] == ["line 1\n"]
        nxt = asyncio.create_task(s.logs(job.id, after=page["next"], wait=4))
        await asyncio.sleep(0.2)
        await w.finish({"lease": claim.lease, "reason": "failed", "exit_code": 3})
        last = await nxt
        assert last["chunks"] == [] and last["state"] == "finished"


# 2 s leases, and a wait for the requeue long enough for a loaded machine
@pytest.mark.parametrize("settings", [ServerSettings(lease_seconds=2.0, sweep_interval=0.2, long_poll_max=30.0)])
async def test_expired_lease_is_requeued_by_the_sweeper(live: LiveServer) -> None:
    await register(live)
    async with live.client("worker") as w, live.client("submit") as s:
        job, _ = await s.submit(req("x"))
        (claim,), _, _ = await w.claim("w1", 1, wait=1)
        # no heartbeats: the 2 s lease runs out and the job is queued again for anyone
        await register(live, "w2")
        (again,), _, _ = await w.claim("w2", 1, wait=30)
        assert again.job.id == job.id and again.attempt == 2
        with pytest.raises(ApiError) as e:
            await w.append_logs(claim.lease, [("stdout", b"late")])
        assert e.value.stale


async def test_openapi_document_is_served(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url) as raw:
        doc = (await raw.get("/api/v1/openapi.json")).json()
    assert "/api/v1/jobs" in doc["paths"] and "/api/v1/workers/{worker_id}/claim" in doc["paths"]


async def test_ended_attempts_names_only_attempts_the_server_knows_and_ended(live: LiveServer) -> None:
    await register(live, "dead")
    await register(live, "alive")
    async with live.client("submit") as s, live.client("worker") as w, live.client("read") as r:
        lost, _ = await s.submit(req("echo", "lost"))
        (claim,), _, _ = await w.claim("dead", 1, wait=0)
        await live.store.expire_leases(time.time() + 3600)  # the dead worker's lease ran out
        (running,), _, _ = await w.claim("alive", 1, wait=0)  # its second attempt
        asked = [(lost.id, 1), (running.job.id, running.attempt), ("f" * 64, 1)]  # the last: another grid's, say
        assert await w.ended_attempts("alive", asked) == {(lost.id, 1)}
        assert claim.job.id == running.job.id == lost.id and running.attempt == 2
        with pytest.raises(ApiError) as refused:
            await r.ended_attempts("alive", asked)
        assert refused.value.status == 403
