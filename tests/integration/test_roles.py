"""Roles that hold: every route of the OpenAPI document against a table of the roles it admits, and a worker token
acting only on its own workers, leases and input blobs."""

from __future__ import annotations

import base64
import hashlib
import re

import httpx
import pytest

from scaleq.client import ApiError, Client
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server.roles import ROLES
from tests.helpers import LONG_LEASES, LiveServer

ALL = set(ROLES)
READERS = {"admin", "submit", "read"}
WORKER = {"admin", "worker"}
ADMIN = {"admin"}

#: Every route and the roles it admits. A route missing here fails the test: a new route needs its entry.
ALLOWED: dict[tuple[str, str], set[str]] = {
    ("GET", "/api/v1/jobs"): READERS,
    ("POST", "/api/v1/jobs"): {"admin", "submit"},
    ("POST", "/api/v1/jobs/batch"): {"admin", "submit"},
    ("GET", "/api/v1/jobs/{job_id}"): READERS,
    ("GET", "/api/v1/jobs/{job_id}/attempts"): READERS,
    ("POST", "/api/v1/jobs/{job_id}/cancel"): {"admin", "submit"},
    ("GET", "/api/v1/jobs/{job_id}/logs"): READERS,
    ("GET", "/api/v1/jobs/{job_id}/outputs"): READERS,
    ("GET", "/api/v1/jobs/{job_id}/outputs/{path}"): READERS,
    ("GET", "/api/v1/jobs/{job_id}/why"): READERS,
    ("GET", "/api/v1/arrays"): READERS,
    ("GET", "/api/v1/arrays/{array_id}"): READERS,
    ("POST", "/api/v1/arrays/{array_id}/cancel"): {"admin", "submit"},
    ("POST", "/api/v1/arrays/{array_id}/rerun"): {"admin", "submit"},
    ("GET", "/api/v1/cost"): READERS,
    ("GET", "/api/v1/queues"): ALL,
    ("GET", "/api/v1/workers"): ALL,
    ("POST", "/api/v1/workers"): WORKER,
    ("POST", "/api/v1/workers/{worker_id}/claim"): WORKER,
    ("POST", "/api/v1/workers/{worker_id}/heartbeat"): WORKER,
    ("POST", "/api/v1/workers/{worker_id}/ended-attempts"): WORKER,
    ("POST", "/api/v1/workers/{worker_id}/drain"): ADMIN,
    ("POST", "/api/v1/workers/{worker_id}/release"): ADMIN,
    ("DELETE", "/api/v1/workers/{worker_id}"): WORKER,
    ("POST", "/api/v1/leases/finish"): WORKER,
    ("POST", "/api/v1/leases/release"): WORKER,
    ("POST", "/api/v1/leases/logs"): WORKER,
    ("POST", "/api/v1/leases/outputs"): WORKER,
    ("GET", "/api/v1/blobs/{sha256}"): WORKER,
    ("GET", "/api/v1/groups"): READERS,
    ("PUT", "/api/v1/groups/{name}"): ADMIN,
    ("DELETE", "/api/v1/groups/{name}"): ADMIN,
    ("GET", "/api/v1/events"): READERS,
    ("POST", "/api/v1/events"): ADMIN,
    ("POST", "/api/v1/demand"): READERS,
    ("GET", "/api/v1/tokens"): ADMIN,
    ("POST", "/api/v1/tokens"): ADMIN,
    ("DELETE", "/api/v1/tokens/{token_id}"): ADMIN,
    ("POST", "/api/v1/admin/purge"): ADMIN,
    ("GET", "/api/v1/whoami"): ALL,
    ("GET", "/api/v1/health"): READERS,
    ("GET", "/api/v1/health/checks"): READERS,
    ("GET", "/metrics"): ALL,
}

ROLE_REFUSAL = re.compile(r"token may not do this")


def _routes(doc: dict) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, ops in doc["paths"].items() for method in ops}


