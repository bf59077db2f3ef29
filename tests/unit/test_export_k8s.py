"""``scaleq export k8s``: every generated object is valid offline — core objects against the Kubernetes 1.32 schema
(``kubernetes_validate``, strict) plus the API server's own rules the schema cannot express (names, labels,
quantities, GPU limits; the same checks the Kubernetes stand-in applies), KEDA objects against the CRDs' OpenAPI v3
schemas (``shared/schemas/keda``, with ``jsonschema``, and no field the API server would prune) — every reference
resolves within its namespace, and the scaling reads the server's real ``/api/v1/queues`` fields.

No cluster and no KEDA run here: what a live KEDA does with these objects is not exercised.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from typer.testing import CliRunner

from scaleq.cli.export import export_app
from scaleq.export import k8s
from scaleq.grid import Grid, load
from scaleq.providers.base import worker_args
from scaleq.providers.kubernetes import MANAGED_BY, TERMINATION_GRACE, group_selector
from scaleq.server.routes.jobs import QueueOut
from tests.standins.kubernetes_api import _check_labels, _check_name, _check_pod, parse_selector

REPO = Path(__file__).resolve().parents[2]
KEDA_CRDS = {
    "ScaledObject": "keda/keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda/keda.sh_triggerauthentications.yaml",
}

GRID = """
name = "prod"

[store]
url = "postgresql://scaleq:s3cret@db.internal:5432/scaleq"

[[groups]]
name = "cpu"
queue = "batch.v2"
provider = "kubernetes"
image = "registry.example/scaleq/worker:1.4"
min_workers = 0
max_workers = 20
slots = 4
runtimes = ["process"]
idle_timeout = 45
scale_down_window = 60
resources = { cpus = 4, memory = "8GiB" }
env = { LOG_LEVEL = "debug" }

[groups.kubernetes]
namespace = "scaleq"

[[groups]]
name = "gpu"
queue = "render"
provider = "kubernetes"
image = "registry.example/scaleq/worker-cuda:1.4"
min_workers = 1
max_workers = 4
slots = 1
tags = ["cuda"]
resources = { cpus = 7.5, memory = "30GiB", gpus = 1 }

[groups.kubernetes]
namespace = "gpu-jobs"
service_account = "gpu-workers"
image_pull_policy = "Always"

