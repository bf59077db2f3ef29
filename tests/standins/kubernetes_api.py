"""A local stand-in for the Kubernetes API: kmock's ``KubernetesEmulator`` served by ``kmock.Server``, with the gaps
filled that scaleq's ``kubernetes`` provider depends on. The official ``kubernetes`` client talks to it over HTTP
through a kubeconfig (:meth:`KubernetesStandIn.kubeconfig`), exactly as it would to a cluster.

kmock stores objects and serves create / fetch / list / patch / delete, but runs no controllers and no kubelet,
ignores label selectors, does not parse ``/api/v1/namespaces/<name>`` paths, merges patches as plain dicts and
validates nothing. Here:

- **every object a client writes is validated like the API server would**: against the real Kubernetes 1.32 OpenAPI
  schema with ``kubernetes_validate`` (strict: unknown fields are errors), then against the rules the schema cannot
  express — names (DNS-1123), label keys and values (63 characters, charset), quantities, GPU requests equal to
  limits, requests not above limits, restart policy, env names, base64 Secret data, an object's namespace matching
  the URL's. An invalid object is refused with 422 ``Invalid`` (400 ``BadRequest`` for a namespace mismatch) and a
  Kubernetes ``Status`` body, and recorded in :attr:`StandInApi.rejected`; valid ones in :attr:`StandInApi.validated`.
  A patch is validated as the object it would produce;
- **authentication and RBAC**: requests must carry ``Authorization: Bearer <token>`` (else 401); verbs on resources
  can be denied (:meth:`KubernetesStandIn.deny`: 403 ``Forbidden`` with the API server's wording), and
  ``SelfSubjectAccessReview`` answers from the same table;
- **namespaces**: created, read, listed (``/api/v1/namespaces[/<name>]``); creating an object in a namespace that
  does not exist answers 404 ``namespaces "x" not found``; listing in one answers an empty list, as a cluster does;
- **server-set fields**: ``uid``, ``creationTimestamp``, ``resourceVersion`` (one counter), ``namespace``;
- **a kubelet for pods**: a new pod is ``Pending`` and becomes ``Running`` on node ``standin-node`` after
  ``start_delay`` seconds, with container statuses of the client's exact shape — unless its image is one
  :meth:`KubernetesStandIn.unpullable` named (it then waits in ``ErrImagePull``). Pods never exit by themselves:
  :meth:`KubernetesStandIn.exit_pod` is the worker process exiting (``Succeeded`` for code 0, else ``Failed``;
  ``OOMKilled`` on request), with the log it printed (served at ``pods/<name>/log``, ``tailLines`` honoured);
- **graceful deletion**: deleting a running pod with a grace period > 0 sets ``deletionTimestamp`` (now + grace) and
  ``deletionGracePeriodSeconds`` and records a ``SIGTERM`` in :attr:`StandInApi.signals`; the pod stays (listed, as
  ``Terminating``) until its worker exits (:meth:`exit_pod` — the object then goes) or the grace period runs out
  (``SIGKILL``: it goes) — or, with ``exit_on_sigterm`` set, its worker drains and exits that many seconds after
  the SIGTERM, as an idle worker does. Grace 0, or a pod that is not running (``Pending`` or finished), goes at
  once. A second delete may shorten the grace. ``preconditions.uid`` is honoured (409 on mismatch);
- **label selectors** on list (``=``, ``==``, ``!=``, ``in``, ``notin``, ``key``, ``!key``) and ``limit``;
- **what ``kubernetes_rules.py`` adds**, as the real server does it: resourceVersion conflicts (409 ``Conflict`` for a
  PATCH or PUT carrying a stale version; every write bumps it), PUT (replace), field selectors on the documented
  fields (400 for others), watches from a resourceVersion with 410 ``Expired`` once history is compacted
  (:meth:`KubernetesStandIn.compact`), ``details.causes`` naming the field in every 422, and DeleteOptions'
  ``propagationPolicy`` checked. ``tests/unit/test_kmock.py`` pins each against the documentation.

Evictions and preemptions are modelled as the cluster records them (:meth:`KubernetesStandIn.disrupt_pod`).

What it does not model: scheduling (resources and node capacity are never checked: every pod fits), image pulls (apart
from :meth:`unpullable`), container restarts, probes, node loss, ``Unknown`` phase, admission webhooks and
quotas (apart from :meth:`exceed_quota`: creating a resource answers 403 ``exceeded quota``), defaulting of fields
beyond the server-set ones above, strategic-merge-patch list semantics (patches merge as JSON merge patches — enough for
the labels and data the provider patches), watch bookmarks, ``deletecollection``,
Deployments/ReplicaSets (no controllers run), and any resource other than namespaces, pods, pods/log, secrets and
selfsubjectaccessreviews (answered 404, so a provider that starts using one is caught).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import datetime
import itertools
import re
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import aiohttp.web
import kmock
import kubernetes_validate
import yaml
from kmock import action as Action
from kubernetes.utils import parse_quantity

from tests.standins import kubernetes_rules as rules

T = TypeVar("T")

VERSION = "1.32"
NODE = "standin-node"
_NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces(?:/([^/]+))?/?$")
_SSAR_PATH = "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews"
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_ENV_NAME = re.compile(r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
_SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
_SELECTOR = re.compile(
    r"^\s*(?P<neg>!)?\s*(?P<key>[A-Za-z0-9./_-]+)\s*"
    r"(?:(?P<op>==|=|!=)\s*(?P<value>[A-Za-z0-9._-]*)|\s(?P<setop>in|notin)\s*\((?P<values>[^)]*)\))?\s*$"
)
_VERBS = {
    Action.CREATE: "create",
    Action.FETCH: "get",
    Action.LIST: "list",
    Action.UPDATE: "patch",
    Action.DELETE: "delete",
    Action.WATCH: "watch",
}
_KINDS = {"pods": "Pod", "secrets": "Secret", "namespaces": "Namespace"}


def _error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details or {"causes": []})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _at(seconds_from_now: float) -> str:
    then = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=seconds_from_now)
    return then.strftime("%Y-%m-%dT%H:%M:%SZ")


# -- selectors --------------------------------------------------------------------------------------------------------


def parse_selector(text: str) -> Callable[[dict[str, str]], bool]:
    """A label selector as the API server reads it; an unreadable one is a 400."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    parts.append(current)
    tests: list[Callable[[dict[str, str]], bool]] = []
    for part in (p for p in parts if p.strip()):
        m = _SELECTOR.match(part)
        if m is None or (m["neg"] and (m["op"] or m["setop"])):
            raise _error(400, "BadRequest", f"unable to parse requirement: {part!r}")
        key = m["key"]
        if m["neg"]:
            tests.append(lambda labels, k=key: k not in labels)
        elif m["op"] in ("=", "=="):
            tests.append(lambda labels, k=key, v=m["value"]: labels.get(k) == v)
        elif m["op"] == "!=":
            tests.append(lambda labels, k=key, v=m["value"]: labels.get(k) != v)
        elif m["setop"]:
            values = {v.strip() for v in m["values"].split(",") if v.strip()}
            if m["setop"] == "in":
                tests.append(lambda labels, k=key, vs=values: labels.get(k) in vs)
            else:
                tests.append(lambda labels, k=key, vs=values: labels.get(k) not in vs)
        else:
            tests.append(lambda labels, k=key: k in labels)
    return lambda labels: all(t(labels) for t in tests)


