"""``scaleq export k8s``: Kubernetes manifests (with KEDA) for a grid's ``kubernetes`` groups, for people who deploy
with their own tools (kubectl, Kustomize, Argo CD, Flux) instead of letting scaleq's controller run the workers.

What is written (YAML, one file per concern, in apply order, plus a README.md from ``templates/k8s/README.md.tmpl``):

- ``00-namespaces.yaml``: the namespaces the groups name (``[groups.kubernetes] namespace``);
- ``10-secrets.yaml``: the store URL for the server (the grid's ``postgresql://`` URL, or a placeholder), the worker
  token for the workers and a ``read`` token for KEDA — placeholders to fill in before applying (README.md says how);
- ``20-server.yaml``: the server — a Deployment running ``scaleq server`` against PostgreSQL (URL from the Secret),
  with readiness and liveness probes on ``/healthz`` — and its Service;
- ``30-keda-auth.yaml``: per namespace a KEDA ``TriggerAuthentication`` that hands the read token to the triggers as
  a bearer token;
- ``40-group-<name>.yaml`` per group: a worker Deployment (the same pod spec as the ``kubernetes`` provider's pods,
  but ``restartPolicy: Always`` and ``--worker-id`` = the pod's name) and a KEDA ``ScaledObject``.

**The scaling signal** is the server's own count, read over its JSON API — no Prometheus in between, so there is no
extra hop to fail silently and the signal exists at zero workers. Two ``metrics-api`` triggers read
``GET /api/v1/queues`` (``valueLocation`` picks the group's queue: ``#(name=="<queue>").queued`` and ``.running``,
GJSON), authenticated with ``authMode: bearer`` through the TriggerAuthentication, and KEDA's ``scalingModifiers``
combine them: ``formula: queued + running`` with ``target`` = the group's ``slots``, so KEDA keeps
``ceil((queued + running) / slots)`` workers — running jobs keep their workers, and the group scales from zero.
(The ``prometheus`` trigger on ``queue_length`` would count waiting jobs only: the group would shrink under its
running jobs, which is the original module's flaw; and it would need a Prometheus scraping the server.)

KEDA scales a Deployment through an HPA, and a Deployment scaled down deletes pods of the ReplicaSet's choosing —
possibly busy ones. The workers drain on SIGTERM within ``terminationGracePeriodSeconds`` (the default job
``max_duration`` plus five minutes), so no job is cut short, but a busy pod may go while an idle one stays. scaleq's
own controller (the ``kubernetes`` provider: bare pods, drained only when idle) does not have that flaw and is
preferred; the export is for those who want no controller of scaleq's in the cluster.

Exported objects carry ``app.kubernetes.io/managed-by: scaleq-export`` (not ``scaleq``), so the provider never takes
them for its own pods, and the Secrets have other names than the provider's ``scaleq-<grid>-worker-token``.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from scaleq.export import render
from scaleq.grid import Grid, Group, KubernetesSettings
from scaleq.providers.kubernetes import (
    GPU_RESOURCE,
    SAFE_TO_EVICT,
    TERMINATION_GRACE,
    container_security,
    memory_quantity,
    pod_security,
    worker_pod_spec,
)

SERVER_PORT = 8765
#: The image of the server when no --image is given: the worker image holds the whole scaleq package.
DEFAULT_IMAGE = "scaleq/worker:latest"
SERVER_GRACE = 300.0
MANAGED_BY = "scaleq-export"
KEDA_API = "keda.sh/v1alpha1"
STORE_PLACEHOLDER = "postgresql://scaleq:CHANGE-ME@postgres.example:5432/scaleq"
TOKEN_PLACEHOLDER = "CHANGE-ME"


class ExportError(ValueError):
    """The grid cannot be exported as asked; the message says why and what to change."""


def _name(*parts: str) -> str:
    """A resource name of at most 63 characters (a DNS label: also usable as a label value)."""
    name = "-".join(parts)
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:6]
    return f"{name[:56].rstrip('-')}-{digest}"


class _Names:
    def __init__(self, grid: Grid, server_ns: str) -> None:
        self.grid = grid.name
        self.server_ns = server_ns
        self.server = _name("scaleq", grid.name, "server")
        self.store_secret = _name("scaleq", grid.name, "store")
        self.workers_secret = _name("scaleq", grid.name, "workers")
        self.keda_secret = _name("scaleq", grid.name, "keda")
        self.keda_auth = _name("scaleq", grid.name, "keda")

    def group(self, g: Group) -> str:
        return _name("scaleq", self.grid, g.name)

    @property
    def server_url(self) -> str:
        return f"http://{self.server}.{self.server_ns}.svc:{SERVER_PORT}"


def _labels(grid: str, component: str, group: str | None = None) -> dict[str, str]:
    labels = {
        "app.kubernetes.io/name": f"scaleq-{component}",
        "app.kubernetes.io/part-of": "scaleq",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        "scaleq.dev/grid": grid,
    }
    if group is not None:
        labels["scaleq.dev/group"] = group
    return labels


def _meta(name: str, namespace: str | None, labels: dict[str, str]) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def _settings(g: Group) -> KubernetesSettings:
    return g.kubernetes or KubernetesSettings()


# -- objects ----------------------------------------------------------------------------------------------------------


def namespaces(grid: Grid, spaces: list[str]) -> list[dict[str, Any]]:
    return [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": _meta(ns, None, _labels(grid.name, "namespace"))}
        for ns in spaces
    ]


def secrets(grid: Grid, names: _Names, spaces: list[str]) -> list[dict[str, Any]]:
    store = grid.store.url if (grid.store.url or "").startswith(("postgresql://", "postgres://")) else None
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": _meta(names.store_secret, names.server_ns, _labels(grid.name, "server")),
            "type": "Opaque",
            "stringData": {"url": store or STORE_PLACEHOLDER},
        }
    ]
    for ns in spaces:
        for name, component in ((names.workers_secret, "worker"), (names.keda_secret, "keda")):
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "metadata": _meta(name, ns, _labels(grid.name, component)),
                    "type": "Opaque",
                    "stringData": {"token": TOKEN_PLACEHOLDER},
                }
            )
    return objects


def server(grid: Grid, names: _Names, image: str) -> list[dict[str, Any]]:
    labels = _labels(grid.name, "server")
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "scaleq.dev/grid")}
    probe = {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 10, "timeoutSeconds": 5}
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.server, names.server_ns, labels),
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": selector},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "enableServiceLinks": False,
                    "automountServiceAccountToken": False,
                    "securityContext": pod_security(),  # restricted, as the workers' pods
                    "containers": [
                        {
                            "name": "server",
                            "image": image,
                            "command": ["scaleq"],
                            "args": [
                                "server",
                                "--host",
                                "0.0.0.0",
                                "--port",
                                str(SERVER_PORT),
                                "--store",
                                "$(SCALEQ_STORE)",
                                "--lease-seconds",
                                f"{grid.server.lease_seconds:g}",
                                "--heartbeat-budget",
                                f"{grid.server.heartbeat_budget:g}",
                                "--data-dir",
                                "/data",
                            ],
                            "env": [
                                {"name": "PYTHONUNBUFFERED", "value": "1"},
                                {
                                    "name": "SCALEQ_STORE",
                                    "valueFrom": {"secretKeyRef": {"name": names.store_secret, "key": "url"}},
                                },
                            ],
                            "ports": [{"name": "http", "containerPort": SERVER_PORT, "protocol": "TCP"}],
                            "readinessProbe": {**probe, "failureThreshold": 3},
                            "livenessProbe": {**probe, "initialDelaySeconds": 10, "failureThreshold": 6},
                            "resources": {
                                "requests": {"cpu": "250m", "memory": "256Mi"},
                                "limits": {"memory": "1Gi"},
                            },
                            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            "securityContext": container_security(),
                        }
                    ],
                    "volumes": [{"name": "data", "emptyDir": {}}],
                },
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(names.server, names.server_ns, labels),
        "spec": {
            "type": "ClusterIP",
            "selector": selector,
            "ports": [{"name": "http", "port": SERVER_PORT, "targetPort": "http", "protocol": "TCP"}],
        },
    }
    return [deployment, service]


def trigger_authentication(grid: Grid, names: _Names, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": KEDA_API,
        "kind": "TriggerAuthentication",
        "metadata": _meta(names.keda_auth, namespace, _labels(grid.name, "keda")),
        "spec": {"secretTargetRef": [{"parameter": "token", "name": names.keda_secret, "key": "token"}]},
    }


def worker_deployment(grid: Grid, names: _Names, g: Group, image: str) -> dict[str, Any]:
    settings = _settings(g)
    labels = _labels(grid.name, "worker", g.name)
    selector = {k: labels[k] for k in ("app.kubernetes.io/name", "scaleq.dev/grid", "scaleq.dev/group")}
    spec = worker_pod_spec(
        g,
        settings,
        image=g.image or image,
        server=names.server_url,
        worker_id="$(POD_NAME)",
        server_grace=SERVER_GRACE,
        secret=names.workers_secret,
        grace=TERMINATION_GRACE,
        restart_policy="Always",
        extra_env=[{"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
    )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.group(g), settings.namespace, labels),
        "spec": {
            "replicas": g.min_workers,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {"labels": labels, "annotations": {SAFE_TO_EVICT: "false"}},
                "spec": spec,
            },
        },
    }


def queue_value(queue: str, field: str) -> str:
    """The GJSON path of a queue's count in ``GET /api/v1/queues`` (a JSON array of queues)."""
    return f"#(name=={json.dumps(queue)}).{field}"


