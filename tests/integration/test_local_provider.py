"""The local provider's records under a ``kill -9`` of its controller: a worker whose process started just before
the kill (its record written, its pid not yet) is found by the next controller, counted and stoppable; a record
whose process never started is dropped after the spawn grace. Found by the fault campaign (tests/faults)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
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


async def test_a_young_record_whose_process_shows_no_command_line_yet_is_not_dropped(tmp_path: Path) -> None:
    """Between a worker's exec and its new command line /proc shows none: another provider instance listing then must
    not take the worker for dead and delete its record (it would never be stopped). A zombie shows none either, and
    is dead."""
    group, local = fast_group(), provider(tmp_path)
    # a stopped process whose command line reads empty, as during the exec: a kernel thread's does (pid 2, kthreadd)
    young = pending_record(tmp_path, "t-cpu-young1", time.time())
    young.write_text(json.dumps(json.loads(young.read_text()) | {"pid": 2}))
    assert Path("/proc/2/cmdline").read_bytes() == b""
    assert [w.id for w in await local.workers(group)] == ["t-cpu-young1"]
    young.write_text(json.dumps(json.loads(young.read_text()) | {"started_at": time.time() - SPAWN_GRACE - 1}))
    assert await local.workers(group) == [] and not young.exists()  # past the spawn grace: not a worker
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # noqa: ASYNC220  (exits, not reaped: a zombie)
    try:
        # wait until it is a zombie, without reaping it (its command line reads empty a moment before: while it exits)
        await asyncio.to_thread(os.waitid, os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)
        dead = pending_record(tmp_path, "t-cpu-dead01", time.time())
        dead.write_text(json.dumps(json.loads(dead.read_text()) | {"pid": zombie.pid}))
        assert await local.workers(group) == [] and not dead.exists()  # a zombie is no worker, however young
    finally:
        zombie.wait()