def merge_patch(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386): objects merge, ``null`` removes, anything else replaces."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            target[key] = merge_patch(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


# -- validation beyond the schema -------------------------------------------------------------------------------------


def _check_name(kind: str, name: Any, problems: list[str]) -> None:
    if not isinstance(name, str) or not name:
        problems.append("metadata.name: Required value: name or generateName is required")
    elif kind == "Namespace" and (len(name) > 63 or not _DNS_LABEL.match(name)):
        problems.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 label must consist of ...")
    elif len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        problems.append(f"metadata.name: Invalid value: {name!r}: a lowercase RFC 1123 subdomain must consist of ...")


def _check_labels(labels: dict[str, Any], problems: list[str]) -> None:
    for key, value in labels.items():
        prefix, _, name = key.rpartition("/")
        if prefix and (len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
            problems.append(f"metadata.labels: Invalid value: {key!r}: prefix part must be a DNS-1123 subdomain")
        if not name or len(name) > 63 or not _LABEL_NAME.match(name):
            problems.append(f"metadata.labels: Invalid value: {key!r}: name part must be 63 characters or less ...")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            problems.append(f"metadata.labels: Invalid value: {value!r}: must be no more than 63 characters ...")


def _quantity(where: str, value: Any, problems: list[str]) -> Decimal | None:
    try:
        return parse_quantity(value)
    except (ValueError, TypeError):
        problems.append(f"{where}: Invalid value: {value!r}: must match the regex of a quantity")
        return None


def _check_pod(pod: dict[str, Any], problems: list[str]) -> None:
    spec = pod.get("spec") or {}
    if spec.get("restartPolicy", "Always") not in ("Always", "OnFailure", "Never"):
        problems.append(f"spec.restartPolicy: Unsupported value: {spec.get('restartPolicy')!r}")
    if (spec.get("terminationGracePeriodSeconds") or 0) < 0:
        problems.append("spec.terminationGracePeriodSeconds: must be greater than or equal to 0")
    containers = spec.get("containers") or []
    if not containers:
        problems.append("spec.containers: Required value")
    names = [c.get("name") for c in containers]
    for i, c in enumerate(containers):
        where = f"spec.containers[{i}]"
        if not isinstance(c.get("name"), str) or not _DNS_LABEL.match(c["name"]) or len(c["name"]) > 63:
            problems.append(f"{where}.name: Invalid value: {c.get('name')!r}")
        elif names.count(c["name"]) > 1:
            problems.append(f"{where}.name: Duplicate value: {c['name']!r}")
        if not c.get("image"):
            problems.append(f"{where}.image: Required value")
        for e in c.get("env") or []:
            if not _ENV_NAME.match(e.get("name", "")):
                problems.append(f"{where}.env.name: Invalid value: {e.get('name')!r}")
            source = e.get("valueFrom") or {}
            if "value" in e and source:
                problems.append(f"{where}.env.valueFrom: Invalid value: may not be specified when `value` is set")
        res = c.get("resources") or {}
        requests = {
            k: _quantity(f"{where}.resources.requests[{k}]", v, problems) for k, v in res.get("requests", {}).items()
        }
        limits = {k: _quantity(f"{where}.resources.limits[{k}]", v, problems) for k, v in res.get("limits", {}).items()}
        for name in set(requests) | set(limits):
            extended = "/" in name and not name.startswith(("kubernetes.io/", "requests."))
            if extended:
                if name not in limits:
                    problems.append(f"{where}.resources.limits: Required value: limit must be set for {name}")
                elif name in requests and requests[name] != limits[name]:
                    problems.append(f"{where}.resources.requests[{name}]: must be equal to {name} limit")
            elif name in requests and name in limits and None not in (requests[name], limits[name]):
                if requests[name] > limits[name]:  # type: ignore[operator]
                    problems.append(f"{where}.resources.requests: Invalid value: must be less than or equal to limit")


def _check_secret(secret: dict[str, Any], problems: list[str]) -> None:
    for key, value in (secret.get("data") or {}).items():
        if not _SECRET_KEY.match(key):
            problems.append(f"data[{key}]: Invalid value: a valid config key must consist of alphanumeric characters")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, TypeError):
            problems.append(f"data[{key}]: Invalid value: illegal base64 data")


