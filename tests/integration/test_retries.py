"""Retries by cause through the API and the CLI: submit's retry settings, a failure queued again, a preempted
attempt handed back, and what ``scaleq job`` says about each."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from typer.testing import CliRunner

from scaleq.cli import app
from scaleq.client import ApiError
from scaleq.jobs import JobDefinition, SubmitRequest
from tests.helpers import LiveServer

runner = CliRunner()


async def cli(live: LiveServer, *args: str) -> Any:
    """``scaleq ARGS`` against the live server (in a thread: the CLI runs its own event loop)."""
    argv = [args[0], "--server", live.url, "--token", live.tokens["admin"], *args[1:]]
    return await asyncio.to_thread(runner.invoke, app, argv, env={"COLUMNS": "200"})


async def test_submit_flags_a_failure_retried_and_a_preempted_attempt_in_scaleq_job(live: LiveServer) -> None:
    done = await cli(live, "submit", "q", "--retries", "2", "--retry-on-exit-code", "3", "--", "sh", "-c", "exit 3")
    assert done.exit_code == 0, done.output
    job_id = done.stdout.strip()
    async with live.client("worker") as w:
        await w.register({"id": "w1", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})
        (first,), _, _ = await w.claim("w1", 1, wait=0)
        assert (first.job.retries, first.job.retry_on_exit_codes) == (2, [3])
        again = await w.finish({"lease": first.lease, "reason": "failed", "exit_code": 3})
        assert (again.state, again.failures) == ("queued", 1)
        (second,), _, _ = await w.claim("w1", 1, wait=0)  # queued again, and claimed at once
        await w.release(second.lease, "preempted")
    shown = await cli(live, "job", job_id)
    assert shown.exit_code == 0, shown.output
    assert "1 of 2 used (failures with exit code 3)" in shown.stdout
    assert "0 of 3 counted" in shown.stdout
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in shown.stdout.splitlines() if "│" in line]
    assert [(row[0], row[-1]) for row in cells if row[0] in ("1", "2")] == [("1", "failed"), ("2", "preempted")]
    as_json = json.loads((await cli(live, "job", job_id, "--output", "json")).stdout)
    assert (as_json["retries"], as_json["failures"], as_json["retry_on_exit_codes"]) == (2, 1, [3])
    assert [a["outcome"] for a in as_json["attempt_history"]] == ["failed", "preempted"]


async def test_bad_retry_settings_are_refused_naming_the_field(live: LiveServer) -> None:
    alone = await cli(live, "submit", "q", "--retry-on-exit-code", "3", "--", "true")
    assert alone.exit_code == 2 and "retry_on_exit_codes: needs retries of at least 1" in alone.output
    zero = await cli(live, "submit", "q", "--retries", "1", "--retry-on-exit-code", "0", "--", "true")
    assert zero.exit_code == 2 and "retry_on_exit_codes" in zero.output
    async with live.client("submit") as c:
        body = {"queue": "q", "definition": {"command": ["true"]}, "retries": 1, "retry_on_exit_codes": [0]}
        try:
            await c.request("POST", "/jobs", json=body)
        except ApiError as exc:
            assert exc.status == 422 and "retry_on_exit_codes" in str(exc)
        else:
            raise AssertionError("accepted exit code 0")
        # retries are not the definition: the same definition with other retries is the same job
        d = JobDefinition(command=["echo", "same"])
        first, created = await c.submit(SubmitRequest(queue="q", definition=d, retries=3))
        second, again = await c.submit(SubmitRequest(queue="q", definition=d))
        assert created and not again and first.id == second.id and second.retries == 3


async def test_submit_many_takes_retry_settings_per_line(live: LiveServer, tmp_path: Any) -> None:
    lines = [{"command": ["a"], "retries": 2}, {"command": ["b"]}, {"command": ["c"], "max_attempts": 5}]
    path = tmp_path / "sweep.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    done = await cli(live, "submit-many", "q", str(path), "--retry-on-exit-code", "9", "--retries", "1")
    assert done.exit_code == 0, done.output
    async with live.client("read") as c:
        jobs = [await c.get_job(i) for i in done.stdout.split()]
    # the flags set every line; a line's own settings give way to them
    assert [(j.retries, j.retry_on_exit_codes, j.max_attempts) for j in jobs] == [(1, [9], 3), (1, [9], 3), (1, [9], 5)]
