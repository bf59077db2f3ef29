"""The fast lane answers a worker's claims and heartbeats exactly as the framework's stack does (issue 11).

One script of worker calls — ordinary ones, and every way of getting one wrong — runs against two live servers,
one with the lane and one without; the two transcripts (status and JSON answer, ids and times normalised) must be
equal, the lane must have answered the ordinary calls itself, and ``/metrics`` must count them under the routes'
templates in both.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import httpx

from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server.fastlane import FastLane
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve

MAX_BODY = 4096
ID = re.compile(r"[0-9a-f]{8,}|[0-9A-Z]{26}")


def normalised(value: Any) -> Any:
    """Ids, leases and times differ between two servers: the rest must not."""
    if isinstance(value, dict):
        return {k: normalised(v) for k, v in value.items()}
    if isinstance(value, list):
        return [normalised(v) for v in value]
    if isinstance(value, float) and value > 1e9:
        return "<time>"
    if isinstance(value, str):
        return ID.sub("<id>", value)
    return value


async def script(live: LiveServer) -> list[tuple[str, int, Any]]:
    """The calls, and what each was answered."""
    out: list[tuple[str, int, Any]] = []
    base = live.url + "/api/v1"
    worker = {"Authorization": f"Bearer {live.tokens['worker']}"}
    submit = {"Authorization": f"Bearer {live.tokens['submit']}"}

    async with httpx.AsyncClient(base_url=base, timeout=30) as http:

        async def call(what: str, path: str, headers: dict[str, str], **kw: Any) -> Any:
            r = await http.post(path, headers=headers, **kw)
            json_answer = r.headers.get("content-type", "").startswith("application/json")
            body = r.json() if json_answer else r.text
            out.append((what, r.status_code, normalised(body)))
            return body

        reg = {"id": "w1", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1.0}
        await call("register", "/workers", worker, json=reg)
        idle = {"max": 1, "wait": 0, "finishes": []}
        await call("claim: no token", "/workers/w1/claim", {}, json=idle)
        await call("claim: unknown token", "/workers/w1/claim", {"Authorization": "Bearer nope"}, json=idle)
        await call("claim: not a bearer", "/workers/w1/claim", {"Authorization": "Basic eDp5"}, json=idle)
        await call("claim: a submit token", "/workers/w1/claim", submit, json=idle)
        await call("claim: bad field", "/workers/w1/claim", worker, json={"max": -1, "wait": 0})
        await call("claim: unknown field type", "/workers/w1/claim", worker, json={"max": "many"})
        await call(
            "claim: broken json",
            "/workers/w1/claim",
            {**worker, "content-type": "application/json"},
            content=b'{"max": ',
        )
        await call(
            "claim: text body",
            "/workers/w1/claim",
            {**worker, "content-type": "text/plain"},
            content=json.dumps(idle).encode(),
        )
        big = {"max": 1, "wait": 0, "finishes": [{"lease": "x" * MAX_BODY, "reason": "success"}]}
        await call("claim: too large", "/workers/w1/claim", worker, json=big)
        await call("claim: unknown worker", "/workers/w9/claim", worker, json=idle)
        await call("claim: nothing queued", "/workers/w1/claim", worker, json=idle)
        await call("heartbeat: no body", "/workers/w1/heartbeat", worker)
        await call(
            "heartbeat: null body",
            "/workers/w1/heartbeat",
            {**worker, "content-type": "application/json"},
            content=b"null",
        )
        await call("heartbeat: bad field", "/workers/w1/heartbeat", worker, json={"draining": "maybe"})
        await call("heartbeat: unknown worker", "/workers/w9/heartbeat", worker, json={"leases": []})

        job = SubmitRequest(queue="q", definition=JobDefinition(command=["true"]))
        async with live.client("submit") as client:
            await client.submit(job)
        got = await call("claim: a job", "/workers/w1/claim", worker, json={"max": 1, "wait": 5, "finishes": []})
        lease = got["claims"][0]["lease"]
        await call("heartbeat: holding it", "/workers/w1/heartbeat", worker, json={"leases": [lease]})
        await call("heartbeat: a foreign lease", "/workers/w1/heartbeat", worker, json={"leases": ["other"]})
        done = {"lease": lease, "reason": "success", "exit_code": 0, "error": None}
        await call("claim: finish riding along", "/workers/w1/claim", worker, json={**idle, "finishes": [done]})
        await call("claim: the same finish again", "/workers/w1/claim", worker, json={**idle, "finishes": [done]})
        await call("heartbeat: draining", "/workers/w1/heartbeat", worker, json={"draining": True, "leases": []})
        await call("claim: while draining", "/workers/w1/claim", worker, json={"max": 1, "wait": 5, "finishes": []})
    return out


async def transcript(tmp_path: Path, fast_lane: bool) -> tuple[list[tuple[str, int, Any]], str, int]:
    store = SQLiteStore(tmp_path / f"lane-{fast_lane}.db")
    await store.open()
    settings = ServerSettings(lease_seconds=15.0, long_poll_max=5.0, max_submit_bytes=MAX_BODY, fast_lane=fast_lane)
    try:
        async with serve(store, settings) as live:
            out = await script(live)
            async with httpx.AsyncClient(timeout=10) as http:
                metrics = (
                    await http.get(live.url + "/metrics", headers={"Authorization": f"Bearer {live.tokens['read']}"})
                ).text
            stack = live.app.middleware_stack  # type: ignore[attr-defined]
            answered = stack.answered if isinstance(stack, FastLane) else 0
    finally:
        await store.close()
    return out, metrics, answered


def counted(metrics: str, call: str) -> dict[str, float]:
    found = {}
    for line in metrics.splitlines():
        m = re.fullmatch(
            rf'scaleq_http_requests_total\{{route="/api/v1/workers/\{{worker_id\}}/{call}",status="(\d+)"\}} (\S+)',
            line,
        )
        if m:
            found[m[1]] = float(m[2])
    return found


async def test_the_lane_answers_as_the_stack_does(tmp_path: Path) -> None:
    slow, slow_metrics, none = await transcript(tmp_path, fast_lane=False)
    fast, fast_metrics, answered = await transcript(tmp_path, fast_lane=True)
    assert none == 0
    for (what, status, body), (what2, status2, body2) in zip(slow, fast, strict=True):
        assert (what, status, body) == (what2, status2, body2), what
    statuses = {what: status for what, status, _ in fast}
    assert statuses["claim: no token"] == 401 and statuses["claim: a submit token"] == 403
    assert statuses["claim: bad field"] == 422 and statuses["claim: too large"] == 413
    assert statuses["claim: unknown worker"] == 404 and statuses["claim: a job"] == 200
    # the lane took the ordinary calls: a worker token and a valid JSON body (answered 200, or 404 for an unknown
    # worker: that answer is the endpoint's own); a heartbeat without a body (no content type) or with a JSON null
    # went down the stack, which reads both as "no body"
    ordinary = [w for w, s, _ in fast if w.startswith(("claim", "heartbeat")) and s in (200, 404)]
    ordinary = [w for w in ordinary if not w.endswith(("no body", "null body"))]
    assert answered == len(ordinary), ordinary
    for call in ("claim", "heartbeat"):
        assert counted(fast_metrics, call) == counted(slow_metrics, call) != {}
