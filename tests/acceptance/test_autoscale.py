"""10. The embedded default group scales from zero to one worker per core (2 here) with the queue."""

from __future__ import annotations

import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

from tests.acceptance.support import Grid
from tests.helpers import wait_for


def test_embedded_group_scales_from_zero_to_the_core_count(grid: Grid) -> None:
    cores = os.cpu_count() or 1
    assert grid.json("workers") == [], "an empty grid has no workers"

    tag = uuid.uuid4().hex[:10]
    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=4) as pool:
        job_ids = list(
            pool.map(lambda i: grid.submit("default", "--", "sh", "-c", f"sleep 2; echo {i}-{tag}"), range(4))
        )

    seen: list[int] = []

    def scaled() -> bool:
        workers = grid.api("GET", "/workers").raise_for_status().json()
        seen.append(len(workers))
        return len([w for w in workers if w["state"] == "active"]) >= min(cores, 4)

    wait_for(scaled, 10, 0.2, f"{min(cores, 4)} workers")
    took = time.monotonic() - started
    workers = grid.json("workers")
    assert len(workers) == min(cores, 4), workers
    assert {(w["queue"], w["group"]) for w in workers} == {("default", "local")}
    assert took < 10

    jobs = grid.wait_all_finished(job_ids, timeout=30)
    assert all((j["state"], j["reason"]) == ("finished", "success") for j in jobs.values()), jobs
    assert max(seen) <= cores, f"never more workers than cores: {seen}"
    assert len({j["attempt_history"][0]["worker_id"] for j in jobs.values()}) == min(cores, 4)
