"""A local stand-in of the Fly Machines API, built from Fly's published OpenAPI spec (the Feb-2024 version).

What comes from the spec (``machines-openapi.json``, found by :func:`spec_path` and checked by its sha256):

- **Routes and methods**: every path of the spec, under ``/v1`` (the spec's server URL), with the methods the spec
  gives it; a path not in the spec is 404, a method it does not list 405, and an operation the stand-in does not act
  out 501.
- **Requests**: JSON bodies are validated with ``jsonschema`` against the operation's request schema, with the
  ``$ref``\\ s resolved in the spec itself. The stand-in is *stricter than the spec*: every object schema that lists
  its properties refuses others (``additionalProperties: false`` is added), so a misspelt or invented field is a
  400, not silently ignored. Known query parameters are type-checked; unknown ones are ignored, as HTTP APIs do
  (the provider sends the newer API's ``metadata.<key>`` filters, which the 2024 spec does not have).
- **Responses** are validated against the operation's response schema (strictly, as above) before they are sent;
  a mismatch is recorded in :attr:`FlyMachines.problems` (the tests assert it stays empty) and answered with 500.

What the spec does not say, the stand-in takes from Fly's documented behaviour: ``Authorization: Bearer <token>``
(or a ``FlyV1 …`` token as it is) or 401; an unknown app is 404; a machine is ``created``, then ``started`` after
``start_delay`` seconds; ``signal`` and ``stop`` need a started machine (412 otherwise); a stop sends its signal
(default: the machine's ``stop_config``, else SIGINT) and kills after its timeout; an exit makes the machine
``stopped``, and ``destroyed`` if ``config.auto_destroy`` — unless ``config.restart`` restarts it (``always``, or
``on-failure``, the default, after a non-zero exit); ``DELETE`` refuses a started machine without ``force=true``
(412); destroyed machines are listed only with ``include_deleted``; the machine size must be one Fly offers
(fly-go's presets). The worker process inside a machine is simulated: it exits when the test says so
(:meth:`FlyMachines.exit`), on SIGKILL, at a stop's timeout, or ``term_exit_after`` seconds after a SIGTERM/SIGINT.

State changes are lazy (computed from the clock when a machine is looked at), so there are no timers; a lock
guards the state, which the server thread and the test share. Failures can be injected (:meth:`FlyMachines.fail`)
to exercise retries, and rate limiting (:meth:`FlyMachines.rate_limit`: 429 ``rate limit exceeded``).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jsonschema
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route

SPEC_SHA256 = "7673f2d9c46c894629bd9ffdb53c5b8ffb04337d3886b38c8e247a32d98da1e0"
_REPO = Path(__file__).resolve().parents[2]
SPEC_CANDIDATES = (
    _REPO / "tests" / "standins" / "schemas" / "fly" / "machines-openapi.json",
    _REPO / "schemas" / "fly" / "machines-openapi.json",
    _REPO.parent / "shared" / "schemas" / "fly" / "machines-openapi.json",
    Path("/work/shared/schemas/fly/machines-openapi.json"),
)
CPU_COUNTS = {"shared": (1, 2, 4, 6, 8), "performance": (1, 2, 4, 6, 8, 10, 12, 14, 16)}
MEMORY_PER_CPU_MB = {"shared": (256, 2048), "performance": (2048, 8192)}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def spec_path() -> Path:
    """The Feb-2024 Machines API spec: ``$SCALEQ_FLY_SPEC``, else the first of :data:`SPEC_CANDIDATES` present."""
    if env := os.environ.get("SCALEQ_FLY_SPEC"):
        return Path(env)
    for candidate in SPEC_CANDIDATES:
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        "the Fly Machines OpenAPI spec (superfly/docs partials/_machines-spec.json @ 5741d10c) is not at any of "
        + ", ".join(map(str, SPEC_CANDIDATES))
        + ": put it there or point SCALEQ_FLY_SPEC at it"
    )


def load_spec(path: Path | None = None) -> dict[str, Any]:
    raw = (path or spec_path()).read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != SPEC_SHA256:
        raise ValueError(f"{path or spec_path()} is not the Feb-2024 Machines API spec (sha256 {digest})")
    return json.loads(raw)


def _strict(node: Any) -> Any:
    """A copy of a schema where every object that lists its properties refuses others."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def go_duration(value: Any) -> float:
    """Seconds in a Go duration (``"10s"``, ``"1m30s"``) or a number of nanoseconds, as fly-go's Duration reads."""
    if isinstance(value, int | float):
        return value / 1e9
    text = str(value).strip()
    parts = _DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * _UNITS[u] for n, u in parts)


