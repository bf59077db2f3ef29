"""``scaleq purge``: finished jobs older than a cut-off go, with their logs and outputs; nothing else does."""

from __future__ import annotations

import json
import time

from tests.acceptance.support import Grid


def test_purge_removes_old_finished_jobs_and_keeps_the_rest(grid: Grid) -> None:
    done = grid.api_submit("sh", "-c", 'echo old; echo data > "$SCALEQ_OUTPUTS/o.txt"')  # waits for it to finish
    other = grid.api_submit("echo", "elsewhere", queue="other", wait=False)  # no group runs "other":
    assert grid.api("POST", f"/jobs/{other}/cancel").status_code == 200  # finished, cancelled
    time.sleep(1.1)  # both finished over a second ago
    waiting = grid.api_submit("echo", "never run", queue="nobody-runs-this", wait=False)

    r = grid.cli("purge", "--older-than", "1s", "--queue", "default", "--output", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["jobs"] == 1 and json.loads(r.stdout)["outputs"] == 1
    gone = grid.cli("job", done)
    assert gone.returncode == 1 and "no job" in gone.stderr
    for kept in (other, waiting):  # another queue; a queued job
        assert grid.json("job", kept)["id"] == kept

    r = grid.cli("purge", "--older-than", "1w")  # nothing that old: a table of zeros
    assert r.returncode == 0 and "jobs" in r.stdout, r.stderr
    assert grid.cli("purge", "--older-than", "soon").returncode == 2
    submitter = grid.cli("tokens", "create", "--role", "submit", "--output", "json")
    token = json.loads(submitter.stdout)["token"]
    refused = grid.cli("purge", "--older-than", "0s", "--token", token)
    assert refused.returncode == 1 and ("403" in refused.stderr or "admin" in refused.stderr), refused.stderr
    assert grid.json("job", other)["id"] == other  # the refused purge removed nothing
