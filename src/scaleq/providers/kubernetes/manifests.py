"""Worker pods as Kubernetes objects: labels, selectors, quantities, the token Secret and the pod spec.

Pure functions, no client needed: the provider builds its pods with them, and ``scaleq export k8s`` builds the same
worker containers for its Deployments (see the package's docstring for why each field is what it is).

**The pods pass the ``restricted`` Pod Security Standard** (:data:`POD_SECURITY`, :data:`CONTAINER_SECURITY`): the
worker needs no privilege -- it runs as a numeric non-root user (:data:`WORKER_UID`, the "nonroot" uid of distroless
images: the image's files are world-readable and its work directory is ``/tmp``), with no privilege escalation, every
capability dropped and the runtime's default seccomp profile. Its process jobs run the same way. Container jobs need
a Docker Engine, which the pod does not mount: a remote one (``DOCKER_HOST`` in the group's env) keeps the pod
restricted; the node's socket (a ``hostPath`` volume, added by whoever deploys it) needs the ``privileged`` level.
"""

from __future__ import annotations

import base64
import copy
from typing import Any

from scaleq.grid import Group, KubernetesSettings
from scaleq.jobs import DEFAULT_MAX_DURATION
from scaleq.providers.base import worker_args

MANAGED_BY = "app.kubernetes.io/managed-by"
GRID_LABEL = "scaleq.dev/grid"
GROUP_LABEL = "scaleq.dev/group"
WORKER_LABEL = "scaleq.dev/worker"
VERSION_LABEL = "scaleq.dev/version"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
CONTAINER = "worker"
TOKEN_KEY = "token"
GPU_RESOURCE = "nvidia.com/gpu"
#: The worker's user and group: numeric (``runAsNonRoot`` cannot check a name) and not root.
WORKER_UID = 65532
#: The pod's and the worker container's security contexts: what the ``restricted`` Pod Security Standard asks
#: (copy them: :func:`pod_security`, :func:`container_security`; a shared dict would be a YAML alias when dumped).
POD_SECURITY: dict[str, Any] = {
    "runAsNonRoot": True,
    "runAsUser": WORKER_UID,
    "runAsGroup": WORKER_UID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY: dict[str, Any] = {
    "allowPrivilegeEscalation": False,
    "capabilities": {"drop": ["ALL"]},
    "runAsNonRoot": True,
    "seccompProfile": {"type": "RuntimeDefault"},
}


def pod_security() -> dict[str, Any]:
    return copy.deepcopy(POD_SECURITY)


def container_security() -> dict[str, Any]:
    return copy.deepcopy(CONTAINER_SECURITY)


#: Long enough for a job of the default max_duration that started just before the SIGTERM, plus its outputs.
TERMINATION_GRACE = DEFAULT_MAX_DURATION + 300


def token_secret_name(grid: str) -> str:
    return f"scaleq-{grid}-worker-token"


def grid_labels(grid: str) -> dict[str, str]:
    return {MANAGED_BY: "scaleq", GRID_LABEL: grid}


def pod_labels(grid: str, group: Group, worker_id: str) -> dict[str, str]:
    return {**grid_labels(grid), GROUP_LABEL: group.name, WORKER_LABEL: worker_id, VERSION_LABEL: group.version()}


def group_selector(grid: str, group: str | None = None) -> str:
    labels = grid_labels(grid) | ({GROUP_LABEL: group} if group else {})
    return ",".join(f"{k}={v}" for k, v in labels.items())


def cpu_quantity(cpus: float) -> str:
    return f"{cpus:g}" if float(cpus).is_integer() else f"{round(cpus * 1000)}m"


def memory_quantity(memory: int) -> str:
    for suffix, size in (("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)):
        if memory % size == 0:
            return f"{memory // size}{suffix}"
    return str(memory)


def resources(group: Group) -> dict[str, dict[str, str]]:
    """Requests equal to limits (Guaranteed QoS when memory is set); GPUs are limits, as extended resources must be."""
    res = group.resources
    amounts = {"cpu": cpu_quantity(res.cpus)}
    if res.memory:
        amounts["memory"] = memory_quantity(res.memory)
    limits = dict(amounts)
    if res.gpus:
        limits[GPU_RESOURCE] = str(res.gpus)
    return {"requests": amounts, "limits": limits}


def token_secret(grid: str, namespace: str, token: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": token_secret_name(grid), "namespace": namespace, "labels": grid_labels(grid)},
        "type": "Opaque",
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }


def worker_container(
    group: Group,
    settings: KubernetesSettings,
    *,
    image: str,
    server: str,
    worker_id: str,
    server_grace: float,
    secret: str,
    extra_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    env: list[dict[str, Any]] = [{"name": "PYTHONUNBUFFERED", "value": "1"}, *(extra_env or [])]
    env += [{"name": k, "value": v} for k, v in group.env.items() if k != "SCALEQ_TOKEN"]
    env.append({"name": "SCALEQ_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": TOKEN_KEY}}})
    return {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": ["scaleq"],
        "args": worker_args(group, server, worker_id, server_grace),
        "env": env,
        "resources": resources(group),
        "securityContext": container_security(),
    }


def worker_pod_spec(
    group: Group,
    settings: KubernetesSettings,
    *,
    image: str,
    server: str,
    worker_id: str,
    server_grace: float,
    secret: str,
    grace: int = TERMINATION_GRACE,
    restart_policy: str = "Never",
    extra_env: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "restartPolicy": restart_policy,
        "terminationGracePeriodSeconds": grace,
        "enableServiceLinks": False,
        "automountServiceAccountToken": settings.service_account is not None,
        "securityContext": pod_security(),
        "containers": [
            worker_container(
                group,
                settings,
                image=image,
                server=server,
                worker_id=worker_id,
                server_grace=server_grace,
                secret=secret,
                extra_env=extra_env,
            )
        ],
    }
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    if settings.node_selector:
        spec["nodeSelector"] = dict(settings.node_selector)
    return spec
