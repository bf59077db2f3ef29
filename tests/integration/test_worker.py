"""The worker agent (process runtime) against a live server: run, stream, cancel, fence, drain, hand back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import pytest

from scaleq.client import Unreachable
from scaleq.jobs import Job, JobDefinition, SubmitRequest
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, eventually, serve
from tests.helpers.workers import agent, running


async def submit(live: LiveServer, *cmd: str, max_attempts: int = 3, **kw: object) -> Job:
    async with live.client("submit") as c:
        d = JobDefinition(command=list(cmd), **kw)
        job, _ = await c.submit(SubmitRequest(queue="q", definition=d, max_attempts=max_attempts))
        return job


async def wait_state(live: LiveServer, job_id: str, state: str = "finished", timeout: float = 15) -> Job:
    deadline = time.monotonic() + timeout
    async with live.client("read") as c:
        while True:
            job = await c.get_job(job_id, wait=1, state=None)
            if job.state == state:
                return job
            assert time.monotonic() < deadline, f"job still {job.state}"
            await asyncio.sleep(0.05)


async def test_runs_jobs_streams_logs_and_collects_outputs(live: LiveServer) -> None:
    a = agent(live)
    async with running(a):
        job = await submit(live, "sh", "-c", 'echo out; echo err >&2; echo data > "$SCALEQ_OUTPUTS/r.txt"; exit 3')
        done = await wait_state(live, job.id)
        assert done.reason == "failed" and done.exit_code == 3
        async with live.client("read") as c:
            page = await c.logs(job.id)
            assert {(ch["stream"], ch["data"]) for ch in page["chunks"]} >= {("stdout", "out\n"), ("stderr", "err\n")}
            assert [o["path"] for o in await c.outputs(job.id)] == ["r.txt"]
            assert await c.output_bytes(job.id, "r.txt") == b"data\n"


async def test_logs_arrive_while_the_job_runs(live: LiveServer, tmp_path: Path) -> None:
    a = agent(live)
    gate = tmp_path / "gate"  # the job holds until the test has seen its first line
    async with running(a):
        job = await submit(live, "sh", "-c", f"echo first; while [ ! -e {gate} ]; do sleep 0.05; done; echo second")
        async with live.client("read") as c:
            page = await c.logs(job.id, wait=5)
            while not page["chunks"]:
                page = await c.logs(job.id, wait=5)
            assert page["chunks"][0]["data"] == "first\n"
            assert (await c.get_job(job.id)).state == "running"
        gate.touch()
        await wait_state(live, job.id)


async def test_slots_bound_concurrency_and_all_jobs_finish(live: LiveServer) -> None:
    a = agent(live, slots=2)
    async with running(a):
        jobs = [await submit(live, "sh", "-c", f"sleep 0.5; echo {i}") for i in range(5)]
        await asyncio.sleep(0.3)
        async with live.client("read") as c:
            assert len(await c.list_jobs(state="running")) <= 2
        for j in jobs:
            assert (await wait_state(live, j.id)).reason == "success"


async def test_cancel_stops_the_running_process(live: LiveServer, tmp_path: Path) -> None:
    marker = tmp_path / "pid"
    a = agent(live)
    async with running(a):
        job = await submit(live, "sh", "-c", f"echo $$ > {marker}; sleep 30")
        await wait_state(live, job.id, "running")
        while not marker.exists() or not marker.read_text().strip():
            await asyncio.sleep(0.05)
        pid = int(marker.read_text())
        async with live.client("submit") as c:
            assert (await c.cancel(job.id)).reason == "cancelled"
        deadline = time.monotonic() + 30  # a beat (0.67 s) and the kill's grace (1 s), with room for a loaded machine
        while Path(f"/proc/{pid}").exists():
            assert time.monotonic() < deadline, "cancelled job still running"
            await asyncio.sleep(0.1)
        assert (await wait_state(live, job.id)).reason == "cancelled"


async def test_max_duration_times_out(live: LiveServer) -> None:
    a = agent(live)
    async with running(a):
        job = await submit(live, "sleep", "30", max_duration=1)
        done = await wait_state(live, job.id)
        assert done.reason == "timed_out"


async def test_drain_finishes_running_jobs_then_exits(live: LiveServer) -> None:
    a = agent(live)
    task = asyncio.create_task(a.run())
    job = await submit(live, "sh", "-c", "sleep 1; echo ok")
    await wait_state(live, job.id, "running")
    a.request_drain()
    queued = await submit(live, "echo", "later")
    assert await asyncio.wait_for(task, 10) == 0
    assert (await wait_state(live, job.id)).reason == "success"
    async with live.client("read") as c:
        assert (await c.get_job(queued.id)).state == "queued"  # a draining worker takes nothing new
        (w,) = await c.workers(include_gone=True)
        assert w.state == "gone"


async def test_forced_drain_hands_jobs_back(live: LiveServer) -> None:
    a = agent(live)
    task = asyncio.create_task(a.run())
    job = await submit(live, "sleep", "30", max_attempts=1)
    await wait_state(live, job.id, "running")
    a.request_drain()
    a.request_drain()
    assert await asyncio.wait_for(task, 10) == 0
    async with live.client("read") as c:
        back = await c.get_job(job.id)
    assert back.state == "queued" and back.attempts == 0


# a minute's long-poll: a worker that waited for its parked claim to run out would outlast the wait below
@pytest.mark.parametrize("settings", [ServerSettings(lease_seconds=2.0, sweep_interval=0.2, long_poll_max=60.0)])
async def test_server_drain_request_stops_an_idle_worker(live: LiveServer) -> None:
    a = agent(live)
    task = asyncio.create_task(a.run())
    async with live.client("admin") as c:
        while not await c.workers():
            await asyncio.sleep(0.05)
        await c.drain_worker("w1")
    assert await asyncio.wait_for(task, 30) == 0  # the parked claim ends at once, not after its long-poll


@pytest.mark.parametrize("max_attempts, reason", [(2, "success"), (1, "worker_lost")])
async def test_a_lost_worker_is_retried_elsewhere_then_worker_lost(
    live: LiveServer, max_attempts: int, reason: str, tmp_path: Path
) -> None:
    doomed = agent(live, "doomed")
    task = asyncio.create_task(doomed.run())
    gate = tmp_path / "gate"  # the job holds until its first worker is gone
    job = await submit(
        live, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo done", max_attempts=max_attempts
    )
    await wait_state(live, job.id, "running")
    task.cancel()  # the worker vanishes: no finish, no heartbeat, no deregistration
    with contextlib.suppress(asyncio.CancelledError):
        await task
    gate.touch()
    async with running(agent(live, "rescuer")):
        done = await wait_state(live, job.id, timeout=20)
    assert done.reason == reason


async def test_worker_waits_out_a_server_outage(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    """A result produced while the server is down is delivered when it is back; the job is not run twice."""
    # the outage (until the job has finished) is shorter than the lease, as a restart of a real server would be
    gate, done_file = tmp_path / "gate", tmp_path / "done"
    settings = ServerSettings(lease_seconds=8.0, sweep_interval=0.2, long_poll_max=1.0)
    async with serve(sqlite_store, settings) as first:
        port, tokens = int(first.url.rsplit(":", 1)[1]), first.tokens
        a = agent(first, server_grace=60)
        task = asyncio.create_task(a.run())
        job = await submit(
            first, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo survived; touch {done_file}"
        )
        await wait_state(first, job.id, "running")
    gate.touch()  # the server is gone while the job finishes

    async def job_ended() -> bool:
        return done_file.exists()

    await eventually(job_ended, 10, what="the job to finish while the server is down")
    async with serve(sqlite_store, settings, port=port, tokens=tokens) as second:
        done = await wait_state(second, job.id, timeout=15)
        assert done.reason == "success" and done.attempts == 1
        a.request_drain()
        assert await asyncio.wait_for(task, 10) == 0


async def test_a_drained_workers_late_result_keeps_its_lease(sqlite_store: SQLiteStore, tmp_path: Path) -> None:
    """A result the server takes only after several leases' time (a whole fleet reporting at once) still lands: the
    drained worker beats on until it has, so the lease holds and the job is neither lost nor run again."""
    # 3 s leases, 1 s beats: a loaded machine's stall of 2 s, not 1 s, would lose the lease
    settings = ServerSettings(lease_seconds=3.0, sweep_interval=0.1, long_poll_max=1.0)
    gate = tmp_path / "gate"
    async with serve(sqlite_store, settings) as live:
        a = agent(live, server_grace=60)
        real, refused = a.client.finish, []
        slow_until: list[float] = []

        async def finish_taken_late(finish: dict[str, object]) -> Job:
            if not slow_until:
                slow_until.append(time.monotonic() + 3 * settings.lease_seconds)
            if time.monotonic() < slow_until[0]:
                refused.append(finish["lease"])
                raise Unreachable("the server is busy with the rest of the fleet")
            return await real(finish)

        a.client.finish = finish_taken_late  # type: ignore[method-assign]
        task = asyncio.create_task(a.run())
        job = await submit(live, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
        await wait_state(live, job.id, "running")
        a.request_drain()  # drained: the result goes on its own, not riding on a claim
        gate.touch()
        assert await asyncio.wait_for(task, 40) == 0
        assert len(refused) >= 3  # the result really was turned away for longer than a lease
        done = await wait_state(live, job.id)
        assert done.reason == "success" and done.attempts == 1
        (attempt,) = await sqlite_store.list_attempts(job.id)
        assert attempt.outcome == "success"


async def test_a_heartbeat_answered_after_a_claim_does_not_abandon_the_new_job(
    live: LiveServer, tmp_path: Path
) -> None:
    # The race: a heartbeat reads the worker's leases, a claim commits and is answered, then the heartbeat's answer
    # (without the new lease) arrives. The new job must run on, not be stopped as "no longer live".
    a = agent(live, slots=1)
    real = a.client.heartbeat
    raced: list[tuple[str, set[str]]] = []
    gate = tmp_path / "gate"  # the job holds until the race has been staged

    async def heartbeat_overtaken_by_a_claim(worker_id: str, **kw: object) -> tuple[str, set[str]]:
        answer = await real(worker_id, **kw)
        if not raced:
            job = await submit(live, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
            await wait_state(live, job.id, "running")
            while not a.running:
                await asyncio.sleep(0.01)
            raced.append((next(iter(a.running)), set(answer[1])))
        return answer

    a.client.heartbeat = heartbeat_overtaken_by_a_claim  # type: ignore[method-assign]
    register = a.client.register

    async def register_as_with_an_older_server(body: dict[str, object]) -> dict[str, object]:
        # so that the idle agent beats while parked (told a claim is a heartbeat, it would not: the race then needs
        # a worker busy on one slot and parked on another, which this staging does not build)
        return {k: v for k, v in (await register(body)).items() if k != "claim_is_heartbeat"}

    a.client.register = register_as_with_an_older_server  # type: ignore[method-assign, assignment]
    async with running(a):
        while not raced:
            await asyncio.sleep(0.05)
        lease, answered = raced[0]
        assert lease not in answered  # the stale answer really lacked the new lease
        job_id = a.running[lease].claim.job.id
        gate.touch()
        done = await wait_state(live, job_id)
        assert done.reason == "success" and done.attempts == 1


async def test_a_claim_whose_answer_is_lost_goes_back_to_the_queue(live: LiveServer) -> None:
    # The server commits a claim, then dies before answering (here: the answer is dropped). The worker never learns
    # of that lease, so its heartbeats must not keep it alive: it expires and the job runs after all.
    a = agent(live, slots=1)
    real = a.client.claim
    dropped: list[str] = []

    async def claim_answer_lost(*args: object, **kw: object) -> object:
        claims, outcomes, state = await real(*args, **kw)  # type: ignore[arg-type]
        if claims and not dropped:
            dropped.append(claims[0].lease)
            raise Unreachable("connection reset before the answer")
        return claims, outcomes, state

    a.client.claim = claim_answer_lost  # type: ignore[method-assign]
    job = await submit(live, "echo", "once")
    async with running(a):
        done = await wait_state(live, job.id, timeout=20)
    assert dropped and done.reason == "success" and done.attempts == 2
    attempts = await live.store.list_attempts(job.id)
    assert [x.outcome for x in attempts] == ["lost", "success"]


def _running(pid: int) -> bool:
    """Running (a zombie nobody reaped yet counts as stopped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


async def test_a_killed_workers_process_job_stops_within_the_lease(any_store: Store, open_tmp_path: Path) -> None:
    """kill -9 of a ``scaleq worker`` mid-job: the job (its session: the shell and its background child) is stopped
    while its lease still holds, so before the job can run again elsewhere. (A root worker runs it as ``nobody``: its
    pid files go where that user can write.)"""
    settings = ServerSettings(lease_seconds=10.0, sweep_interval=0.2, long_poll_max=5.0)
    main, child = open_tmp_path / "main.pid", open_tmp_path / "child.pid"
    pids: list[int] = []
    async with serve(any_store, settings) as live:
        worker = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "scaleq", "worker", "--queue", "q", "--runtime", "process", "--slots", "1"),
            *("--worker-id", "doomed", "--server", live.url, "--token", live.tokens["worker"]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        try:
            note = "echo {pid} > {f}.tmp; mv {f}.tmp {f}"  # whole or not at all
            script = f"sleep 1000 & {note.format(pid='$!', f=child)}; {note.format(pid='$$', f=main)}; wait"
            job = await submit(live, "sh", "-c", script)
            await eventually(lambda: _exists(main, child), timeout=30, what="the job to start")  # a process's start
            pids += [int(main.read_text()), int(child.read_text())]
            assert all(_running(p) for p in pids)
            worker.kill()
            await worker.wait()

            async def stopped() -> bool:
                return not any(_running(p) for p in pids)

            await eventually(stopped, timeout=settings.lease_seconds, what="the dead worker's job to stop")
            still = await live.store.get_job(job.id)
            assert (still.state, still.attempts) == ("running", 1)  # stopped within the lease, not after it
        finally:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
            for pid in pids:  # leave nothing behind, even when the test failed
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


async def _exists(*paths: Path) -> bool:
    return all(p.exists() for p in paths)


async def test_a_preemptible_worker_hands_its_jobs_back_at_once_on_sigterm(
    live: LiveServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    a = agent(live, group="g", on_notice="handback")
    task = asyncio.create_task(a.run())
    jobs = [await submit(live, "sh", "-c", f"echo $$ > {tmp_path / str(n)}; sleep 30", max_attempts=1) for n in (1, 2)]
    for j in jobs:
        await wait_state(live, j.id, "running")
    while not all((tmp_path / str(n)).exists() and (tmp_path / str(n)).read_text().strip() for n in (1, 2)):
        await asyncio.sleep(0.05)
    os.kill(os.getpid(), signal.SIGTERM)  # the provider's notice: the handler the worker installed takes it
    assert await asyncio.wait_for(task, 10) == 0
    assert "preemption notice" in caplog.text
    async with live.client("admin") as c:
        for j in jobs:
            back = await c.get_job(j.id)
            assert (back.state, back.attempts) == ("queued", 0)  # max_attempts 1, and not spent
            assert [at["outcome"] for at in await c.attempts(j.id)] == ["preempted"]
        assert [e["kind"] for e in await c.events(group="g")] == ["preempted", "preempted"]
        (w,) = await c.workers(include_gone=True)
        assert w.state == "gone"
    for n in (1, 2):  # the jobs were stopped, not left running
        assert not Path(f"/proc/{int((tmp_path / str(n)).read_text())}").exists()


async def test_a_failed_job_with_retries_left_runs_again(live: LiveServer, tmp_path: Path) -> None:
    marker = tmp_path / "tried"
    a = agent(live)
    async with running(a):
        async with live.client("submit") as c:
            d = JobDefinition(command=["sh", "-c", f"test -e {marker} && exit 0; touch {marker}; exit 3"])
            job, _ = await c.submit(SubmitRequest(queue="q", definition=d, retries=1, retry_on_exit_codes=[3]))
        done = await wait_state(live, job.id)
        assert (done.reason, done.failures) == ("success", 1)
        async with live.client("read") as c:
            assert [at["outcome"] for at in await c.attempts(job.id)] == ["failed", "success"]
