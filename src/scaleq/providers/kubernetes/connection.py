"""The connection to a cluster: which credentials, one client per cluster, and API errors in words.

Credentials come from the usual places: ``[groups.kubernetes] kubeconfig`` (and ``context``), else ``$KUBECONFIG``,
else ``~/.kube/config``, else the in-cluster service account. None of them, or one that does not work, is a
:class:`~scaleq.providers.base.ProviderError` that says which was tried and what to do. The official client is
synchronous: every call runs in ``asyncio.to_thread`` with a request timeout, and API errors (401, 403, a missing
namespace, an unreachable server) become errors that name the fix. The ``kubernetes`` package is optional
(``pip install 'scaleq[kubernetes]'``) and imported on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from scaleq.grid import KubernetesSettings
from scaleq.providers.base import CapacityRefused, ProviderError

T = TypeVar("T")

NO_CREDENTIALS = (
    "no Kubernetes credentials found: no kubeconfig ([groups.kubernetes] kubeconfig, $KUBECONFIG or "
    "~/.kube/config) and not running inside a cluster (KUBERNETES_SERVICE_HOST is unset). Point "
    "[groups.kubernetes] kubeconfig or KUBECONFIG at a kubeconfig for the cluster (e.g. from your cloud's "
    "get-credentials command), or run the controller in a pod with a service account"
)
RBAC_HINT = (
    "the credentials need, in namespace {ns}: pods (get, list, create, delete) and secrets (get, create, patch, "
    "delete) — see the Role in docs/providers.md (Kubernetes)"
)


def client_modules() -> Any:
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
class Connection:
    api_client: Any
    core: Any
    authz: Any
    version: Any
    where: str  # for messages: "https://host:6443 (kubeconfig ~/.kube/config, context prod)"


def kubeconfig_for(settings: KubernetesSettings) -> tuple[str | None, str]:
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


def status_message(exc: Any) -> str:
    """The message of a Kubernetes ``Status`` error body, or the HTTP reason."""
    try:
        body = json.loads(exc.body or "{}")
    except (TypeError, ValueError):
        body = {}
    return str(body.get("message") or exc.reason or exc.status)


class Connections:
    """The provider's clients, one per (kubeconfig, context), made on first use."""

    def __init__(self) -> None:
        self._cache: dict[tuple[str | None, str | None], Connection] = {}
        self._lock = threading.Lock()

    def get(self, settings: KubernetesSettings) -> Connection:
        """A client for the settings' cluster, made once (it reads the kubeconfig), in the calling thread."""
        key = (settings.kubeconfig, settings.context)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            k8s = client_modules()
            path, source = kubeconfig_for(settings)
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
                raise ProviderError(NO_CREDENTIALS)
            conn = Connection(
                api_client,
                k8s.client.CoreV1Api(api_client),
                k8s.client.AuthorizationV1Api(api_client),
                k8s.client.VersionApi(api_client),
                where,
            )
            self._cache[key] = conn
            return conn

    async def call(self, settings: KubernetesSettings, what: str, fn: Callable[[Connection], T]) -> T:
        """Run ``fn(connection)`` in a thread; API and network errors become ProviderError saying what to do."""
        conn: Connection | None = None

        def run() -> T:
            nonlocal conn
            conn = self.get(settings)
            return fn(conn)

        try:
            return await asyncio.to_thread(run)
        except ProviderError:
            raise
        except Exception as exc:
            error = translate(settings, conn, what, exc)
            if error is None:
                raise
            raise error from exc

    def close(self) -> None:
        with self._lock:
            for conn in self._cache.values():
                conn.api_client.close()
            self._cache.clear()


def translate(settings: KubernetesSettings, conn: Connection | None, what: str, exc: Exception) -> ProviderError | None:
    """The ProviderError that says what to do about ``exc``, or None for an error that is not the cluster's."""
    import urllib3

    k8s = client_modules()
    where = conn.where if conn is not None else "the Kubernetes API server"
    ns = settings.namespace
    if isinstance(exc, k8s.client.ApiException):
        message = status_message(exc)
        if exc.status == 401:
            return ProviderError(
                f"the API server at {where} refused the credentials (401 Unauthorized) to {what}: the "
                "kubeconfig's token or certificate is wrong or expired; refresh it (e.g. your cloud's "
                "get-credentials command)"
            )
        if exc.status == 403 and "exceeded quota" in message:  # a ResourceQuota of the namespace
            return CapacityRefused(
                f"the namespace's ResourceQuota refused to {what} on {where}: {message}. Raise the quota (kubectl "
                f"describe resourcequota -n {ns}) or lower max_workers",
                "quota",
            )
        if exc.status == 429:
            message = f"the API server at {where} is rate-limiting: cannot {what}: {message}"
            return CapacityRefused(message, "rate_limited")
        if exc.status == 403:
            return ProviderError(
                f"the API server at {where} forbids this: cannot {what}: {message}. {RBAC_HINT.format(ns=ns)}"
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
