"""The job user: resolving it, handing an attempt dir to it and back, and process jobs run as it.

These run as root (as the suite does here), with the host's real ``nobody``: the kernel, not a mock, says what the
job user may read and write.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from scaleq.jobs import JobDefinition
from scaleq.worker.runtime import jobuser
from scaleq.worker.runtime.base import RunSpec
from scaleq.worker.runtime.jobuser import JobUser, JobUserError
from scaleq.worker.runtime.process import ProcessRuntime
from tests.helpers import eventually

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def nobody() -> JobUser:
    return JobUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)


class Sink:
    def __init__(self) -> None:
        self.out: dict[str, bytes] = {"stdout": b"", "stderr": b""}

    async def __call__(self, stream: str, data: bytes) -> None:
        self.out[stream] += data

    def text(self, stream: str = "stdout") -> str:
        return self.out[stream].decode()


def spec_in(attempt: Path, command: list[str], **definition: object) -> RunSpec:
    """A spec laid out as the worker lays it out: inputs and outputs inside one attempt dir."""
    attempt.mkdir(mode=0o700, exist_ok=True)
    (attempt / "inputs").mkdir(exist_ok=True)
    return RunSpec(
        job_id="e" * 64,
        attempt=1,
        worker_id="w-test",
        definition=JobDefinition(command=command, **definition),
        inputs_dir=attempt / "inputs",
        outputs_dir=attempt / "outputs",
    )


def owner(path: Path) -> int:
    return path.lstat().st_uid


# -- resolving ----------------------------------------------------------------------------------------------------


def test_a_root_worker_runs_jobs_as_nobody_unless_told_otherwise() -> None:
    assert jobuser.resolve(None, euid=0) == JobUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert jobuser.resolve(str(NOBODY.pw_uid), euid=0) == JobUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid)
    assert jobuser.resolve("root", euid=0) is None  # asked for on purpose: jobs stay root


def test_an_unknown_or_empty_user_is_refused_naming_it() -> None:
    with pytest.raises(JobUserError, match="no user 'no-such-user-here'"):
        jobuser.resolve("no-such-user-here", euid=0)
    with pytest.raises(JobUserError, match="empty"):
        jobuser.resolve(" ", euid=0)


def test_a_worker_that_is_not_root_runs_jobs_as_itself_and_cannot_switch() -> None:
    assert jobuser.resolve(None, euid=NOBODY.pw_uid) is None
    assert jobuser.resolve("nobody", euid=NOBODY.pw_uid) is None  # its own user: nothing to switch
    with pytest.raises(JobUserError, match="only a worker running as root"):
        jobuser.resolve("root", euid=NOBODY.pw_uid)


# -- the attempt dir, there and back ------------------------------------------------------------------------------


def as_nobody(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", "-c", script],
        cwd=cwd,
        user=NOBODY.pw_uid,
        group=NOBODY.pw_gid,
        extra_groups=[],
        capture_output=True,
        text=True,
        check=False,
    )


def test_give_then_take_back_leaves_nothing_the_job_user_can_change_or_point_elsewhere(
    open_tmp_path: Path, nobody: JobUser
) -> None:
    attempt = open_tmp_path / "attempt"
    (attempt / "inputs").mkdir(parents=True)
    (attempt / "inputs" / "data.txt").write_text("given")
    (attempt / "outputs").mkdir()
    jobuser.give(attempt, nobody)
    assert {owner(p) for p in [attempt, *attempt.rglob("*")]} == {nobody.uid}
    assert stat.S_IMODE(attempt.stat().st_mode) == 0o700

    elsewhere = open_tmp_path / "someone-elses"  # a file of a third user, which nobody can read
    elsewhere.write_text("not the job's")
    os.chown(elsewhere, 4242, 4242)
    os.chmod(elsewhere, 0o600)
    made = as_nobody(
        "cat inputs/data.txt > outputs/copy.txt && mkdir -m 777 outputs/open && echo x > outputs/open/f "
        f"&& chmod 666 outputs/open/f && ln -s {elsewhere} outputs/link",
        attempt,
    )
    assert made.returncode == 0, made.stderr
    os.link(elsewhere, attempt / "outputs" / "hardlink")  # what protected_hardlinks=0 would let a job do

    assert jobuser.take_back(attempt, nobody) == 1
    assert not (attempt / "outputs" / "hardlink").exists()  # removed, not collected
    assert elsewhere.read_text() == "not the job's" and owner(elsewhere) == 4242  # the link was not followed
    tree = [attempt, *attempt.rglob("*")]
    assert {owner(p) for p in tree} == {os.geteuid()}
    assert {stat.S_IMODE(p.stat().st_mode) for p in tree if p.is_dir() and not p.is_symlink()} == {0o700}
    assert stat.S_IMODE((attempt / "outputs" / "open" / "f").stat().st_mode) == 0o644
    assert (attempt / "outputs" / "copy.txt").read_text() == "given"
    assert as_nobody("ls outputs", attempt).returncode != 0  # out of its reach again


def test_can_enter_reads_every_directory_on_the_way(open_tmp_path: Path, nobody: JobUser) -> None:
    closed = open_tmp_path / "closed"
    (closed / "inner").mkdir(parents=True)
    os.chmod(closed, 0o700)
    os.chmod(closed / "inner", 0o755)
    assert not jobuser.can_enter(str(closed / "inner"), nobody)  # its parent is root's 0700
    opened = open_tmp_path / "open"
    opened.mkdir(mode=0o755)
    os.chmod(opened, 0o755)
    assert jobuser.can_enter(str(opened), nobody)
    own = open_tmp_path / "own"
    own.mkdir(mode=0o700)
    os.chown(own, nobody.uid, nobody.gid)
    assert jobuser.can_enter(str(own), nobody)
    (open_tmp_path / "via").symlink_to(closed / "inner")
    assert not jobuser.can_enter(str(open_tmp_path / "via"), nobody)  # resolved, then checked
    assert not jobuser.can_enter(str(open_tmp_path / "missing"), nobody)


# -- process jobs as the job user ---------------------------------------------------------------------------------


@pytest.fixture
def runtime(nobody: JobUser) -> ProcessRuntime:
    return ProcessRuntime(kill_grace=0.5, job_user=nobody)


async def test_a_job_runs_as_the_job_user_and_its_outputs_come_back_owned_by_the_worker(
    runtime: ProcessRuntime, open_tmp_path: Path
) -> None:
    secret = open_tmp_path / "secret"  # a root file next to it, as admin.token is in the data dir
    secret.write_text("s3cret")
    os.chmod(secret, 0o600)
    closed = open_tmp_path / "closed"
    closed.mkdir(mode=0o755)
    os.chmod(closed, 0o755)
    script = (
        'id -u; id -G; cat "$1" || echo cannot-read; echo x > "$2/f" || echo cannot-write; '
        'echo result > "$SCALEQ_OUTPUTS/result.txt"; pwd'
    )
    spec = spec_in(open_tmp_path / "attempt", ["sh", "-c", script, "job", str(secret), str(closed)])
    sink = Sink()
    result = await runtime.run(spec, sink)
    assert result.reason == "success", sink.text("stderr")
    uid, groups, read, wrote, cwd = sink.text().split("\n")[:5]
    assert (uid, groups) == (str(NOBODY.pw_uid), str(NOBODY.pw_gid))  # none of the worker's groups
    assert (read, wrote) == ("cannot-read", "cannot-write")
    assert Path(cwd).parent == spec.outputs_dir.parent  # a work dir inside the attempt dir
    assert "s3cret" not in sink.text() + sink.text("stderr")
    assert not (closed / "f").exists()
    out = spec.outputs_dir / "result.txt"
    assert out.read_text() == "result\n"
    assert owner(out) == owner(spec.outputs_dir) == os.geteuid()  # taken back before the worker reads it


async def test_the_jobs_own_env_reaches_only_the_job(runtime: ProcessRuntime, open_tmp_path: Path) -> None:
    before = dict(os.environ)
    evil = {"LD_PRELOAD": "/nonexistent/evil.so", "PATH": str(open_tmp_path), "LD_LIBRARY_PATH": str(open_tmp_path)}
    spec = spec_in(open_tmp_path / "attempt", ["/bin/sh", "-c", 'echo "$PATH"; /bin/sleep 30'], env=evil)
    sink = Sink()
    run = asyncio.create_task(runtime.run(spec, sink))

    async def started() -> str:
        return sink.text()

    assert (await eventually(started, 10, what="the job to start")).strip() == str(open_tmp_path)
    watchdog = runtime.watchdog.pid
    assert watchdog is not None
    environ = Path(f"/proc/{watchdog}/environ").read_bytes().split(b"\0")
    assert not any(v.startswith((b"LD_PRELOAD=", b"LD_LIBRARY_PATH=")) for v in environ)
    assert dict(os.environ) == before  # the worker's own environment is untouched
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_workdir_the_job_user_cannot_enter_fails_saying_so(
    runtime: ProcessRuntime, open_tmp_path: Path
) -> None:
    private = open_tmp_path / "private"
    private.mkdir(mode=0o700)
    result = await runtime.run(spec_in(open_tmp_path / "attempt", ["pwd"], workdir=str(private)), Sink())
    assert result.reason == "failed"
    assert result.error == f"workdir {private} is not accessible to the job user nobody"


async def test_a_job_run_as_the_job_user_dies_with_its_worker(runtime: ProcessRuntime, open_tmp_path: Path) -> None:
    pidfile = open_tmp_path / "pid"
    spec = spec_in(open_tmp_path / "attempt", ["sh", "-c", f"echo $$ > {pidfile}; exec sleep 60"])
    run = asyncio.create_task(runtime.run(spec, Sink()))

    async def pid() -> int:
        text = pidfile.read_text().strip() if pidfile.exists() else ""
        return int(text) if text else 0

    job = await eventually(pid, 10, what="the job to write its pid")
    assert Path(f"/proc/{job}/status").read_text().count(f"\t{NOBODY.pw_uid}\t") >= 1
    runtime.watchdog.close()  # what the worker's death does: end-of-file on the watchdog's pipe

    async def gone() -> bool:
        try:
            state = Path(f"/proc/{job}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            return True
        return state == "Z"

    assert await eventually(gone, 10, what="the job to die with its worker")
    run.cancel()
    with pytest.raises(asyncio.CancelledError):
        await run


async def test_a_missing_command_is_reported_as_not_found_also_as_the_job_user(
    runtime: ProcessRuntime, open_tmp_path: Path
) -> None:
    # the worker's PATH may hold directories nobody cannot search (EACCES), which must not hide "not found"
    spec = spec_in(open_tmp_path / "attempt", ["no-such-command-anywhere"], env={"PATH": f"/root:{open_tmp_path}"})
    result = await runtime.run(spec, Sink())
    assert (result.reason, result.exit_code, result.error) == (
        "failed",
        127,
        "command not found: no-such-command-anywhere",
    )


async def test_a_program_the_job_user_may_not_run_is_refused_saying_as_whom(
    runtime: ProcessRuntime, open_tmp_path: Path
) -> None:
    program = open_tmp_path / "roots-only"
    program.write_text("#!/bin/sh\necho ran\n")
    os.chmod(program, 0o700)  # root may run it; nobody may not
    result = await runtime.run(spec_in(open_tmp_path / "attempt", [str(program)]), Sink())
    assert (result.reason, result.exit_code) == ("failed", 126)
    assert result.error == f"permission denied: {program} (as user nobody)"