def scaled_object(grid: Grid, names: _Names, g: Group) -> dict[str, Any]:
    settings = _settings(g)
    url = f"{names.server_url}/api/v1/queues"

    def trigger(field: str) -> dict[str, Any]:
        return {
            "type": "metrics-api",
            "name": field,
            "metadata": {
                "url": url,
                "format": "json",
                "valueLocation": queue_value(g.queue, field),
                "targetValue": str(g.slots),
                "authMode": "bearer",
            },
            "authenticationRef": {"name": names.keda_auth},
        }

    return {
        "apiVersion": KEDA_API,
        "kind": "ScaledObject",
        "metadata": _meta(names.group(g), settings.namespace, _labels(grid.name, "worker", g.name)),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": names.group(g)},
            "minReplicaCount": g.min_workers,
            "maxReplicaCount": g.max_workers,
            "pollingInterval": 5,
            "cooldownPeriod": max(1, round(g.idle_timeout)),
            "advanced": {
                "horizontalPodAutoscalerConfig": {
                    "behavior": {"scaleDown": {"stabilizationWindowSeconds": round(g.scale_down_window)}}
                },
                "scalingModifiers": {
                    "formula": "queued + running",
                    "target": str(g.slots),
                    "activationTarget": "0",
                    "metricType": "AverageValue",
                },
            },
            "triggers": [trigger("queued"), trigger("running")],
        },
    }


