"""``scaleq why ID`` against a real ``scaleq up`` (the embedded default grid: group ``local`` on queue ``default``,
process jobs): a job that ran, a job no group can run, a queue nothing serves, and bad or unknown ids."""

from __future__ import annotations

import json

from tests.acceptance.support import Grid


def test_why_explains_a_finished_job_a_misfit_and_an_unserved_queue(grid: Grid) -> None:
    done = grid.api_submit("true")
    r = grid.cli("why", done)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0] == f"job {done[:12]} on queue default: finished (success)"
    assert lines[1].strip().startswith("• attempt 1 on worker scaleq-local-") and "succeeded after" in lines[1]
    assert lines[2:] == ["  • finished: succeeded"]

    gpu = grid.api_submit("nvidia-smi", wait=False, requirements={"gpus": 1})
    r = grid.cli("why", gpu[:8])  # a prefix, as every job command takes
    assert r.returncode == 0, r.stderr
    assert "✗ group local cannot run it: it offers gpus 0, the job needs 1" in r.stdout
    assert "none of the 1 group and 0 workers serving queue default can run it" in r.stdout
    assert "estimated start: not known: nothing can run it" in r.stdout

    lost = grid.api_submit("true", queue="why-nowhere", wait=False)
    answer = grid.json("why", lost)
    assert [s["kind"] for s in answer["chain"]] == ["position", "unserved"]
    assert answer["chain"][0]["numbers"] == {"ahead": 0, "higher_priority": 0, "queued": 1, "priority": 0}
    assert (answer["state"], answer["estimated_start"]) == ("queued", None)
    assert answer["estimate_basis"] == "nothing can run it: no group and no worker serves its queue"
    assert json.loads(grid.cli("why", lost, "--output", "json").stdout) == answer

    bad = grid.cli("why", "not-an-id")
    assert bad.returncode == 2 and "is not a job id" in bad.stderr
    unknown = grid.cli("why", "abcdef0123456789")
    assert unknown.returncode == 1 and "no job abcdef0123456789" in unknown.stderr
