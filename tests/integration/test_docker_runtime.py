"""DockerRuntime against a real Docker Engine.

Start one with ``eval "$(scripts/docker-engine.sh | tail -n1)"`` (it also builds ``scaleq-test/busybox:latest``).
These tests fail, never skip, when DOCKER_HOST is not set: a silently skipped runtime suite hides regressions.
The ``runtime`` fixture runs each of its tests both ways ``/outputs`` can go: bind-mounted (an engine on this host)
and copied out of a volume (what a remote engine gets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import secrets
import stat
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from scaleq.jobs import InputFile, JobDefinition, SubmitRequest
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from scaleq.worker import transfer
from scaleq.worker.agent import WorkerAgent, WorkerConfig
from scaleq.worker.runtime.base import RunSpec, RuntimeUnavailable
from scaleq.worker.runtime.docker import DockerRuntime, OutputsMode, _adopt_outputs, _extract_outputs
from tests.helpers import eventually, serve
from tests.helpers.engine import BUSYBOX

pytestmark = pytest.mark.docker


@pytest.fixture
def worker_id() -> str:
    return f"w-test-{secrets.token_hex(4)}"


def managed(engine: docker.DockerClient, worker_id: str) -> tuple[list[Any], list[Any]]:
    labels = {"label": ["scaleq.managed=true", f"scaleq.worker={worker_id}"]}
    return engine.containers.list(all=True, filters=labels), engine.volumes.list(filters=labels)


@pytest.fixture(autouse=True)
def _nothing_left_behind(engine: docker.DockerClient, worker_id: str) -> Iterator[None]:
    yield
    containers, volumes = managed(engine, worker_id)
    assert (containers, volumes) == ([], []), "the runtime left containers or volumes behind"


@pytest.fixture(params=["bind", "archive"])
def runtime(engine: docker.DockerClient, request: pytest.FixtureRequest) -> DockerRuntime:
    mode: OutputsMode = request.param
    return DockerRuntime(pull=False, kill_grace=1, outputs=mode)


ROOT = os.geteuid() == 0  # auto mode binds /outputs only for a root worker (CI runs as root; both are asserted)


class Sink:
    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes, float]] = []
        self.event = asyncio.Event()

    async def __call__(self, stream: str, data: bytes) -> None:
        self.chunks.append((stream, data, time.monotonic()))
        self.event.set()

    def text(self, stream: str) -> str:
        return b"".join(d for s, d, _ in self.chunks if s == stream).decode()


def make_spec(tmp_path: Path, worker_id: str, command: list[str], **definition: Any) -> RunSpec:
    (tmp_path / "in").mkdir(exist_ok=True)
    return RunSpec(
        job_id=secrets.token_hex(32),
        attempt=1,
        worker_id=worker_id,
        definition=JobDefinition(image=definition.pop("image", BUSYBOX), command=command, **definition),
        inputs_dir=tmp_path / "in",
        outputs_dir=tmp_path / "out",
    )


def sh(script: str) -> list[str]:
    return ["sh", "-c", script]


async def test_success_streams_stdout_and_stderr(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    sink = Sink()
    # the job holds until the test opens its gate (a file made in the container): lines must arrive before that
    script = "echo out1; echo err1 >&2; while [ ! -e /tmp/gate ]; do sleep 0.05; done; echo out2"
    task = asyncio.create_task(runtime.run(make_spec(tmp_path, worker_id, sh(script)), sink))

    async def first_lines() -> bool:
        return sink.text("stdout") == "out1\n" and sink.text("stderr") == "err1\n"

    try:
        await eventually(first_lines, 20, what="the first lines while the job still runs", every=0.05)
        [container] = managed(engine, worker_id)[0]
        assert container.exec_run(["touch", "/tmp/gate"]).exit_code == 0
    finally:
        res = await asyncio.wait_for(task, 30)
    assert (res.reason, res.exit_code, res.error) == ("success", 0, None)
    assert sink.text("stdout") == "out1\nout2\n"
    assert sink.text("stderr") == "err1\n"


async def test_a_quiet_job_keeps_its_log_stream(tmp_path: Path, worker_id: str) -> None:
    # Quiet for longer than the API timeout: the log stream must not time out (and drop what follows).
    sink = Sink()
    runtime = DockerRuntime(pull=False, api_timeout=1)
    res = await runtime.run(make_spec(tmp_path, worker_id, sh("echo before; sleep 2.5; echo after")), sink)
    assert res.reason == "success"
    assert sink.text("stdout") == "before\nafter\n"


async def test_nonzero_exit_fails(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    res = await runtime.run(make_spec(tmp_path, worker_id, sh("exit 3")), Sink())
    assert (res.reason, res.exit_code) == ("failed", 3)


async def test_command_not_found(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    res = await runtime.run(make_spec(tmp_path, worker_id, ["no-such-command"]), Sink())
    assert (res.reason, res.exit_code) == ("failed", 127)
    assert "no-such-command" in (res.error or "")


async def test_env_workdir_and_entrypoint(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    sink = Sink()
    spec = make_spec(
        tmp_path,
        worker_id,
        ['echo "$FOO|$(pwd)|$SCALEQ_JOB_ID|$SCALEQ_ATTEMPT|$SCALEQ_INPUTS|$SCALEQ_OUTPUTS"'],
        entrypoint=["sh", "-c"],
        env={"FOO": "bar baz"},
        workdir="/tmp",
    )
    res = await runtime.run(spec, sink)
    assert res.reason == "success", res
    assert sink.text("stdout").strip() == f"bar baz|/tmp|{spec.job_id}|1|/inputs|/outputs"


async def test_inputs_are_visible_and_read_only(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    files = {"a.txt": b"alpha\n", "sub/dir/b.txt": b"beta\n"}
    inputs = []
    for rel, data in files.items():
        path = tmp_path / "in" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        inputs.append(InputFile(path=rel, sha256=hashlib.sha256(data).hexdigest(), size=len(data)))
    script = (
        "cat /inputs/a.txt /inputs/sub/dir/b.txt; "
        "if echo x > /inputs/new 2>/dev/null || touch /inputs/a.txt 2>/dev/null; then echo WRITABLE; "
        "else echo read-only; fi; ls -l /inputs/a.txt"
    )
    sink = Sink()
    res = await runtime.run(make_spec(tmp_path, worker_id, sh(script), inputs=inputs), sink)
    assert res.reason == "success", (res, sink.text("stderr"))
    lines = sink.text("stdout").splitlines()
    assert lines[:3] == ["alpha", "beta", "read-only"]
    assert lines[3].startswith("-r--r--r--")  # the declared mode (0o444 by default)


async def test_outputs_are_collected(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    script = (
        "mkdir -p /outputs/a/b/empty && echo deep > /outputs/a/b/c.txt && echo top > /outputs/top.txt "
        "&& ln -s /etc/passwd /outputs/link"
    )
    sink = Sink()
    res = await runtime.run(make_spec(tmp_path, worker_id, sh(script)), sink)
    assert res.reason == "success", res
    out = tmp_path / "out"
    assert (out / "a" / "b" / "c.txt").read_text() == "deep\n"
    assert (out / "top.txt").read_text() == "top\n"
    assert (out / "a" / "b" / "empty").is_dir()
    assert not (out / "link").exists() and not (out / "link").is_symlink()
    assert "output link skipped" in sink.text("stderr")


async def test_outputs_are_only_what_the_job_wrote(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    # An image that already has a file in /outputs: it must not be copied into the outputs volume.
    base = engine.containers.create(BUSYBOX, ["true"])
    base.put_archive("/", _tar({"outputs/baked.txt": b"from the image"}))
    image = f"scaleq-test/baked:{worker_id}"
    base.commit(*image.split(":"))
    base.remove()
    try:
        res = await runtime.run(make_spec(tmp_path, worker_id, sh("echo new > /outputs/new.txt"), image=image), Sink())
        assert res.reason == "success"
        assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"]
    finally:
        engine.images.remove(image)


def test_output_extraction_refuses_unsafe_members(tmp_path: Path) -> None:
    members = {
        "outputs/ok.txt": b"ok",
        "outputs/../escape.txt": b"no",
        "/outputs/abs.txt": b"no",
    }
    data = _tar(members, links={"outputs/sym": "/etc/passwd", "outputs/hard": "outputs/ok.txt"})
    dest = tmp_path / "out"
    skipped = _extract_outputs(iter([data[:700], data[700:]]), dest)
    assert sorted(p.name for p in dest.iterdir()) == ["ok.txt"]
    assert sorted(skipped) == ["../escape.txt", "/outputs/abs.txt", "hard", "sym"]
    assert not (tmp_path / "escape.txt").exists()


def test_adoption_of_bind_mounted_outputs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    deep = out
    for _ in range(1100):  # deeper than Python's recursion limit, shorter than PATH_MAX
        deep /= "d"
        deep.mkdir(parents=deep.parent == out)
    try:
        (deep / "f.txt").write_text("deep")
        (out / "suid").write_text("x")
        (out / "suid").chmod(0o4777)
        (out / "passwd").symlink_to("/etc/passwd")
        (out / "dir-link").symlink_to(tmp_path)
        os.mkfifo(out / "d" / "fifo")
        skipped = _adopt_outputs(out)
        assert sorted(skipped) == ["d/fifo", "dir-link", "passwd"]
        assert (deep / "f.txt").read_text() == "deep"
        assert stat.S_IMODE((out / "suid").stat().st_mode) == 0o755
        assert sorted(p.name for p in out.iterdir()) == ["d", "suid"]
        with pytest.raises(OSError):
            _adopt_outputs(out / "suid")  # not a directory
    finally:  # shutil.rmtree (pytest's clean-up too) recurses, so too deep for it: one level at a time
        (deep / "f.txt").unlink(missing_ok=True)
        while deep != out:
            deep.rmdir()
            deep = deep.parent


def _tar(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE if target.startswith("/") else tarfile.LNKTYPE
            info.linkname = target
            tar.addfile(info)
    return buf.getvalue()


async def test_timeout_stops_and_removes_the_container(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    spec = make_spec(tmp_path, worker_id, sh('trap "" TERM; echo started; sleep 300'), max_duration=1)
    async with asyncio.timeout(60):  # the job sleeps for 300 s: ending at all is the runtime's doing
        res = await runtime.run(spec, Sink())
    assert res.reason == "timed_out"
    assert res.exit_code == 137  # SIGTERM ignored: killed after the grace
    assert "max_duration" in (res.error or "")
    assert managed(engine, worker_id) == ([], [])


async def test_cancellation_removes_the_container(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    sink = Sink()
    task = asyncio.create_task(runtime.run(make_spec(tmp_path, worker_id, sh("echo started; sleep 30")), sink))
    await asyncio.wait_for(sink.event.wait(), 10)
    assert len(managed(engine, worker_id)[0]) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert managed(engine, worker_id) == ([], [])


async def test_cancellation_with_inputs_removes_the_volume(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x").write_bytes(b"x")
    inputs = [InputFile(path="x", sha256=hashlib.sha256(b"x").hexdigest(), size=1)]
    sink = Sink()
    spec = make_spec(tmp_path, worker_id, sh("echo started; sleep 30"), inputs=inputs)
    task = asyncio.create_task(runtime.run(spec, sink))
    await asyncio.wait_for(sink.event.wait(), 10)
    containers, volumes = managed(engine, worker_id)
    assert (len(containers), len(volumes)) == (1, 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_memory_and_cpu_limits_are_applied(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    sink = Sink()
    spec = make_spec(tmp_path, worker_id, sh("echo ready; sleep 1"), requirements={"memory": "64m", "cpus": 0.5})
    task = asyncio.create_task(runtime.run(spec, sink))
    await asyncio.wait_for(sink.event.wait(), 10)
    [container] = managed(engine, worker_id)[0]
    host = container.attrs["HostConfig"]
    assert container.labels["scaleq.job"] == spec.job_id and container.labels["scaleq.attempt"] == "1"
    assert (host["Memory"], host["MemorySwap"], host["NanoCpus"]) == (64 << 20, 64 << 20, 500_000_000)
    assert host["NetworkMode"] == "none"
    assert (await task).reason == "success"


async def test_gpus_become_a_device_request(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    spec = make_spec(tmp_path, worker_id, ["true"], requirements={"gpus": 2})
    container = await runtime.create_container(spec)
    try:
        container.reload()
        [request] = container.attrs["HostConfig"]["DeviceRequests"]
        assert (request["Count"], request["Capabilities"]) == (2, [["gpu"]])
    finally:
        container.remove(force=True, v=True)
    # This machine has no GPU runtime: the start fails, clearly, and nothing is left behind.
    res = await runtime.run(spec, Sink())
    assert res.reason == "failed"
    assert "did not start" in (res.error or "") and "GPU" in (res.error or "")


async def test_out_of_memory(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    script = "x=$(head -c 50000000 /dev/zero | tr '\\0' a); echo survived"
    res = await runtime.run(make_spec(tmp_path, worker_id, sh(script), requirements={"memory": "8m"}), Sink())
    assert res.reason == "failed"
    assert res.exit_code == 137
    assert res.error == "out of memory (OOMKilled; limit 8 MiB)"


async def test_missing_image(tmp_path: Path, worker_id: str) -> None:
    res = await DockerRuntime(pull=False).run(
        make_spec(tmp_path, worker_id, ["true"], image="scaleq-test/nope:1"), Sink()
    )
    assert res.reason == "failed"
    assert (res.error or "").startswith("image scaleq-test/nope:1 not found")
    # Pulling from a registry that is not there fails the attempt too, without raising.
    image = "127.0.0.1:9/scaleq/nope:1"
    res = await DockerRuntime(pull=True).run(make_spec(tmp_path, worker_id, ["true"], image=image), Sink())
    assert res.reason == "failed"
    assert (res.error or "").startswith(f"image {image} not found: ")


async def test_host_network_needs_permission(tmp_path: Path, worker_id: str) -> None:
    spec = make_spec(tmp_path, worker_id, sh("cat /proc/net/dev | grep -c :"), network="host")
    refused = await DockerRuntime(pull=False).run(spec, Sink())
    assert refused.reason == "failed" and "host" in (refused.error or "")
    sink = Sink()
    allowed = await DockerRuntime(pull=False, allow_host_network=True).run(spec, sink)
    assert allowed.reason == "success", allowed
    assert int(sink.text("stdout")) > 1  # more than lo: the host's interfaces


async def test_cleanup_orphans(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    spec = make_spec(tmp_path, worker_id, ["true"])
    for _ in range(2):
        await runtime.create_container(spec)
    labels = {"scaleq.managed": "true", "scaleq.worker": worker_id}
    engine.volumes.create(name=f"scaleq-test-orphan-{worker_id}", labels=labels)
    other = make_spec(tmp_path, f"{worker_id}-other", ["true"])
    keep = await runtime.create_container(other)
    try:
        assert await runtime.cleanup_orphans(worker_id) == 3
        assert managed(engine, worker_id) == ([], [])
        keep.reload()  # another worker's container is not touched
    finally:
        keep.remove(force=True, v=True)


async def test_check(runtime: DockerRuntime) -> None:
    await runtime.check()
    with pytest.raises(RuntimeUnavailable, match="DOCKER_HOST"):
        await DockerRuntime(base_url="unix:///nonexistent/docker.sock").check()


async def test_auto_binds_outputs_on_this_hosts_engine(
    engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    runtime = DockerRuntime(pull=False)
    assert runtime.local is (None if ROOT else False)  # root: decided by the first attempt's probe
    spec = make_spec(tmp_path, worker_id, ["true"])
    container = await runtime.create_container(spec)
    try:
        container.reload()
        mounts = {m["Destination"]: m for m in container.attrs["Mounts"]}
        if not ROOT:  # a worker that could not re-own what the job writes: the volume, copied out
            assert runtime.local is False and mounts["/outputs"]["Type"] == "volume"
            assert container.attrs["HostConfig"]["NetworkMode"] == "none"
            return
        assert runtime.local is True
        assert (mounts["/outputs"]["Type"], mounts["/outputs"]["Source"]) == ("bind", str(spec.outputs_dir.resolve()))
        assert (mounts["/etc/hosts"]["Type"], mounts["/etc/hosts"]["RW"]) == ("bind", False)
        # network none without the engine's sandbox: still "none", and no network at all
        assert container.attrs["HostConfig"]["NetworkMode"] == "none"
        assert container.attrs["Config"].get("NetworkDisabled") is True
    finally:
        container.remove(force=True, v=True)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".scaleq-probe")] == []  # the probe cleaned up


async def test_no_network_is_only_loopback(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    script = "cat /proc/net/dev | grep -c :; cat /sys/class/net/lo/flags; grep -c '^127.0.0.1\\slocalhost$' /etc/hosts"
    sink = Sink()
    res = await runtime.run(make_spec(tmp_path, worker_id, sh(script)), sink)
    assert res.reason == "success", (res, sink.text("stderr"))
    interfaces, lo_flags, localhost = sink.text("stdout").split()
    assert interfaces == "1"  # lo, and nothing else
    assert int(lo_flags, 16) & 1  # lo is up
    assert localhost == "1"  # and localhost resolves through /etc/hosts


async def test_outputs_cannot_lead_outside(runtime: DockerRuntime, tmp_path: Path, worker_id: str) -> None:
    # Links to the host's (and the container's) files, a fifo, modes and owners the worker could not read.
    script = (
        "mkdir -p /outputs/d/sub && echo kept > /outputs/d/sub/f.txt && echo top > /outputs/top.txt "
        "&& ln -s / /outputs/root && ln -s /etc/passwd /outputs/d/passwd && ln -s ../../.. /outputs/d/sub/up "
        "&& ln -s top.txt /outputs/inside && mkfifo /outputs/fifo "
        "&& echo secret > /outputs/locked && chmod 4000 /outputs/locked && chown 65534:65534 /outputs/locked "
        "&& chmod 000 /outputs/d/sub"
    )
    sink = Sink()
    res = await runtime.run(make_spec(tmp_path, worker_id, sh(script)), sink)
    assert res.reason == "success", (res, sink.text("stderr"))
    out = tmp_path / "out"
    found = {str(p.relative_to(out)): p.lstat() for p in out.rglob("*")}
    assert sorted(found) == ["d", "d/sub", "d/sub/f.txt", "locked", "top.txt"]
    for path, st in found.items():
        assert stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode), path
        assert st.st_uid == os.geteuid(), path
        assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID | 0o022), (path, oct(st.st_mode))
    assert (out / "locked").read_text() == "secret\n"
    assert (out / "d" / "sub" / "f.txt").read_text() == "kept\n"
    for name in ("root", "d/passwd", "d/sub/up", "inside", "fifo"):
        assert f"output {name} skipped" in sink.text("stderr")
    # what the worker uploads: these files, nothing from outside
    assert transfer.pack_outputs(out, tmp_path / "out.tar")
    with tarfile.open(tmp_path / "out.tar") as t:
        assert sorted(t.getnames()) == ["d/sub/f.txt", "locked", "top.txt"]


async def test_a_removed_image_is_checked_again(
    runtime: DockerRuntime, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    image = f"scaleq-test/gone:{worker_id}"
    engine.images.get(BUSYBOX).tag(image)
    res = await runtime.run(make_spec(tmp_path, worker_id, ["true"], image=image), Sink())
    assert res.reason == "success"  # its presence is now cached
    engine.images.remove(image)
    res = await runtime.run(make_spec(tmp_path, worker_id, ["true"], image=image), Sink())
    assert res.reason == "failed"
    assert (res.error or "").startswith(f"image {image} not found: not present on this worker")


def test_an_engine_that_does_not_see_the_outputs_dir_gets_the_archive(tmp_path: Path, worker_id: str) -> None:
    # The worker in a mount namespace of its own, with a tmpfs the engine does not see where the outputs go (as a
    # worker in a container with the engine's socket): auto mode must notice and copy /outputs out instead. (Making
    # the mount namespace needs root; a worker that is not root copies /outputs out anyway: asserted below.)
    work = tmp_path / "private"
    work.mkdir()
    script = textwrap.dedent(
        f"""
        import asyncio, json, secrets
        from pathlib import Path
        from scaleq.jobs import JobDefinition
        from scaleq.worker.runtime.base import RunSpec
        from scaleq.worker.runtime.docker import DockerRuntime

        async def main():
            work = Path({str(work)!r})
            (work / "in").mkdir()
            definition = JobDefinition(image={BUSYBOX!r}, command=["sh", "-c", "echo hi > /outputs/x.txt"])
            spec = RunSpec(secrets.token_hex(32), 1, {worker_id!r}, definition, work / "in", work / "out")
            async def sink(stream, data): pass
            runtime = DockerRuntime(pull=False)
            res = await runtime.run(spec, sink)
            print(json.dumps([res.reason, runtime.local, (work / "out" / "x.txt").read_text()]))

        asyncio.run(main())
        """
    )
    mount = f'mount -t tmpfs tmpfs {work} && exec {sys.executable} -c "$0"'
    isolate = ["unshare", "--mount", "--propagation", "private"] if ROOT else []
    done = subprocess.run(
        [*isolate, "sh", "-c", mount if ROOT else f'exec {sys.executable} -c "$0"', script],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == '["success", false, "hi\\n"]'


async def test_a_killed_workers_container_is_removed_by_a_worker_on_the_same_engine(
    sqlite_store: SQLiteStore, engine: docker.DockerClient, tmp_path: Path, worker_id: str
) -> None:
    """kill -9 of a ``scaleq worker`` mid-job leaves its container running on the engine: once the server has ended
    that attempt (its lease ran out), a worker on the same engine stops and removes it."""
    settings = ServerSettings(lease_seconds=3.0, sweep_interval=0.2, long_poll_max=2.0)
    doomed_labels = {"label": ["scaleq.managed=true", f"scaleq.worker={worker_id}"]}
    async with serve(sqlite_store, settings) as live:
        doomed = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "scaleq", "worker", "--queue", "q", "--runtime", "docker", "--slots", "1"),
            *("--worker-id", worker_id, "--server", live.url, "--token", live.tokens["worker"]),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        rescuer = WorkerAgent(
            WorkerConfig(
                server=live.url,
                token=live.tokens["worker"],
                queue="q",
                runtimes={"docker": DockerRuntime(pull=False, kill_grace=1)},
                slots=1,
                worker_id=f"{worker_id}-rescuer",
                cpus=1.0,
                work_dir=tmp_path,
            )
        )
        rescue: asyncio.Task[int] | None = None
        job_ids: list[str] = []
        try:
            async with live.client("submit") as c:
                definition = JobDefinition(image=BUSYBOX, command=["sleep", "1000"], max_duration=600)
                job, _ = await c.submit(SubmitRequest(queue="q", definition=definition))
                job_ids.append(job.id)

            async def running() -> list[Any]:
                return engine.containers.list(filters={**doomed_labels, "status": "running"})

            (first,) = await eventually(running, timeout=30, what="the first run's container")
            doomed.kill()
            await doomed.wait()
            rescue = asyncio.create_task(rescuer.run())

            async def removed() -> bool:
                return engine.containers.list(all=True, filters=doomed_labels) == []

            # the lease runs out (3 s), then the rescuer's next look (once per lease) removes the container
            await eventually(removed, timeout=3 * settings.lease_seconds + 5, what="the dead worker's container")
            attempts = await live.store.list_attempts(job.id)
            assert attempts[0].worker_id == worker_id and attempts[0].outcome == "lost"
        finally:
            if rescue is not None:
                rescuer.request_drain()
                rescuer.request_drain()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(rescue, 15)
            if doomed.returncode is None:
                doomed.kill()
                await doomed.wait()
            for job_id in job_ids:
                for leftover in engine.containers.list(all=True, filters={"label": [f"scaleq.job={job_id}"]}):
                    leftover.remove(force=True, v=True)