[[groups]]
name = "laptop"
provider = "local"
"""


def schema_dir() -> Path:
    candidates = [Path(os.environ["SCALEQ_SCHEMAS"])] if os.environ.get("SCALEQ_SCHEMAS") else []
    candidates += [
        REPO / "tests" / "standins" / "schemas",
        REPO.parent / "shared" / "schemas",
        REPO / "shared" / "schemas",
    ]
    for base in candidates:
        if all((base / f).exists() for f in KEDA_CRDS.values()):
            return base
    pytest.fail(f"KEDA's CRDs ({', '.join(KEDA_CRDS.values())}) are not under {', '.join(map(str, candidates))}")


@pytest.fixture(scope="module")
def crd_schemas() -> dict[str, dict[str, Any]]:
    base = schema_dir()
    schemas = {}
    for kind, name in KEDA_CRDS.items():
        crd = yaml.safe_load((base / name).read_text())
        assert crd["spec"]["names"]["kind"] == kind
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
        schemas[kind] = version["schema"]["openAPIV3Schema"]
    return schemas


@pytest.fixture
def grid(tmp_path: Path) -> Grid:
    path = tmp_path / "grid.toml"
    path.write_text(GRID)
    return load(path)


@pytest.fixture
def written(grid: Grid, tmp_path: Path) -> list[Path]:
    return k8s.export_k8s(grid, tmp_path / "out")


@pytest.fixture
def objects(written: list[Path]) -> list[dict[str, Any]]:
    found = []
    for path in written:
        if path.suffix == ".yaml":
            found += [o for o in yaml.safe_load_all(path.read_text()) if o is not None]
    return found


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def find(objects: list[dict[str, Any]], kind: str, namespace: str | None, name: str) -> dict[str, Any] | None:
    return next(
        (
            o
            for o in objects
            if o["kind"] == kind and o["metadata"]["name"] == name and o["metadata"].get("namespace") == namespace
        ),
        None,
    )


# -- the checkers ---------------------------------------------------------------------------------------------------


def pruned_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the API server would drop (structural-schema pruning): not declared where the schema is closed."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems = []
    if isinstance(obj, dict):
        props, extra = schema.get("properties"), schema.get("additionalProperties")
        for key, value in obj.items():
            if props is not None and key in props:
                problems += pruned_fields(value, props[key], f"{path}.{key}")
            elif isinstance(extra, dict):
                problems += pruned_fields(value, extra, f"{path}.{key}")
            elif props is not None or extra is False:
                problems.append(f"{path}.{key}")
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for i, value in enumerate(obj):
            problems += pruned_fields(value, schema["items"], f"{path}[{i}]")
    return problems


def keda_problems(obj: dict[str, Any], crd_schemas: dict[str, dict[str, Any]]) -> list[str]:
    schema = crd_schemas[obj["kind"]]
    validator = jsonschema.Draft7Validator(schema)
    problems = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]
    problems += [f"{p}: not in the CRD schema (the API server would drop it)" for p in pruned_fields(obj, schema)]
    problems += meta_problems(obj)
    return problems


def meta_problems(obj: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    _check_name(obj["kind"], obj["metadata"].get("name"), problems)
    _check_labels(obj["metadata"].get("labels") or {}, problems)
    return problems


def core_problems(obj: dict[str, Any]) -> list[str]:
    problems = []
    try:
        kubernetes_validate.validate(obj, "1.32", strict=True)
    except kubernetes_validate.ValidationError as exc:
        problems.append(f"{'.'.join(map(str, exc.absolute_path))}: {exc.message}")
    problems += meta_problems(obj)
    if obj["kind"] == "Deployment":
        template = obj["spec"]["template"]
        _check_labels(template["metadata"].get("labels") or {}, problems)
        _check_pod({"spec": template["spec"]}, problems)
    return problems


def gjson_query(document: Any, path: str) -> Any:
    """The GJSON paths the export writes — ``#(key=="value").field`` on a top-level array — evaluated by the rules
    GJSON documents (first matching element; the quoted value is a JSON string)."""
    m = re.fullmatch(r'#\((\w+)==("(?:[^"\\]|\\.)*")\)\.(\w+)', path)
    assert m, f"not a query the test can evaluate: {path}"
    key, value, field = m.group(1), json.loads(m.group(2)), m.group(3)
    match = next((item for item in document if item.get(key) == value), None)
    return None if match is None else match.get(field)


# -- what is written --------------------------------------------------------------------------------------------------


def test_writes_the_files_in_apply_order_deterministically(grid: Grid, written: list[Path], tmp_path: Path) -> None:
    assert [p.name for p in written] == [
        "00-namespaces.yaml",
        "10-secrets.yaml",
        "20-server.yaml",
        "30-keda-auth.yaml",
        "40-group-cpu.yaml",
        "40-group-gpu.yaml",
        "README.md",
    ]
    again = k8s.export_k8s(grid, tmp_path / "again")
    assert [p.read_text() for p in again] == [p.read_text() for p in written]
    assert all(p.read_text().startswith("# Generated by `scaleq export k8s`") for p in written if p.suffix == ".yaml")


def test_every_core_object_is_valid_for_kubernetes_1_32(objects: list[dict[str, Any]]) -> None:
    core = [o for o in objects if not o["apiVersion"].startswith("keda.sh/")]
    assert sorted({o["kind"] for o in core}) == ["Deployment", "Namespace", "Secret", "Service"]
    for obj in core:
        assert core_problems(obj) == [], obj["metadata"]["name"]


def test_every_keda_object_is_valid_against_the_crds(
    objects: list[dict[str, Any]], crd_schemas: dict[str, dict[str, Any]]
) -> None:
    keda = [o for o in objects if o["apiVersion"].startswith("keda.sh/")]
    kinds = sorted(o["kind"] for o in keda)
    assert kinds == ["ScaledObject", "ScaledObject", "TriggerAuthentication", "TriggerAuthentication"]
    for obj in keda:
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert keda_problems(obj, crd_schemas) == [], obj["metadata"]["name"]


def test_the_checkers_catch_what_they_should(
    objects: list[dict[str, Any]], crd_schemas: dict[str, dict[str, Any]]
) -> None:
    (so, *_) = by_kind(objects, "ScaledObject")
    unknown = json.loads(json.dumps(so))
    unknown["spec"]["triggers"][0]["metadta"] = {}
    assert any("metadta" in p for p in keda_problems(unknown, crd_schemas))
    not_a_string = json.loads(json.dumps(so))
    not_a_string["spec"]["triggers"][0]["metadata"]["targetValue"] = 4
    assert keda_problems(not_a_string, crd_schemas)
    bad_type = json.loads(json.dumps(so))
    bad_type["spec"]["maxReplicaCount"] = "4"
    assert keda_problems(bad_type, crd_schemas)
    deployment = json.loads(json.dumps(by_kind(objects, "Deployment")[-1]))
    deployment["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"] = "2"
    assert any("nvidia.com/gpu" in p for p in core_problems(deployment))
    deployment["spec"]["template"]["spec"]["containers"][0]["restart"] = "no"
    assert any("restart" in p for p in core_problems(deployment))


def test_every_reference_resolves_in_its_namespace(objects: list[dict[str, Any]]) -> None:
    namespaces = {o["metadata"]["name"] for o in by_kind(objects, "Namespace")}
    assert namespaces == {"scaleq", "gpu-jobs"}
    for obj in objects:
        assert obj["kind"] == "Namespace" or obj["metadata"]["namespace"] in namespaces
    for so in by_kind(objects, "ScaledObject"):
        ns = so["metadata"]["namespace"]
        assert find(objects, "Deployment", ns, so["spec"]["scaleTargetRef"]["name"]) is not None
        for trigger in so["spec"]["triggers"]:
            auth = find(objects, "TriggerAuthentication", ns, trigger["authenticationRef"]["name"])
            assert auth is not None
            for ref in auth["spec"]["secretTargetRef"]:
                secret = find(objects, "Secret", ns, ref["name"])
                assert secret is not None and ref["key"] in secret["stringData"]
    for deployment in by_kind(objects, "Deployment"):
        ns, spec = deployment["metadata"]["namespace"], deployment["spec"]
        labels = spec["template"]["metadata"]["labels"]
        assert spec["selector"]["matchLabels"].items() <= labels.items()
        for container in spec["template"]["spec"]["containers"]:
            for env in container["env"]:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    secret = find(objects, "Secret", ns, ref["name"])
                    assert secret is not None and ref["key"] in secret["stringData"], ref
    (service,) = by_kind(objects, "Service")
    server = find(objects, "Deployment", service["metadata"]["namespace"], service["metadata"]["name"])
    assert server is not None
    assert service["spec"]["selector"].items() <= server["spec"]["template"]["metadata"]["labels"].items()
    (container,) = server["spec"]["template"]["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}


# -- the scaling --------------------------------------------------------------------------------------------------


def test_keda_scales_on_the_servers_queued_plus_running_per_slot(grid: Grid, objects: list[dict[str, Any]]) -> None:
    groups = {g.name: g for g in grid.groups}
    (service,) = by_kind(objects, "Service")
    server_url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{k8s.SERVER_PORT}"
    for so in by_kind(objects, "ScaledObject"):
        g = groups[so["metadata"]["labels"]["scaleq.dev/group"]]
        spec = so["spec"]
        assert (spec["minReplicaCount"], spec["maxReplicaCount"]) == (g.min_workers, g.max_workers)
        assert spec["advanced"]["scalingModifiers"] == {
            "formula": "queued + running",
            "target": str(g.slots),
            "activationTarget": "0",
            "metricType": "AverageValue",
        }
        assert spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == {
            "stabilizationWindowSeconds": round(g.scale_down_window)
        }
        assert spec["cooldownPeriod"] == round(g.idle_timeout)
        triggers = {t["name"]: t for t in spec["triggers"]}
        assert set(triggers) == {"queued", "running"}  # the names the formula uses
        # the fields exist in the server's real response model, and the path picks the group's queue
        response = [
            QueueOut(
                name=name, queued=q, running=r, finished=0, succeeded=0, unsuccessful=0, oldest_queued_age=None
            ).model_dump()
            for name, q, r in (("other", 100, 100), (g.queue, 7, 3), (g.queue + "x", 50, 50))
        ]
        for name, trigger in triggers.items():
            meta = trigger["metadata"]
            assert trigger["type"] == "metrics-api"
            assert meta["url"] == f"{server_url}/api/v1/queues" and meta["format"] == "json"
            assert meta["authMode"] == "bearer"
            assert gjson_query(response, meta["valueLocation"]) == {"queued": 7, "running": 3}[name]


def test_workers_run_the_same_pod_spec_as_the_provider_but_as_a_deployment(
    grid: Grid, objects: list[dict[str, Any]]
) -> None:
    (service,) = by_kind(objects, "Service")
    server_url = f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc:{k8s.SERVER_PORT}"
    for g in (g for g in grid.groups if g.provider == "kubernetes"):
        assert g.kubernetes is not None
        deployment = find(objects, "Deployment", g.kubernetes.namespace, f"scaleq-prod-{g.name}")
        assert deployment is not None
        assert deployment["spec"]["replicas"] == g.min_workers
        assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 1, "maxUnavailable": 0}
        template = deployment["spec"]["template"]
        labels = template["metadata"]["labels"]
        assert labels[MANAGED_BY] == "scaleq-export"  # never taken by the provider for its own pods
        assert not parse_selector(group_selector("prod", g.name))(labels)
        pod = template["spec"]
        assert pod["restartPolicy"] == "Always" and pod["terminationGracePeriodSeconds"] == TERMINATION_GRACE
        assert pod.get("serviceAccountName") == g.kubernetes.service_account
        (container,) = pod["containers"]
        assert container["image"] == g.image and container["imagePullPolicy"] == g.kubernetes.image_pull_policy
        assert container["command"] == ["scaleq"]
        assert container["args"] == worker_args(g, server_url, "$(POD_NAME)", k8s.SERVER_GRACE)
        env = {e["name"]: e for e in container["env"]}
        assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
        assert env["SCALEQ_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "scaleq-prod-workers", "key": "token"}
        assert all("value" not in e for e in container["env"] if e["name"] == "SCALEQ_TOKEN")
        for name, value in g.env.items():
            assert env[name]["value"] == value
    gpu = find(objects, "Deployment", "gpu-jobs", "scaleq-prod-gpu")
    assert gpu is not None
    assert gpu["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "7500m", "memory": "30Gi"},
        "limits": {"cpu": "7500m", "memory": "30Gi", "nvidia.com/gpu": "1"},
    }


def test_the_server_runs_on_postgresql_from_a_secret(grid: Grid, objects: list[dict[str, Any]]) -> None:
    server = find(objects, "Deployment", "scaleq", "scaleq-prod-server")
    assert server is not None
    (container,) = server["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[:1] == ["server"] and args[args.index("--store") + 1] == "$(SCALEQ_STORE)"
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert (
        args[args.index("--heartbeat-budget") + 1] == f"{grid.server.heartbeat_budget:g}"
    )  # the grid's, on every server
    env = {e["name"]: e for e in container["env"]}
    assert env["SCALEQ_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "scaleq-prod-store", "key": "url"}
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    store = find(objects, "Secret", "scaleq", "scaleq-prod-store")
    assert store is not None and store["stringData"]["url"] == grid.store.url
    for name in ("scaleq-prod-workers", "scaleq-prod-keda"):
        for ns in ("scaleq", "gpu-jobs"):
            secret = find(objects, "Secret", ns, name)
            assert secret is not None and secret["stringData"]["token"] == k8s.TOKEN_PLACEHOLDER


def test_a_sqlite_grid_gets_a_store_placeholder(tmp_path: Path) -> None:
    grid = Grid.model_validate(
        {"name": "t", "groups": [{"name": "a", "provider": "kubernetes", "image": "i", "max_workers": 2}]}
    )
    files = k8s.manifests(grid)
    (store,) = [o for o in files["10-secrets.yaml"] if o["metadata"]["name"] == "scaleq-t-store"]
    assert store["stringData"]["url"] == k8s.STORE_PLACEHOLDER
    assert files["20-server.yaml"][0]["spec"]["template"]["spec"]["containers"][0]["image"] == "i"


def test_long_names_stay_within_63_characters(tmp_path: Path) -> None:
    grid = Grid.model_validate(
        {
            "name": "a-grid-name-that-is-thirty-two-c",
            "groups": [{"name": "g" * 40, "provider": "kubernetes", "image": "i", "max_workers": 1}],
        }
    )
    for objs in k8s.manifests(grid).values():
        for obj in objs:
            assert len(obj["metadata"]["name"]) <= 63
            if not obj["apiVersion"].startswith("keda.sh/"):
                assert core_problems(obj) == []


def test_readme_explains_bootstrap_and_the_scale_in_caveat(written: list[Path]) -> None:
    text = written[-1].read_text()
    assert "scaleq tokens create --role worker" in text and "scaleq tokens create --role read" in text
    assert "busy ones included" in text and "`laptop` (local)" in text
    assert "KEDA 2.13" in text


# -- the command --------------------------------------------------------------------------------------------------


def test_the_command_writes_the_files_and_refuses_a_grid_without_kubernetes_groups(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID)
    runner = CliRunner()
    result = runner.invoke(export_app, ["k8s", str(tmp_path / "out"), "--grid", str(grid_file)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "40-group-gpu.yaml").exists() and "README.md" in result.output
    local_only = tmp_path / "local.toml"
    local_only.write_text('[[groups]]\nname = "a"\n')
    result = runner.invoke(export_app, ["k8s", str(tmp_path / "none"), "--grid", str(local_only)])
    assert result.exit_code == 2 and "no kubernetes groups" in result.output
    assert not (tmp_path / "none").exists()
