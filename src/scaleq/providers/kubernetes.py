"""The kubernetes provider: workers are bare pods of the group's worker image, one pod per worker.

Design:

- **Bare pods, not a Deployment.** Scale-in must remove only the idle workers scaleq drained. A Deployment (or a
  ReplicaSet) scaled down deletes pods of its own choosing — possibly one in the middle of a job — so scaleq creates
  one pod per worker, named by the worker id, and the controller decides which go: it drains idle workers through
  the server, the worker exits 0, and ``list`` deletes the finished pod.
- **Labels are the state**: ``app.kubernetes.io/managed-by=scaleq``, ``scaleq.dev/grid``, ``scaleq.dev/group``,
  ``scaleq.dev/worker`` and ``scaleq.dev/version`` (``Group.version()``). ``list`` finds pods by label selector only,
  so a restarted controller, a second provider instance, ``destroy`` and ``doctor`` all see what the cluster runs.
- **A pod** runs ``scaleq worker …`` (``command: [scaleq]``, the same arguments every provider uses) in
  ``group.image``, with ``restartPolicy: Never`` (a drained worker must stay gone; the controller replaces workers),
  requests and limits from ``group.resources`` (``cpu``, ``memory``, ``nvidia.com/gpu``; requests equal limits, so
  the pod is in the Guaranteed QoS class and is the last to be evicted under node pressure), the group's
  ``service_account`` and ``image_pull_policy``, no service-link environment variables, and no API token mounted
  unless a service account is named (workers do not talk to the Kubernetes API).
- **The worker token** comes from the Secret ``scaleq-<grid>-worker-token`` (key ``token``) that ``start`` creates or
  updates in the namespace: ``SCALEQ_TOKEN`` is a ``secretKeyRef``, never a plain value in the pod spec, so whoever
  may read pods may not read the token. ``destroy`` deletes the Secret once no pod of the grid is left there.
- **Draining**: ``terminationGracePeriodSeconds`` is :data:`TERMINATION_GRACE` (the default job ``max_duration``
  plus five minutes for outputs), so a pod deleted by ``stop``, by a node drain or by an eviction gets its SIGTERM,
  finishes its jobs and exits before the kubelet's SIGKILL. ``stop`` deletes the pod with that grace period (the
  kubelet sends SIGTERM at once; the pod shows a ``deletionTimestamp`` and lists as ``stopping``); ``force`` deletes
  with grace 0. The pods also carry ``cluster-autoscaler.kubernetes.io/safe-to-evict: "false"``: the cluster
  autoscaler must not move a busy worker to pack nodes — scaleq removes idle workers itself, which empties nodes.
- **Housekeeping**: a pod whose worker exited (phase ``Succeeded`` or ``Failed``) has no use; ``list`` deletes it,
  logging why a failed one failed (exit code, reason such as ``OOMKilled``, the last lines of its log).
- **Rolling image update**: a changed image (or any group setting) is a new ``Group.version()``; new pods carry it in
  ``scaleq.dev/version`` and ``list`` reports each pod's version, so ``apply`` drains the out-of-date ones.
- **Credentials** come from the usual places: ``[groups.kubernetes] kubeconfig`` (and ``context``), else
  ``$KUBECONFIG``, else ``~/.kube/config``, else the in-cluster service account. None of them, or one that does not
  work, is a :class:`ProviderError` that says which was tried and what to do — from ``plan``, ``apply``, the
  controller and ``doctor`` alike. API errors (401, 403, a missing namespace) become errors that name the fix.
- The official client is synchronous: every call runs in ``asyncio.to_thread`` with a request timeout.
- The ``kubernetes`` package is optional (``pip install 'scaleq[kubernetes]'``) and imported on first use; the pure
  manifest builders here (:func:`worker_pod_spec`, …) need no client and are shared with ``scaleq export k8s``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from scaleq.grid import Group, KubernetesSettings
from scaleq.jobs import DEFAULT_MAX_DURATION
from scaleq.providers.base import Health, ProviderError, ProviderWorker, new_worker_id, wait_gone, worker_args

log = logging.getLogger(__name__)
T = TypeVar("T")

MANAGED_BY = "app.kubernetes.io/managed-by"
GRID_LABEL = "scaleq.dev/grid"
GROUP_LABEL = "scaleq.dev/group"
WORKER_LABEL = "scaleq.dev/worker"
VERSION_LABEL = "scaleq.dev/version"
SAFE_TO_EVICT = "cluster-autoscaler.kubernetes.io/safe-to-evict"
CONTAINER = "worker"
TOKEN_KEY = "token"
GPU_RESOURCE = "nvidia.com/gpu"
#: Long enough for a job of the default max_duration that started just before the SIGTERM, plus its outputs.
TERMINATION_GRACE = DEFAULT_MAX_DURATION + 300
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
#: Pod problems worth a warning in the log (once per pod and reason).
_STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "CreateContainerConfigError", "Unschedulable"}
_NO_CREDENTIALS = (
    "no Kubernetes credentials found: no kubeconfig ([groups.kubernetes] kubeconfig, $KUBECONFIG or "
    "~/.kube/config) and not running inside a cluster (KUBERNETES_SERVICE_HOST is unset). Point "
    "[groups.kubernetes] kubeconfig or KUBECONFIG at a kubeconfig for the cluster (e.g. from your cloud's "
    "get-credentials command), or run the controller in a pod with a service account"
)
_RBAC_HINT = (
    "the credentials need, in namespace {ns}: pods (get, list, create, delete) and secrets (get, create, patch, "
    "delete) — see the Role in docs/providers.md (Kubernetes)"
)


# -- manifests (pure: no client needed; shared with ``scaleq export k8s``) --------------------------------------------


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
    return spec


# -- the client, imported on first use --------------------------------------------------------------------------------


def _client_modules() -> Any:
    try:
        import kubernetes
        import kubernetes.client
        import kubernetes.config
    except ImportError as exc:  # the optional extra is not installed
        raise ProviderError(
            f"the kubernetes provider needs the official Kubernetes client ({exc}): pip install 'scaleq[kubernetes]'"
        ) from exc
    return kubernetes


@dataclass
class _Connection:
    api_client: Any
    core: Any
    authz: Any
    version: Any
    where: str  # for messages: "https://host:6443 (kubeconfig ~/.kube/config, context prod)"


def _kubeconfig(settings: KubernetesSettings) -> tuple[str | None, str]:
    """The kubeconfig to use and where that choice came from; (None, why) when there is none."""
    if settings.kubeconfig:
        path = Path(settings.kubeconfig).expanduser()
        if not path.is_file():
            raise ProviderError(
                f"the kubeconfig {settings.kubeconfig} named by [groups.kubernetes] kubeconfig does not exist: fix "
                "the path, or remove the setting to use $KUBECONFIG, ~/.kube/config or the in-cluster account"
            )
        return str(path), "[groups.kubernetes] kubeconfig"
    env = os.environ.get("KUBECONFIG", "")
    if env:
        paths = [p for p in env.split(os.pathsep) if p]
        if any(Path(p).expanduser().is_file() for p in paths):
            return env, "$KUBECONFIG"
        raise ProviderError(
            f"KUBECONFIG={env} names no existing file: fix it, or unset it to use ~/.kube/config or the "
            "in-cluster account"
        )
    default = Path("~/.kube/config").expanduser()
    if default.is_file():
        return str(default), "~/.kube/config"
    return None, "none"


def _status_message(exc: Any) -> str:
    """The message of a Kubernetes ``Status`` error body, or the HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc.status)


