"""A local stand-in for the Compute Engine v1 REST API: the methods scaleq's ``gcp`` provider calls, built from the
published discovery document (``compute-v1-discovery.json``, revision 20261106).

What comes from the discovery document, not from memory:

- **routes**: each served method's HTTP method and path (``servicePath`` + ``flatPath``); any other path answers 404
  and a known path with the wrong HTTP method 405;
- **parameters**: path parameters are checked against their ``pattern``; query parameters must be the method's own
  or the API's global ones (``alt``, ``fields``, …), of the declared type; required ones must be there;
- **request bodies**: validated against the method's ``request`` schema — unknown fields, wrong JSON types,
  values outside an ``enum``, strings that miss a ``pattern``, malformed int64 / bytes, and fields the document
  annotates as required for the method — answering 400 in Google's error JSON (``{"error": {"code", "message",
  "errors": [{"message", "domain", "reason"}], "status"}}``);
- **responses**: every body the stand-in sends is validated against the method's ``response`` schema too (a
  stand-in bug answers 500 rather than teach the client a shape the API never sends).

The discovery document annotates required fields on the *global* ``instanceTemplates.insert`` only; the regional
``regionInstanceTemplates.insert`` takes the same ``InstanceTemplate`` resource, so its requirements are applied there
too (``REQUIRED_ALIASES``).

What it models (the behaviour scaleq depends on):

- **operations**: mutations answer an ``Operation`` (``RUNNING``) whose effect happens when it turns ``DONE``, after
  ``op_delay`` seconds; ``regionOperations.get`` and ``wait`` (which blocks until ``DONE`` or ``wait_max``) report it.
  Failures found while the operation runs (e.g. deleting a non-member without ``skipInstancesOnValidationError``)
  end up in ``Operation.error``, as the API documents;
- **regional instance templates**: insert / get / list (paged) / delete; a name taken answers 409
  ``alreadyExists``; a template that a MIG references (``instanceTemplate`` or ``versions``) cannot be deleted: 400
  ``resourceInUseByAnotherResource``. Label keys and values follow GCP's label rules; metadata sizes its limits; a
  template needs a boot disk and a network interface;
- **regional MIGs**: insert (with ``distributionPolicy`` zones checked against the region), get, delete (deletes the
  instances, then the group), ``createInstances`` (instances get exactly the given names, ``targetSize`` grows),
  ``deleteInstances`` (exactly those instances, ``targetSize`` shrinks), ``listManagedInstances`` (paged:
  ``page_size`` per page unless ``maxResults`` says otherwise), ``setInstanceTemplate`` and ``resize``;
- **instances**: ``currentAction`` goes ``CREATING`` (``instanceStatus`` ``PROVISIONING``) → ``NONE`` (``RUNNING``)
  after ``create_delay`` seconds, and ``DELETING`` (``STOPPING``) → gone after ``delete_delay``. Each keeps the
  template it was created from: ``version.instanceTemplate`` is how out-of-date instances show;
- **what a MIG does by itself**, so that a client that forgets to switch it off is caught: with ``updatePolicy.type``
  other than ``OPPORTUNISTIC``, ``setInstanceTemplate`` *recreates* every out-of-date instance (PROACTIVE update);
  with ``updatePolicy.instanceRedistributionType`` other than ``NONE`` (PROACTIVE is the default), a
  ``deleteInstances`` that leaves the zones uneven makes the MIG delete instances of its own choosing in the fuller
  zones and create randomly named ones in the emptier ones; ``resize`` down deletes instances of its own choosing;
- **creation failures**, as the API reports them (:meth:`ComputeStandIn.refuse_creation`): ``createInstances`` ends
  ``DONE`` without error, and each instance that cannot be made (a quota, a zone out of capacity, an org policy)
  stays ``CREATING`` with no ``instanceStatus`` while the MIG retries it every ``retry_delay`` seconds; each failed
  attempt sets the instance's ``lastAttempt.errors`` and adds an entry to ``listErrors`` (newest first: code,
  message, the instance and action, a timestamp). A later attempt that succeeds clears ``lastAttempt``;
- **preemption** (:meth:`ComputeStandIn.preempt`): Compute Engine takes a spot VM back. As the API reports it, a
  zone operation of type ``compute.instances.preempted`` appears (``DONE``, user ``system``, ``statusMessage``
  ``Instance was preempted.``, ``targetLink`` the instance), listed by ``zoneOperations.list`` -- which, of the
  list filters, understands ``field = "value"`` terms joined by ``AND`` (on ``operationType``, ``targetLink``,
  ``status``), as Google's preemption-history sample uses them; and the MIG recreates the instance under its name
  (``RECREATING``, then ``RUNNING`` after ``create_delay``);
- **errors**: unknown project, region, template, MIG or operation → 404 ``notFound`` with GCP's message
  (``The resource 'projects/…' was not found``); faults can be injected: :meth:`ComputeStandIn.inject` answers
  e.g. 403 or 500 to the next matching calls, :meth:`ComputeStandIn.fail_operation` makes the next operation of a
  method end ``DONE`` with an error (e.g. ``QUOTA_EXCEEDED``), as the API reports what fails while it works.

What it does not model: IAM (requests are unauthenticated; inject a 403 to test refusal), quotas themselves (inject a
refusal, above), real VMs (no
container runs: an instance is a record), health checks and autohealing, stateful policy, filters on list calls
(answered 400, but for zone operations' ``=`` terms), ``versions`` with several templates (canary updates),
global templates, zonal MIGs.

Every request is recorded in :attr:`ComputeStandIn.calls` (method id, path parameters, query, body) for assertions.
Serve it with :func:`serve` (``http.server`` in a thread) and reach it with the official client:
``transport="rest"``, ``ClientOptions(api_endpoint=standin.url)``, ``AnonymousCredentials()``.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import itertools
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

# the repo's own copy first (tests/standins/schemas, see its README), then the shared folder beside the checkout
SCHEMAS_DIR = Path(
    os.environ.get("SCALEQ_SCHEMAS_DIR")
    or next(
        (
            d
            for d in (
                Path(__file__).resolve().parent / "schemas",
                Path(__file__).resolve().parents[3] / "shared" / "schemas",
            )
            if (d / "gcp" / "compute-v1-discovery.json").exists()
        ),
        Path(__file__).resolve().parent / "schemas",
    )
)
DISCOVERY = SCHEMAS_DIR / "gcp" / "compute-v1-discovery.json"
BASE = "https://www.googleapis.com/compute/v1/"

SERVED: dict[str, tuple[str, ...]] = {
    "regionInstanceTemplates": ("insert", "get", "list", "delete"),
    "regionInstanceGroupManagers": (
        "insert",
        "get",
        "delete",
        "createInstances",
        "deleteInstances",
        "listManagedInstances",
        "listErrors",
        "setInstanceTemplate",
        "resize",
    ),
    "regionOperations": ("get", "wait"),
    "regions": ("get",),
    "zoneOperations": ("list",),
}
REQUIRED_ALIASES = {"compute.regionInstanceTemplates.insert": "compute.instanceTemplates.insert"}
DEFAULT_REGIONS = {
    "us-central1": ("us-central1-a", "us-central1-b", "us-central1-c", "us-central1-f"),
    "europe-west1": ("europe-west1-b", "europe-west1-c", "europe-west1-d"),
}
LABEL_KEY = re.compile(r"[a-z][a-z0-9_-]{0,62}")
LABEL_VALUE = re.compile(r"[a-z0-9_-]{0,63}")
NAME = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
TEMPLATE_REF = re.compile(
    r"(?:.*/)?(?:projects/(?P<project>[^/]+)/)?(?:regions/(?P<region>[^/]+)|(?P<global>global))"
    r"/instanceTemplates/(?P<name>[^/]+)"
)
INSTANCE_REF = re.compile(r"(?:.*/)?(?:projects/(?P<project>[^/]+)/)?zones/(?P<zone>[^/]+)/instances/(?P<name>[^/]+)")
ZONE_REF = re.compile(r"(?:.*/)?zones/(?P<zone>[^/]+)")
INT64 = re.compile(r"-?[0-9]{1,19}")
UINT64 = re.compile(r"[0-9]{1,20}")


class ApiError(Exception):
    """An error answered in Google's JSON shape."""

    def __init__(
        self, code: int, message: str, reason: str, status: str | None = None, op_code: str | None = None
    ) -> None:
        super().__init__(message)
        self.code, self.message, self.reason, self.status = code, message, reason, status
        self.op_code = op_code or reason.upper()  # the code an Operation's error gives it (e.g. QUOTA_EXCEEDED)

    def body(self) -> dict[str, Any]:
        error: dict[str, Any] = {
            "code": self.code,
            "message": self.message,
            "errors": [{"message": self.message, "domain": "global", "reason": self.reason}],
        }
        if self.status:
            error["status"] = self.status
        return {"error": error}


