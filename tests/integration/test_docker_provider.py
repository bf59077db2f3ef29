"""DockerProvider against the real engine and the real worker image (``scripts/worker-image.sh``).

The worker containers run with host networking and reach the live test server on 127.0.0.1. Start an engine with
``eval "$(scripts/docker-engine.sh | tail -n1)"`` (it also builds ``scaleq-test/busybox:latest``); the worker image
is built here when it is missing or out of date (about 2 minutes the first time, a few seconds after a source
change). These tests fail, never skip, without an engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from scaleq.client import Client
from scaleq.grid import Group
from scaleq.jobfile import collect_inputs, encode_blobs
from scaleq.jobs import JobDefinition, Requirements, RuntimeKind, SubmitRequest
from scaleq.providers.base import ProviderError
from scaleq.providers.docker import DEFAULT_IMAGE, DockerProvider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, controlling, eventually
from tests.helpers.drivers import never_registering
from tests.helpers.engine import BUSYBOX
from tests.helpers.groups import fast_group

# a cold build of the worker image (debootstrap, wheels) takes about 2 minutes, inside the first test's time
pytestmark = [pytest.mark.docker, pytest.mark.timeout(400)]
ROOT = Path(__file__).resolve().parents[2]
BAD_HOST = "DOCKER_HOST=unix:///nonexistent/scaleq/docker.sock"
GATE = "/tmp/scaleq-test-gate"  # in a worker container, where its process jobs run


@pytest.fixture(scope="session")
def worker_image(engine: docker.DockerClient) -> str:
    """The real worker image, (re)built by the script when missing or stale (the script decides: source hash)."""
    started = time.monotonic()
    r = subprocess.run(
        [str(ROOT / "scripts" / "worker-image.sh")], capture_output=True, text=True, timeout=900, cwd=ROOT
    )
    if r.returncode != 0:
        pytest.fail(f"scripts/worker-image.sh failed (exit {r.returncode}):\n{r.stderr[-4000:]}", pytrace=False)
    print(f"worker image ready in {time.monotonic() - started:.1f} s: {r.stderr.strip().splitlines()[-1]}")
    return DEFAULT_IMAGE


@pytest.fixture
def grid_name() -> str:
    return f"t{secrets.token_hex(3)}"


def labelled(engine: docker.DockerClient, *labels: str) -> tuple[list[Any], list[Any]]:
    filters = {"label": ["scaleq.managed=true", *labels]}
    # ignore_removed: a short-lived helper (the inputs volume's) may go between the listing and its inspect
    containers = engine.containers.list(all=True, filters=filters, ignore_removed=True)
    return containers, engine.volumes.list(filters=filters)


@pytest.fixture
def cleanup(engine: docker.DockerClient, grid_name: str) -> Iterator[set[str]]:
    """Remove whatever a test left with its grid's label, and its workers' job containers and volumes."""
    worker_ids: set[str] = set()
    yield worker_ids
    containers, _ = labelled(engine, f"scaleq.grid={grid_name}")
    worker_ids |= {c.labels.get("scaleq.worker-id", "") for c in containers}
    for c in containers:
        with contextlib.suppress(docker.errors.NotFound):
            c.remove(force=True, v=True)
    for w in worker_ids:
        containers, volumes = labelled(engine, f"scaleq.worker={w}")
        for obj in [*containers, *volumes]:
            with contextlib.suppress(docker.errors.NotFound):
                obj.remove(force=True)


def group(name: str = "box", **kw: Any) -> Group:
    return fast_group(name, **{"provider": "docker", **kw})


def provider_for(live: LiveServer, grid_name: str, **kw: Any) -> DockerProvider:
    return DockerProvider(grid=grid_name, server=live.url, token=live.tokens["worker"], **kw)


async def running(provider: DockerProvider, g: Group, n: int) -> bool:
    return len([w for w in await provider.workers(g) if w.status == "running"]) == n


async def finished(c: Client, job_id: str, reason: str = "success") -> bool:
    job = await c.get_job(job_id)
    assert job.state != "finished" or job.reason == reason, f"job {job_id[:12]} finished {job.reason}: {job.error}"
    return job.state == "finished"


async def jobs_running(c: Client, ids: list[str], n: int) -> bool:
    return sum([(await c.get_job(i)).state == "running" for i in ids]) == n


async def registered(c: Client, ids: set[str]) -> bool:
    return ids <= {w.id for w in await c.workers() if w.state == "active"}


async def stdout_of(c: Client, job_id: str) -> str:
    page = await c.logs(job_id)
    return "".join(ch["data"] for ch in page["chunks"] if ch["stream"] == "stdout")


async def test_controller_scales_worker_containers_from_zero_to_three_and_back(
    live: LiveServer, worker_image: str, engine: docker.DockerClient, grid_name: str, cleanup: set[str]
) -> None:
    g, provider = group(), provider_for(live, grid_name)
    admin = live.client("admin")
    controller = Controller([(g, provider)], RemoteObserver(admin), tick=0.2)
    try:
        async with controlling(controller):
            submitted = time.monotonic()
            ids = []
            for i in range(6):
                # each job holds until the test opens the gate in its worker's container, once all three run one
                script = f"while [ ! -e {GATE} ]; do sleep 0.05; done; echo {i}"
                job, _ = await admin.submit(
                    SubmitRequest(queue="q", definition=JobDefinition(command=["sh", "-c", script]))
                )
                ids.append(job.id)
            await eventually(lambda: running(provider, g, 3), timeout=15, what="3 worker containers running")
            up = time.monotonic() - submitted
            containers, _ = labelled(engine, f"scaleq.grid={grid_name}", "scaleq.group=box")
            assert len(containers) == 3 and all(c.status == "running" for c in containers)
            await eventually(lambda: jobs_running(admin, ids, 3), timeout=40, what="a job on each worker container")
            for c in containers:
                assert c.exec_run(["touch", GATE]).exit_code == 0
            for job_id in ids:
                await eventually(lambda j=job_id: finished(admin, j), timeout=40, what=f"job {job_id[:12]}")
            for i, job_id in enumerate(ids):
                assert await stdout_of(admin, job_id) == f"{i}\n"
            workers = {a["worker_id"] for j in ids for a in await admin.attempts(j)}
            assert len(workers) == 3, "the six jobs ran on the three worker containers"
            await eventually(lambda: running(provider, g, 0), timeout=30, what="back to 0 workers")
            # drained workers exit 0, and list() removes their containers
            await eventually(
                lambda: _none(engine, f"scaleq.grid={grid_name}"), timeout=10, what="no worker containers left"
            )
            await eventually(lambda: _current(admin, 0), timeout=5, what="the group's recorded status at 0")
        print(f"3 worker containers running {up:.1f} s after the first submit")
        events = await admin.events(group="box", limit=100)
        kinds = [e["kind"] for e in events]
        assert "scale_up" in kinds and "scale_down" in kinds
        assert all(e["reason"] for e in events)
        scale_up = next(e for e in reversed(events) if e["kind"] == "scale_up")
        assert "waiting" in scale_up["reason"]
        (status,) = await admin.groups()
        assert status["current"] == 0 and status["max"] == 3 and status["provider"] == "docker"
    finally:
        await provider.destroy(g, grace=5)
        await provider.close()
        await admin.close()


async def _current(c: Client, n: int) -> bool:
    (status,) = await c.groups()
    return status["current"] == n


async def _none(engine: docker.DockerClient, *labels: str) -> bool:
    containers, _ = await asyncio.to_thread(labelled, engine, *labels)
    return not containers


async def test_container_job_runs_docker_out_of_docker(
    live: LiveServer, worker_image: str, engine: docker.DockerClient, grid_name: str, cleanup: set[str], tmp_path: Path
) -> None:
    g = group(
        "dood",
        max_workers=1,
        runtimes=[RuntimeKind.docker],
        resources=Requirements(cpus=1, memory="512m"),
        env={"SCALEQ_EXAMPLE": "1"},
    )
    provider = provider_for(live, grid_name)
    admin = live.client("admin")
    try:
        (worker_id,) = await provider.start(g, 1)
        cleanup.add(worker_id)
        # what the provider created: name, labels, limits, host network, no restarts, the engine's socket
        c = engine.containers.get(f"scaleq-{worker_id}")
        labels = c.labels
        assert labels["scaleq.managed"] == "true" and labels["scaleq.grid"] == grid_name
        assert labels["scaleq.group"] == "dood" and labels["scaleq.worker-id"] == worker_id
        assert labels["scaleq.version"] == g.version()
        host = c.attrs["HostConfig"]
        assert host["NetworkMode"] == "host" and host["RestartPolicy"]["Name"] in ("", "no") and host["Init"]
        assert host["NanoCpus"] == 1_000_000_000 and host["Memory"] == 512 * 2**20
        env = dict(e.split("=", 1) for e in c.attrs["Config"]["Env"])
        assert env["SCALEQ_TOKEN"] == live.tokens["worker"] and env["SCALEQ_EXAMPLE"] == "1"
        assert env["DOCKER_HOST"] == "unix:///var/run/docker.sock"
        (mount,) = c.attrs["Mounts"]
        assert mount["Destination"] == "/var/run/docker.sock"
        assert mount["Source"] == os.environ["DOCKER_HOST"].removeprefix("unix://")
        assert c.attrs["Config"]["Cmd"][:2] == ["scaleq", "worker"] and "--worker-id" in c.attrs["Config"]["Cmd"]
        await eventually(lambda: registered(admin, {worker_id}), timeout=20, what="the worker to register")

        (tmp_path / "in.txt").write_text("hello from the host\n")
        entries, blobs = collect_inputs([str(tmp_path / "in.txt")], tmp_path)
        definition = JobDefinition(
            image=BUSYBOX,
            command=["sh", "-c", "cat /inputs/in.txt; wc -c < /inputs/in.txt > /outputs/n.txt; echo done >&2"],
            inputs=entries,
            requirements=Requirements(cpus=0.5, memory="64m"),
        )
        job, _ = await admin.submit(SubmitRequest(queue="q", definition=definition, blobs=encode_blobs(blobs)))
        await eventually(lambda: finished(admin, job.id), timeout=40, what="the container job")
        assert await stdout_of(admin, job.id) == "hello from the host\n"
        (attempt,) = await admin.attempts(job.id)
        assert attempt["worker_id"] == worker_id and attempt["outcome"] == "success"
        outputs = {o["path"]: o for o in await admin.outputs(job.id)}
        assert set(outputs) == {"n.txt"}
        assert (await admin.output_bytes(job.id, "n.txt")).strip() == b"20"
        # the job container was a sibling on this engine, and is gone with its inputs volume
        assert labelled(engine, f"scaleq.worker={worker_id}") == ([], [])
    finally:
        removed = await provider.destroy(g, grace=5)
        await provider.close()
        await admin.close()
    assert removed == [worker_id]
    assert labelled(engine, f"scaleq.grid={grid_name}") == ([], [])


async def test_a_second_provider_adopts_by_label_and_destroy_leaves_nothing(
    live: LiveServer, worker_image: str, engine: docker.DockerClient, grid_name: str, cleanup: set[str], tmp_path: Path
) -> None:
    g = group("adopt", min_workers=2, max_workers=2, runtimes=[RuntimeKind.docker])
    first = provider_for(live, grid_name)
    admin = live.client("admin")
    second = provider_for(live, grid_name)
    try:
        ids = set(await first.start(g, 2))
        cleanup.update(ids)
        await eventually(lambda: registered(admin, ids), timeout=20, what="both workers to register")
        seen = await second.workers(g)
        assert {w.id for w in seen} == ids
        assert all(w.status == "running" and w.version == g.version() and w.group == "adopt" for w in seen)
        assert [w.id for w in seen] == [w.id for w in await first.workers(g)]
        assert await second.workers(group("other")) == []  # another group of the grid: not these

        # a long container job with an input: a job container and an inputs volume exist while destroy runs
        (tmp_path / "data.txt").write_text("x")
        entries, blobs = collect_inputs([str(tmp_path / "data.txt")], tmp_path)
        definition = JobDefinition(image=BUSYBOX, command=["sleep", "300"], inputs=entries)
        job, _ = await admin.submit(SubmitRequest(queue="q", definition=definition, blobs=encode_blobs(blobs)))

        async def job_container_running() -> bool:
            cs, vs = labelled(engine, f"scaleq.job={job.id}")
            return any(c.status == "running" for c in cs) and bool(vs)

        await eventually(job_container_running, timeout=20, what="the job's container and inputs volume")
        async with asyncio.timeout(60):  # the job sleeps for 300 s: destroy must not wait for it
            removed = await second.destroy(g, grace=2)
        assert set(removed) == ids
        assert labelled(engine, f"scaleq.grid={grid_name}") == ([], [])
        for w in ids:
            assert labelled(engine, f"scaleq.worker={w}") == ([], []), f"worker {w} left job containers or volumes"
        assert labelled(engine, f"scaleq.job={job.id}") == ([], [])
        assert await first.workers(g) == [] and await second.workers(g) == []
        # the draining workers handed the job back (second SIGTERM) rather than losing it
        assert (await admin.get_job(job.id)).state == "queued"
    finally:
        await first.destroy(g, grace=2)
        await first.close()
        await second.close()
        await admin.close()


async def test_health_names_docker_host_and_a_missing_image_names_the_build_script(
    live: LiveServer, engine: docker.DockerClient, grid_name: str, cleanup: set[str]
) -> None:
    good = provider_for(live, grid_name)
    health = await good.health()
    assert health.ok and os.environ["DOCKER_HOST"] in health.message and "Docker Engine" in health.message

    bad = provider_for(live, grid_name, docker_host=BAD_HOST.removeprefix("DOCKER_HOST="))
    health = await bad.health()
    assert not health.ok
    assert BAD_HOST in health.message
    assert "scripts/docker-engine.sh" in health.message
    with pytest.raises(ProviderError, match=re.escape(BAD_HOST)):
        await bad.start(group(), 1)
    with pytest.raises(ProviderError, match=re.escape(BAD_HOST)):
        await bad.workers(group())

    with pytest.raises(ProviderError) as e:
        await good.start(group(image="scaleq-test/no-such-worker:latest"), 1)
    assert "image scaleq-test/no-such-worker:latest not found" in str(e.value)
    assert "scripts/worker-image.sh" in str(e.value)
    assert labelled(engine, f"scaleq.grid={grid_name}") == ([], [])

    # a loopback server is out of reach of containers on another network: refused before anything is created
    isolated = provider_for(live, grid_name, network_mode="none")
    with pytest.raises(ProviderError, match="loopback"):
        await isolated.start(group(), 1)
    for p in (good, bad, isolated):
        await p.close()


async def test_containers_whose_workers_never_register_are_replaced_never_piled_up(
    engine: docker.DockerClient, worker_image: str, grid_name: str, cleanup: set[str], sqlite_store: SQLiteStore
) -> None:
    """Real worker containers pointed at a server address nothing answers: after startup_grace each is stopped and
    removed, its state said in an event, and the engine never runs more than max_workers of the group's."""
    g = group(max_workers=2, startup_grace=60, image=worker_image)
    p = DockerProvider(grid=grid_name, server="http://127.0.0.1:9", token="t")

    async def containers() -> int:  # an exited one holds nothing (the next listing removes it)
        found = labelled(engine, f"scaleq.grid={grid_name}", "scaleq.group=box")[0]
        return sum(1 for c in found if c.status not in ("exited", "dead"))

    try:
        events = await never_registering(p, g, sqlite_store, containers, rounds=2)
    finally:
        await p.destroy(g, grace=5)
        await p.close()
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 2 * g.max_workers
    assert all("startup_grace (60 s): container scaleq-" in e.reason for e in lapsed), lapsed[0]
