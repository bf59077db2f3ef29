"""10. The embedded default group scales from zero to one worker per core (2 here) with the queue."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.acceptance.support import Grid
from tests.helpers import wait_for


def test_embedded_group_scales_from_zero_to_the_core_count(grid: Grid, tmp_path: Path) -> None:
    cores = os.cpu_count() or 1
    assert grid.json("workers") == [], "an empty grid has no workers"

    tag = uuid.uuid4().hex[:10]
    # the jobs hold until the test opens their gate, once every worker runs one: the demand stays until then
    gate = tmp_path / "gate"
    script = f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {{}}-{tag}"
    with ThreadPoolExecutor(max_workers=4) as pool:
        job_ids = list(pool.map(lambda i: grid.submit("default", "--", "sh", "-c", script.format(i)), range(4)))

    seen: list[int] = []

    def scaled() -> bool:
        workers = grid.api("GET", "/workers").raise_for_status().json()
        seen.append(len(workers))
        return len([w for w in workers if w["state"] == "active"]) >= min(cores, 4)

    wait_for(scaled, 30, 0.2, f"{min(cores, 4)} workers")  # (fresh worker processes start, import, register)
    workers = grid.json("workers")
    assert len(workers) == min(cores, 4), workers
    assert {(w["queue"], w["group"]) for w in workers} == {("default", "local")}

    def one_job_each() -> bool:
        return sum(grid.api_job(i)["state"] == "running" for i in job_ids) == min(cores, 4)

    wait_for(one_job_each, 20, 0.2, f"a job running on each of the {min(cores, 4)} workers")
    gate.touch()

    jobs = grid.wait_all_finished(job_ids, timeout=30)
    assert all((j["state"], j["reason"]) == ("finished", "success") for j in jobs.values()), jobs
    assert max(seen) <= cores, f"never more workers than cores: {seen}"
    assert len({j["attempt_history"][0]["worker_id"] for j in jobs.values()}) == min(cores, 4)