def not_found(what: str) -> ApiError:
    return ApiError(404, f"The resource '{what}' was not found", "notFound")


def invalid(message: str) -> ApiError:
    return ApiError(400, message, "invalid")


def payload_error(message: str) -> ApiError:
    return ApiError(400, f"Invalid JSON payload received. {message}", "invalid", "INVALID_ARGUMENT")


# -- the discovery document -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    id: str
    resource: str
    name: str
    http_method: str
    path: re.Pattern[str]
    parameters: dict[str, dict[str, Any]]
    request: str | None
    response: str | None


@functools.cache
def discovery() -> dict[str, Any]:
    if not DISCOVERY.exists():
        raise FileNotFoundError(
            f"the Compute Engine discovery document is not at {DISCOVERY}: set SCALEQ_SCHEMAS_DIR to the directory "
            "that holds gcp/compute-v1-discovery.json"
        )
    return json.loads(DISCOVERY.read_text())


@functools.cache
def methods() -> tuple[Method, ...]:
    doc = discovery()
    found = []
    for resource, names in SERVED.items():
        for name in names:
            m = doc["resources"][resource]["methods"][name]
            pattern = re.sub(r"\{(\w+)\}", r"(?P<\1>[^/]+)", "/" + doc["servicePath"] + m["flatPath"])
            found.append(
                Method(
                    m["id"],
                    resource,
                    name,
                    m["httpMethod"],
                    re.compile(pattern),
                    m.get("parameters", {}),
                    m.get("request", {}).get("$ref"),
                    m.get("response", {}).get("$ref"),
                )
            )
    return tuple(found)


def validate(value: Any, schema: dict[str, Any], where: str, method_id: str | None) -> None:
    """Check ``value`` against a discovery schema; ``method_id`` enforces the fields annotated required for it
    (None for responses, which are output). Raises :class:`ApiError` (400) at the first problem."""
    schemas = discovery()["schemas"]
    if "$ref" in schema:
        schema = schemas[schema["$ref"]]
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise payload_error(f"Invalid value at '{where}': expected an object, got {json.dumps(value)}")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                validate(item, props[key], f"{where}.{key}", method_id)
            elif extra is not None:
                validate(item, extra, f"{where}[{key!r}]", method_id)
            else:
                raise payload_error(f"Unknown name {json.dumps(key)} at '{where}': Cannot find field.")
        if method_id is not None:
            wanted = {method_id, REQUIRED_ALIASES.get(method_id, method_id)}
            for key, prop in props.items():
                required = set(prop.get("annotations", {}).get("required", ()))
                if required & wanted and value.get(key) in (None, "", [], {}):
                    raise ApiError(400, f"Required field '{where}.{key}' not specified", "required")
    elif kind == "array":
        if not isinstance(value, list):
            raise payload_error(f"Invalid value at '{where}': expected a list, got {json.dumps(value)}")
        for i, item in enumerate(value):
            validate(item, schema.get("items", {}), f"{where}[{i}]", method_id)
    elif kind == "string":
        fmt = schema.get("format")
        if fmt in ("int64", "uint64") and isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # proto JSON accepts numbers for 64-bit integers too
        if not isinstance(value, str):
            raise payload_error(f"Invalid value at '{where}' (TYPE_STRING), {json.dumps(value)}")
        if (fmt == "int64" and not INT64.fullmatch(value)) or (fmt == "uint64" and not UINT64.fullmatch(value)):
            raise payload_error(f"Invalid value at '{where}' (TYPE_{fmt.upper()}), {json.dumps(value)}")
        if fmt == "byte":
            try:
                base64.b64decode(value, validate=True)
            except binascii.Error:
                raise payload_error(f"Invalid value at '{where}' (TYPE_BYTES), {json.dumps(value)}") from None
        if "enum" in schema and value not in schema["enum"]:
            raise payload_error(f"Invalid value at '{where}' (TYPE_ENUM), {json.dumps(value)}")
        if "pattern" in schema and method_id is not None and not re.fullmatch(schema["pattern"], value):
            raise invalid(f"Invalid value for field '{where}': {json.dumps(value)}. Must match {schema['pattern']}")
    elif kind == "integer":
        if isinstance(value, str) and INT64.fullmatch(value):
            value = int(value)
        if not isinstance(value, int) or isinstance(value, bool):
            raise payload_error(f"Invalid value at '{where}' (TYPE_INT32), {json.dumps(value)}")
        if schema.get("format") in ("uint32", "uint64") and value < 0:
            raise payload_error(f"Invalid value at '{where}' (TYPE_UINT32), {value}")
    elif kind == "number":
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise payload_error(f"Invalid value at '{where}' (TYPE_DOUBLE), {json.dumps(value)}")
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise payload_error(f"Invalid value at '{where}' (TYPE_BOOL), {json.dumps(value)}")


