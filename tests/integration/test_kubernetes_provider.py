"""KubernetesProvider with the official ``kubernetes`` client against the Kubernetes stand-in
(``tests/standins/kubernetes_api.py``: kmock's emulator plus a kubelet model, label selectors, RBAC, graceful deletion,
and every written object validated against the Kubernetes 1.32 schema). The provider reaches it through a kubeconfig,
as it would a cluster. No real cluster runs here: what the stand-in does not model is listed in its docstring.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

from scaleq.client import Client
from scaleq.deploy import Deployer
from scaleq.doctor.remote import run_checks
from scaleq.grid import Grid, Group, KubernetesSettings
from scaleq.jobs import JobDefinition, Requirements, SubmitRequest
from scaleq.providers.base import ProviderError
from scaleq.providers.kubernetes import (
    GRID_LABEL,
    GROUP_LABEL,
    MANAGED_BY,
    TERMINATION_GRACE,
    VERSION_LABEL,
    WORKER_LABEL,
    KubernetesProvider,
    token_secret_name,
)
from scaleq.providers.registry import ProviderContext
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, controlling, eventually, free_port, serve
from tests.helpers.drivers import never_registering, refused_then_retried, taken_back
from tests.helpers.groups import fast_group
from tests.standins.kubernetes_api import KubernetesStandIn

NS = "scaleq"
IMAGE = "registry.example/scaleq/worker:1"


@pytest.fixture
def standin() -> Iterator[KubernetesStandIn]:
    with KubernetesStandIn(namespaces=(NS, "other")) as s:
        yield s


@pytest.fixture
def kubeconfig(standin: KubernetesStandIn, tmp_path: Path) -> Path:
    return standin.kubeconfig(tmp_path / "kubeconfig")


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No kubeconfig anywhere the client looks, and not in a cluster."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KUBECONFIG", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
async def server(sqlite_store: SQLiteStore, settings: ServerSettings) -> AsyncIterator[LiveServer]:
    async with serve(sqlite_store, settings) as live:
        yield live


def group(kubeconfig: Path | None, name: str = "cpu", **kw: object) -> Group:
    settings = KubernetesSettings(kubeconfig=str(kubeconfig) if kubeconfig else None, namespace=NS)
    fields = {"provider": "kubernetes", "image": IMAGE, "resources": Requirements(cpus=1), "kubernetes": settings}
    return fast_group(name, **{**fields, **kw})


@contextlib.asynccontextmanager
async def provider(
    g: Group, grid: str = "t", token: str = "worker-secret", server: str = "http://scaleq.example:8765"
) -> AsyncIterator[KubernetesProvider]:
    p = KubernetesProvider(grid=grid, server=server, token=token, settings=g.kubernetes)
    try:
        yield p
    finally:
        await p.close()


def api(kubeconfig: Path) -> k8s.CoreV1Api:
    return k8s.CoreV1Api(k8s_config.new_client_from_config(config_file=str(kubeconfig), persist_config=False))


async def running(p: KubernetesProvider, g: Group, n: int) -> bool:
    return [w.status for w in await p.workers(g)] == ["running"] * n


# -- start, list, adopt -------------------------------------------------------------------------------------------


async def test_start_creates_named_labelled_schema_valid_pods_and_the_token_secret(
    standin: KubernetesStandIn, kubeconfig: Path
) -> None:
    g = group(kubeconfig, resources=Requirements(cpus=1.5, memory="2GiB", gpus=1), env={"EXTRA": "1"})
    async with provider(g) as p:
        ids = await p.start(g, 2)
        assert len(ids) == 2 and len(set(ids)) == 2
        pods = {pod["metadata"]["name"]: pod for pod in standin.pods(NS)}
        assert set(pods) == set(ids)  # one pod per worker, named by the worker id
        for worker_id, pod in pods.items():
            assert pod["metadata"]["labels"] == {
                MANAGED_BY: "scaleq",
                GRID_LABEL: "t",
                GROUP_LABEL: "cpu",
                WORKER_LABEL: worker_id,
                VERSION_LABEL: g.version(),
            }
            spec = pod["spec"]
            assert spec["restartPolicy"] == "Never"
            assert spec["terminationGracePeriodSeconds"] == TERMINATION_GRACE
            (container,) = spec["containers"]
            assert container["image"] == IMAGE and container["command"] == ["scaleq"]
            args = container["args"]
            assert args[0] == "worker" and args[args.index("--worker-id") + 1] == worker_id
            assert args[args.index("--server") + 1] == "http://scaleq.example:8765"
            assert container["resources"] == {
                "requests": {"cpu": "1500m", "memory": "2Gi"},
                "limits": {"cpu": "1500m", "memory": "2Gi", "nvidia.com/gpu": "1"},
            }
            env = {e["name"]: e for e in container["env"]}
            assert env["EXTRA"]["value"] == "1"
            assert env["SCALEQ_TOKEN"] == {
                "name": "SCALEQ_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "scaleq-t-worker-token", "key": "token"}},
            }
            assert "worker-secret" not in json.dumps(pod)  # the token is never in the pod spec
            assert pod["status"]["qosClass"] == "Guaranteed"
        secret = standin.secret(NS, token_secret_name("t"))
        assert secret is not None and base64.b64decode(secret["data"]["token"]) == b"worker-secret"
        assert secret["metadata"]["labels"] == {MANAGED_BY: "scaleq", GRID_LABEL: "t"}
        # every object the provider wrote passed the Kubernetes 1.32 schema (strict) in the stand-in
        assert standin.rejected == []
        assert sorted(standin.validated) == sorted(
            [("Secret", NS, "scaleq-t-worker-token"), *(("Pod", NS, i) for i in ids)]
        )
        # Pending, then Running once the stand-in's kubelet starts them
        await eventually(lambda: running(p, g, 2), timeout=30)
        workers = await p.workers(g)
        assert {w.id for w in workers} == set(ids)
        assert all(w.version == g.version() and w.group == "cpu" and "standin-node" in w.detail for w in workers)


async def test_the_token_secret_follows_a_new_token(standin: KubernetesStandIn, kubeconfig: Path) -> None:
    g = group(kubeconfig)
    async with provider(g, token="first") as p:
        await p.start(g, 1)
    async with provider(g, token="second") as p:
        await p.start(g, 1)
    secret = standin.secret(NS, token_secret_name("t"))
    assert secret is not None and base64.b64decode(secret["data"]["token"]) == b"second"
    assert standin.rejected == []


async def test_a_secret_changed_between_read_and_update_is_read_again_not_overwritten(
    standin: KubernetesStandIn, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another writer changes the Secret after the provider read it: its update, carrying the version it read, is a
    409 Conflict (as the real API server answers it), and the provider decides again on a fresh read."""
    g = group(kubeconfig)
    async with provider(g, token="first") as p:
        await p.start(g, 1)
    other = api(kubeconfig)
    name = token_secret_name("t")
    real_read, real_patch = k8s.CoreV1Api.read_namespaced_secret, k8s.CoreV1Api.patch_namespaced_secret
    reads: list[str] = []
    answers: list[int] = []

    def read(self: k8s.CoreV1Api, *args: object, **kw: object) -> object:
        found = real_read(self, *args, **kw)
        reads.append(found.metadata.resource_version)
        if len(reads) == 1:  # the other writer gets in between the provider's read and its update
            real_patch(other, name, NS, {"metadata": {"annotations": {"touched-by": "someone-else"}}})
        return found

    def patch(self: k8s.CoreV1Api, *args: object, **kw: object) -> object:
        try:
            result = real_patch(self, *args, **kw)
        except k8s.ApiException as exc:
            answers.append(exc.status)
            raise
        answers.append(200)
        return result

    monkeypatch.setattr(k8s.CoreV1Api, "read_namespaced_secret", read)
    monkeypatch.setattr(k8s.CoreV1Api, "patch_namespaced_secret", patch)
    async with provider(g, token="second") as p:
        await p.start(g, 1)
    assert answers == [409, 200] and len(reads) == 2 and reads[1] != reads[0]
    secret = standin.secret(NS, name)
    assert secret is not None and base64.b64decode(secret["data"]["token"]) == b"second"
    assert secret["metadata"]["annotations"] == {"touched-by": "someone-else"}  # the other write was not lost