# -- files ------------------------------------------------------------------------------------------------------------


def _yaml(objects: list[dict[str, Any]], header: str) -> str:
    try:
        import yaml
    except ImportError as exc:  # pragma: no cover - PyYAML comes with uvicorn[standard]
        raise ExportError(f"writing YAML needs PyYAML ({exc}): pip install pyyaml") from exc

    class Dumper(yaml.SafeDumper):
        def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: repeated labels are written out
            return True

    comment = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.strip().splitlines())
    body = "---\n".join(yaml.dump(o, Dumper=Dumper, sort_keys=False, default_flow_style=False) for o in objects)
    return f"{comment}---\n{body}"


def _check(grid: Grid) -> tuple[list[Group], list[Group]]:
    groups = [g for g in grid.groups if g.provider == "kubernetes"]
    skipped = [g for g in grid.groups if g not in groups]
    if not groups:
        raise ExportError(
            'the grid has no kubernetes groups: the export writes groups with provider = "kubernetes" (and their '
            "[groups.kubernetes] settings)"
        )
    for g in groups:
        if g.max_workers < 1:
            raise ExportError(f"group {g.name!r}: a ScaledObject needs max_workers >= 1")
    return groups, skipped


def manifests(grid: Grid, image: str | None = None) -> dict[str, list[dict[str, Any]]]:
    """The objects of every file, by file name (in apply order)."""
    groups, _ = _check(grid)
    spaces = list(dict.fromkeys(_settings(g).namespace for g in groups))
    names = _Names(grid, spaces[0])
    server_image = image or next((g.image for g in groups if g.image), None) or DEFAULT_IMAGE
    files: dict[str, list[dict[str, Any]]] = {
        "00-namespaces.yaml": namespaces(grid, spaces),
        "10-secrets.yaml": secrets(grid, names, spaces),
        "20-server.yaml": server(grid, names, server_image),
        "30-keda-auth.yaml": [trigger_authentication(grid, names, ns) for ns in spaces],
    }
    for g in groups:
        files[f"40-group-{g.name}.yaml"] = [
            worker_deployment(grid, names, g, server_image),
            scaled_object(grid, names, g),
        ]
    return files


