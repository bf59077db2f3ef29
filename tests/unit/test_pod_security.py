"""Worker pods -- the kubernetes provider's and ``scaleq export k8s``'s -- and the exported server's pod pass the
``restricted`` Pod Security Standard (https://kubernetes.io/docs/concepts/security/pod-security-standards/), which a
namespace labelled ``pod-security.kubernetes.io/enforce=restricted`` enforces. The standard's controls are written
below as a table, each a check of a pod spec, and the checks are shown to catch what they should."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaleq.export import k8s
from scaleq.grid import Group, KubernetesSettings, load
from scaleq.providers.kubernetes import KubernetesProvider

Spec = dict[str, Any]

#: Volume types the restricted level allows.
RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim"}
RESTRICTED_VOLUMES |= {"projected", "secret"}
#: Capabilities the baseline level lets a container add.
BASELINE_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
}
BASELINE_CAPABILITIES |= {"SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def containers(spec: Spec) -> list[dict[str, Any]]:
    return [*spec.get("initContainers", []), *spec["containers"], *spec.get("ephemeralContainers", [])]


def security(c: dict[str, Any]) -> dict[str, Any]:
    return c.get("securityContext") or {}


def pod_or_every_container(spec: Spec, field: str, ok: Callable[[Any], bool]) -> bool:
    """Set acceptably on the pod (and no container overrides it badly) or on every container."""
    pod = (spec.get("securityContext") or {}).get(field)
    values = [security(c).get(field) for c in containers(spec)]
    if pod is not None and ok(pod):
        return all(v is None or ok(v) for v in values)
    return all(v is not None and ok(v) for v in values)


#: (level, control, check): the standard's controls for Linux pods, as checks of a pod spec.
CONTROLS: list[tuple[str, str, Callable[[Spec], bool]]] = [
    ("baseline", "host namespaces", lambda s: not (s.get("hostNetwork") or s.get("hostPID") or s.get("hostIPC"))),
    ("baseline", "privileged containers", lambda s: not any(security(c).get("privileged") for c in containers(s))),
    (
        "baseline",
        "capabilities",
        lambda s: all(
            set((security(c).get("capabilities") or {}).get("add", [])) <= BASELINE_CAPABILITIES for c in containers(s)
        ),
    ),
    ("baseline", "hostPath volumes", lambda s: not any("hostPath" in v for v in s.get("volumes", []))),
    (
        "baseline",
        "host ports",
        lambda s: not any(p.get("hostPort") for c in containers(s) for p in c.get("ports", [])),
    ),
    (
        "baseline",
        "/proc mount type",
        lambda s: all(security(c).get("procMount", "Default") == "Default" for c in containers(s)),
    ),
    (
        "baseline",
        "seccomp not Unconfined",
        lambda s: all(
            (x.get("seccompProfile") or {}).get("type") != "Unconfined"
            for x in [s.get("securityContext") or {}, *map(security, containers(s))]
        ),
    ),
    (
        "restricted",
        "volume types",
        lambda s: all(set(v) - {"name"} <= RESTRICTED_VOLUMES for v in s.get("volumes", [])),
    ),
    (
        "restricted",
        "privilege escalation",
        lambda s: all(security(c).get("allowPrivilegeEscalation") is False for c in containers(s)),
    ),
    ("restricted", "running as non-root", lambda s: pod_or_every_container(s, "runAsNonRoot", lambda v: v is True)),
    (
        "restricted",
        "running as non-root user",
        lambda s: all(x.get("runAsUser") != 0 for x in [s.get("securityContext") or {}, *map(security, containers(s))]),
    ),
    (
        "restricted",
        "seccomp",
        lambda s: pod_or_every_container(
            s, "seccompProfile", lambda v: v.get("type") in ("RuntimeDefault", "Localhost")
        ),
    ),
    (
        "restricted",
        "capabilities",
        lambda s: all(
            "ALL" in (security(c).get("capabilities") or {}).get("drop", [])
            and set((security(c).get("capabilities") or {}).get("add", [])) <= {"NET_BIND_SERVICE"}
            for c in containers(s)
        ),
    ),
]


def violations(spec: Spec) -> list[str]:
    return [f"{level}: {control}" for level, control, check in CONTROLS if not check(spec)]


GRID = """
name = "prod"

[server]
public_url = "https://scaleq.example"

[[groups]]
name = "cpu"
provider = "kubernetes"
image = "registry.example/scaleq/worker:1"
runtimes = ["process"]
max_workers = 3
[groups.kubernetes]
namespace = "batch"