class KubernetesProvider:
    name = "kubernetes"

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
        self._connections: dict[tuple[str | None, str | None], _Connection] = {}
        self._lock = threading.Lock()
        self._warned: set[tuple[str, str]] = set()

    # -- the API server ---------------------------------------------------------------------------------------------

    def _settings(self, group: Group | None = None) -> KubernetesSettings:
        return (group.kubernetes if group is not None else None) or self.settings or KubernetesSettings()

    def _connect(self, settings: KubernetesSettings) -> _Connection:
        """A client for the settings' cluster, made once (it reads the kubeconfig), in the calling thread."""
        key = (settings.kubeconfig, settings.context)
        with self._lock:
            if key in self._connections:
                return self._connections[key]
            k8s = _client_modules()
            path, source = _kubeconfig(settings)
            if path is not None:
                ctx = f", context {settings.context}" if settings.context else ""
                try:
                    api_client = k8s.config.new_client_from_config(
                        config_file=path, context=settings.context, persist_config=False
                    )
                except Exception as exc:  # ConfigException, YAML errors, unreadable files: all say "fix the file"
                    raise ProviderError(
                        f"cannot use the kubeconfig {path} (from {source}{ctx}): {exc}. Fix the file or the context "
                        "name ([groups.kubernetes] context; kubectl config get-contexts lists them)"
                    ) from exc
                where = f"{api_client.configuration.host} (kubeconfig {path}{ctx or ', its current context'})"
            elif os.environ.get("KUBERNETES_SERVICE_HOST"):
                if settings.context:
                    raise ProviderError(
                        f"[groups.kubernetes] context is {settings.context!r}, but no kubeconfig was found (only the "
                        "in-cluster account, which has no contexts): set kubeconfig, or remove context"
                    )
                cfg = k8s.client.Configuration()
                try:
                    k8s.config.load_incluster_config(client_configuration=cfg)
                except Exception as exc:
                    raise ProviderError(
                        f"running in a cluster, but its service account cannot be used: {exc}. Mount the pod's "
                        "service account token (automountServiceAccountToken) or give a kubeconfig"
                    ) from exc
                api_client = k8s.client.ApiClient(cfg)
                where = f"{cfg.host} (in-cluster service account)"
            else:
                raise ProviderError(_NO_CREDENTIALS)
            conn = _Connection(
                api_client,
                k8s.client.CoreV1Api(api_client),
                k8s.client.AuthorizationV1Api(api_client),
                k8s.client.VersionApi(api_client),
                where,
            )
            self._connections[key] = conn
            return conn

    async def _call(self, settings: KubernetesSettings, what: str, fn: Callable[[_Connection], T]) -> T:
        """Run ``fn(connection)`` in a thread; API and network errors become ProviderError saying what to do."""
        conn: _Connection | None = None

        def run() -> T:
            nonlocal conn
            conn = self._connect(settings)
            return fn(conn)

        try:
            return await asyncio.to_thread(run)
        except ProviderError:
            raise
        except Exception as exc:
            error = self._translate(settings, conn, what, exc)
            if error is None:
                raise
            raise error from exc

    def _translate(
        self, settings: KubernetesSettings, conn: _Connection | None, what: str, exc: Exception
    ) -> ProviderError | None:
        import urllib3

        k8s = _client_modules()
        where = conn.where if conn is not None else "the Kubernetes API server"
        ns = settings.namespace
        if isinstance(exc, k8s.client.ApiException):
            message = _status_message(exc)
            if exc.status == 401:
                return ProviderError(
                    f"the API server at {where} refused the credentials (401 Unauthorized) to {what}: the "
                    "kubeconfig's token or certificate is wrong or expired; refresh it (e.g. your cloud's "
                    "get-credentials command)"
                )
            if exc.status == 403:
                return ProviderError(
                    f"the API server at {where} forbids this: cannot {what}: {message}. {_RBAC_HINT.format(ns=ns)}"
                )
            if exc.status == 404 and f'namespaces "{ns}" not found' in message:
                return ProviderError(
                    f"cannot {what}: namespace {ns} does not exist on {where}. Create it (kubectl create namespace "
                    f"{ns}) or set [groups.kubernetes] namespace; scaleq does not create namespaces"
                )
            return ProviderError(f"the API server at {where} refused to {what}: {exc.status} {message}")
        if isinstance(exc, urllib3.exceptions.MaxRetryError):
            return ProviderError(
                f"cannot reach the Kubernetes API server at {where} to {what}: {exc.reason}. Check that the cluster "
                "is up and that its address in the kubeconfig is reachable from here"
            )
        if isinstance(exc, urllib3.exceptions.HTTPError | OSError | k8s.config.ConfigException):
            return ProviderError(f"cannot {what} on the Kubernetes API server at {where}: {exc}")
        return None

    def close(self) -> None:
        with self._lock:
            for conn in self._connections.values():
                conn.api_client.close()
            self._connections.clear()

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

    def _ensure_secret(self, conn: _Connection, namespace: str) -> None:
        """Create the worker-token Secret, or update it when the token (or its labels) changed."""
        k8s = _client_modules()
        body = token_secret(self.grid, namespace, self.token)
        name = body["metadata"]["name"]
        try:
            current = conn.core.read_namespaced_secret(name, namespace, _request_timeout=self.api_timeout)
        except k8s.client.ApiException as exc:
            if exc.status != 404:
                raise
            try:
                conn.core.create_namespaced_secret(namespace, body, _request_timeout=self.api_timeout)
                return
            except k8s.client.ApiException as again:
                if again.status != 409:  # 409: another controller created it meanwhile; make sure of its token
                    raise
            current = conn.core.read_namespaced_secret(name, namespace, _request_timeout=self.api_timeout)
        labels = current.metadata.labels or {}
        if (current.data or {}).get(TOKEN_KEY) != body["data"][TOKEN_KEY] or any(
            labels.get(k) != v for k, v in grid_labels(self.grid).items()
        ):
            patch = {"metadata": {"labels": grid_labels(self.grid)}, "data": body["data"]}
            conn.core.patch_namespaced_secret(name, namespace, patch, _request_timeout=self.api_timeout)

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

    def _housekeep(self, conn: _Connection, namespace: str, pod: Any) -> None:
        """Delete a pod whose worker exited, saying why it exited if it failed."""
        k8s = _client_modules()
        name = pod.metadata.name
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

    async def list(self, group: Group) -> list[ProviderWorker]:
        settings = self._settings(group)
        ns = settings.namespace

        def scan(conn: _Connection) -> list[ProviderWorker]:
            pods = conn.core.list_namespaced_pod(
                ns, label_selector=group_selector(self.grid, group.name), _request_timeout=self.api_timeout
            ).items
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

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        settings = self._settings(group)
        ns = settings.namespace
        manifests = [self.pod_manifest(group, self.new_worker_id(group)) for _ in range(count)]
        secret = token_secret_name(self.grid)
        await self._call(
            settings,
            f"store the worker token in Secret {secret} in namespace {ns}",
            lambda c: self._ensure_secret(c, ns),
        )

        def create(conn: _Connection, body: dict[str, Any]) -> str:
            conn.core.create_namespaced_pod(ns, body, _request_timeout=self.api_timeout)
            return body["metadata"]["name"]

        results = await asyncio.gather(
            *(
                self._call(
                    settings,
                    f"create pod {m['metadata']['name']} in namespace {ns}",
                    lambda c, m=m: create(c, m),
                )
                for m in manifests
            ),
            return_exceptions=True,
        )
        started = [r for r in results if isinstance(r, str)]
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            if started:  # they exist and carry labels: the next list() finds them
                log.warning("group %s: started %s, but %d failed", group.name, ", ".join(started), len(failures))
            raise failures[0]
        return started

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        """Delete the worker's pod: the kubelet sends SIGTERM and the worker drains (within the grace period)."""
        settings = self._settings(group)
        ns = settings.namespace
        grace = 0 if force else self.termination_grace

        def delete(conn: _Connection) -> None:
            k8s = _client_modules()
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

    async def wait_gone(self, group: Group, timeout: float) -> bool:
        return await wait_gone(self, group, timeout, every=0.25)

    async def destroy(self, group: Group, grace: float = 15.0) -> list[str]:
        """Drain every worker (SIGTERM); after ``grace`` s delete what is left with grace 0; then the token Secret,
        once no pod of the grid is left in the namespace. Returns the workers removed."""
        settings = self._settings(group)
        ns = settings.namespace
        workers = await self.list(group)
        for w in workers:
            if w.status != "stopping":
                await self.stop(group, w.id)
        if workers and not await self.wait_gone(group, grace):
            for w in await self.list(group):
                await self.stop(group, w.id, force=True)  # jobs still running come back through lease expiry
            await self.wait_gone(group, FORCE_GRACE)

        def remove_secret(conn: _Connection) -> None:
            k8s = _client_modules()
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

        await self._call(settings, f"delete Secret {token_secret_name(self.grid)} in namespace {ns}", remove_secret)
        return [w.id for w in workers]

    async def health(self) -> Health:
        """One cheap look: the server's version, a one-item pod list in the namespace, the namespace itself (where
        readable) and whether the credentials may do what the provider does (SelfSubjectAccessReview)."""
        settings = self._settings()
        ns = settings.namespace

        def check(conn: _Connection) -> Health:
            k8s = _client_modules()
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
                    f"{ns}; {_RBAC_HINT.format(ns=ns)}",
                )
            return Health(True, f"Kubernetes {version} at {conn.where}, namespace {ns}: pods and secrets allowed")

        try:
            return await self._call(settings, f"check access to namespace {ns}", check)
        except ProviderError as exc:
            return Health(False, str(exc))
