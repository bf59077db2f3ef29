"""The kubernetes provider: the primitives on bare pods (see the package's docstring for the design).

``workers`` lists the group's pods by label selector and keeps house (an exited worker's pod is deleted, a failed one
logged); ``start`` stores the worker token in its Secret, then creates the pods; ``stop`` deletes one pod with the
termination grace (``force``: grace 0); ``destroy`` is the skeleton's drain-then-force, then the Secret goes once no
pod of the grid is left; ``health`` asks the API server whether the credentials may do all that.

It lists on every call and never watches: the controller asks once a tick, and a fresh list has no resourceVersion
to outlive, so a watch's 410 Expired (history compacted) cannot reach it. The one object it updates, the Secret, it
updates with the resourceVersion it read, so a concurrent writer is a 409 Conflict and a fresh read, not a lost write.

``preempted`` answers from what Kubernetes records when it takes a pod back: a kubelet's eviction (``status.reason``
``Evicted``) or, since 1.26, a ``DisruptionTarget`` condition (:data:`DISRUPTIONS`: preemption by the scheduler, the
Eviction API, the kubelet, the taint manager, the pod garbage collector). An evicted pod has failed, and ``workers``
deletes failed pods: what it saw is remembered, so the controller's question that follows still has its answer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar

from scaleq.grid import Group, KubernetesSettings
from scaleq.providers.base import Health, ProviderBase, ProviderError, ProviderWorker, new_worker_id, start_each
from scaleq.providers.kubernetes.connection import RBAC_HINT, Connection, Connections, client_modules
from scaleq.providers.kubernetes.manifests import (
    CONTAINER,
    GRID_LABEL,
    GROUP_LABEL,
    SAFE_TO_EVICT,
    TERMINATION_GRACE,
    TOKEN_KEY,
    VERSION_LABEL,
    WORKER_LABEL,
    grid_labels,
    group_selector,
    pod_labels,
    token_secret,
    token_secret_name,
    worker_pod_spec,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: How long ``destroy`` waits for pods deleted with grace 0 to leave the API.
FORCE_GRACE = 10.0
#: The verbs the provider needs in its namespace (``health`` asks the API server whether they are allowed).
NEEDED_ACCESS = (
    ("list", "pods"),
    ("get", "pods"),
    ("create", "pods"),
    ("delete", "pods"),
    ("get", "secrets"),
    ("create", "secrets"),
    ("patch", "secrets"),
    ("delete", "secrets"),
)
#: The reasons of a ``DisruptionTarget`` condition: the cluster, not the worker, ended the pod.
DISRUPTIONS = frozenset(
    {
        "PreemptionByScheduler",
        "PreemptionByKubeScheduler",  # its name before Kubernetes 1.27
        "EvictionByEvictionAPI",
        "TerminationByKubelet",
        "DeletionByTaintManager",
        "DeletionByPodGC",
    }
)
#: How many evictions seen by ``workers`` are kept for ``preempted`` (the controller asks within seconds).
TAKEN_KEPT = 256
#: Pod problems worth a warning in the log (once per pod and reason).
_STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "Unschedulable"}


class KubernetesProvider(ProviderBase):
    name = "kubernetes"
    force_grace = FORCE_GRACE

    def __init__(
        self,
        *,
        grid: str,
        server: str,
        token: str,
        settings: KubernetesSettings | None = None,
        termination_grace: int = TERMINATION_GRACE,
        server_grace: float = 300.0,
        api_timeout: float = 30.0,
    ) -> None:
        self.grid = grid
        self.server = server
        self.token = token
        self.settings = settings
        self.termination_grace = termination_grace
        self.server_grace = server_grace
        self.api_timeout = api_timeout
        self._connections = Connections()
        self._warned: set[tuple[str, str]] = set()
        self._taken: dict[str, str] = {}  # worker id → how the cluster took its pod back, seen as it was deleted

    # -- the API server ---------------------------------------------------------------------------------------------

    def _settings(self, group: Group | None = None) -> KubernetesSettings:
        return (group.kubernetes if group is not None else None) or self.settings or KubernetesSettings()

    async def _call(self, settings: KubernetesSettings, what: str, fn: Callable[[Connection], T]) -> T:
        return await self._connections.call(settings, what, fn)

    async def close(self) -> None:
        self._connections.close()

    # -- what a worker pod is ---------------------------------------------------------------------------------------

    def new_worker_id(self, group: Group) -> str:
        """The worker id, which is also the pod's name and a label value: at most 63 characters."""
        worker_id = new_worker_id(self.grid, group.name)
        if len(worker_id) > 63:
            worker_id = f"{f'{self.grid}-{group.name}'[:56].rstrip('-')}-{secrets.token_hex(3)}"
        return worker_id

    def pod_manifest(self, group: Group, worker_id: str) -> dict[str, Any]:
        settings = self._settings(group)
        if not group.image:
            raise ProviderError(f"group {group.name}: a kubernetes group needs image (the worker image its pods run)")
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": worker_id,
                "namespace": settings.namespace,
                "labels": pod_labels(self.grid, group, worker_id),
                "annotations": {SAFE_TO_EVICT: "false"},
            },
            "spec": worker_pod_spec(
                group,
                settings,
                image=group.image,
                server=self.server,
                worker_id=worker_id,
                server_grace=self.server_grace,
                secret=token_secret_name(self.grid),
                grace=self.termination_grace,
            ),
        }

    def _ensure_secret(self, conn: Connection, namespace: str) -> None:
        """Create the worker-token Secret, or update it when the token (or its labels) changed.

        The update carries the resourceVersion it was decided on, so it lands only on the Secret that was read: if
        another writer changed it in between, the API server answers 409 Conflict and the decision is made again on
        a fresh read (once; a second conflict is an error worth reporting, not a loop)."""
        k8s = client_modules()
        body = token_secret(self.grid, namespace, self.token)
        name = body["metadata"]["name"]
        for attempt in (1, 2):
            current = self._read_or_create_secret(conn, namespace, body)
            if current is None:
                return
            labels = current.metadata.labels or {}
            if (current.data or {}).get(TOKEN_KEY) == body["data"][TOKEN_KEY] and all(
                labels.get(k) == v for k, v in grid_labels(self.grid).items()
            ):
                return
            patch = {
                "metadata": {"labels": grid_labels(self.grid), "resourceVersion": current.metadata.resource_version},
                "data": body["data"],
            }
            try:
                conn.core.patch_namespaced_secret(name, namespace, patch, _request_timeout=self.api_timeout)
                return
            except k8s.client.ApiException as exc:
                if exc.status != 409 or attempt == 2:
                    raise
                log.info("Secret %s in namespace %s changed while it was updated; reading it again", name, namespace)

    def _read_or_create_secret(self, conn: Connection, namespace: str, body: dict[str, Any]) -> Any:
        """The Secret as stored, or None when this call created it (with the right token already)."""
        k8s = client_modules()
        name = body["metadata"]["name"]
        try:
            return conn.core.read_namespaced_secret(name, namespace, _request_timeout=self.api_timeout)
        except k8s.client.ApiException as exc:
            if exc.status != 404:
                raise
        try:
            conn.core.create_namespaced_secret(namespace, body, _request_timeout=self.api_timeout)
            return None
        except k8s.client.ApiException as again:
            if again.status != 409:  # 409 AlreadyExists: another controller created it meanwhile; check its token
                raise
        return conn.core.read_namespaced_secret(name, namespace, _request_timeout=self.api_timeout)

    def _pods(self, conn: Connection, namespace: str, group: Group) -> list[Any]:
        """The group's pods, found by its label selector."""
        return list(
            conn.core.list_namespaced_pod(
                namespace, label_selector=group_selector(self.grid, group.name), _request_timeout=self.api_timeout
            ).items
        )

    def _describe(self, pod: Any) -> tuple[str, str]:
        """(status, detail) of a live pod."""
        status_obj = pod.status
        phase = (status_obj.phase if status_obj else None) or "Pending"
        reason = ""
        for cs in (status_obj.container_statuses if status_obj else None) or []:
            waiting = cs.state.waiting if cs.state else None
            if waiting is not None and waiting.reason:
                reason = f"{waiting.reason}: {waiting.message}" if waiting.message else waiting.reason
        for cond in (status_obj.conditions if status_obj else None) or []:
            if cond.type == "PodScheduled" and cond.status == "False" and cond.reason:
                reason = f"{cond.reason}: {cond.message}" if cond.message else cond.reason
        if pod.metadata.deletion_timestamp is not None:
            status = "stopping"
        elif phase in ("Running", "Unknown"):
            status = "running"
        else:
            status = "starting"
        image = pod.spec.containers[0].image if pod.spec and pod.spec.containers else "?"
        node = (pod.spec.node_name if pod.spec else None) or "no node yet"
        detail = f"pod {pod.metadata.name} ({image}) on {node}: {phase}"
        if pod.metadata.deletion_timestamp is not None:
            detail += ", terminating"
        if reason:
            detail += f" ({reason})"
            key = (pod.metadata.name, reason.split(":", 1)[0])
            if key[1] in _STUCK and key not in self._warned:
                self._warned.add(key)
                log.warning("worker pod %s cannot start: %s", pod.metadata.name, reason)
        return status, detail

    def _housekeep(self, conn: Connection, namespace: str, pod: Any) -> None:
        """Delete a pod whose worker exited, saying why it exited if it failed."""
        k8s = client_modules()
        name = pod.metadata.name
        if taken := disruption(pod):
            self._taken[(pod.metadata.labels or {}).get(WORKER_LABEL) or name] = taken
            while len(self._taken) > TAKEN_KEPT:  # idle workers' evictions are never asked about: forget the oldest
                del self._taken[next(iter(self._taken))]
        terminated = None
        for cs in (pod.status.container_statuses if pod.status else None) or []:
            if cs.state is not None and cs.state.terminated is not None:
                terminated = cs.state.terminated
        code = terminated.exit_code if terminated is not None else None
        if pod.status.phase == "Failed" or code not in (0, None):
            why = f"exit code {code}" if code is not None else "no exit code"
            if terminated is not None and terminated.reason:
                why += f", {terminated.reason}"
            if pod.status.reason or pod.status.message:
                why += f", {pod.status.reason or ''} {pod.status.message or ''}".rstrip()
            tail = ""
            try:
                tail = conn.core.read_namespaced_pod_log(
                    name, namespace, container=CONTAINER, tail_lines=20, _request_timeout=self.api_timeout
                ).strip()
            except Exception:  # logs are a courtesy: pods/log may be forbidden, or the node gone
                pass
            log.warning("worker pod %s failed (%s); its last output:\n%s", name, why, tail or "(none)")
        try:
            conn.core.delete_namespaced_pod(name, namespace, grace_period_seconds=0, _request_timeout=self.api_timeout)
        except k8s.client.ApiException as exc:
            if exc.status != 404:
                raise
        self._warned = {k for k in self._warned if k[0] != name}

    # -- the provider interface -------------------------------------------------------------------------------------

    async def workers(self, group: Group) -> list[ProviderWorker]:
        settings = self._settings(group)
        ns = settings.namespace

        def scan(conn: Connection) -> list[ProviderWorker]:
            pods = self._pods(conn, ns, group)
            found = []
            for pod in pods:
                labels = pod.metadata.labels or {}
                if pod.status is not None and pod.status.phase in ("Succeeded", "Failed"):
                    self._housekeep(conn, ns, pod)
                    continue
                status, detail = self._describe(pod)
                created = pod.metadata.creation_timestamp
                found.append(
                    ProviderWorker(
                        labels.get(WORKER_LABEL) or pod.metadata.name,
                        group.name,
                        created.timestamp() if created is not None else time.time(),
                        status,  # type: ignore[arg-type]
                        detail,
                        labels.get(VERSION_LABEL, ""),
                    )
                )
            return sorted(found, key=lambda w: (w.started_at, w.id))

        return await self._call(settings, f"list the pods of group {group.name} in namespace {ns}", scan)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """From each pod's status: the waiting container's reason (``ErrImagePull``, ``ImagePullBackOff``, …) or the
        scheduler's (``Unschedulable``), with the message, as ``kubectl describe pod`` shows them."""
        settings = self._settings(group)
        ns, wanted = settings.namespace, set(worker_ids)

        def look(conn: Connection) -> dict[str, str]:
            pods = self._pods(conn, ns, group)
            found = {}
            for pod in pods:
                worker_id = (pod.metadata.labels or {}).get(WORKER_LABEL) or pod.metadata.name
                if worker_id in wanted:
                    found[worker_id] = self._describe(pod)[1]
            return found

        return await self._call(settings, f"read the pods of group {group.name} in namespace {ns}", look)

    async def preempted(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """Of these workers, those whose pods the cluster evicted or preempted (:func:`disruption`), as seen now or
        as ``workers`` saw them before deleting the failed pods."""
        settings = self._settings(group)
        ns, wanted = settings.namespace, set(worker_ids)

        def look(conn: Connection) -> dict[str, str]:
            pods = self._pods(conn, ns, group)
            found = {i: self._taken.pop(i) for i in wanted if i in self._taken}
            for pod in pods:
                worker_id = (pod.metadata.labels or {}).get(WORKER_LABEL) or pod.metadata.name
                if worker_id in wanted and (taken := disruption(pod)):
                    found[worker_id] = taken
            return found

        return await self._call(settings, f"read the pods of group {group.name} in namespace {ns}", look)

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        settings = self._settings(group)
        ns = settings.namespace
        ids = [self.new_worker_id(group) for _ in range(count)]
        manifests = {i: self.pod_manifest(group, i) for i in ids}  # refused before the API is asked, as a whole
        secret = token_secret_name(self.grid)
        await self._call(
            settings,
            f"store the worker token in Secret {secret} in namespace {ns}",
            lambda c: self._ensure_secret(c, ns),
        )

        def create(conn: Connection, body: dict[str, Any]) -> str:
            conn.core.create_namespaced_pod(ns, body, _request_timeout=self.api_timeout)
            return body["metadata"]["name"]

        return await start_each(
            group,
            ids,
            lambda i: self._call(settings, f"create pod {i} in namespace {ns}", lambda c: create(c, manifests[i])),
        )

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        """Delete the worker's pod: the kubelet sends SIGTERM and the worker drains (within the grace period)."""
        settings = self._settings(group)
        ns = settings.namespace
        grace = 0 if force else self.termination_grace

        def delete(conn: Connection) -> None:
            k8s = client_modules()
            try:
                pod = conn.core.read_namespaced_pod(worker_id, ns, _request_timeout=self.api_timeout)
            except k8s.client.ApiException as exc:
                if exc.status == 404:
                    return
                raise
            labels = pod.metadata.labels or {}
            if labels.get(GRID_LABEL) != self.grid or labels.get(GROUP_LABEL) != group.name:
                return  # a namesake that is not ours
            options = k8s.client.V1DeleteOptions(
                grace_period_seconds=grace, preconditions=k8s.client.V1Preconditions(uid=pod.metadata.uid)
            )
            try:
                conn.core.delete_namespaced_pod(
                    worker_id, ns, grace_period_seconds=grace, body=options, _request_timeout=self.api_timeout
                )
            except k8s.client.ApiException as exc:
                if exc.status not in (404, 409):  # gone meanwhile, or replaced by a namesake (uid precondition)
                    raise

        await self._call(settings, f"delete pod {worker_id} in namespace {ns}", delete)

    async def clean_up(self, group: Group, drained: list[ProviderWorker]) -> None:
        """Delete the token Secret, once no pod of the grid is left in the namespace. (Jobs still running on pods
        deleted with grace 0 come back through lease expiry.)"""
        ns = self._settings(group).namespace

        def remove_secret(conn: Connection) -> None:
            k8s = client_modules()
            others = conn.core.list_namespaced_pod(
                ns, label_selector=group_selector(self.grid), limit=1, _request_timeout=self.api_timeout
            ).items
            if others:  # another group of this grid still uses the token
                return
            try:
                conn.core.delete_namespaced_secret(token_secret_name(self.grid), ns, _request_timeout=self.api_timeout)
            except k8s.client.ApiException as exc:
                if exc.status != 404:
                    raise

        await self._call(
            self._settings(group), f"delete Secret {token_secret_name(self.grid)} in namespace {ns}", remove_secret
        )

    async def health(self) -> Health:
        """One cheap look: the server's version, a one-item pod list in the namespace, the namespace itself (where
        readable) and whether the credentials may do what the provider does (SelfSubjectAccessReview)."""
        settings = self._settings()
        ns = settings.namespace

        def check(conn: Connection) -> Health:
            k8s = client_modules()
            version = conn.version.get_code(_request_timeout=self.api_timeout).git_version
            conn.core.list_namespaced_pod(
                ns, label_selector=group_selector(self.grid), limit=1, _request_timeout=self.api_timeout
            )
            try:
                conn.core.read_namespace(ns, _request_timeout=self.api_timeout)
            except k8s.client.ApiException as exc:
                if exc.status == 404:
                    return Health(
                        False,
                        f"Kubernetes {version} at {conn.where}: namespace {ns} does not exist. Create it (kubectl "
                        f"create namespace {ns}) or set [groups.kubernetes] namespace",
                    )
                if exc.status != 403:  # 403: may not read namespaces, which the provider does not need
                    raise
            denied = []
            for verb, resource in NEEDED_ACCESS:
                review = k8s.client.V1SelfSubjectAccessReview(
                    api_version="authorization.k8s.io/v1",
                    kind="SelfSubjectAccessReview",
                    spec=k8s.client.V1SelfSubjectAccessReviewSpec(
                        resource_attributes=k8s.client.V1ResourceAttributes(
                            namespace=ns, verb=verb, resource=resource, group=""
                        )
                    ),
                )
                try:
                    answer = conn.authz.create_self_subject_access_review(review, _request_timeout=self.api_timeout)
                except k8s.client.ApiException as exc:
                    if exc.status in (403, 404):  # the review API is not offered: the calls themselves will tell
                        break
                    raise
                if not answer.status.allowed:
                    denied.append(f"{verb} {resource}")
            if denied:
                return Health(
                    False,
                    f"Kubernetes {version} at {conn.where}: the credentials may not {', '.join(denied)} in namespace "
                    f"{ns}; {RBAC_HINT.format(ns=ns)}",
                )
            return Health(True, f"Kubernetes {version} at {conn.where}, namespace {ns}: pods and secrets allowed")

        try:
            return await self._call(settings, f"check access to namespace {ns}", check)
        except ProviderError as exc:
            return Health(False, str(exc))


def disruption(pod: Any) -> str:
    """How the cluster took the pod back, in its words: an eviction (``status.reason`` ``Evicted``) or a
    ``DisruptionTarget`` condition of :data:`DISRUPTIONS`; empty when it did not."""
    status = pod.status
    name = pod.metadata.name
    for cond in (status.conditions if status else None) or []:
        if cond.type == "DisruptionTarget" and cond.status == "True" and cond.reason in DISRUPTIONS:
            return f"pod {name}: DisruptionTarget {cond.reason}: {cond.message or 'no message'}"
    if status is not None and status.reason == "Evicted":
        return f"pod {name} evicted: {status.message or 'no message'}"
    return ""