class ApiError(Exception):
    def __init__(self, status: int, error: str) -> None:
        super().__init__(error)
        self.status = status
        self.error = error


@dataclass
class Failure:
    status: int
    times: int
    method: str | None
    path: str | None
    after: bool  # do the request, then answer with the failure (an answer lost on the way back)
    retry_after: str | None


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int = 0


@dataclass
class Machine:
    id: str
    app: str
    name: str
    region: str
    config: dict[str, Any]
    created: float
    instance_id: str
    private_ip: str
    state: str = "created"
    start_due: float | None = None
    exit_due: float | None = None
    exit_code: int = 0
    kill_due: float | None = None
    stop_requested: bool = False
    restarts: int = 0
    updated: float = 0.0
    signals: list[str] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)  # newest first, as the API lists them


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class FlyMachines:
    """The stand-in's state and behaviour; :func:`serve_fly` runs it on a local port."""

    def __init__(
        self,
        *,
        token: str = "fly-test-token",
        apps: tuple[str, ...] = ("scaleq-test",),
        start_delay: float = 0.2,
        term_exit_after: float | None = None,
        spec: dict[str, Any] | None = None,
    ) -> None:
        self.spec = spec or load_spec()
        self.token = token
        self.apps = {name: f"app_{secrets.token_hex(4)}" for name in apps}
        self.start_delay = start_delay
        self.term_exit_after = term_exit_after
        self.machines: dict[str, Machine] = {}
        self.calls: list[Call] = []
        self.problems: list[str] = []
        self._failures: list[Failure] = []
        self._lock = threading.RLock()
        self._strict_doc = {"components": _strict(self.spec["components"])}
        self._validators: dict[str, jsonschema.Draft7Validator] = {}
        self.url = ""  # set by serve_fly

    # -- what a test does -------------------------------------------------------------------------------------------

    def fail(
        self,
        status: int,
        times: int = 1,
        *,
        method: str | None = None,
        path: str | None = None,
        after: bool = False,
        retry_after: str | None = None,
    ) -> None:
        """Answer the next ``times`` matching requests with ``status`` (``after``: having done them first)."""
        with self._lock:
            self._failures.append(Failure(status, times, method, path, after, retry_after))

    def rate_limit(self, times: int, *, method: str | None = None, retry_after: str = "0") -> None:
        """Answer the next ``times`` requests (of ``method``) 429 ``rate limit exceeded``, as Fly's API does."""
        self.fail(429, times, method=method, retry_after=retry_after)

    def heal(self) -> None:
        """Forget the failures still to inject."""
        with self._lock:
            self._failures.clear()

    def exit(self, machine_id: str, code: int = 0) -> None:
        """The worker process in the machine exits (as a drained worker does)."""
        with self._lock:
            m = self.machines[machine_id]
            self._advance(m, time.time())
            if m.state not in ("started", "stopping"):
                raise AssertionError(f"machine {machine_id} is {m.state}: nothing runs that could exit")
            self._exited(m, code, time.time())

    def live(self, app: str | None = None) -> list[Machine]:
        """Machines that are not destroyed (after applying the clock)."""
        with self._lock:
            now = time.time()
            for m in self.machines.values():
                self._advance(m, now)
            return [m for m in self.machines.values() if m.state != "destroyed" and app in (None, m.app)]

    def by_name(self, name: str) -> Machine:
        with self._lock:
            (m,) = [m for m in self.machines.values() if m.name == name and m.state != "destroyed"]
            self._advance(m, time.time())
            return m

    def calls_to(self, method: str, suffix: str = "") -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and c.path.endswith(suffix)]

    # -- the machine lifecycle --------------------------------------------------------------------------------------

    def _event(self, m: Machine, kind: str, status: str, at: float, request: dict[str, Any] | None = None) -> None:
        event: dict[str, Any] = {
            "id": secrets.token_hex(13).upper(),
            "type": kind,
            "status": status,
            "source": "flyd" if kind in ("start", "exit") else "user",
            "timestamp": int(at * 1000),
        }
        if request is not None:
            event["request"] = request
        m.events.insert(0, event)
        m.updated = at

    def _start(self, m: Machine, at: float) -> None:
        m.state, m.start_due, m.exit_due, m.kill_due, m.stop_requested = "started", None, None, None, False
        m.signals.clear()
        self._event(m, "start", "started", at)

    def _advance(self, m: Machine, now: float) -> None:
        """Apply what the clock says has happened to ``m`` since it was last looked at."""
        if m.state == "created" and m.start_due is not None and now >= m.start_due:
            self._start(m, m.start_due)
        if m.state in ("started", "stopping"):
            due = [(t, code) for t, code in ((m.exit_due, m.exit_code), (m.kill_due, 137)) if t is not None]
            if due:
                at, code = min(due)
                if now >= at:
                    self._exited(m, code, at)

    def _exited(self, m: Machine, code: int, at: float) -> None:
        exit_event = {"exit_code": code, "requested_stop": m.stop_requested, "exited_at": _iso(at)}
        if code:
            exit_event["signal"] = 9 if code == 137 else 0
        m.exit_due = m.kill_due = None
        restart = m.config.get("restart") or {}
        policy = restart.get("policy") or "on-failure"
        retries = restart.get("max_retries", 10)
        if not m.stop_requested and (policy == "always" or (policy == "on-failure" and code and m.restarts < retries)):
            self._event(m, "exit", "stopped", at, {"exit_event": {**exit_event, "restarting": True}})
            m.restarts += 1
            self._start(m, at)
            return
        m.state = "stopped"
        self._event(m, "exit", "stopped", at, {"exit_event": exit_event})
        if m.config.get("auto_destroy"):
            m.state = "destroyed"
            self._event(m, "destroy", "destroyed", at)

    def _deliver(self, m: Machine, signal: str, now: float) -> None:
        m.signals.append(signal)
        if signal == "SIGKILL":
            self._exited(m, 137, now)
        elif signal in ("SIGTERM", "SIGINT") and self.term_exit_after is not None:
            due = now + self.term_exit_after
            m.exit_due, m.exit_code = min(due, m.exit_due or due), 0

    # -- the HTTP side ----------------------------------------------------------------------------------------------

    def app(self) -> Starlette:
        routes = []
        for path, item in self.spec["paths"].items():
            operations = {method.upper(): op for method, op in item.items() if method != "parameters"}
            routes.append(Route(path, self._endpoint(operations), methods=list(operations)))
        return Starlette(routes=[Mount("/v1", routes=routes)])

    def _endpoint(self, operations: dict[str, dict[str, Any]]) -> Any:
        async def endpoint(request: Request) -> Response:
            return await self._handle(request, operations[request.method])

        return endpoint

    def _check(self, schema: dict[str, Any], value: Any) -> str | None:
        """The first error of ``value`` against ``schema`` (a spec fragment with ``$ref``\\ s), or None."""
        key = json.dumps(schema, sort_keys=True)
        if key not in self._validators:
            self._validators[key] = jsonschema.Draft7Validator({**_strict(schema), **self._strict_doc})
        error = jsonschema.exceptions.best_match(self._validators[key].iter_errors(value))
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(body)"
        return f"{where}: {error.message}"

    async def _handle(self, request: Request, op: dict[str, Any]) -> Response:
        call = Call(request.method, request.url.path, dict(request.query_params), None)
        with self._lock:
            self.calls.append(call)
        status, body, headers = await self._answer(request, op, call)
        call.status = status
        if body is not None:
            schema = (
                (((op.get("responses") or {}).get(str(status)) or {}).get("content") or {})
                .get("application/json", {})
                .get("schema")
            )
            if status >= 400 and schema is None:
                schema = {"$ref": "#/components/schemas/ErrorResponse"}
            if schema is not None and (problem := self._check(schema, body)):
                with self._lock:
                    self.problems.append(f"{op['operationId']} answer {status} does not match the spec: {problem}")
                return JSONResponse({"error": f"stand-in answer off spec: {problem}"}, status_code=500)
        if body is None:
            return Response(status_code=status, headers=headers)
        return JSONResponse(body, status_code=status, headers=headers)

    async def _answer(self, request: Request, op: dict[str, Any], call: Call) -> tuple[int, Any, dict[str, str]]:
        auth = request.headers.get("authorization", "")
        if auth not in (f"Bearer {self.token}", self.token if self.token.startswith("FlyV1 ") else None):
            return 401, {"error": "You must be authenticated to view this."}, {}
        failure = self._take_failure(request.method, request.url.path)
        headers = {"retry-after": failure.retry_after} if failure and failure.retry_after else {}
        if failure is not None and not failure.after:
            error = "rate limit exceeded" if failure.status == 429 else f"injected failure {failure.status}"
            return failure.status, {"error": error}, headers
        try:
            body = await self._body(request, op)
            call.body = body
            query = self._query(request, op)
            handler = getattr(self, f"_op_{op['operationId']}", None)
            if handler is None:
                raise ApiError(501, f"{op['operationId']} is not acted out by the stand-in")
            params = dict(request.path_params)
            if "app_name" in params and params["app_name"] not in self.apps:
                raise ApiError(404, "app not found")
            with self._lock:
                status, out = handler(params, query, body)
        except ApiError as exc:
            return exc.status, {"error": exc.error}, {}
        if failure is not None:  # done, but the answer is "lost"
            return failure.status, {"error": f"injected failure {failure.status} (after the fact)"}, headers
        return status, out, {}

    def _take_failure(self, method: str, path: str) -> Failure | None:
        with self._lock:
            for f in self._failures:
                if (f.method in (None, method)) and (f.path is None or f.path in path):
                    f.times -= 1
                    if f.times <= 0:
                        self._failures.remove(f)
                    return f
        return None

    async def _body(self, request: Request, op: dict[str, Any]) -> Any:
        spec = op.get("requestBody")
        raw = await request.body()
        if spec is None:
            return None
        if not raw.strip():
            if spec.get("required"):
                raise ApiError(400, "a request body is required")
            return None
        try:
            body = json.loads(raw)
        except ValueError as exc:
            raise ApiError(400, f"the body is not JSON: {exc}") from None
        schema = spec["content"]["application/json"]["schema"]
        if problem := self._check(schema, body):
            raise ApiError(400, f"invalid request: {problem}")
        return body

    def _query(self, request: Request, op: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in op.get("parameters", []):
            if p["in"] != "query" or p["name"] not in request.query_params:
                continue
            raw, kind = request.query_params[p["name"]], p.get("schema", {}).get("type")
            if kind == "boolean":
                if raw not in ("true", "false"):
                    raise ApiError(400, f"{p['name']} must be true or false, not {raw!r}")
                out[p["name"]] = raw == "true"
            elif kind == "integer":
                if not re.fullmatch(r"-?\d+", raw):
                    raise ApiError(400, f"{p['name']} must be an integer, not {raw!r}")
                out[p["name"]] = int(raw)
            else:
                out[p["name"]] = raw
        return out

    # -- the operations (named by operationId) ----------------------------------------------------------------------

    def _machine(self, params: dict[str, str]) -> Machine:
        m = self.machines.get(params["machine_id"])
        if m is None or m.app != params["app_name"]:
            raise ApiError(404, "machine not found")
        self._advance(m, time.time())
        return m

    def _json(self, m: Machine) -> dict[str, Any]:
        image = m.config.get("image", "")
        repository, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "latest")
        return {
            "id": m.id,
            "name": m.name,
            "state": m.state,
            "region": m.region,
            "instance_id": m.instance_id,
            "private_ip": m.private_ip,
            "config": m.config,
            "image_ref": {"registry": "registry-1.docker.io", "repository": repository, "tag": tag, "labels": {}},
            "created_at": _iso(m.created),
            "updated_at": _iso(m.updated or m.created),
            "events": m.events,
            "checks": [],
        }

    def _op_Apps_show(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        name = params["app_name"]
        return 200, {
            "id": self.apps[name],
            "name": name,
            "status": "deployed" if self.live(name) else "pending",
            "organization": {"name": "scaleq tests", "slug": "personal"},
        }

    def _op_Machines_list(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        now, out = time.time(), []
        for m in self.machines.values():
            if m.app != params["app_name"]:
                continue
            self._advance(m, now)
            if m.state == "destroyed" and not query.get("include_deleted"):
                continue
            if "region" in query and m.region != query["region"]:
                continue
            out.append(self._json(m))
        return 200, out

    def _op_Machines_create(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        config = copy.deepcopy(body.get("config") or {})
        if not config.get("image"):
            raise ApiError(400, "invalid config: image is required")
        guest = config.get("guest") or {}
        kind, cpus, memory = guest.get("cpu_kind", "shared"), guest.get("cpus", 1), guest.get("memory_mb", 256)
        if kind not in CPU_COUNTS or cpus not in CPU_COUNTS[kind]:
            raise ApiError(400, f"invalid guest: no {kind} machine with {cpus} CPUs")
        low, high = MEMORY_PER_CPU_MB[kind]
        if memory % 256 or not low * cpus <= memory <= high * cpus:
            raise ApiError(400, f"invalid guest: {memory} MB is not a valid memory size for {kind} x {cpus}")
        for key in ("stop_config",):
            if timeout := (config.get(key) or {}).get("timeout"):
                try:
                    go_duration(timeout)
                except ValueError as exc:
                    raise ApiError(400, f"invalid {key}.timeout: {exc}") from None
        now = time.time()
        m = Machine(
            id=secrets.token_hex(7),
            app=params["app_name"],
            name=body.get("name") or f"machine-{secrets.token_hex(4)}",
            region=body.get("region") or "iad",
            config=config,
            created=now,
            instance_id=secrets.token_hex(13).upper(),
            private_ip=f"fdaa:0:1:a7b:1::{len(self.machines) + 2:x}",
        )
        self._event(m, "launch", "created", now)
        if not body.get("skip_launch"):
            m.start_due = now + self.start_delay
        self.machines[m.id] = m
        self._advance(m, now)
        return 200, self._json(m)

    def _op_Machines_show(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        return 200, self._json(self._machine(params))

    def _op_Machines_start(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        m = self._machine(params)
        if m.state in ("stopped", "created"):
            m.restarts = 0
            self._start(m, time.time())
        elif m.state == "destroyed":
            raise ApiError(412, "failed_precondition: machine is destroyed")
        return 200, None

    def _op_Machines_signal(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        m = self._machine(params)
        if m.state not in ("started", "stopping"):
            raise ApiError(412, f"failed_precondition: machine is {m.state}, not started")
        self._deliver(m, body["signal"], time.time())
        return 200, None

    def _op_Machines_stop(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        m, now = self._machine(params), time.time()
        if m.state in ("stopped", "destroyed"):
            return 200, None
        if m.state == "created":
            m.stop_requested = True
            m.start_due = None
            self._exited(m, 0, now)
            return 200, None
        stop_config = m.config.get("stop_config") or {}
        signal = (body or {}).get("signal") or stop_config.get("signal") or "SIGINT"
        try:
            timeout = go_duration((body or {}).get("timeout") or stop_config.get("timeout") or "5s")
        except ValueError as exc:
            raise ApiError(400, f"invalid timeout: {exc}") from None
        m.stop_requested = True
        m.state = "stopping"
        m.kill_due = min(now + timeout, m.kill_due or now + timeout)
        self._deliver(m, signal, now)
        return 200, None

    def _op_Machines_delete(self, params: dict[str, str], query: dict[str, Any], body: Any) -> tuple[int, Any]:
        m, now = self._machine(params), time.time()
        if m.state == "destroyed":
            raise ApiError(404, "machine not found")
        if m.state in ("started", "stopping"):
            if not query.get("force"):
                raise ApiError(412, f"failed_precondition: unable to destroy machine, it is {m.state} (use force)")
            m.stop_requested = True
            m.signals.append("SIGKILL")
            self._exited(m, 137, now)
        m.state = "destroyed"
        if not m.events or m.events[0]["type"] != "destroy":
            self._event(m, "destroy", "destroyed", now)
        return 200, None


@contextlib.contextmanager
def serve_fly(**kw: Any) -> Iterator[FlyMachines]:
    """Run a :class:`FlyMachines` on a free local port in a thread; ``.url`` is the base (without ``/v1``)."""
    fly = FlyMachines(**kw)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(fly.app(), log_level="warning", lifespan="off"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="fly-standin")
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the Fly stand-in did not start")
        time.sleep(0.01)
    fly.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield fly
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