# -- the API ----------------------------------------------------------------------------------------------------------


class StandInApi(kmock.KubernetesEmulator):
    """The handler. Everything runs on the stand-in's own event loop; tests reach it through
    :class:`KubernetesStandIn`, which runs it in a thread."""

    def __init__(self, *, token: str, start_delay: float, version: str, exit_on_sigterm: float | None) -> None:
        super().__init__()
        self.token = token
        self.start_delay = start_delay
        self.exit_on_sigterm = exit_on_sigterm
        self.version = version
        self.namespaces: dict[str, dict[str, Any]] = {}
        self.denied: set[tuple[str, str]] = set()  # (verb, resource), e.g. ("create", "pods") or ("get", "pods/log")
        self.unpullable_images: set[str] = set()
        self.quotas: dict[str, str] = {}  # resource (e.g. "pods") → the exhausted ResourceQuota's name
        self.logs: dict[tuple[str, str], str] = {}
        self.validated: list[tuple[str, str, str]] = []  # (kind, namespace, name) of each valid write
        self.rejected: list[str] = []
        self.signals: list[tuple[str, str, str]] = []  # (signal, namespace, pod)
        self._rv = itertools.count(1)
        self.last_rv = 0  # the latest resourceVersion given: what a list reads at
        self._started_at: dict[tuple[str, str], float] = {}  # (namespace, pod) → monotonic creation time
        self._kill_at: dict[tuple[str, str], float] = {}  # (namespace, pod) → monotonic SIGKILL time
        self._term_at: dict[tuple[str, str], float] = {}  # (namespace, pod) → monotonic SIGTERM time
        self.journal = rules.Journal()  # every change, for watches (kubernetes_rules.py)
        self.closing = False
        for resource in ("pods", "secrets"):
            self.resources[f"v1/{resource}"] = {
                "kind": _KINDS[resource],
                "namespaced": True,
                "singular": resource[:-1],
                "verbs": ["create", "delete", "get", "list", "patch"],
                "shortnames": [],
                "categories": [],
                "subresources": ["log"] if resource == "pods" else [],
            }

    # -- kmock hooks ----------------------------------------------------------------------------------------------

    async def _serve_server_version(self, request: Any) -> dict[str, Any]:
        major, minor = self.version.split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": f"v{major}.{minor}.0-standin",
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.23",
            "compiler": "gc",
            "platform": "linux/amd64",
        }

    async def __call__(self, raw_request: Any) -> aiohttp.web.StreamResponse:
        try:
            return await super().__call__(raw_request)
        finally:
            self.journal.sync(self)

    async def _handle(self, request: Any) -> aiohttp.web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            raise _error(401, "Unauthorized", "Unauthorized")
        self.kubelet()
        path = request.url.path
        if path.rstrip("/") == "/version":  # kmock serves /version only without the client's trailing slash
            return aiohttp.web.json_response(await self._serve_server_version(request))
        m = _NAMESPACES_PATH.match(path)
        if m:
            return self._namespace_request(request, m.group(1))
        if path.rstrip("/") == _SSAR_PATH:
            return self._access_review(request)
        res = request.resource
        if res is None or res.plural is None:
            return await super()._handle(request)  # discovery: /api, /apis, /api/v1, …
        if res.group != "" or res.version != "v1" or res.plural not in ("pods", "secrets"):
            raise _error(404, "NotFound", f"the stand-in does not model {path} (only namespaces, pods, secrets)")
        resource = res.plural + (f"/{request.subresource}" if request.subresource else "")
        verb = _VERBS.get(
            request.action, "update" if str(request.method.value).upper() == "PUT" else str(request.action)
        )
        ns = request.namespace
        if (verb, resource) in self.denied:
            raise _error(
                403,
                "Forbidden",
                f'{resource} is forbidden: User "standin" cannot {verb} resource "{res.plural}" in API group "" in '
                f'the namespace "{ns}"',
            )
        if ns is None:
            raise _error(404, "NotFound", "the stand-in serves namespaced requests only")
        if request.subresource == "log" and request.action == Action.FETCH:
            return self._pod_log(request)
        if request.subresource:
            raise _error(404, "NotFound", f"the stand-in does not serve {resource}")
        if request.action == Action.WATCH or (str(request.method.value).upper() == "PUT" and request.name):
            return await self._watch_or_replace(request, res.plural, ns)
        if request.action == Action.LIST:
            return self._list(res.plural, ns, request.params)
        if request.action == Action.CREATE:
            if res.plural in self.quotas:  # the ResourceQuota admission plugin's refusal, in its words
                name, quota = (request.data or {}).get("metadata", {}).get("name", "?"), self.quotas[res.plural]
                raise _error(
                    403,
                    "Forbidden",
                    f'{res.plural} "{name}" is forbidden: exceeded quota: {quota}, requested: {res.plural}=1, '
                    f"used: {res.plural}=2, limited: {res.plural}=2",
                )
            return self._create(res.plural, ns, request.data)
        if request.action == Action.FETCH:
            return aiohttp.web.json_response(self._get(res.plural, ns, request.name).raw)
        if request.action == Action.UPDATE:
            return self._patch(res.plural, ns, request.name, request.data)
        if request.action == Action.DELETE and request.name:
            return self._delete(res.plural, ns, request.name, request.params, request.data)
        raise _error(405, "MethodNotAllowed", f"the stand-in does not serve {request.method} {path}")

    # -- validation -----------------------------------------------------------------------------------------------

    def validate(self, obj: dict[str, Any], namespace: str | None) -> None:
        kind = obj.get("kind", "?")
        problems: list[str] = []
        try:
            kubernetes_validate.validate(obj, self.version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(p) for p in exc.absolute_path) or "(root)"
            problems.append(f"{where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(exc.message)
        meta = obj.get("metadata") or {}
        if kind in _KINDS.values():  # stored objects have names; reviews do not
            _check_name(kind, meta.get("name"), problems)
        _check_labels(meta.get("labels") or {}, problems)
        if kind == "Pod":
            _check_pod(obj, problems)
        elif kind == "Secret":
            _check_secret(obj, problems)
        name = meta.get("name", "?")
        if problems:
            message = f'{kind} "{name}" is invalid: ' + "; ".join(problems)
            self.rejected.append(message)
            raise _error(422, "Invalid", message, kind=kind, name=name, causes=rules.causes(problems))
        if namespace is not None and meta.get("namespace") not in (None, namespace):
            message = "the namespace of the provided object does not match the namespace sent on the request"
            self.rejected.append(message)
            raise _error(400, "BadRequest", message)
        self.validated.append((kind, namespace or "", name))

    # -- namespaces and access reviews ----------------------------------------------------------------------------

    def _namespace_request(self, request: Any, name: str | None) -> aiohttp.web.StreamResponse:
        method = str(request.method.value).upper()
        if name is None and method == "GET":
            items = list(self.namespaces.values())
            return aiohttp.web.json_response(
                {"apiVersion": "v1", "kind": "NamespaceList", "metadata": {}, "items": items}
            )
        if name is None and method == "POST":
            body = {"apiVersion": "v1", "kind": "Namespace", **(request.data or {})}
            self.validate(body, None)
            return aiohttp.web.json_response(self.add_namespace(body["metadata"]["name"]), status=201)
        if name is not None and method == "GET":
            if name not in self.namespaces:
                raise _error(404, "NotFound", f'namespaces "{name}" not found', name=name, kind="namespaces")
            return aiohttp.web.json_response(self.namespaces[name])
        raise _error(405, "MethodNotAllowed", f"the stand-in does not serve {method} on namespaces")

    def add_namespace(self, name: str) -> dict[str, Any]:
        if name in self.namespaces:
            raise _error(409, "AlreadyExists", f'namespaces "{name}" already exists')
        ns = {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "uid": str(uuid.uuid4()),
                "creationTimestamp": _now(),
                "resourceVersion": self._next_rv(),
            },
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"},
        }
        self.namespaces[name] = ns
        return ns

    def _access_review(self, request: Any) -> aiohttp.web.StreamResponse:
        body = {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", **(request.data or {})}
        self.validate(body, None)
        attrs = (body.get("spec") or {}).get("resourceAttributes") or {}
        resource = attrs.get("resource", "") + (f"/{attrs['subresource']}" if attrs.get("subresource") else "")
        allowed = (attrs.get("verb", ""), resource) not in self.denied
        status = {"allowed": allowed}
        if not allowed:
            status["reason"] = "denied by the stand-in"
        return aiohttp.web.json_response({**body, "status": status}, status=201)

    # -- objects ---------------------------------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self.last_rv = next(self._rv)
        return str(self.last_rv)

    def _key(self, plural: str, ns: str, name: str) -> tuple[Any, str, str]:
        return (kmock.resource("", "v1", plural), ns, name)

    def _live(self, plural: str, ns: str | None = None) -> list[tuple[tuple[Any, str, str], Any]]:
        res = kmock.resource("", "v1", plural)
        return [
            (key, obj)
            for key, obj in self.objects.items()
            if key[0] == res and not obj.deleted and (ns is None or key[1] == ns)
        ]

    def _get(self, plural: str, ns: str, name: str) -> Any:
        key = self._key(plural, ns, name)
        if key not in self.objects or self.objects[key].deleted:
            raise _error(404, "NotFound", f'{plural} "{name}" not found', name=name, kind=plural)
        return self.objects[key]

    def _list(self, plural: str, ns: str, params: dict[str, str]) -> aiohttp.web.StreamResponse:
        match = self._selection(plural, params)
        items = [obj.raw for key, obj in sorted(self._live(plural, ns), key=lambda kv: kv[0][2]) if match(obj.raw)]
        self.journal.sync(self)  # a list reads at the latest version, and moves none
        items, meta = rules.page(items, params, self.last_rv, self.journal.compacted)
        kind = _KINDS[plural] + "List"
        return aiohttp.web.json_response({"apiVersion": "v1", "kind": kind, "metadata": meta, "items": items})

    def _create(self, plural: str, ns: str, body: Any) -> aiohttp.web.StreamResponse:
        if not isinstance(body, dict):
            raise _error(400, "BadRequest", "the request body is not a JSON object")
        obj = {"apiVersion": "v1", "kind": _KINDS[plural], **copy.deepcopy(body)}
        self.validate(obj, ns)
        name = obj["metadata"]["name"]
        if ns not in self.namespaces:
            raise _error(404, "NotFound", f'namespaces "{ns}" not found', name=ns, kind="namespaces")
        key = self._key(plural, ns, name)
        if key in self.objects and not self.objects[key].deleted:
            raise _error(409, "AlreadyExists", f'{plural} "{name}" already exists', name=name, kind=plural)
        meta = obj["metadata"]
        meta.update(namespace=ns, uid=str(uuid.uuid4()), creationTimestamp=_now(), resourceVersion=self._next_rv())
        if plural == "pods":
            obj["status"] = {"phase": "Pending", "qosClass": _qos(obj)}
            self._started_at[(ns, name)] = time.monotonic()
        elif plural == "secrets":
            obj.setdefault("type", "Opaque")
        if key in self.objects:
            self.objects[key].create(obj)
        else:
            self.objects[key] = obj
        return aiohttp.web.json_response(obj, status=201)

    def _patch(self, plural: str, ns: str, name: str, body: Any) -> aiohttp.web.StreamResponse:
        current = self._get(plural, ns, name)
        if not isinstance(body, dict):
            raise _error(415, "UnsupportedMediaType", "the stand-in merges JSON object patches only")
        rules.check_resource_version(plural, current.raw, body)
        merged = merge_patch(copy.deepcopy(current.raw), body)
        rules.check_update(plural, current.raw, merged)
        self.validate(merged, ns)
        merged["metadata"]["resourceVersion"] = self._next_rv()
        current.history.append(merged)
        return aiohttp.web.json_response(merged)

    def _delete(self, plural: str, ns: str, name: str, params: dict[str, str], body: Any) -> aiohttp.web.StreamResponse:
        obj = self._get(plural, ns, name)
        raw = copy.deepcopy(obj.raw)
        options = body if isinstance(body, dict) else {}
        self._check_delete_options(params, options)
        rules.check_delete_preconditions(plural, raw, options)
        uid = (options.get("preconditions") or {}).get("uid")
        if uid and uid != raw["metadata"]["uid"]:
            raise _error(
                409,
                "Conflict",
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: {raw['metadata']['uid']}",
            )
        if plural != "pods":
            obj.delete()
            return aiohttp.web.json_response({"apiVersion": "v1", "kind": "Status", "status": "Success"})
        grace_text = params.get("gracePeriodSeconds", options.get("gracePeriodSeconds"))
        grace = int(grace_text) if grace_text is not None else int(raw["spec"].get("terminationGracePeriodSeconds", 30))
        phase = raw["status"]["phase"]
        if grace <= 0 or phase != "Running":
            if phase == "Running":
                self.signals.append(("SIGKILL", ns, name))
            self._remove_pod(ns, name)
            raw["metadata"].setdefault("deletionTimestamp", _now())
            raw["metadata"]["deletionGracePeriodSeconds"] = 0
            return aiohttp.web.json_response(raw)
        deadline = time.monotonic() + grace
        if (ns, name) in self._kill_at and self._kill_at[(ns, name)] <= deadline:
            return aiohttp.web.json_response(raw)  # already terminating, with a shorter grace
        if (ns, name) not in self._kill_at:
            self.signals.append(("SIGTERM", ns, name))
            self._term_at[(ns, name)] = time.monotonic()
        self._kill_at[(ns, name)] = deadline
        obj.patch(
            {
                "metadata": {
                    "deletionTimestamp": _at(grace),
                    "deletionGracePeriodSeconds": grace,
                    "resourceVersion": self._next_rv(),
                }
            }
        )
        return aiohttp.web.json_response(obj.raw)

    def _check_delete_options(self, params: dict[str, str], options: dict[str, Any]) -> None:
        """DeleteOptions as the API server validates them: an unknown propagationPolicy is 422."""
        policy = params.get("propagationPolicy", options.get("propagationPolicy"))
        if policy is not None and policy not in ("Foreground", "Background", "Orphan"):
            problem = (
                f'propagationPolicy: Unsupported value: "{policy}": supported values: "Foreground", "Background", '
                '"Orphan"'
            )
            raise _error(
                422,
                "Invalid",
                f'DeleteOptions.meta.k8s.io "" is invalid: {problem}',
                kind="DeleteOptions",
                name="",
                causes=rules.causes([problem]),
            )

    def _selection(self, plural: str, params: dict[str, str]) -> Callable[[dict[str, Any]], bool]:
        """The objects a list or watch selects: its label selector and its field selector (both 400 if unreadable)."""
        labels = parse_selector(params.get("labelSelector", ""))
        fields = rules.parse_field_selector(plural, params.get("fieldSelector", ""))
        return lambda obj: labels((obj.get("metadata") or {}).get("labels") or {}) and fields(obj)

    async def _watch_or_replace(self, request: Any, plural: str, ns: str) -> aiohttp.web.StreamResponse:
        """A watch of a collection (``?watch=true``), or an update (PUT) of one object."""
        if request.action == Action.WATCH:
            if request.name:
                raise _error(405, "MethodNotAllowed", "the stand-in watches collections only (use a fieldSelector)")
            return await rules.serve_watch(self, request, plural, self._selection(plural, request.params))
        current = self._get(plural, ns, request.name)
        new = rules.replace(plural, current.raw, request.data)
        rules.check_update(plural, current.raw, new)
        self.validate(new, ns)
        new["metadata"]["resourceVersion"] = self._next_rv()
        current.history.append(new)
        return aiohttp.web.json_response(new)

    def _remove_pod(self, ns: str, name: str) -> None:
        self.objects[self._key("pods", ns, name)].delete()
        self._kill_at.pop((ns, name), None)
        self._term_at.pop((ns, name), None)
        self._started_at.pop((ns, name), None)

    def _pod_log(self, request: Any) -> aiohttp.web.StreamResponse:
        self._get("pods", request.namespace, request.name)
        text = self.logs.get((request.namespace, request.name), "")
        tail = request.params.get("tailLines")
        if tail:
            text = "".join(text.splitlines(keepends=True)[-int(tail) :])
        return aiohttp.web.Response(text=text, content_type="text/plain")

    # -- the kubelet -----------------------------------------------------------------------------------------------

    def kubelet(self) -> None:
        """Advance pods: Pending → Running after ``start_delay``; terminating pods past their grace are killed."""
        now = time.monotonic()
        for (_, ns, name), obj in self._live("pods"):
            pod = obj.raw
            if (ns, name) in self._kill_at and now >= self._kill_at[(ns, name)]:
                self.signals.append(("SIGKILL", ns, name))
                self._remove_pod(ns, name)
                continue
            term = self._term_at.get((ns, name))
            if term is not None and self.exit_on_sigterm is not None and now >= term + self.exit_on_sigterm:
                self.signals.append(("exited", ns, name))
                self._remove_pod(ns, name)
                continue
            if pod["status"]["phase"] != "Pending":
                continue
            container = pod["spec"]["containers"][0]
            if container["image"] in self.unpullable_images:
                if not pod["status"].get("containerStatuses"):
                    obj.patch(
                        {
                            "spec": {"nodeName": NODE},
                            "status": {
                                "containerStatuses": [
                                    _container_status(
                                        container,
                                        ready=False,
                                        state={
                                            "waiting": {
                                                "reason": "ErrImagePull",
                                                "message": f"pull access denied for {container['image']}",
                                            }
                                        },
                                    )
                                ]
                            },
                        }
                    )
                continue
            if now - self._started_at.get((ns, name), now) >= self.start_delay:
                started = _now()
                obj.patch(
                    {
                        "metadata": {"resourceVersion": self._next_rv()},
                        "spec": {"nodeName": NODE},
                        "status": {
                            "phase": "Running",
                            "startTime": started,
                            "hostIP": "10.0.0.1",
                            "podIP": f"10.1.{secrets.randbelow(250)}.{secrets.randbelow(250) + 2}",
                            "conditions": [
                                {"type": "PodScheduled", "status": "True", "lastTransitionTime": started},
                                {"type": "Ready", "status": "True", "lastTransitionTime": started},
                            ],
                            "containerStatuses": [
                                _container_status(container, ready=True, state={"running": {"startedAt": started}})
                            ],
                        },
                    }
                )

    def exit_pod(self, ns: str, name: str, code: int = 0, log: str = "", reason: str | None = None) -> None:
        """The worker process in the pod exits: the pod finishes (or, if it was terminating, goes)."""
        obj = self._get("pods", ns, name)
        self.logs[(ns, name)] = log
        if (ns, name) in self._kill_at:
            self._remove_pod(ns, name)
            return
        container = obj.raw["spec"]["containers"][0]
        finished = _now()
        terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": obj.raw["status"].get("startTime", finished),
            "finishedAt": finished,
        }
        obj.patch(
            {
                "metadata": {"resourceVersion": self._next_rv()},
                "status": {
                    "phase": "Succeeded" if code == 0 else "Failed",
                    "conditions": [{"type": "Ready", "status": "False", "lastTransitionTime": finished}],
                    "containerStatuses": [_container_status(container, ready=False, state={"terminated": terminated})],
                },
            }
        )
        self._started_at.pop((ns, name), None)

    def disrupt_pod(self, ns: str, name: str, reason: str, message: str) -> None:
        """The cluster takes the pod back, as Kubernetes >= 1.26 records it: a ``DisruptionTarget`` condition with
        ``reason``; then a kubelet eviction (``TerminationByKubelet``) fails the pod (``status.reason`` ``Evicted``,
        its container killed), anything else (``PreemptionByScheduler``, ``EvictionByEvictionAPI``,
        ``DeletionByTaintManager``) deletes it gracefully, as a client's delete would."""
        obj = self._get("pods", ns, name)
        at = _now()
        condition = {"type": "DisruptionTarget", "status": "True", "reason": reason, "message": message}
        conditions = [*obj.raw["status"].get("conditions", []), {**condition, "lastTransitionTime": at}]
        status: dict[str, Any] = {"conditions": conditions}
        if reason == "TerminationByKubelet":
            container = obj.raw["spec"]["containers"][0]
            killed = {"exitCode": 137, "reason": "Error", "startedAt": obj.raw["status"].get("startTime", at)}
            status |= {"phase": "Failed", "reason": "Evicted", "message": message}
            status["containerStatuses"] = [
                _container_status(container, ready=False, state={"terminated": {**killed, "finishedAt": at}})
            ]
        obj.patch({"metadata": {"resourceVersion": self._next_rv()}, "status": status})
        if reason != "TerminationByKubelet":
            self._delete("pods", ns, name, {}, None)