_HEADERS = {
    "00-namespaces.yaml": "The namespaces of the grid's kubernetes groups.",
    "10-secrets.yaml": (
        "Secrets: FILL THESE IN before applying, and keep the filled-in file out of version control\n"
        "(or create the Secrets with kubectl instead: see README.md)."
    ),
    "20-server.yaml": "The scaleq server (API, dashboard, /metrics) on PostgreSQL, and its Service.",
    "30-keda-auth.yaml": "KEDA: the read token, as a bearer token for the metrics-api triggers.",
}


def readme(grid: Grid, groups: list[Group], skipped: list[Group], files: dict[str, list[dict[str, Any]]]) -> str:
    spaces = list(dict.fromkeys(_settings(g).namespace for g in groups))
    names = _Names(grid, spaces[0])
    rows = "\n".join(
        f"| `{g.name}` | `{_settings(g).namespace}` | `{g.queue}` | {g.min_workers}..{g.max_workers} | {g.slots} "
        f"| {g.resources.cpus:g} cpu"
        + (f", {memory_quantity(g.resources.memory)}" if g.resources.memory else "")
        + (f", {g.resources.gpus} {GPU_RESOURCE}" if g.resources.gpus else "")
        + " |"
        for g in groups
    )
    skipped_text = ""
    if skipped:
        skipped_text = "\nGroups of other providers are left out: " + ", ".join(
            f"`{g.name}` ({g.provider})" for g in skipped
        )
        skipped_text += ".\n"
    file_list = "\n".join(f"- `{name}`: {', '.join(o['kind'] for o in objs)}" for name, objs in files.items())
    worker_secrets = " ".join(f"-n {s}" for s in spaces)
    return render.render(
        "k8s/README.md.tmpl",
        grid_name=grid.name,
        rows=rows,
        skipped_text=skipped_text,
        file_list=file_list,
        workers_secret=names.workers_secret,
        keda_secret=names.keda_secret,
        worker_secrets=worker_secrets,
        server_namespace=names.server_ns,
        server=names.server,
        termination_grace=TERMINATION_GRACE,
    )


def export_k8s(grid: Grid, out: Path, *, image: str | None = None) -> list[Path]:
    """Write the manifests for the grid's kubernetes groups into ``out``; return the files written, in apply order
    (README.md last). ``image`` is the server's image (default: the first group's image)."""
    groups, skipped = _check(grid)
    files = manifests(grid, image)
    texts = {}
    for name, objects in files.items():
        header = (
            _HEADERS.get(name)
            or f"Worker group {name[len('40-group-') : -len('.yaml')]}: Deployment + KEDA ScaledObject."
        )
        texts[name] = _yaml(objects, f"Generated by `scaleq export k8s` for grid {grid.name}.\n{header}")
    texts["README.md"] = readme(grid, groups, skipped, files)
    return render.write(out, texts)
