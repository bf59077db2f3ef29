"""The local provider's records under a ``kill -9`` of its controller: a worker whose process started just before
the kill (its record written, its pid not yet) is found by the next controller, counted and stoppable; a record
whose process never started is dropped after the spawn grace. Found by the fault campaign (tests/faults)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

from scaleq.providers.local import SPAWN_GRACE, LocalProvider
from tests.helpers import eventually
from tests.helpers.groups import fast_group


def provider(tmp_path: Path) -> LocalProvider:
    return LocalProvider(
        grid="t", server="http://127.0.0.1:9", token="t", state_dir=tmp_path / "workers", log_dir=tmp_path / "logs"
    )


def pending_record(tmp_path: Path, worker_id: str, started_at: float) -> Path:
    """What a controller killed between writing a worker's record and spawning it (or learning its pid) leaves."""
    directory = tmp_path / "workers" / "t" / "cpu"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{worker_id}.json"
    record = {"id": worker_id, "pid": None, "started_at": started_at, "group": "cpu", "version": ""}
    path.write_text(json.dumps(record))
    return path


async def test_a_worker_spawned_just_before_its_controller_died_is_found_and_stopped(tmp_path: Path) -> None:
    worker_id = "t-cpu-0a1b2c"
    path = pending_record(tmp_path, worker_id, time.time())
    # the process the killed controller started: its command line carries the worker id, as a real worker's does
    orphan = await asyncio.create_subprocess_exec(
        sys.executable, "-c", "import time; time.sleep(60)", "--worker-id", worker_id, start_new_session=True
    )
    try:
        cmdline = Path(f"/proc/{orphan.pid}/cmdline")

        async def shown() -> bool:  # the child has exec'd a moment before the kernel shows its new command line
            return worker_id.encode() in cmdline.read_bytes()

        await eventually(shown, 10, what="the orphan's command line", every=0.01)
        group, local = fast_group(), provider(tmp_path)
        (found,) = await local.workers(group)
        assert (found.id, found.status, found.detail) == (worker_id, "running", f"pid {orphan.pid}")
        assert json.loads(path.read_text())["pid"] == orphan.pid  # the record now says which process it is
        await local.stop(group, worker_id)
        assert await asyncio.wait_for(orphan.wait(), 10) == -15  # SIGTERM: drained like any other worker
    finally:
        if orphan.returncode is None:
            orphan.kill()
            await orphan.wait()


async def test_a_record_whose_process_never_started_counts_until_the_spawn_grace_then_goes(tmp_path: Path) -> None:
    group, local = fast_group(), provider(tmp_path)
    fresh = pending_record(tmp_path, "t-cpu-fresh0", time.time())
    stale = pending_record(tmp_path, "t-cpu-stale0", time.time() - SPAWN_GRACE - 1)
    # the fresh one may still be starting: it counts toward max_workers; the stale one never will
    assert [w.id for w in await local.workers(group)] == ["t-cpu-fresh0"]
    assert fresh.exists() and not stale.exists()
