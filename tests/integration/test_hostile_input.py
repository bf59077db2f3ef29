"""Hostile values the fuzzer finds only by luck, each sent to the route it once broke: a 422 naming the field, never
a 5xx, and nothing stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from scaleq.jobs import MAX_ARG_BYTES, MAX_EXEC_BYTES
from tests.helpers import LiveServer

BIG = 2**63  # one past a signed 64-bit column
REG = {"id": "w1", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1}
LEASE = "no-such-lease"


def job(**definition: Any) -> dict[str, Any]:
    return {"queue": "q", "definition": {"command": ["true"], **definition}}


@dataclass(frozen=True)
class Case:
    method: str
    path: str
    loc: list[str | int]  # where the 422 must point
    body: Any = None
    params: dict[str, Any] | None = None
    role: str = "admin"


CASES = {
    "group size past 2^63": Case(
        "PUT",
        "/api/v1/groups/g",
        ["body", "min"],
        {"name": "g", "queue": "q", "provider": "local", "min": BIG, "max": 1, "current": 0, "desired": 0},
    ),
    "event count past 2^63": Case(
        "POST", "/api/v1/events", ["body", "to"], {"group": "g", "kind": "scale", "to": BIG, "reason": "x"}
    ),
    "events after past 2^63": Case("GET", "/api/v1/events", ["query", "after"], params={"after": BIG}),
    "log seq past 2^63": Case("GET", "/api/v1/jobs/abc/logs", ["query", "after"], params={"after": BIG}),
    "log attempt past 2^63": Case("GET", "/api/v1/jobs/abc/logs", ["query", "attempt"], params={"attempt": BIG}),
    "worker memory past 2^63": Case("POST", "/api/v1/workers", ["body", "memory"], {**REG, "memory": BIG}),
    "worker gpus past 2^63": Case("POST", "/api/v1/workers", ["body", "gpus"], {**REG, "gpus": BIG}),
    "a NUL in a worker's queue": Case("POST", "/api/v1/workers", ["body", "queue"], {**REG, "queue": "a\0b"}),
    "a NUL in a worker's hostname": Case("POST", "/api/v1/workers", ["body", "hostname"], {**REG, "hostname": "a\0"}),
    "demand limit past 2^63": Case(
        "POST", "/api/v1/demand", ["body", "limit"], {"queue": "q", "capabilities": {}, "limit": BIG}
    ),
    "demand memory past 2^63": Case(
        "POST", "/api/v1/demand", ["body", "capabilities", "memory"], {"queue": "q", "capabilities": {"memory": BIG}}
    ),
    "finish exit_code past 2^63": Case(
        "POST", "/api/v1/leases/finish", ["body", "exit_code"], {"lease": LEASE, "reason": "failed", "exit_code": BIG}
    ),
    "log chunk not base64": Case(
        "POST",
        "/api/v1/leases/logs",
        ["body", "chunks", 0, "data"],
        {"lease": LEASE, "chunks": [{"stream": "stdout", "data": "%%% not base64"}]},
        role="worker",
    ),
    "requirements.memory an object": Case(
        "POST", "/api/v1/jobs", ["body", "definition", "requirements", "memory"], job(requirements={"memory": {}})
    ),
    "requirements.memory past 1 EiB": Case(
        "POST",
        "/api/v1/jobs",
        ["body", "definition", "requirements", "memory"],
        job(requirements={"memory": "9999999999999t"}),
    ),
    "requirements.memory a huge number": Case(
        "POST", "/api/v1/jobs", ["body", "definition", "requirements", "memory"], job(requirements={"memory": 1e308})
    ),
    "batch requirements.memory an object": Case(
        "POST",
        "/api/v1/jobs/batch",
        ["body", "jobs", 1, "definition", "requirements", "memory"],
        {"jobs": [job(), job(requirements={"memory": {}})]},
    ),
    "batch requirements.memory past 1 EiB": Case(
        "POST",
        "/api/v1/jobs/batch",
        ["body", "jobs", 0, "definition", "requirements", "memory"],
        {"jobs": [job(requirements={"memory": "9999999999999t"})]},
    ),
    "an env value longer than exec takes": Case(
        "POST", "/api/v1/jobs", ["body", "definition", "env"], job(env={"BIG": "x" * MAX_ARG_BYTES})
    ),
    "argv and env together past the limit": Case(
        "POST",
        "/api/v1/jobs",
        ["body", "definition"],
        job(env={f"V{n}": "x" * 60_000 for n in range(MAX_EXEC_BYTES // 60_000 + 1)}),
    ),
    "an argument longer than exec takes": Case(
        "POST", "/api/v1/jobs", ["body", "definition", "command"], job(command=["echo", "x" * (MAX_ARG_BYTES + 1)])
    ),
    "a NUL in an argument": Case("POST", "/api/v1/jobs", ["body", "definition", "command"], job(command=["a\0b"])),
    "an input path with a NUL": Case(
        "POST",
        "/api/v1/jobs",
        ["body", "definition", "inputs", 0, "path"],
        job(inputs=[{"path": "a\0b", "sha256": "0" * 64, "size": 0}]),
    ),
    "an input path of 5,999 characters": Case(
        "POST",
        "/api/v1/jobs",
        ["body", "definition", "inputs", 0, "path"],
        job(inputs=[{"path": "/".join(["d" * 199] * 30), "sha256": "0" * 64, "size": 0}]),
    ),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_hostile_value_is_a_422_naming_its_field(live: LiveServer, name: str) -> None:
    case = CASES[name]
    headers = {"Authorization": f"Bearer {live.tokens[case.role]}"}
    async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=60) as c:
        r = await c.request(case.method, case.path, json=case.body, params=case.params)
    assert r.status_code == 422, (r.status_code, r.text[:500])
    locs = [d["loc"] for d in r.json()["detail"]]
    assert case.loc in locs, locs
    assert all(d["msg"] for d in r.json()["detail"])
    assert await live.store.list_jobs(queue=None, state=None, limit=1) == []


async def test_a_30_mib_env_is_refused_at_submit(live: LiveServer) -> None:
    headers = {"Authorization": f"Bearer {live.tokens['submit']}"}
    async with httpx.AsyncClient(base_url=live.url, headers=headers, timeout=120) as c:
        r = await c.post("/api/v1/jobs", json=job(env={"HUGE": "x" * (30 << 20)}))
    assert r.status_code == 422, r.text[:300]
    (detail,) = r.json()["detail"]
    assert detail["loc"] == ["body", "definition", "env"] and "more than exec accepts" in detail["msg"]
    assert await live.store.list_jobs(queue=None, state=None, limit=1) == []