async def test_a_second_conflict_is_an_error_not_a_loop(
    standin: KubernetesStandIn, kubeconfig: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    g = group(kubeconfig)
    async with provider(g, token="first") as p:
        await p.start(g, 1)
    other = api(kubeconfig)
    real_read, real_patch = k8s.CoreV1Api.read_namespaced_secret, k8s.CoreV1Api.patch_namespaced_secret
    reads: list[int] = []

    def read(self: k8s.CoreV1Api, *args: object, **kw: object) -> object:
        found = real_read(self, *args, **kw)
        reads.append(1)
        real_patch(other, token_secret_name("t"), NS, {"metadata": {"annotations": {"n": str(len(reads))}}})
        return found

    monkeypatch.setattr(k8s.CoreV1Api, "read_namespaced_secret", read)
    async with provider(g, token="second") as p:
        with pytest.raises(ProviderError, match="409"):
            await p.start(g, 1)
    assert len(reads) == 2


async def test_the_stand_in_refuses_invalid_objects_as_the_api_server_does(
    standin: KubernetesStandIn, kubeconfig: Path
) -> None:
    """The validation hook is live: what the provider writes passes it because it is valid, not by default. (The
    request goes around the official client, which checks some of this itself.)"""
    bad_field = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "w", "image": "i", "restart": "no"}]},
    }
    long_label = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "y", "labels": {WORKER_LABEL: "w" * 64}},
        "spec": {"containers": [{"name": "w", "image": "i"}]},
    }
    gpu_request = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "z"},
        "spec": {"containers": [{"name": "w", "image": "i", "resources": {"requests": {"nvidia.com/gpu": "1"}}}]},
    }
    headers = {"Authorization": f"Bearer {standin.token}"}
    async with httpx.AsyncClient(base_url=standin.url, headers=headers, timeout=5) as http:
        for body in (bad_field, long_label, gpu_request):
            r = await http.post(f"/api/v1/namespaces/{NS}/pods", json=body)
            assert r.status_code == 422 and r.json()["reason"] == "Invalid", r.text
    assert len(standin.rejected) == 3 and "restart" in standin.rejected[0]
    assert standin.pods() == []


