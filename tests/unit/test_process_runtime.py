"""ProcessRuntime against real subprocesses (POSIX sh)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from scaleq.jobs import JobDefinition
from scaleq.worker.runtime.base import RunSpec
from scaleq.worker.runtime.process import ProcessRuntime
from scaleq.worker.runtime.watchdog import Watchdog
from tests.helpers import eventually


class Sink:
    """Collects log chunks with the time they arrived."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes, float]] = []

    async def __call__(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data, time.monotonic()))

    def text(self, stream: str) -> str:
        return b"".join(d for s, d, _ in self.chunks if s == stream).decode()


def make_spec(tmp_path: Path, command: list[str], **definition: object) -> RunSpec:
    (tmp_path / "in").mkdir(exist_ok=True)
    return RunSpec(
        job_id="f" * 64,
        attempt=2,
        worker_id="w-test",
        definition=JobDefinition(command=command, **definition),
        inputs_dir=tmp_path / "in",
        outputs_dir=tmp_path / "out",
    )


def alive(pid: int) -> bool:
    """Running (a zombie nobody reaped counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] != b"Z"


def group_alive(pgid: int) -> bool:
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_bytes()
            except OSError:
                continue
            fields = stat[stat.rfind(b")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != b"Z":
                return True
    return False


async def wait_for_file(path: Path, timeout: float = 5.0) -> str:
    async def written() -> str:
        return path.read_text() if path.exists() and path.read_text().strip() else ""

    return await eventually(written, timeout, what=f"{path} written", every=0.02)


@pytest.fixture
def runtime() -> ProcessRuntime:
    return ProcessRuntime(kill_grace=0.5)


async def test_success_and_exit_codes(runtime: ProcessRuntime, tmp_path: Path) -> None:
    ok = await runtime.run(make_spec(tmp_path, ["true"]), Sink())
    assert (ok.reason, ok.exit_code, ok.error) == ("success", 0, None)
    bad = await runtime.run(make_spec(tmp_path, ["sh", "-c", "exit 3"]), Sink())
    assert (bad.reason, bad.exit_code) == ("failed", 3)
    killed = await runtime.run(make_spec(tmp_path, ["sh", "-c", "kill -9 $$"]), Sink())
    assert (killed.reason, killed.exit_code) == ("failed", 137)  # 128 + SIGKILL, as Docker reports it


async def test_entrypoint_is_prepended(runtime: ProcessRuntime, tmp_path: Path) -> None:
    sink = Sink()
    res = await runtime.run(make_spec(tmp_path, ["echo from-entrypoint"], entrypoint=["sh", "-c"]), sink)
    assert res.reason == "success"
    assert sink.text("stdout") == "from-entrypoint\n"


async def test_env_and_scaleq_variables(
    runtime: ProcessRuntime, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WORKER_SIDE", "inherited")
    sink = Sink()
    script = 'echo "$WORKER_SIDE $MINE $SCALEQ_INPUTS $SCALEQ_OUTPUTS $SCALEQ_JOB_ID $SCALEQ_ATTEMPT"'
    spec = make_spec(tmp_path, ["sh", "-c", script], env={"MINE": "job-value", "SCALEQ_JOB_ID": "spoofed"})
    res = await runtime.run(spec, sink)
    assert res.reason == "success"
    assert sink.text("stdout").split() == [
        "inherited",
        "job-value",
        str(tmp_path / "in"),
        str(tmp_path / "out"),
        "f" * 64,  # the runtime's own variables win over the definition's
        "2",
    ]


async def test_an_array_member_sees_its_array_and_index(runtime: ProcessRuntime, tmp_path: Path) -> None:
    script = 'echo "${SCALEQ_ARRAY_ID-unset} ${SCALEQ_ARRAY_INDEX-unset}"'
    member = dataclasses.replace(make_spec(tmp_path, ["sh", "-c", script]), array_id="a" * 64, array_index=41)
    alone = make_spec(tmp_path, ["sh", "-c", script], env={"SCALEQ_ARRAY_INDEX": "7"})
    seen = []
    for spec in (member, alone):
        sink = Sink()
        assert (await runtime.run(spec, sink)).reason == "success"
        seen.append(sink.text("stdout").split())
    assert seen == [["a" * 64, "41"], ["unset", "7"]]  # a job alone has none (its own env is its own)


async def test_workdir_given_or_fresh_temp_dir(runtime: ProcessRuntime, tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    wd.mkdir()
    sink = Sink()
    assert (await runtime.run(make_spec(tmp_path, ["pwd"], workdir=str(wd)), sink)).reason == "success"
    assert sink.text("stdout").strip() == str(wd)

    sink = Sink()
    assert (await runtime.run(make_spec(tmp_path, ["sh", "-c", "pwd; touch x"]), sink)).reason == "success"
    fresh = Path(sink.text("stdout").strip())
    assert fresh.parent == tmp_path and fresh.name.startswith("work-")  # in the attempt dir, not the worker's cwd
    assert not fresh.exists()  # removed after the attempt

    missing = await runtime.run(make_spec(tmp_path, ["true"], workdir="/does/not/exist"), Sink())
    assert missing.reason == "failed" and "/does/not/exist" in (missing.error or "")


async def test_logs_stream_in_order_as_they_come(runtime: ProcessRuntime, tmp_path: Path) -> None:
    sink = Sink()
    # the job holds at each gate until the test has seen what came before it: every chunk arrives while it runs
    gates = [tmp_path / f"gate{n}" for n in range(3)]
    hold = [f"while [ ! -e {g} ]; do sleep 0.02; done" for g in gates]
    script = f"echo one; {hold[0]}; echo two >&2; {hold[1]}; printf partial; {hold[2]}; echo ' end'"
    task = asyncio.create_task(runtime.run(make_spec(tmp_path, ["sh", "-c", script]), sink))
    try:
        for n, gate in enumerate(gates):

            async def arrived(n: int = n) -> bool:
                return len(sink.chunks) == n + 1

            await eventually(arrived, 10, what=f"chunk {n + 1} while the job holds", every=0.02)
            gate.touch()
    finally:
        res = await asyncio.wait_for(task, 10)
    assert res.reason == "success"
    assert [(s, d) for s, d, _ in sink.chunks] == [
        ("stdout", b"one\n"),
        ("stderr", b"two\n"),
        ("stdout", b"partial"),  # no newline yet: delivered anyway
        ("stdout", b" end\n"),
    ]


async def test_outputs_written_via_env_land_in_outputs_dir(runtime: ProcessRuntime, tmp_path: Path) -> None:
    (tmp_path / "in" / "data.txt").parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / "in" / "data.txt").write_text("hello")
    script = 'mkdir -p "$SCALEQ_OUTPUTS/sub" && cat "$SCALEQ_INPUTS/data.txt" > "$SCALEQ_OUTPUTS/sub/copy.txt"'
    res = await runtime.run(make_spec(tmp_path, ["sh", "-c", script]), Sink())
    assert res.reason == "success"
    assert (tmp_path / "out" / "sub" / "copy.txt").read_text() == "hello"


async def test_command_not_found(runtime: ProcessRuntime, tmp_path: Path) -> None:
    res = await runtime.run(make_spec(tmp_path, ["scaleq-no-such-command", "x"]), Sink())
    assert res.reason == "failed"
    assert res.exit_code == 127
    assert res.error == "command not found: scaleq-no-such-command"


async def test_timeout_kills_the_whole_group(runtime: ProcessRuntime, tmp_path: Path) -> None:
    # The leader waits on a grandchild that ignores SIGTERM: only the SIGKILL after the grace ends it.
    pids = tmp_path / "pids"
    script = f'(trap "" TERM; sleep 60; true) & echo "$$ $!" > {pids}; wait'
    started = time.monotonic()
    async with asyncio.timeout(30):  # the grandchild sleeps for 60 s: ending at all is the SIGKILL's doing
        res = await runtime.run(make_spec(tmp_path, ["sh", "-c", script], max_duration=1), Sink())
    took = time.monotonic() - started
    assert res.reason == "timed_out"
    assert res.exit_code in (143, 137)
    assert "max_duration" in (res.error or "")
    assert took >= 1.0  # not before max_duration
    leader, grandchild = map(int, pids.read_text().split())
    assert not alive(grandchild)
    assert not group_alive(leader)


async def test_background_stragglers_die_with_the_main_process(runtime: ProcessRuntime, tmp_path: Path) -> None:
    # The background sleep keeps stdout open; the run must still end when sh exits, and kill it.
    pids = tmp_path / "pids"
    async with asyncio.timeout(30):  # the straggler sleeps for 60 s: the run must not wait for it
        res = await runtime.run(make_spec(tmp_path, ["sh", "-c", f"sleep 60 & echo $! > {pids}; echo done"]), Sink())
    assert res.reason == "success"
    assert not alive(int(pids.read_text()))


async def test_cancellation_kills_the_group_and_reraises(runtime: ProcessRuntime, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f'(trap "" TERM; sleep 60; true) & echo "$$ $!" > {pids}; wait'
    task = asyncio.create_task(runtime.run(make_spec(tmp_path, ["sh", "-c", script]), Sink()))
    leader, grandchild = map(int, (await wait_for_file(pids)).split())
    assert alive(leader) and alive(grandchild)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(grandchild)
    assert not group_alive(leader)


async def test_second_cancellation_does_not_cut_the_kill_short(runtime: ProcessRuntime, tmp_path: Path) -> None:
    pids = tmp_path / "pids"
    script = f'(trap "" TERM; sleep 60; true) & echo "$$ $!" > {pids}; wait'
    task = asyncio.create_task(runtime.run(make_spec(tmp_path, ["sh", "-c", script]), Sink()))
    leader, grandchild = map(int, (await wait_for_file(pids)).split())
    task.cancel()
    await asyncio.sleep(0.1)  # now inside the grace period
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not alive(grandchild)
    assert not group_alive(leader)


async def test_check_and_cleanup_orphans(runtime: ProcessRuntime) -> None:
    await runtime.check()
    assert await runtime.cleanup_orphans("w-test") == 0
    assert runtime.name == "process"


def test_the_watchdog_stops_listed_groups_when_its_worker_goes_and_is_replaced_if_killed() -> None:
    def group() -> subprocess.Popen[bytes]:
        return subprocess.Popen(["sh", "-c", "sleep 1000 & wait"], start_new_session=True)

    first, second, done = group(), group(), group()
    dog = Watchdog(grace=0.5)
    try:
        dog.watch(first.pid)
        dog.watch(done.pid)
        dog.unwatch(done.pid)  # a job that ended is forgotten
        killed = dog.pid
        assert killed is not None
        os.kill(killed, signal.SIGKILL)  # the watchdog itself dies: the next call starts another, told of all
        deadline = time.monotonic() + 5
        while alive(killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        dog.watch(second.pid)
        assert dog.pid not in (None, killed)
        dog.close()  # as when the worker dies: every listed group is stopped
        for p in (first, second):
            assert p.wait(timeout=5) == -signal.SIGTERM
        assert group_alive(done.pid)
    finally:
        for p in (first, second, done):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)
            p.wait()