async def test_every_route_admits_exactly_the_roles_of_the_table(live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as raw:
        doc = (await raw.get("/api/v1/openapi.json")).json()
        routes = _routes(doc)
        assert routes == set(ALLOWED), (
            f"routes without an entry in ALLOWED: {sorted(routes - set(ALLOWED))}; "
            f"entries without a route: {sorted(set(ALLOWED) - routes)}"
        )
        for (method, template), allowed in sorted(ALLOWED.items()):
            # placeholders for path parameters, no body: an admitted role gets past auth (2xx, or 4xx that is not
            # a refusal of its role), another role gets 403 saying which scope it lacks
            path = re.sub(r"\{[^}]+\}", "zz", template)
            assert (await raw.request(method, path)).status_code == 401, (method, template)
            for role in ROLES:
                r = await raw.request(method, path, headers={"Authorization": f"Bearer {live.tokens[role]}"})
                refused = r.status_code == 403 and bool(ROLE_REFUSAL.search(r.text))
                assert r.status_code < 500 and r.status_code != 401, (method, template, role, r.status_code, r.text)
                assert refused == (role not in allowed), (method, template, role, r.status_code, r.text)


def _job(cmd: str, queue: str = "q", **kw: object) -> SubmitRequest:
    return SubmitRequest(queue=queue, definition=JobDefinition(command=["sh", "-c", cmd], **kw))


async def _register(c: Client, wid: str) -> None:
    await c.register({"id": wid, "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})


@pytest.mark.parametrize("settings", [LONG_LEASES])  # its lease is held across many requests without a heartbeat
async def test_a_worker_token_acts_only_on_its_own_workers_leases_and_inputs(live: LiveServer) -> None:
    async with live.client("admin") as admin:
        other_token = (await admin.create_token("worker", "other hosts"))["token"]
    data = b"secret input"
    sha = hashlib.sha256(data).hexdigest()
    inputs = [{"path": "in.txt", "sha256": sha, "size": len(data)}]
    async with (
        live.client("submit") as s,
        live.client("worker") as mine,
        Client(live.url, other_token) as other,
        httpx.AsyncClient(base_url=live.url, headers={"Authorization": f"Bearer {other_token}"}) as raw,
    ):
        job, _ = await s.submit(
            _job("cat in.txt", inputs=inputs).model_copy(update={"blobs": {sha: base64.b64encode(data).decode()}})
        )
        await _register(mine, "w-mine")
        await _register(other, "w-other")
        claims, _, _ = await mine.claim("w-mine", 1, wait=0)
        assert [c.job.id for c in claims] == [job.id]
        lease = claims[0].lease

        # the other token can do nothing to w-mine: not drain, heartbeat, claim for it or deregister it
        for method, path, body in [
            ("POST", "/api/v1/workers/w-mine/heartbeat", {"draining": True}),
            ("POST", "/api/v1/workers/w-mine/heartbeat", {}),
            ("POST", "/api/v1/workers/w-mine/claim", {"max": 1, "wait": 0}),
            ("DELETE", "/api/v1/workers/w-mine", None),
            ("POST", "/api/v1/leases/finish", {"lease": lease, "reason": "success", "exit_code": 0}),
            ("POST", "/api/v1/leases/release", {"lease": lease}),
            ("POST", "/api/v1/leases/logs", {"lease": lease, "chunks": [{"stream": "stdout", "data": "aGk="}]}),
        ]:
            r = await raw.request(method, path, json=body)
            assert r.status_code == 403, (method, path, r.status_code, r.text)
            assert "another token" in r.json()["detail"], r.text
        r = await raw.post("/api/v1/leases/outputs", content=b"", headers={"X-Scaleq-Lease": lease})
        assert r.status_code == 403 and "another token" in r.text
        with pytest.raises(ApiError) as e:  # nor read the input of a job it does not hold
            await other.blob(sha)
        assert e.value.status == 403 and "inputs of the jobs its workers hold" in e.value.detail
        # nor take over the id of the live worker
        with pytest.raises(ApiError) as e:
            await _register(other, "w-mine")
        assert e.value.status == 409 and "another token" in e.value.detail
        # a finish riding along with the other worker's claim is refused, the claim itself answered
        r = await raw.post(
            "/api/v1/workers/w-other/claim",
            json={"max": 0, "wait": 0, "finishes": [{"lease": lease, "reason": "success", "exit_code": 0}]},
        )
        assert r.status_code == 200 and r.json()["finished"] == [
            {"lease": lease, "ok": False, "detail": "this lease belongs to another token's worker"}
        ]

        # nothing of that reached w-mine or its job
        workers = {w.id: w for w in await mine.workers()}
        assert workers["w-mine"].state == "active"
        assert (await s.get_job(job.id)).state == "running"
        # while its own token does all of it
        assert await mine.blob(sha) == data
        await mine.append_logs(lease, [("stdout", b"hi\n")])
        done = await mine.finish({"lease": lease, "reason": "success", "exit_code": 0})
        assert done.state == "finished" and done.reason == "success"
        state, _ = await mine.heartbeat("w-mine", draining=True)
        assert state == "draining"
        await mine.deregister("w-mine")
        assert {w.id: w.state for w in await mine.workers(include_gone=True)}["w-mine"] == "gone"
        # once it is gone, its id is free for another token
        await _register(other, "w-mine")
        state, _ = await other.heartbeat("w-mine")
        assert state == "active"


@pytest.mark.parametrize("settings", [LONG_LEASES])  # its leases are finished without a heartbeat
async def test_a_finish_riding_along_reads_its_lease_owner_only_when_this_server_did_not_hand_it_out(
    sqlite_live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server remembers which token each lease it handed out went to, so its own worker's finish costs no read
    of the lease's owner; a lease it does not know (handed out by another server, or before a restart) is read from
    the store, and another token's is refused either way."""
    live = sqlite_live
    reads: list[list[str]] = []
    real = live.store.lease_tokens

    async def counted(leases: list[str]) -> dict[str, str | None]:
        reads.append(list(leases))
        return await real(leases)

    monkeypatch.setattr(live.store, "lease_tokens", counted)
    async with live.client("admin") as admin:
        other_token = (await admin.create_token("worker", "other hosts"))["token"]
    async with live.client("submit") as s, live.client("worker") as w, Client(live.url, other_token) as other:
        for i in range(3):
            await s.submit(_job(f"echo {i}"))  # (a job's id is its content's: three different jobs)
        await _register(w, "w1")
        await _register(other, "w2")
        ok = {"reason": "success", "exit_code": 0}
        claims, _, _ = await w.claim("w1", 1, wait=0)
        leases = [claims[0].lease]
        # another token's worker: checked in the store, refused
        _, finished, _ = await other.claim("w2", 0, wait=0, finishes=[{"lease": leases[0], **ok}])
        assert reads == [[leases[0]]] and finished[0]["ok"] is False
        # its own worker: known here, no read (and the claim it rides along with takes the next job)
        claims, finished, _ = await w.claim("w1", 1, wait=0, finishes=[{"lease": leases[0], **ok}])
        assert reads == [[leases[0]]] and finished == [{"lease": leases[0], "ok": True, "detail": None}]
        leases.append(claims[0].lease)
        # a lease this server forgot (as after a restart, or handed out by another server): read, then accepted
        live.app.state.tokens.clear()  # type: ignore[attr-defined]
        claims, finished, _ = await w.claim("w1", 1, wait=0, finishes=[{"lease": leases[1], **ok}])
        assert reads[-1] == [leases[1]] and finished[0]["ok"] is True
        leases.append(claims[0].lease)
        # and /leases/finish takes the same way: another token's finish is read and refused, its own is not read
        before = len(reads)
        with pytest.raises(ApiError) as e:
            await other.finish({"lease": leases[2], **ok})
        assert e.value.status == 403 and len(reads) == before + 1
        done = await w.finish({"lease": leases[2], **ok})
        assert done.state == "finished" and len(reads) == before + 1


async def test_a_worker_id_registered_again_by_another_token_takes_its_binding_and_leases_along(
    sqlite_live: LiveServer,
) -> None:
    """The server remembers bindings and the leases it handed out: once a gone worker's id is registered by another
    token, the old token can act neither on the worker nor on the lease this server handed it before."""
    live = sqlite_live
    async with live.client("admin") as admin:
        other_token = (await admin.create_token("worker", "other hosts"))["token"]
    async with live.client("submit") as s, live.client("worker") as a, Client(live.url, other_token) as b:
        await s.submit(_job("echo rebound"))
        await _register(a, "w9")
        claims, _, _ = await a.claim("w9", 1, wait=0)
        lease = claims[0].lease
        await live.store.set_worker_state("w9", "gone")  # as another server marks a silent worker gone
        await _register(b, "w9")  # the id is free: token b takes it, on this server
        for call in (a.heartbeat("w9"), a.claim("w9", 1, wait=0), a.finish({"lease": lease, "reason": "success"})):
            with pytest.raises(ApiError) as e:
                await call
            assert e.value.status == 403 and "another token" in e.value.detail


async def test_a_worker_token_reads_only_what_the_docs_say(live: LiveServer) -> None:
    async with live.client("worker") as w:
        await w.queues()
        await w.workers()
        for call in (w.groups(), w.events(), w.list_jobs(), w.demand("q", {"runtimes": ["process"]})):
            with pytest.raises(ApiError) as e:
                await call
            assert e.value.status == 403


async def test_the_last_admin_token_cannot_be_revoked(live: LiveServer) -> None:
    async with live.client("admin") as admin:
        (first,) = [t for t in await admin.list_tokens() if t["role"] == "admin"]
        with pytest.raises(ApiError) as e:
            await admin.revoke_token(first["id"])
        assert e.value.status == 409 and "last admin token" in e.value.detail
        second = await admin.create_token("admin", "second")
        await admin.revoke_token(first["id"])  # with another admin token alive it goes
        async with Client(live.url, second["token"]) as admin2:
            with pytest.raises(ApiError) as e:
                await admin2.revoke_token(second["id"])
            assert e.value.status == 409
            assert {t["id"]: t["revoked_at"] is None for t in await admin2.list_tokens()}[second["id"]]