[[groups]]
name = "spot"
provider = "kubernetes"
image = "registry.example/scaleq/worker:1"
runtimes = ["docker"]
env = { DOCKER_HOST = "tcp://dockerd.batch.svc:2375" }
max_workers = 3
[groups.kubernetes]
namespace = "batch"
spot = true
node_selector = { "cloud.google.com/gke-spot" = "true" }
"""


def provider_pod(group: Group) -> Spec:
    p = KubernetesProvider(grid="prod", server="https://scaleq.example", token="t", settings=group.kubernetes)
    return p.pod_manifest(group, "prod-cpu-abc123")["spec"]


def exported_pods(tmp_path: Path) -> dict[str, Spec]:
    (tmp_path / "grid.toml").write_text(GRID)
    grid = load(tmp_path / "grid.toml")
    pods = {}
    for path in k8s.export_k8s(grid, tmp_path / "out"):
        if path.suffix == ".yaml":
            for obj in yaml.safe_load_all(path.read_text()):
                if obj and obj["kind"] == "Deployment":
                    pods[obj["metadata"]["name"]] = obj["spec"]["template"]["spec"]
    return pods


def test_the_providers_worker_pods_pass_the_restricted_standard(tmp_path: Path) -> None:
    (tmp_path / "grid.toml").write_text(GRID)
    for group in load(tmp_path / "grid.toml").groups:
        spec = provider_pod(group)
        assert violations(spec) == [], group.name
        assert spec["securityContext"]["runAsUser"] not in (None, 0)


def test_the_exported_worker_and_server_pods_pass_the_restricted_standard(tmp_path: Path) -> None:
    pods = exported_pods(tmp_path)
    assert sorted(pods) == ["scaleq-prod-cpu", "scaleq-prod-server", "scaleq-prod-spot"]
    for name, spec in pods.items():
        assert violations(spec) == [], name


@pytest.mark.parametrize(
    ("change", "caught"),
    [
        (lambda s: s["containers"][0]["securityContext"].update(allowPrivilegeEscalation=True), "privilege escalation"),
        (lambda s: s["securityContext"].update(runAsUser=0), "running as non-root user"),
        (
            lambda s: [x.pop("runAsNonRoot") for x in (s["securityContext"], *map(security, s["containers"]))],
            "running as non-root",
        ),
        (lambda s: s["containers"][0]["securityContext"].update(runAsNonRoot=False), "running as non-root"),
        (lambda s: s["containers"][0]["securityContext"].pop("capabilities"), "capabilities"),
        (lambda s: s["securityContext"].update(seccompProfile={"type": "Unconfined"}), "seccomp not Unconfined"),
        (
            lambda s: [x.pop("seccompProfile") for x in (s["securityContext"], *map(security, s["containers"]))],
            "seccomp",
        ),
        (lambda s: s["containers"][0]["securityContext"].update(privileged=True), "privileged containers"),
        (lambda s: s.update(hostNetwork=True), "host namespaces"),
        (
            lambda s: s.update(volumes=[{"name": "sock", "hostPath": {"path": "/var/run/docker.sock"}}]),
            "hostPath volumes",
        ),
    ],
)
def test_the_checks_catch_what_they_should(change: Callable[[Spec], object], caught: str) -> None:
    spec = copy.deepcopy(
        provider_pod(Group(name="cpu", provider="kubernetes", image="x:1", kubernetes=KubernetesSettings()))
    )
    assert violations(spec) == []
    change(spec)
    assert any(v.endswith(f": {caught}") for v in violations(spec)), violations(spec)


def test_a_spot_groups_pods_go_to_its_nodes_and_hand_their_jobs_back_on_sigterm(tmp_path: Path) -> None:
    (tmp_path / "grid.toml").write_text(GRID)
    cpu, spot = load(tmp_path / "grid.toml").groups
    spot_pod, cpu_pod = provider_pod(spot), provider_pod(cpu)
    args = spot_pod["containers"][0]["args"]
    assert args[args.index("--on-notice") + 1] == "handback"
    assert spot_pod["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert "--on-notice" not in cpu_pod["containers"][0]["args"] and "nodeSelector" not in cpu_pod
    assert spot.version() != spot.model_copy(update={"kubernetes": cpu.kubernetes}).version()
    exported = exported_pods(tmp_path)["scaleq-prod-spot"]
    assert exported["nodeSelector"] == {"cloud.google.com/gke-spot": "true"}
    assert exported["containers"][0]["args"][-2:] == ["--on-notice", "handback"]
