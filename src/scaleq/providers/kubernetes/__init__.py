"""The kubernetes provider: workers are bare pods of the group's worker image, one pod per worker.

Design:

- **Bare pods, not a Deployment.** Scale-in must remove only the idle workers scaleq drained. A Deployment (or a
  ReplicaSet) scaled down deletes pods of its own choosing — possibly one in the middle of a job — so scaleq creates
  one pod per worker, named by the worker id, and the controller decides which go: it drains idle workers through
  the server, the worker exits 0, and ``workers`` deletes the finished pod.
- **Labels are the state**: ``app.kubernetes.io/managed-by=scaleq``, ``scaleq.dev/grid``, ``scaleq.dev/group``,
  ``scaleq.dev/worker`` and ``scaleq.dev/version`` (``Group.version()``). ``workers`` finds pods by label selector only,
  so a restarted controller, a second provider instance, ``destroy`` and ``doctor`` all see what the cluster runs.
- **A pod** runs ``scaleq worker …`` (``command: [scaleq]``, the same arguments every provider uses) in
  ``group.image``, with ``restartPolicy: Never`` (a drained worker must stay gone; the controller replaces workers),
  requests and limits from ``group.resources`` (``cpu``, ``memory``, ``nvidia.com/gpu``; requests equal limits, so
  the pod is in the Guaranteed QoS class and is the last to be evicted under node pressure), the group's
  ``service_account``, ``image_pull_policy`` and ``node_selector``, a security context that passes the
  ``restricted`` Pod Security Standard (see ``manifests.py``), no service-link environment variables, and no API
  token mounted unless a service account is named (workers do not talk to the Kubernetes API). A ``spot`` group's
  workers read SIGTERM as a preemption notice (``--on-notice handback``).
- **The worker token** comes from the Secret ``scaleq-<grid>-worker-token`` (key ``token``) that ``start`` creates or
  updates in the namespace: ``SCALEQ_TOKEN`` is a ``secretKeyRef``, never a plain value in the pod spec, so whoever
  may read pods may not read the token. ``destroy`` deletes the Secret once no pod of the grid is left there.
- **Draining**: ``terminationGracePeriodSeconds`` is :data:`TERMINATION_GRACE` (the default job ``max_duration``
  plus five minutes for outputs), so a pod deleted by ``stop``, by a node drain or by an eviction gets its SIGTERM,
  finishes its jobs and exits before the kubelet's SIGKILL. ``stop`` deletes the pod with that grace period (the
  kubelet sends SIGTERM at once; the pod shows a ``deletionTimestamp`` and lists as ``stopping``); ``force`` deletes
  with grace 0. The pods also carry ``cluster-autoscaler.kubernetes.io/safe-to-evict: "false"``: the cluster
  autoscaler must not move a busy worker to pack nodes — scaleq removes idle workers itself, which empties nodes.
- **Housekeeping**: a pod whose worker exited (phase ``Succeeded`` or ``Failed``) has no use; ``workers`` deletes it,
  logging why a failed one failed (exit code, reason such as ``OOMKilled``, the last lines of its log).
- **Rolling image update**: a changed image (or any group setting) is a new ``Group.version()``; new pods carry it in
  ``scaleq.dev/version`` and ``workers`` reports each pod's version, so ``apply`` drains the out-of-date ones.
- **Credentials** come from the usual places: ``[groups.kubernetes] kubeconfig`` (and ``context``), else
  ``$KUBECONFIG``, else ``~/.kube/config``, else the in-cluster service account. None of them, or one that does not
  work, is a :class:`~scaleq.providers.base.ProviderError` that says which was tried and what to do — from ``plan``,
  ``apply``, the controller and ``doctor`` alike. API errors (401, 403, a missing namespace) become errors that name
  the fix.
- The official client is synchronous: every call runs in ``asyncio.to_thread`` with a request timeout.
- The ``kubernetes`` package is optional (``pip install 'scaleq[kubernetes]'``) and imported on first use; the pure
  manifest builders (:func:`worker_pod_spec`, …) need no client and are shared with ``scaleq export k8s``.

The package, one idea a module: ``manifests.py`` (labels, quantities, the token Secret, the pod spec: pure),
``connection.py`` (credentials, one client per cluster, API errors in words), ``provider.py`` (the provider's
primitives on the skeleton of :mod:`scaleq.providers.base`). The names other code uses are exported here.
"""

from __future__ import annotations

from scaleq.providers.kubernetes.connection import NO_CREDENTIALS, RBAC_HINT
from scaleq.providers.kubernetes.manifests import (
    CONTAINER,
    GPU_RESOURCE,
    GRID_LABEL,
    GROUP_LABEL,
    MANAGED_BY,
    SAFE_TO_EVICT,
    TERMINATION_GRACE,
    TOKEN_KEY,
    VERSION_LABEL,
    WORKER_LABEL,
    WORKER_UID,
    container_security,
    cpu_quantity,
    grid_labels,
    group_selector,
    memory_quantity,
    pod_labels,
    pod_security,
    resources,
    token_secret,
    token_secret_name,
    worker_container,
    worker_pod_spec,
)
from scaleq.providers.kubernetes.provider import FORCE_GRACE, NEEDED_ACCESS, KubernetesProvider

__all__ = [
    "CONTAINER",
    "FORCE_GRACE",
    "GPU_RESOURCE",
    "GRID_LABEL",
    "GROUP_LABEL",
    "MANAGED_BY",
    "NEEDED_ACCESS",
    "NO_CREDENTIALS",
    "RBAC_HINT",
    "SAFE_TO_EVICT",
    "TERMINATION_GRACE",
    "TOKEN_KEY",
    "VERSION_LABEL",
    "WORKER_LABEL",
    "WORKER_UID",
    "KubernetesProvider",
    "container_security",
    "cpu_quantity",
    "grid_labels",
    "group_selector",
    "memory_quantity",
    "pod_labels",
    "pod_security",
    "resources",
    "token_secret",
    "token_secret_name",
    "worker_container",
    "worker_pod_spec",
]