def _query_value(name: str, raw: list[str], spec: dict[str, Any]) -> Any:
    if len(raw) > 1 and not spec.get("repeated"):
        raise payload_error(f"Invalid value at '{name}': given {len(raw)} times")
    value = raw[-1]
    kind = spec.get("type")
    if kind == "integer":
        if not INT64.fullmatch(value) or (spec.get("format", "").startswith("u") and int(value) < 0):
            raise payload_error(f"Invalid value at '{name}' (TYPE_INT32), {json.dumps(value)}")
        return int(value)
    if kind == "boolean":
        if value not in ("true", "false"):
            raise payload_error(f"Invalid value at '{name}' (TYPE_BOOL), {json.dumps(value)}")
        return value == "true"
    if "enum" in spec and value not in spec["enum"]:
        raise payload_error(f"Invalid value at '{name}' (TYPE_ENUM), {json.dumps(value)}")
    return value


# -- the model ---------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class Vm:
    name: str
    zone: str
    template: str  # URL of the template it was created from
    id: str
    action: str = "CREATING"
    status: str | None = "PROVISIONING"
    until: float = 0.0  # when the current action ends
    errors: list[dict[str, str]] = field(default_factory=list)  # lastAttempt.errors.errors of a failed creation


@dataclass
class Mig:
    project: str
    region: str
    resource: dict[str, Any]  # what insert was given, plus output fields
    vms: dict[str, Vm] = field(default_factory=dict)
    deleting: bool = False
    errors: list[dict[str, Any]] = field(default_factory=list)  # what listErrors answers, oldest first


@dataclass
class Call:
    method: str  # the discovery id, e.g. compute.regionInstanceGroupManagers.createInstances
    params: dict[str, str]
    query: dict[str, Any]
    body: Any


@dataclass
class Fault:
    code: int
    message: str
    reason: str
    method: str | None  # a method id (or its last part, e.g. "createInstances"); None: any
    times: int


@dataclass
class CreationFault:
    code: str  # e.g. QUOTA_EXCEEDED, ZONE_RESOURCE_POOL_EXHAUSTED, CONDITION_NOT_MET
    message: str
    attempts: int | None  # how many creation attempts fail; None: until cleared


@dataclass
class _Op:
    resource: dict[str, Any]
    due: float
    effect: Callable[[], None] | None  # None once applied
    done_when: Callable[[], bool] | None = None  # after the effect, the operation runs until this is true