async def test_long_grid_and_group_names_still_make_valid_pod_names(
    standin: KubernetesStandIn, kubeconfig: Path
) -> None:
    g = group(kubeconfig, name="a-very-long-group-name-for-the-gpu-pool1")
    async with provider(g, grid="a-rather-long-grid-name-for-tests") as p:
        (worker_id,) = await p.start(g, 1)
    assert len(worker_id) <= 63 and standin.pod(NS, worker_id) is not None
    assert standin.rejected == []


async def test_a_second_provider_instance_adopts_the_pods_by_label(
    standin: KubernetesStandIn, kubeconfig: Path
) -> None:
    g, other_group = group(kubeconfig), group(kubeconfig, name="gpu")
    async with provider(g) as first:
        ids = await first.start(g, 2)
        await first.start(other_group, 1)
    async with provider(g, grid="other-grid") as other_grid:
        await other_grid.start(g, 1)
    async with provider(g) as second:  # a restarted controller: nothing in memory
        await eventually(lambda: running(second, g, 2), timeout=30)
        assert {w.id for w in await second.workers(g)} == set(ids)
        assert [w.version for w in await second.workers(g)] == [g.version()] * 2
    assert len(standin.pods(NS)) == 4


# -- stop, housekeeping ------------------------------------------------------------------------------------------


async def test_stop_deletes_exactly_that_pod_with_a_grace_period_to_drain(
    standin: KubernetesStandIn, kubeconfig: Path
) -> None:
    g = group(kubeconfig)
    async with provider(g) as p:
        ids = await p.start(g, 3)
        await eventually(lambda: running(p, g, 3), timeout=30)
        await p.stop(g, ids[0])
        pod = standin.pod(NS, ids[0])
        assert pod is not None and pod["metadata"]["deletionGracePeriodSeconds"] == TERMINATION_GRACE
        assert standin.signals == [("SIGTERM", NS, ids[0])]
        statuses = {w.id: w.status for w in await p.workers(g)}
        assert statuses == {ids[0]: "stopping", ids[1]: "running", ids[2]: "running"}
        standin.exit_pod(NS, ids[0])  # the worker drained and exited: the pod goes
        assert {w.id for w in await p.workers(g)} == {ids[1], ids[2]}
        await p.stop(g, ids[1], force=True)  # grace 0: gone at once
        assert [w.id for w in await p.workers(g)] == [ids[2]]
        assert standin.signals[-1] == ("SIGKILL", NS, ids[1])
        await p.stop(g, "t-cpu-gone00")  # already gone: nothing to do, no error
        await p.stop(group(kubeconfig, name="gpu"), ids[2])  # not of that group: left alone
        assert [w.status for w in await p.workers(g)] == ["running"]