def _container_status(container: dict[str, Any], *, ready: bool, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": container["name"],
        "image": container["image"],
        "imageID": f"docker-pullable://{container['image']}@sha256:{'0' * 64}"
        if ready or "terminated" in state
        else "",
        "ready": ready,
        "started": "running" in state,
        "restartCount": 0,
        "state": state,
    }


def _qos(pod: dict[str, Any]) -> str:
    containers = pod["spec"]["containers"]
    res = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in res):
        return "BestEffort"
    for r in res:
        requests, limits = r.get("requests") or {}, r.get("limits") or {}
        for name in ("cpu", "memory"):
            if name not in limits or parse_quantity(requests.get(name, limits[name])) != parse_quantity(limits[name]):
                return "Burstable"
    return "Guaranteed"


# -- the stand-in, in a thread of its own ------------------------------------------------------------------------------


class KubernetesStandIn:
    """Runs :class:`StandInApi` on its own event loop in a thread (so tests may call the synchronous client, and the
    provider's threads, without deadlocking the test's loop). Use as a context manager; the helpers below are
    thread-safe: each runs whole on the stand-in's loop."""

    def __init__(
        self,
        *,
        namespaces: tuple[str, ...] = ("scaleq",),
        start_delay: float = 0.05,
        version: str = VERSION,
        exit_on_sigterm: float | None = None,
    ) -> None:
        self.token = secrets.token_urlsafe(16)
        self.start_delay = start_delay
        self.exit_on_sigterm = exit_on_sigterm
        self.version = version
        self._initial_namespaces = namespaces
        self.url = ""
        self.api: StandInApi | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None

    def __enter__(self) -> KubernetesStandIn:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kubernetes-standin", daemon=True)
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the Kubernetes stand-in did not start in 15 s")
        if self._failure is not None:
            raise RuntimeError(f"the Kubernetes stand-in failed to start: {self._failure!r}") from self._failure
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._thread is not None
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(15)
        self._loop.close()

    def _run(self) -> None:
        assert self._loop is not None
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to __enter__
            self._failure = exc
            self._ready.set()

    async def _serve(self) -> None:
        self.api = StandInApi(
            token=self.token, start_delay=self.start_delay, version=self.version, exit_on_sigterm=self.exit_on_sigterm
        )
        for ns in self._initial_namespaces:
            self.api.add_namespace(ns)
        async with self.api, kmock.Server(self.api) as server:
            self.url = str(server.url).rstrip("/")
            self._stop = asyncio.Event()
            self._ready.set()
            await self._stop.wait()
            self.api.closing = True  # open watches end, so the server can stop

    def call(self, fn: Callable[[StandInApi], T]) -> T:
        """Run ``fn(api)`` on the stand-in's loop and return its result."""
        assert self._loop is not None and self.api is not None
        api = self.api

        async def run() -> T:
            try:
                return fn(api)
            finally:
                api.journal.sync(api)

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(15)

    # -- set-up ----------------------------------------------------------------------------------------------------

    def kubeconfig(
        self, path: Path, *, context: str = "standin", namespace: str = "scaleq", token: str | None = None
    ) -> Path:
        """Write a kubeconfig whose ``context`` (also the current one) reaches this stand-in with its token."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "standin", "cluster": {"server": self.url}}],
            "users": [{"name": "standin", "user": {"token": token or self.token}}],
            "contexts": [
                {"name": context, "context": {"cluster": "standin", "user": "standin", "namespace": namespace}}
            ],
            "current-context": context,
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(config))
        return path

    def add_namespace(self, name: str) -> None:
        self.call(lambda api: api.add_namespace(name))

    def deny(self, verb: str, resource: str) -> None:
        """Forbid ``verb`` on ``resource`` (e.g. "create", "pods") to the credentials, as RBAC would."""
        self.call(lambda api: api.denied.add((verb, resource)))

    def unpullable(self, image: str) -> None:
        self.call(lambda api: api.unpullable_images.add(image))

    def exceed_quota(self, resource: str = "pods", quota: str | None = "compute-resources") -> None:
        """Creating ``resource`` is refused as an exhausted ResourceQuota refuses it (403 ``exceeded quota``);
        ``quota=None`` lifts it."""

        def change(api: StandInApi) -> None:
            if quota is None:
                api.quotas.pop(resource, None)
            else:
                api.quotas[resource] = quota

        self.call(change)

    def compact(self) -> None:
        """Compact the history, as etcd does: a watch from any version seen so far is now told 410 Expired."""
        self.call(lambda api: api.journal.compact())

    # -- what a kubelet would do -----------------------------------------------------------------------------------

    def exit_pod(self, namespace: str, name: str, code: int = 0, log: str = "", reason: str | None = None) -> None:
        """The worker in pod ``name`` exits with ``code`` (after printing ``log``)."""
        self.call(lambda api: api.exit_pod(namespace, name, code, log, reason))

    def disrupt_pod(self, namespace: str, name: str, reason: str, message: str) -> None:
        """The cluster evicts or preempts pod ``name`` (see :meth:`StandInApi.disrupt_pod`)."""
        self.call(lambda api: api.disrupt_pod(namespace, name, reason, message))

    # -- looking -----------------------------------------------------------------------------------------------------

    def pods(self, namespace: str | None = None) -> list[dict[str, Any]]:
        def look(api: StandInApi) -> list[dict[str, Any]]:
            api.kubelet()
            return [copy.deepcopy(obj.raw) for _, obj in sorted(api._live("pods", namespace), key=lambda kv: kv[0][2])]

        return self.call(look)

    def pod(self, namespace: str, name: str) -> dict[str, Any] | None:
        return next((p for p in self.pods(namespace) if p["metadata"]["name"] == name), None)

    def secret(self, namespace: str, name: str) -> dict[str, Any] | None:
        def look(api: StandInApi) -> dict[str, Any] | None:
            key = api._key("secrets", namespace, name)
            return copy.deepcopy(api.objects[key].raw) if key in api.objects and not api.objects[key].deleted else None

        return self.call(look)

    @property
    def validated(self) -> list[tuple[str, str, str]]:
        return self.call(lambda api: list(api.validated))

    @property
    def rejected(self) -> list[str]:
        return self.call(lambda api: list(api.rejected))

    @property
    def signals(self) -> list[tuple[str, str, str]]:
        return self.call(lambda api: list(api.signals))