class ComputeStandIn:
    """The API's state and behaviour; :func:`serve` puts it behind HTTP."""

    def __init__(
        self,
        *,
        projects: tuple[str, ...] = ("scaleq-test",),
        regions: dict[str, tuple[str, ...]] | None = None,
        op_delay: float = 0.05,
        create_delay: float = 0.3,
        delete_delay: float = 0.3,
        page_size: int = 500,
        wait_max: float = 120.0,
        retry_delay: float | None = None,
    ) -> None:
        self.projects = set(projects)
        self.regions = dict(regions or DEFAULT_REGIONS)
        self.op_delay, self.create_delay, self.delete_delay = op_delay, create_delay, delete_delay
        self.page_size = page_size
        self.wait_max = wait_max
        self.retry_delay = create_delay if retry_delay is None else retry_delay  # a MIG retrying a failed creation
        self.creation_faults: list[CreationFault] = []
        self.templates: dict[tuple[str, str, str], dict[str, Any]] = {}  # (project, region, name) → resource
        self.migs: dict[tuple[str, str, str], Mig] = {}
        self.ops: dict[tuple[str, str, str], _Op] = {}
        self.calls: list[Call] = []
        self._inserting: dict[tuple[str, str, str], tuple[str, str, str]] = {}  # insert operation → template
        self.faults: list[Fault] = []
        self.op_faults: list[Fault] = []
        self.zone_ops: list[tuple[str, str, dict[str, Any]]] = []  # (project, zone, Operation), oldest first
        self._ids = itertools.count(int(time.time() * 1000) * 1000)
        self._lock = threading.RLock()
        self._rand = random.Random(7)
        self.url = ""  # set by serve()

    # -- for tests --------------------------------------------------------------------------------------------------

    def inject(self, code: int, message: str, reason: str = "", *, method: str | None = None, times: int = 1) -> None:
        """Answer the next ``times`` calls (of ``method``, or any) with this error instead."""
        reasons = {403: "forbidden", 404: "notFound", 429: "rateLimitExceeded", 500: "backendError", 503: "unavailable"}
        with self._lock:
            self.faults.append(Fault(code, message, reason or reasons.get(code, "invalid"), method, times))

    def fail_operation(self, method: str, code: str, message: str, *, times: int = 1) -> None:
        """Let the next ``times`` operations of ``method`` (id or last part) end DONE with this error, as the API
        reports what goes wrong while an operation runs (e.g. ``QUOTA_EXCEEDED``)."""
        with self._lock:
            self.op_faults.append(Fault(400, message, code, method, times))

    def refuse_creation(self, code: str, message: str, *, attempts: int | None = None) -> None:
        """Make instance creation fail as the API reports it: ``createInstances`` still ends DONE, the instance stays
        ``CREATING`` with no status while the MIG retries it every ``retry_delay`` seconds, each failed attempt is in
        the instance's ``lastAttempt.errors`` and in the group's ``listErrors``. ``attempts`` failed attempts (in
        all), or until :meth:`allow_creation`."""
        with self._lock:
            self.creation_faults.append(CreationFault(code, message, attempts))

    def allow_creation(self) -> None:
        """Let creation succeed again (a quota raised, capacity back): the next retries create the instances."""
        with self._lock:
            self.creation_faults.clear()

    def preempt(self, project: str, region: str, mig: str, name: str) -> dict[str, Any]:
        """Compute Engine takes the spot VM ``name`` of ``mig`` back: the ``compute.instances.preempted`` zone
        operation is recorded, and the MIG recreates the instance. Returns the operation."""
        with self._lock:
            self._advance()
            vm = self.migs[(project, region, mig)].vms[name]
            zone_url = f"{BASE}projects/{project}/zones/{vm.zone}"
            op_name = f"systemevent-{int(time.time() * 1000)}-{self._rand.getrandbits(48):012x}"
            at = _now()
            op = {
                "kind": "compute#operation",
                "id": self._id(),
                "name": op_name,
                "zone": zone_url,
                "operationType": "compute.instances.preempted",
                "targetLink": f"{zone_url}/instances/{name}",
                "targetId": vm.id,
                "status": "DONE",
                "statusMessage": "Instance was preempted.",
                "user": "system",
                "progress": 100,
                "insertTime": at,
                "startTime": at,
                "endTime": at,
                "selfLink": f"{zone_url}/operations/{op_name}",
            }
            self.zone_ops.append((project, vm.zone, op))
            vm.action, vm.status, vm.until = "RECREATING", "STOPPING", time.monotonic() + self.create_delay
            return dict(op)

    def called(self, name: str) -> list[Call]:
        """The recorded calls of a method, by its id or last part (``createInstances``)."""
        return [c for c in self.calls if c.method == name or c.method.rsplit(".", 1)[-1] == name]

    def instances(self, project: str, region: str, mig: str) -> dict[str, Vm]:
        with self._lock:
            self._advance()
            found = self.migs.get((project, region, mig))
            return dict(found.vms) if found else {}

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no operation is pending and every instance has finished its action."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                self._advance()
                busy = any(o.resource["status"] != "DONE" for o in self.ops.values()) or any(
                    vm.action != "NONE" for m in self.migs.values() for vm in m.vms.values()
                )
            if not busy:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("the stand-in did not settle")
            time.sleep(0.02)

    # -- dispatch ---------------------------------------------------------------------------------------------------

    def handle(self, http_method: str, raw_path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        """Answer one HTTP request: (status, JSON body)."""
        split = urlsplit(raw_path)
        query = parse_qs(split.query, keep_blank_values=True)
        allowed = []
        for m in methods():
            match = m.path.fullmatch(split.path)
            if match is None:
                continue
            if m.http_method != http_method:
                allowed.append(m.http_method)
                continue
            try:
                return 200, self._call(m, match.groupdict(), query, body)
            except ApiError as exc:
                return exc.code, exc.body()
        if allowed:
            return 405, ApiError(405, f"Method {http_method} is not allowed here", "httpMethodNotAllowed").body()
        return 404, ApiError(404, f"The requested URL {split.path} was not found on this server.", "notFound").body()

    def _call(self, m: Method, params: dict[str, str], raw_query: dict[str, list[str]], raw_body: bytes) -> dict:
        doc = discovery()
        for name, value in params.items():
            pattern = m.parameters[name].get("pattern")
            if pattern and not re.fullmatch(pattern, value):
                raise invalid(f"Invalid value for field '{name}': '{value}'. Must match {pattern}")
        query: dict[str, Any] = {}
        for name, raw in raw_query.items():
            spec = m.parameters.get(name) or doc["parameters"].get(name.lstrip("$"))
            if spec is None or spec.get("location") != "query":
                raise payload_error(f"Unknown name {json.dumps(name)}: Cannot bind query parameter.")
            query[name] = _query_value(name, raw, spec)
        for name, spec in m.parameters.items():
            if spec.get("required") and spec["location"] == "query" and name not in query:
                raise ApiError(400, f"Required field '{name}' not specified", "required")
        body: Any = None
        if m.request:
            try:
                body = json.loads(raw_body or b"null")
            except ValueError as exc:
                raise payload_error(f"Unexpected token: {exc}") from None
            if body is None:
                raise ApiError(400, "Required field 'resource' not specified", "required")
            validate(body, {"$ref": m.request}, m.request[0].lower() + m.request[1:], m.id)
        elif raw_body.strip() not in (b"", b"{}", b"null"):
            raise payload_error("This method takes no request body.")
        with self._lock:
            self.calls.append(Call(m.id, dict(params), query, body))
            for fault in self.faults:
                if fault.times > 0 and fault.method in (None, m.id, m.name):
                    fault.times -= 1
                    raise ApiError(fault.code, fault.message, fault.reason)
            self._advance()
            self._project(params["project"])
            if "region" in params and m.resource != "regions":
                self._region(params["project"], params["region"])
            if not (m.resource == "regionOperations" and m.name == "wait"):
                result = getattr(self, f"_{m.resource}_{m.name}")(params, query, body)
                if m.response == "Operation":
                    self._maybe_fail(m, params, result)
        if m.resource == "regionOperations" and m.name == "wait":
            result = self._wait(params)  # blocks without the lock, so other requests go on meanwhile
        if m.response:
            try:
                validate(result, {"$ref": m.response}, m.response, None)
            except ApiError as exc:
                raise ApiError(
                    500, f"stand-in bug: its answer does not fit {m.response}: {exc.message}", "backendError"
                ) from None
        return result

    def _maybe_fail(self, m: Method, params: dict[str, str], op: dict[str, Any]) -> None:
        for fault in self.op_faults:
            if fault.times > 0 and fault.method in (m.id, m.name):
                fault.times -= 1
                error = ApiError(fault.code, fault.message, "operationFailed", op_code=fault.reason)

                def fail(error: ApiError = error) -> None:
                    raise error

                self.ops[(params["project"], params["region"], op["name"])].effect = fail
                return

    # -- scopes -----------------------------------------------------------------------------------------------------

    def _project(self, project: str) -> None:
        if project not in self.projects:
            raise not_found(f"projects/{project}")

    def _region(self, project: str, region: str) -> tuple[str, ...]:
        if region not in self.regions:
            raise not_found(f"projects/{project}/regions/{region}")
        return self.regions[region]

    def _id(self) -> str:
        return str(next(self._ids))

    # -- operations -------------------------------------------------------------------------------------------------

    def _operation(self, project: str, region: str, kind: str, target: str, effect: Callable[[], None]) -> dict:
        name = f"operation-{int(time.time() * 1000)}-{self._rand.getrandbits(48):012x}"
        region_url = f"{BASE}projects/{project}/regions/{region}"
        resource = {
            "kind": "compute#operation",
            "id": self._id(),
            "name": name,
            "operationType": kind,
            "targetLink": target,
            "targetId": self._id(),
            "status": "RUNNING",
            "progress": 0,
            "user": "anonymous@scaleq-standin",
            "insertTime": _now(),
            "startTime": _now(),
            "region": region_url,
            "selfLink": f"{region_url}/operations/{name}",
        }
        self.ops[(project, region, name)] = _Op(resource, time.monotonic() + self.op_delay, effect)
        return dict(resource)

    def _advance(self) -> None:
        """Finish what is due: instance actions (and groups deleted with their last instance), then operations."""
        now = time.monotonic()
        for key, mig in list(self.migs.items()):
            for vm in list(mig.vms.values()):
                if vm.action == "NONE" or vm.until > now:
                    continue
                if vm.action == "DELETING":
                    del mig.vms[vm.name]
                elif fault := self._creation_fault():  # the attempt fails; the MIG tries again later
                    self._creation_failed(mig, vm, fault)
                else:  # CREATING, RECREATING
                    vm.action, vm.status, vm.errors = "NONE", "RUNNING", []
            if mig.deleting and not mig.vms:
                del self.migs[key]
        for op in sorted((o for o in self.ops.values() if o.resource["status"] != "DONE"), key=lambda o: o.due):
            if op.due > now:
                break
            effect, op.effect = op.effect, None
            try:
                if effect is not None:
                    effect()
            except ApiError as exc:
                op.resource["error"] = {"errors": [{"code": exc.op_code, "message": exc.message}]}
                op.resource["httpErrorStatusCode"] = exc.code
                op.resource["httpErrorMessage"] = {400: "BAD REQUEST", 404: "NOT FOUND"}.get(exc.code, "ERROR")
            else:
                if op.done_when is not None and not op.done_when():
                    continue
            op.resource.update(status="DONE", progress=100, endTime=_now())

    def _creation_fault(self) -> CreationFault | None:
        for fault in self.creation_faults:
            if fault.attempts is None or fault.attempts > 0:
                if fault.attempts is not None:
                    fault.attempts -= 1
                return fault
        return None

    def _creation_failed(self, mig: Mig, vm: Vm, fault: CreationFault) -> None:
        error = {"code": fault.code, "message": fault.message}
        vm.status, vm.errors, vm.until = None, [error], time.monotonic() + self.retry_delay
        mig.errors.append(
            {
                "error": dict(error),
                "instanceActionDetails": {
                    "action": vm.action,
                    "instance": f"{BASE}projects/{mig.project}/zones/{vm.zone}/instances/{vm.name}",
                    "version": {"instanceTemplate": vm.template},
                },
                "timestamp": _now(),
            }
        )

    def _wait(self, params: dict[str, str]) -> dict:
        key = (params["project"], params["region"], params["operation"])
        deadline = time.monotonic() + self.wait_max
        while True:
            with self._lock:
                self._advance()
                op = self.ops.get(key)
                if op is None:
                    raise not_found(f"projects/{key[0]}/regions/{key[1]}/operations/{key[2]}")
                if op.resource["status"] == "DONE" or time.monotonic() >= deadline:
                    return dict(op.resource)
            time.sleep(0.01)

    def _regionOperations_get(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        op = self.ops.get((params["project"], params["region"], params["operation"]))
        if op is None:
            raise not_found(f"projects/{params['project']}/regions/{params['region']}/operations/{params['operation']}")
        return dict(op.resource)

    def _zoneOperations_list(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        project, zone = params["project"], params["zone"]
        if not any(zone in zones for zones in self.regions.values()):
            raise not_found(f"projects/{project}/zones/{zone}")
        if query.get("orderBy"):
            raise invalid("the stand-in does not implement orderBy")
        terms = operation_filter(query.get("filter") or "")
        found = [
            dict(op)
            for p, z, op in self.zone_ops
            if (p, z) == (project, zone) and all((op.get(f) == v) == (o == "=") for f, o, v in terms)
        ]
        items, token = self._page(found, query)
        url = f"{BASE}projects/{project}/zones/{zone}/operations"
        answer: dict[str, Any] = {"kind": "compute#operationList", "id": url, "items": items, "selfLink": url}
        if token:
            answer["nextPageToken"] = token
        return answer

    # -- regions ----------------------------------------------------------------------------------------------------

    def _regions_get(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        project, region = params["project"], params["region"]
        zones = self._region(project, region)
        return {
            "kind": "compute#region",
            "id": str(1000 + sorted(self.regions).index(region)),
            "name": region,
            "description": region,
            "status": "UP",
            "zones": [f"{BASE}projects/{project}/zones/{z}" for z in zones],
            "selfLink": f"{BASE}projects/{project}/regions/{region}",
            "creationTimestamp": "1969-12-31T16:00:00.000-08:00",
            "supportsPzs": False,
        }

    # -- regional instance templates --------------------------------------------------------------------------------

    def _template_url(self, project: str, region: str, name: str) -> str:
        return f"{BASE}projects/{project}/regions/{region}/instanceTemplates/{name}"

    def _find_template(self, project: str, region: str, ref: str, field_name: str) -> str:
        """The URL of a template a MIG refers to; 404 when it does not exist, 400 when the reference is bad."""
        m = TEMPLATE_REF.fullmatch(ref)
        if m is None:
            raise invalid(f"Invalid value for field '{field_name}': '{ref}'. The URL is malformed.")
        if m["global"]:
            raise not_found(f"projects/{m['project'] or project}/global/instanceTemplates/{m['name']}")
        key = (m["project"] or project, m["region"], m["name"])
        if key not in self.templates:
            raise not_found(f"projects/{key[0]}/regions/{key[1]}/instanceTemplates/{key[2]}")
        if key[1] != region:
            raise invalid(f"Invalid value for field '{field_name}': '{ref}'. The template is in another region.")
        return self._template_url(*key)

    def _regionInstanceTemplates_insert(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        project, region = params["project"], params["region"]
        name = body["name"]
        key = (project, region, name)
        if key in self.templates or key in self._pending_templates():
            raise ApiError(
                409,
                f"The resource 'projects/{project}/regions/{region}/instanceTemplates/{name}' already exists",
                "alreadyExists",
            )
        _check_properties(body.get("properties") or {})
        url = self._template_url(*key)
        resource = {
            **body,
            "kind": "compute#instanceTemplate",
            "id": self._id(),
            "creationTimestamp": _now(),
            "region": f"{BASE}projects/{project}/regions/{region}",
            "selfLink": url,
        }

        def effect() -> None:
            self.templates[key] = resource

        op = self._operation(project, region, "insert", url, effect)
        self._inserting[(project, region, op["name"])] = key
        return op

    def _pending_templates(self) -> set[tuple[str, str, str]]:
        """Templates whose insert has not finished yet (their names are taken already)."""
        return {key for op, key in self._inserting.items() if self.ops[op].resource["status"] != "DONE"}

    def _regionInstanceTemplates_get(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        key = (params["project"], params["region"], params["instanceTemplate"])
        if key not in self.templates:
            raise not_found("projects/{}/regions/{}/instanceTemplates/{}".format(*key))
        return self.templates[key]

    def _regionInstanceTemplates_list(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        if query.get("filter"):
            raise invalid("the stand-in does not implement list filters")
        project, region = params["project"], params["region"]
        items = [t for (p, r, _), t in sorted(self.templates.items()) if (p, r) == (project, region)]
        page, token = self._page(items, query)
        out: dict[str, Any] = {
            "kind": "compute#instanceTemplateList",
            "id": f"projects/{project}/regions/{region}/instanceTemplates",
            "items": page,
            "selfLink": f"{BASE}projects/{project}/regions/{region}/instanceTemplates",
        }
        if token:
            out["nextPageToken"] = token
        return out

    def _page(self, items: list[Any], query: dict[str, Any]) -> tuple[list[Any], str]:
        size = query.get("maxResults") or self.page_size
        start = 0
        if query.get("pageToken"):
            try:
                start = int(base64.urlsafe_b64decode(query["pageToken"]).decode())
            except (ValueError, binascii.Error):
                raise invalid(f"Invalid value for field 'pageToken': '{query['pageToken']}'") from None
        end = start + min(size, 500)
        token = base64.urlsafe_b64encode(str(end).encode()).decode() if end < len(items) else ""
        return items[start:end], token

    def _regionInstanceTemplates_delete(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        project, region, name = params["project"], params["region"], params["instanceTemplate"]
        key = (project, region, name)
        if key not in self.templates:
            raise not_found(f"projects/{project}/regions/{region}/instanceTemplates/{name}")
        url = self._template_url(*key)
        for (p, r, mig_name), mig in self.migs.items():
            used = {mig.resource["instanceTemplate"], *(v["instanceTemplate"] for v in mig.resource["versions"])}
            if url in used:
                raise ApiError(
                    400,
                    f"The instance_template resource 'projects/{project}/regions/{region}/instanceTemplates/{name}' "
                    f"is already being used by 'projects/{p}/regions/{r}/instanceGroupManagers/{mig_name}'",
                    "resourceInUseByAnotherResource",
                )

        def effect() -> None:
            self.templates.pop(key, None)

        return self._operation(project, region, "delete", url, effect)

    # -- regional managed instance groups ---------------------------------------------------------------------------

    def _mig(self, params: dict[str, str], *, changing: bool = True) -> Mig:
        key = (params["project"], params["region"], params["instanceGroupManager"])
        mig = self.migs.get(key)
        if mig is None:
            raise not_found("projects/{}/regions/{}/instanceGroupManagers/{}".format(*key))
        if mig.deleting and changing:
            raise ApiError(
                400,
                "The resource 'projects/{}/regions/{}/instanceGroupManagers/{}' is not ready".format(*key),
                "resourceNotReady",
            )
        return mig

    def _mig_url(self, project: str, region: str, name: str) -> str:
        return f"{BASE}projects/{project}/regions/{region}/instanceGroupManagers/{name}"

    def _zones(self, mig: Mig) -> list[str]:
        configured = [ZONE_REF.fullmatch(z["zone"])["zone"] for z in mig.resource["distributionPolicy"]["zones"]]
        return configured or list(self.regions[mig.region])

    def _new_vm(self, mig: Mig, name: str, zone: str | None = None) -> Vm:
        if zone is None:  # targetShape EVEN: the zone with the fewest instances
            counts = {z: 0 for z in self._zones(mig)}
            for vm in mig.vms.values():
                if vm.action != "DELETING" and vm.zone in counts:
                    counts[vm.zone] += 1
            zone = min(counts, key=lambda z: (counts[z], z))
        vm = Vm(name, zone, mig.resource["instanceTemplate"], self._id(), until=time.monotonic() + self.create_delay)
        mig.vms[name] = vm
        return vm

    def _random_name(self, mig: Mig) -> str:
        while True:
            name = (
                f"{mig.resource['baseInstanceName']}-{''.join(self._rand.choices('abcdefghijklmnopqrstuvwxyz', k=4))}"
            )
            if name not in mig.vms:
                return name

    def _delete_vm(self, vm: Vm) -> None:
        vm.action, vm.status, vm.until = "DELETING", "STOPPING", time.monotonic() + self.delete_delay

    def _regionInstanceGroupManagers_insert(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        project, region = params["project"], params["region"]
        name = body["name"]
        key = (project, region, name)
        if key in self.migs:
            raise ApiError(
                409,
                f"The resource 'projects/{project}/regions/{region}/instanceGroupManagers/{name}' already exists",
                "alreadyExists",
            )
        template = self._find_template(project, region, body.get("instanceTemplate", ""), "resource.instanceTemplate")
        policy = body.get("distributionPolicy") or {}
        for i, z in enumerate(policy.get("zones", [])):
            m = ZONE_REF.fullmatch(z["zone"])
            if m is None or m["zone"] not in self.regions[region]:
                raise invalid(
                    f"Invalid value for field 'resource.distributionPolicy.zones[{i}].zone': '{z['zone']}'. "
                    f"Zone must be in region {region}."
                )
        base = body.get("baseInstanceName") or name[:58]
        if not re.fullmatch(r"[a-z](([-a-z0-9]{0,57})|([-a-z0-9]{0,51}-#{1,10}(\[[0-9]{1,10}\])?))", base):
            raise invalid(f"Invalid value for field 'resource.baseInstanceName': '{base}'.")
        url = self._mig_url(*key)
        resource = {
            **body,
            "kind": "compute#instanceGroupManager",
            "id": self._id(),
            "creationTimestamp": _now(),
            "region": f"{BASE}projects/{project}/regions/{region}",
            "selfLink": url,
            "instanceGroup": f"{BASE}projects/{project}/regions/{region}/instanceGroups/{name}",
            "instanceTemplate": template,
            "versions": [{"instanceTemplate": template}],
            "baseInstanceName": base,
            "distributionPolicy": {"zones": policy.get("zones", []), "targetShape": policy.get("targetShape", "EVEN")},
            "fingerprint": base64.b64encode(os.urandom(8)).decode(),
        }
        resource.setdefault("updatePolicy", {})

        def effect() -> None:
            mig = Mig(project, region, resource)
            self.migs[key] = mig
            for _ in range(int(body["targetSize"])):
                self._new_vm(mig, self._random_name(mig))

        return self._operation(project, region, "insert", url, effect)

    def _regionInstanceGroupManagers_get(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        mig = self._mig(params, changing=False)
        actions = {
            a: 0
            for a in (
                "abandoning",
                "creating",
                "creatingWithoutRetries",
                "deleting",
                "none",
                "recreating",
                "refreshing",
                "restarting",
                "resuming",
                "starting",
                "stopping",
                "suspending",
                "verifying",
            )
        }
        for vm in mig.vms.values():
            actions[vm.action.lower()] += 1
        current = mig.resource["instanceTemplate"]
        return {
            **mig.resource,
            "targetSize": sum(1 for vm in mig.vms.values() if vm.action != "DELETING"),
            "currentActions": actions,
            "status": {
                "isStable": all(vm.action == "NONE" for vm in mig.vms.values()),
                "versionTarget": {"isReached": all(vm.template == current for vm in mig.vms.values())},
            },
        }

    def _regionInstanceGroupManagers_delete(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        mig = self._mig(params)
        url = mig.resource["selfLink"]
        key = (mig.project, mig.region, mig.resource["name"])

        def effect() -> None:
            mig.deleting = True
            for vm in mig.vms.values():
                if vm.action != "DELETING":
                    self._delete_vm(vm)

        op = self._operation(mig.project, mig.region, "delete", url, effect)
        # like the API, the operation is DONE once the group (after its instances) is gone
        self.ops[(mig.project, mig.region, op["name"])].done_when = lambda: key not in self.migs
        return op

    def _regionInstanceGroupManagers_createInstances(
        self, params: dict[str, str], query: dict[str, Any], body: Any
    ) -> dict:
        mig = self._mig(params)
        names = []
        for i, config in enumerate(body.get("instances", [])):
            name = config.get("name", "")
            if not NAME.fullmatch(name):
                raise invalid(
                    f"Invalid value for field 'instances[{i}].name': '{name}'. Must be a match of regex "
                    "'[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?'"
                )
            if name in mig.vms or name in names:
                raise invalid(f"Instance '{name}' already exists in instance group manager '{mig.resource['name']}'")
            names.append(name)
        if not names:
            raise ApiError(400, "Required field 'instances' not specified", "required")

        def effect() -> None:
            for name in names:
                self._new_vm(mig, name)

        return self._operation(
            mig.project, mig.region, "compute.instanceGroupManagers.createInstances", mig.resource["selfLink"], effect
        )

    def _regionInstanceGroupManagers_deleteInstances(
        self, params: dict[str, str], query: dict[str, Any], body: Any
    ) -> dict:
        mig = self._mig(params)
        refs = []
        for i, ref in enumerate(body.get("instances", [])):
            m = INSTANCE_REF.fullmatch(ref)
            if m is None:
                raise invalid(f"Invalid value for field 'instances[{i}]': '{ref}'. The URL is malformed.")
            if m["zone"] not in self.regions[mig.region]:
                raise invalid(
                    f"Invalid value for field 'instances[{i}]': '{ref}'. The instance is in a zone outside "
                    f"region {mig.region}."
                )
            refs.append((m["zone"], m["name"], ref))
        skip = bool(body.get("skipInstancesOnValidationError"))

        def effect() -> None:
            chosen = []
            for zone, name, ref in refs:
                vm = mig.vms.get(name)
                if vm is None or vm.zone != zone or vm.action in ("DELETING", "ABANDONING"):
                    if skip:
                        continue
                    raise invalid(f"The instance '{ref}' is not a member of the group or is already being deleted")
                chosen.append(vm)
            for vm in chosen:
                self._delete_vm(vm)
            self._redistribute(mig)

        return self._operation(
            mig.project, mig.region, "compute.instanceGroupManagers.deleteInstances", mig.resource["selfLink"], effect
        )

    def _redistribute(self, mig: Mig) -> None:
        """PROACTIVE redistribution (the API's default): even the zones out by replacing instances of its choosing."""
        if mig.resource.get("updatePolicy", {}).get("instanceRedistributionType", "PROACTIVE") == "NONE":
            return
        zones = self._zones(mig)
        while True:
            live: dict[str, list[Vm]] = {z: [] for z in zones}
            for vm in mig.vms.values():
                if vm.action != "DELETING" and vm.zone in live:
                    live[vm.zone].append(vm)
            fullest = max(zones, key=lambda z: len(live[z]))
            emptiest = min(zones, key=lambda z: len(live[z]))
            if len(live[fullest]) - len(live[emptiest]) <= 1:
                return
            self._delete_vm(sorted(live[fullest], key=lambda vm: vm.name)[0])
            self._new_vm(mig, self._random_name(mig), emptiest)

    def _regionInstanceGroupManagers_listManagedInstances(
        self, params: dict[str, str], query: dict[str, Any], body: Any
    ) -> dict:
        if query.get("filter"):
            raise invalid("the stand-in does not implement list filters")
        mig = self._mig(params, changing=False)
        items = []
        for vm in sorted(mig.vms.values(), key=lambda vm: vm.name):
            item: dict[str, Any] = {
                "instance": f"{BASE}projects/{mig.project}/zones/{vm.zone}/instances/{vm.name}",
                "name": vm.name,
                "id": vm.id,
                "currentAction": vm.action,
                "targetStatus": "DELETED" if vm.action == "DELETING" else "RUNNING",
            }
            if vm.status:
                item["instanceStatus"] = vm.status
            if vm.action != "DELETING":  # the API leaves the version out for instances being deleted
                item["version"] = {"instanceTemplate": vm.template}
            if vm.errors:
                item["lastAttempt"] = {"errors": {"errors": [dict(e) for e in vm.errors]}}
            items.append(item)
        page, token = self._page(items, query)
        out: dict[str, Any] = {"managedInstances": page}
        if token:
            out["nextPageToken"] = token
        return out

    def _regionInstanceGroupManagers_listErrors(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        """The group's errors, newest first (the API's documented order)."""
        if query.get("filter") or query.get("orderBy"):
            raise invalid("the stand-in does not implement list filters or orderBy")
        mig = self._mig(params, changing=False)
        page, token = self._page(list(reversed(mig.errors)), query)
        out: dict[str, Any] = {"items": page}
        if token:
            out["nextPageToken"] = token
        return out

    def _regionInstanceGroupManagers_setInstanceTemplate(
        self, params: dict[str, str], query: dict[str, Any], body: Any
    ) -> dict:
        mig = self._mig(params)
        template = self._find_template(mig.project, mig.region, body.get("instanceTemplate", ""), "instanceTemplate")

        def effect() -> None:
            mig.resource["instanceTemplate"] = template
            mig.resource["versions"] = [{"instanceTemplate": template}]
            if mig.resource.get("updatePolicy", {}).get("type", "PROACTIVE") != "OPPORTUNISTIC":
                for vm in mig.vms.values():  # the MIG replaces out-of-date instances by itself
                    if vm.template != template and vm.action != "DELETING":
                        vm.template, vm.action, vm.status = template, "RECREATING", "STOPPING"
                        vm.until = time.monotonic() + self.create_delay

        return self._operation(
            mig.project,
            mig.region,
            "compute.instanceGroupManagers.setInstanceTemplate",
            mig.resource["selfLink"],
            effect,
        )

    def _regionInstanceGroupManagers_resize(self, params: dict[str, str], query: dict[str, Any], body: Any) -> dict:
        mig = self._mig(params)
        size = query["size"]
        if size < 0:
            raise invalid(f"Invalid value for field 'size': '{size}'. Must be greater than or equal to 0")

        def effect() -> None:
            live = sorted((vm for vm in mig.vms.values() if vm.action != "DELETING"), key=lambda vm: vm.name)
            for _ in range(size - len(live)):
                self._new_vm(mig, self._random_name(mig))
            # down: instances of the MIG's choosing (creating ones first, then any) — never what scaleq wants
            victims = sorted(live, key=lambda vm: (vm.action == "NONE", self._rand.random()))
            for vm in victims[: max(0, len(live) - size)]:
                self._delete_vm(vm)

        return self._operation(
            mig.project, mig.region, "compute.instanceGroupManagers.resize", mig.resource["selfLink"], effect
        )


_FILTER_TERM = re.compile(r'\s*(?P<field>operationType|targetLink|status)\s*(?P<op>!?=)\s*"(?P<value>[^"]*)"\s*')


def operation_filter(text: str) -> list[tuple[str, str, str]]:
    """``field = "value"`` terms joined by ``AND``, as (field, op, value); anything else answers 400 (the real
    grammar is larger: a client relying on more is caught)."""
    if not text.strip():
        return []
    terms = []
    for part in re.split(r"\s+AND\s+", text.strip()):
        m = _FILTER_TERM.fullmatch(part)
        if m is None:
            raise invalid(f"Invalid list filter expression '{text}' (the stand-in reads field = \"value\" terms)")
        terms.append((m["field"], m["op"], m["value"]))
    return terms


def _check_properties(props: dict[str, Any]) -> None:
    """What the API checks in an instance template beyond the schema: labels, metadata limits, disks, network."""
    labels = props.get("labels") or {}
    if len(labels) > 64:
        raise invalid("Invalid value for field 'resource.properties.labels': at most 64 labels")
    for k, v in labels.items():
        if not LABEL_KEY.fullmatch(k) or not LABEL_VALUE.fullmatch(v):
            raise invalid(
                f"Invalid value for field 'resource.properties.labels': '{k}={v}'. Label keys must start with a "
                "lowercase letter; keys and values may contain only lowercase letters, digits, '_' and '-', "
                "up to 63 characters"
            )
    items = (props.get("metadata") or {}).get("items") or []
    keys = [i.get("key", "") for i in items]
    if len(set(keys)) != len(keys):
        raise invalid("Invalid value for field 'resource.properties.metadata': duplicate keys")
    for item in items:
        if len(item.get("value", "").encode()) > 256 * 1024:
            raise invalid(f"Invalid value for field 'resource.properties.metadata': value of {item['key']} > 256 KB")
    if sum(len(i.get("key", "").encode()) + len(i.get("value", "").encode()) for i in items) > 512 * 1024:
        raise invalid("Invalid value for field 'resource.properties.metadata': more than 512 KB in all")
    if "/" in props.get("machineType", ""):
        raise invalid(
            "Invalid value for field 'resource.properties.machineType': give a machine type name in a "
            "template, not a URL"
        )
    disks = props.get("disks") or []
    if sum(1 for d in disks if d.get("boot")) != 1:
        raise invalid("Invalid value for field 'resource.properties.disks': exactly one boot disk is needed")
    if not props.get("networkInterfaces"):
        raise invalid("Invalid value for field 'resource.properties.networkInterfaces': at least one is needed")


# -- HTTP --------------------------------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    standin: ComputeStandIn
    protocol_version = "HTTP/1.1"

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, answer = self.server.standin.handle(self.command, self.path, body)  # type: ignore[attr-defined]
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_DELETE = do_PATCH = do_PUT = _serve

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def serve(standin: ComputeStandIn | None = None, **kw: Any) -> Iterator[ComputeStandIn]:
    """Serve a stand-in on a free port of 127.0.0.1 in a thread; ``standin.url`` is its ``api_endpoint``."""
    standin = standin or ComputeStandIn(**kw)
    methods()  # load the discovery document before the first request
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    server.standin = standin  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    standin.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield standin
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