async def test_exited_pods_are_deleted_and_failures_logged(
    standin: KubernetesStandIn, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = group(kubeconfig)
    async with provider(g) as p:
        ok, oom = await p.start(g, 2)
        await eventually(lambda: running(p, g, 2), timeout=30)
        standin.exit_pod(NS, ok, 0, log="drained\n")
        standin.exit_pod(NS, oom, 137, log="line 1\nlast words\n", reason="OOMKilled")
        with caplog.at_level(logging.WARNING, logger="scaleq.providers.kubernetes"):
            assert await p.workers(g) == []
        assert standin.pods(NS) == []
    (record,) = [r for r in caplog.records if "failed" in r.getMessage()]
    assert oom in record.getMessage() and "OOMKilled" in record.getMessage() and "last words" in record.getMessage()


async def test_an_unpullable_image_shows_in_the_worker_detail(
    standin: KubernetesStandIn, kubeconfig: Path, caplog: pytest.LogCaptureFixture
) -> None:
    g = group(kubeconfig, image="registry.example/missing:1")
    standin.unpullable("registry.example/missing:1")
    async with provider(g) as p:
        with caplog.at_level(logging.WARNING, logger="scaleq.providers.kubernetes"):
            (worker_id,) = await p.start(g, 1)
            (w,) = await eventually(lambda: _with_detail(p, g, "ErrImagePull"), timeout=30)
            assert w.status == "starting" and "pull access denied" in w.detail
            await p.workers(g)
    assert len([r for r in caplog.records if worker_id in r.getMessage()]) == 1  # warned once


async def _with_detail(p: KubernetesProvider, g: Group, text: str) -> list:
    workers = await p.workers(g)
    return workers if workers and text in workers[0].detail else []


# -- rolling update, destroy -----------------------------------------------------------------------------------


async def test_a_changed_image_rolls_out_by_draining_the_old_pods(
    standin: KubernetesStandIn, kubeconfig: Path, server: LiveServer, tmp_path: Path
) -> None:
    old = group(kubeconfig, min_workers=1, idle_timeout=60)
    new = group(kubeconfig, min_workers=1, idle_timeout=60, image="registry.example/scaleq/worker:2")
    assert old.version() != new.version()
    admin = server.client("admin")
    ctx = ProviderContext("t", server.url, server.tokens["worker"], tmp_path)
    try:
        await Deployer(Grid(name="t", groups=[old]), tmp_path, admin, ctx).apply()
        (first,) = standin.pods(NS)
        assert first["metadata"]["labels"][VERSION_LABEL] == old.version()
        async with provider(old) as p:
            await eventually(lambda: running(p, old, 1), timeout=30)
        changed = Deployer(Grid(name="t", groups=[new]), tmp_path, admin, ctx)
        (plan,) = await changed.plan()
        assert (plan.action, plan.out_of_date) == ("update", 1)
        (applied,) = await changed.apply()
        assert any("draining out-of-date worker" in line for line in applied.done)
        async with provider(new, token=server.tokens["worker"]) as p:
            workers = {w.id: w for w in await p.workers(new)}
            old_id = first["metadata"]["name"]
            assert workers[old_id].status == "stopping" and workers[old_id].version == old.version()
            (new_id,) = set(workers) - {old_id}
            assert workers[new_id].version == new.version()
            assert standin.pod(NS, new_id)["spec"]["containers"][0]["image"] == "registry.example/scaleq/worker:2"
            assert ("SIGTERM", NS, old_id) in standin.signals
            standin.exit_pod(NS, old_id)  # the old worker finished draining
            assert [w.id for w in await p.workers(new)] == [new_id]
            await p.destroy(new, grace=0.2)
    finally:
        await admin.close()


async def test_destroy_removes_the_pods_and_then_the_secret(standin: KubernetesStandIn, kubeconfig: Path) -> None:
    a, b = group(kubeconfig, name="a"), group(kubeconfig, name="b")
    async with provider(a) as p:
        ids = await p.start(a, 2)
        (kept,) = await p.start(b, 1)
        await eventually(lambda: running(p, a, 2), timeout=30)
        removed = await p.destroy(a, grace=0.3)  # the stand-in's workers never exit: forced after the grace
        assert sorted(removed) == sorted(ids)
        assert [pod["metadata"]["name"] for pod in standin.pods(NS)] == [kept]
        assert [s for s, _, name in standin.signals if name == ids[0]] == ["SIGTERM", "SIGKILL"]
        assert standin.secret(NS, token_secret_name("t")) is not None  # group b still uses it
        assert await p.destroy(b, grace=0.3) == [kept]
        assert standin.pods(NS) == [] and standin.secret(NS, token_secret_name("t")) is None


async def test_destroy_drains_workers_that_exit_on_sigterm(tmp_path: Path) -> None:
    with KubernetesStandIn(exit_on_sigterm=0.2) as standin:
        g = group(standin.kubeconfig(tmp_path / "kubeconfig"))
        async with provider(g) as p:
            ids = await p.start(g, 2)
            await eventually(lambda: running(p, g, 2), timeout=30)
            assert sorted(await p.destroy(g, grace=10)) == sorted(ids)
        assert sorted(standin.signals) == sorted([("SIGTERM", NS, i) for i in ids] + [("exited", NS, i) for i in ids])


# -- credentials and access: clear errors, no tracebacks --------------------------------------------------------


async def test_no_credentials_is_a_clear_error_from_list_health_plan_and_doctor(
    no_credentials: None, tmp_path: Path
) -> None:
    g = group(None)
    async with provider(g) as p:
        health = await p.health()
        assert not health.ok and "no Kubernetes credentials found" in health.message
        assert "KUBECONFIG" in health.message and "~/.kube/config" in health.message
        with pytest.raises(ProviderError, match="no Kubernetes credentials found"):
            await p.workers(g)
        with pytest.raises(ProviderError, match="no Kubernetes credentials found"):
            await p.start(g, 1)
    grid = Grid(name="t", groups=[g])
    ctx = ProviderContext("t", "http://127.0.0.1:9", "token", tmp_path)
    checks = await run_checks(None, grid, ctx, unconfigured="no server for this test")
    (check,) = [c for c in checks if c.name == "provider"]
    assert not check.ok and "no Kubernetes credentials found" in check.detail
    async with Client(f"http://127.0.0.1:{free_port()}", "token", timeout=2) as nobody:  # no server: plan goes on
        with pytest.raises(ProviderError, match="no Kubernetes credentials found"):
            await Deployer(grid, tmp_path, nobody, ctx).plan()


async def test_plan_and_doctor_say_it_in_one_line_without_a_traceback(server: LiveServer, tmp_path: Path) -> None:
    """The real CLI (``python -m scaleq``), in a subprocess with no credentials anywhere."""
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(
        'name = "t"\n[[groups]]\nname = "cpu"\nqueue = "q"\nprovider = "kubernetes"\nimage = "i"\nmax_workers = 1\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SCALEQ_", "KUBE"))}
    env["HOME"] = str(tmp_path / "home")
    common = ["--server", server.url, "--token", server.tokens["admin"], "--data-dir", str(tmp_path / "data")]
    for command in (["plan", "--grid", str(grid_file)], ["doctor", "--grid", str(grid_file)]):
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "scaleq",
            *command,
            *common,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
        output = (stdout + stderr).decode()
        assert proc.returncode == 1, output
        assert "no Kubernetes credentials found" in output and "Traceback" not in output, output


async def test_bad_kubeconfigs_are_clear_errors(
    no_credentials: None, standin: KubernetesStandIn, kubeconfig: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = group(None, kubernetes=KubernetesSettings(kubeconfig=str(tmp_path / "nope"), namespace=NS))
    async with provider(missing) as p:
        with pytest.raises(ProviderError, match=r"kubeconfig .*nope named by \[groups.kubernetes\] kubeconfig"):
            await p.workers(missing)
    wrong_context = group(None, kubernetes=KubernetesSettings(kubeconfig=str(kubeconfig), context="prod"))
    async with provider(wrong_context) as p:
        health = await p.health()
        assert not health.ok and "context prod" in health.message and "get-contexts" in health.message
    garbage = tmp_path / "garbage"
    garbage.write_text("clusters: [")
    monkeypatch.setenv("KUBECONFIG", str(garbage))
    g = group(None)
    async with provider(g) as p:
        with pytest.raises(ProviderError, match=r"cannot use the kubeconfig .*garbage .*from \$KUBECONFIG"):
            await p.workers(g)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    async with provider(g) as p:
        with pytest.raises(ProviderError, match=r"KUBECONFIG=.*absent names no existing file"):
            await p.workers(g)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))  # the usual place works
    async with provider(g) as p:
        assert (await p.health()).ok
    monkeypatch.delenv("KUBECONFIG")
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")  # "in a cluster", without a service account token
    async with provider(g) as p:
        health = await p.health()
        assert not health.ok and "service account cannot be used" in health.message


async def test_api_refusals_say_what_to_fix(standin: KubernetesStandIn, kubeconfig: Path, tmp_path: Path) -> None:
    g = group(kubeconfig)
    async with provider(g) as p:
        health = await p.health()
        assert health.ok and "v1.32" in health.message and "namespace scaleq" in health.message
    # wrong token: 401
    stale = group(standin.kubeconfig(tmp_path / "stale", token="expired"))
    async with provider(stale) as p:
        with pytest.raises(ProviderError, match=r"refused the credentials .401"):
            await p.workers(stale)
        assert "refused the credentials" in (await p.health()).message
    # a namespace that does not exist
    nowhere = group(kubeconfig, kubernetes=KubernetesSettings(kubeconfig=str(kubeconfig), namespace="missing"))
    async with provider(nowhere) as p:
        with pytest.raises(ProviderError, match=r"namespace missing does not exist.*kubectl create namespace missing"):
            await p.start(nowhere, 1)
        health = await p.health()
        assert not health.ok and "namespace missing does not exist" in health.message
    # RBAC: may not create pods
    standin.deny("create", "pods")
    async with provider(g) as p:
        health = await p.health()
        assert not health.ok and "may not create pods in namespace scaleq" in health.message
        assert "docs/providers.md" in health.message
        with pytest.raises(ProviderError, match=r"forbids this: cannot create pod .*pods \(get, list, create, delete"):
            await p.start(g, 1)
    # an API server that does not answer
    port = free_port()
    down = tmp_path / "down"
    down.write_text(kubeconfig.read_text().replace(standin.url, f"http://127.0.0.1:{port}"))
    unreachable = group(down)
    async with provider(unreachable) as p:
        with pytest.raises(ProviderError, match=r"cannot reach the Kubernetes API server at http://127.0.0.1"):
            await p.workers(unreachable)


# -- the controller, end to end -----------------------------------------------------------------------------------


async def test_the_controller_scales_pods_with_the_queue_and_scale_in_drains_only_idle_workers(
    standin: KubernetesStandIn, kubeconfig: Path, server: LiveServer
) -> None:
    g = group(kubeconfig, max_workers=2)
    admin, worker = server.client("admin"), server.client("worker")
    p = KubernetesProvider(grid="t", server=server.url, token=server.tokens["worker"], settings=g.kubernetes)
    controller = Controller([(g, p)], RemoteObserver(admin), tick=0.2)
    try:
        async with controlling(controller):
            job, _ = await admin.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
            (pod_id,) = [w.id for w in await eventually(lambda: _running_workers(p, g, 1), timeout=10)]
            # the pod's worker registers under the pod's name, takes the job and finishes it
            await worker.register(
                {"id": pod_id, "queue": "q", "group": "cpu", "slots": 1, "runtimes": ["process"], "cpus": 1}
            )
            claims, _, _ = await worker.claim(pod_id, 1, wait=5)
            assert [c.job.id for c in claims] == [job.id]
            await worker.finish({"lease": claims[0].lease, "reason": "success", "exit_code": 0})
            # idle now: the controller drains it through the server — it does not delete the pod
            await eventually(lambda: _heartbeat_says(worker, pod_id, "draining"), timeout=15)
            pod = standin.pod(NS, pod_id)
            assert pod is not None and "deletionTimestamp" not in pod["metadata"]
            assert standin.signals == []
            # the drained worker exits 0: list() deletes the finished pod
            await worker.deregister(pod_id)
            standin.exit_pod(NS, pod_id, 0)
            await eventually(lambda: _none_left(p, g, standin), timeout=10)
        events = await admin.events(group="cpu", limit=100)
        up = next(e for e in reversed(events) if e["kind"] == "scale_up")
        assert up["to"] == 1 and "waiting" in up["reason"] and "starting" in up["reason"]
        down = next(e for e in events if e["kind"] == "scale_down")
        assert down["reason"] and "idle" in down["reason"]
        assert not [e for e in events if e["kind"] == "error"], events
        assert len([v for v in standin.validated if v[0] == "Pod"]) == 1 and standin.rejected == []
    finally:
        await p.close()
        await admin.close()
        await worker.close()


async def _running_workers(p: KubernetesProvider, g: Group, n: int) -> list:
    workers = await p.workers(g)
    return workers if [w.status for w in workers] == ["running"] * n else []


async def _heartbeat_says(worker_client: object, worker_id: str, state: str) -> bool:
    said, _ = await worker_client.heartbeat(worker_id)  # type: ignore[attr-defined]
    return said == state


async def _none_left(p: KubernetesProvider, g: Group, standin: KubernetesStandIn) -> bool:
    return await p.workers(g) == [] and standin.pods(NS) == []


async def test_pods_that_never_pull_their_image_are_replaced_never_piled_up(
    standin: KubernetesStandIn, kubeconfig: Path, sqlite_store: SQLiteStore
) -> None:
    """Pods stuck in ErrImagePull never register: after startup_grace each is deleted, with the kubelet's reason in
    an event, and the namespace never holds more than max_workers of the group's pods."""
    broken = "registry.example/scaleq/worker:missing"
    standin.unpullable(broken)
    g = group(kubeconfig, max_workers=2, startup_grace=120, image=broken)

    async def pods() -> int:
        return len(standin.pods(NS))

    async with provider(g) as p:
        events = await never_registering(p, g, sqlite_store, pods)
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 3 * g.max_workers
    assert all("ErrImagePull" in e.reason and "startup_grace (120 s)" in e.reason for e in lapsed), lapsed[0]


async def test_an_exceeded_resource_quota_is_the_groups_state_until_it_is_lifted(
    standin: KubernetesStandIn, kubeconfig: Path, sqlite_store: SQLiteStore
) -> None:
    g = group(kubeconfig, max_workers=2)
    async with provider(g) as p:
        refused, recovered = await refused_then_retried(
            p, g, sqlite_store, lambda: standin.exceed_quota("pods"), lambda: standin.exceed_quota("pods", None)
        )
    assert refused.state == "quota" and refused.state_since is not None
    assert "exceeded quota: compute-resources" in refused.message and "resourcequota" in refused.message
    assert (recovered.state, recovered.message, recovered.current) == ("ok", "", 1)
    assert len(standin.pods(NS)) == 1


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("TerminationByKubelet", "The node was low on resource: memory. Threshold quantity: 100Mi, available: 52Mi."),
        ("PreemptionByScheduler", "default-scheduler: preempting to accommodate a higher priority pod"),
        ("EvictionByEvictionAPI", "Eviction API: evicting"),
    ],
)
async def test_jobs_of_an_evicted_or_preempted_pod_come_back_without_spending_an_attempt(
    standin: KubernetesStandIn, kubeconfig: Path, sqlite_store: SQLiteStore, reason: str, message: str
) -> None:
    g = group(kubeconfig, max_workers=2)

    def take(name: str) -> None:
        while standin.pod(NS, name)["status"]["phase"] != "Running":  # type: ignore[index]
            pass  # the stand-in's kubelet starts it within start_delay
        standin.disrupt_pod(NS, name, reason, message)

    async with provider(g) as p:
        jobs, events = await taken_back(p, g, sqlite_store, take)
        (taken, kept) = jobs
        (event,) = [e for e in events if e.kind == "preempted"]
        assert f"worker {taken} was preempted (pod {taken}" in event.reason
        assert message in event.reason and "1 job(s) back in the queue" in event.reason
        back = await sqlite_store.get_job(jobs[taken])
        assert (back.state, back.attempts) == ("queued", 0)
        assert [a.outcome for a in await sqlite_store.list_attempts(back.id)] == ["preempted"]
        assert (await sqlite_store.get_job(jobs[kept])).state == "running"  # silent, not taken: left to its lease
        if reason == "TerminationByKubelet":  # a failed pod: deleted by workers() before preempted() was asked
            assert standin.pod(NS, taken) is None
        await p.destroy(g, grace=0)
