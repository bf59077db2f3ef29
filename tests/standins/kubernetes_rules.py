"""What a real Kubernetes API server enforces beyond storing objects, for the stand-in in ``kubernetes_api.py``.

No real API server can be installed here by package name (docs/providers.md says what was looked for), so the
stand-in has to behave like one wherever a client could tell the difference. This module holds those rules, each as
the API conventions and the API reference document it, so that ``tests/unit/test_kmock.py`` can pin them:

- **optimistic concurrency** (API conventions, "Concurrency Control and Consistency"): every write gives the object a
  new ``metadata.resourceVersion``; an update (PUT) or patch whose body carries a ``resourceVersion`` other than the
  stored one is refused with 409 ``Conflict`` and the server's words ("the object has been modified; please apply
  your changes to the latest version and try again"). A body without one is applied unconditionally;
- **field selectors** ("Field Selectors" concept page): ``=``, ``==`` and ``!=`` joined by commas, on the fields the
  page lists for the kind (pods: ``metadata.name``, ``metadata.namespace``, ``spec.nodeName``, ``status.phase`` and
  the rest; secrets: ``type`` and the metadata ones); any other field, or an operator the page does not list, is
  400 ``BadRequest``;
- **watch** ("Efficient detection of changes"): a journal of ADDED / MODIFIED / DELETED events, each carrying the
  object at its new resourceVersion; a watch from resourceVersion N sees the events after N, a watch with none (or
  "0") first sees every matching object as ADDED; an object that stops (starts) matching the watch's selectors is
  DELETED (ADDED) for that watch. History is finite (etcd compacts it; here :meth:`Journal.compact` or the
  ``window``): a watch from a version older than the history answers HTTP 200 with one ``ERROR`` event whose object
  is a ``Status`` with code 410, reason ``Expired``, "too old resource version: N (M)" — the client must relist;
- **lists** ("Retrieving large results sets in chunks"): read at the latest version without moving it; ``limit``
  and ``continue`` page them, a token older than the history is 410 ``Expired``;
- **deletes and pod updates**: ``preconditions.resourceVersion`` (409 on a mismatch), ``propagationPolicy`` one of
  Foreground, Background, Orphan (422); a pod's spec changes only in the fields ``ValidatePodUpdate`` allows (422);
- **422 ``Invalid``** carries ``details.causes``: one ``{reason, message, field}`` per problem, the field path named
  (``metadata.name``, ``spec.containers[0].image``, …), as the API server's field errors do.

The journal learns of writes by comparing the stored objects with what it last saw (after every request and every
test helper), not from each write site: a write that forgot to bump ``resourceVersion`` gets a new one here, so
"every write bumps it" holds for code added to the stand-in later too.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import copy
import json
import re
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp.web
import kmock

#: The field selectors the API server accepts, per plural ("Field Selectors": every kind has the metadata ones).
SELECTABLE_FIELDS = {
    "pods": (
        "metadata.name",
        "metadata.namespace",
        "spec.nodeName",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.phase",
        "status.podIP",
        "status.nominatedNodeName",
    ),
    "secrets": ("metadata.name", "metadata.namespace", "type"),
}
#: How many events the journal keeps before the oldest are compacted away (etcd keeps ~5 minutes of history).
WINDOW = 1000
_FIELD_TERM = re.compile(r"^\s*(?P<key>[A-Za-z0-9.]+)\s*(?P<op>==|!=|=)\s*(?P<value>[^,=!]*?)\s*$")
_CAUSE = re.compile(r"^(?P<field>[^\s:]+): (?P<rest>.*)$")
_CAUSE_REASONS = {
    "Required value": "FieldValueRequired",
    "Unsupported value": "FieldValueNotSupported",
    "Duplicate value": "FieldValueDuplicate",
    "Invalid value": "FieldValueInvalid",
    "Too long": "FieldValueTooLong",
    "Forbidden": "FieldValueForbidden",
}
#: What an update may change in a pod's spec (the API server's ValidatePodUpdate).
_POD_MUTABLE = (
    "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations`"
)


def status_error(status: int, reason: str, message: str, **details: Any) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=details or {"causes": []})


# -- optimistic concurrency -------------------------------------------------------------------------------------------


def check_resource_version(plural: str, current: dict[str, Any], body: Any) -> None:
    """A write carrying a stale ``metadata.resourceVersion`` is a 409 Conflict, in the API server's words."""
    wanted = ((body.get("metadata") or {}) if isinstance(body, dict) else {}).get("resourceVersion")
    meta = current.get("metadata") or {}
    if wanted and str(wanted) != str(meta.get("resourceVersion")):
        name = meta.get("name", "")
        raise status_error(
            409,
            "Conflict",
            f'Operation cannot be fulfilled on {plural} "{name}": the object has been modified; please apply your '
            "changes to the latest version and try again",
            name=name,
            kind=plural,
        )


def replace(plural: str, current: dict[str, Any], body: Any) -> dict[str, Any]:
    """The object a PUT (update) makes: the client's body, with the fields the server owns kept from the stored one
    (uid, creationTimestamp, namespace; a pod's status, which only the status subresource writes)."""
    if not isinstance(body, dict):
        raise status_error(400, "BadRequest", "the request body is not a JSON object")
    check_resource_version(plural, current, body)
    name = (current.get("metadata") or {}).get("name")
    if (body.get("metadata") or {}).get("name") not in (None, name):
        raise status_error(400, "BadRequest", "the name of the object does not match the name on the URL")
    new = copy.deepcopy(body)
    meta = new.setdefault("metadata", {})
    for key in ("uid", "creationTimestamp", "namespace", "name", "deletionTimestamp", "deletionGracePeriodSeconds"):
        if key in current["metadata"]:
            meta[key] = current["metadata"][key]
    if "status" in current and plural == "pods":
        new["status"] = copy.deepcopy(current["status"])
    new.setdefault("apiVersion", current.get("apiVersion", "v1"))
    new.setdefault("kind", current.get("kind"))
    return new


def check_update(plural: str, old: dict[str, Any], new: dict[str, Any]) -> None:
    """A pod's spec is immutable but for a few fields: an update touching any other is 422, as the server's
    ``ValidatePodUpdate`` refuses it (labels, annotations and the mutable fields may change)."""
    if plural != "pods":
        return

    def fixed(spec: dict[str, Any]) -> dict[str, Any]:
        spec = copy.deepcopy(spec)
        for key in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds"):
            spec.pop(key, None)
        for key in ("containers", "initContainers"):
            for container in spec.get(key) or []:
                container.pop("image", None)
        return spec

    if fixed(old.get("spec") or {}) != fixed(new.get("spec") or {}):
        problem = f"spec: Forbidden: pod updates may not change fields other than {_POD_MUTABLE}"
        name = (old.get("metadata") or {}).get("name", "")
        raise status_error(
            422, "Invalid", f'Pod "{name}" is invalid: {problem}', kind="Pod", name=name, causes=causes([problem])
        )


def check_delete_preconditions(plural: str, current: dict[str, Any], options: dict[str, Any]) -> None:
    """``DeleteOptions.preconditions.resourceVersion``: deleting a version other than the stored one is 409."""
    wanted = (options.get("preconditions") or {}).get("resourceVersion")
    stored = (current.get("metadata") or {}).get("resourceVersion")
    if wanted and str(wanted) != str(stored):
        raise status_error(
            409,
            "Conflict",
            f"Precondition failed: ResourceVersion in precondition: {wanted}, ResourceVersion in object meta: {stored}",
            name=(current.get("metadata") or {}).get("name", ""),
            kind=plural,
        )


# -- paging -----------------------------------------------------------------------------------------------------------


def page(items: list[dict[str, Any]], params: dict[str, str], rv: int, oldest: int) -> tuple[list[Any], dict[str, Any]]:
    """``limit`` and ``continue`` as the API server pages a list ("Retrieving large results sets in chunks"): a
    limited list says ``metadata.continue`` and ``remainingItemCount`` while items remain; a token names where the
    next chunk starts and the version the list was read at, and one older than the kept history is 410 Expired.
    ``items`` come sorted by name; returns the chunk and the list's metadata."""
    token = params.get("continue")
    if token:
        try:
            state = json.loads(base64.urlsafe_b64decode(token.encode()))
            start, rv = str(state["start"]), int(state["rv"])
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise status_error(400, "BadRequest", "continue key is not valid: could not decode it") from None
        if rv < oldest:
            raise status_error(
                410,
                "Expired",
                "The provided continue parameter is too old to display a consistent list result. You can start a new "
                "list without the continue parameter.",
            )
        items = [i for i in items if i["metadata"]["name"] > start]
    meta: dict[str, Any] = {"resourceVersion": str(rv)}
    try:
        limit = int(params.get("limit") or 0)
    except ValueError:
        raise status_error(400, "BadRequest", f"limit: Invalid value: {params.get('limit')!r}") from None
    if 0 < limit < len(items):
        chunk = items[:limit]
        state = {"start": chunk[-1]["metadata"]["name"], "rv": rv}
        meta["continue"] = base64.urlsafe_b64encode(json.dumps(state).encode()).decode()
        meta["remainingItemCount"] = len(items) - limit
        return chunk, meta
    return items, meta


# -- field selectors --------------------------------------------------------------------------------------------------


def _field_value(obj: dict[str, Any], path: str) -> str:
    value: Any = obj
    for part in path.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if isinstance(value, bool):
        return "true" if value else "false"
    return "" if value is None else str(value)


def parse_field_selector(plural: str, text: str) -> Callable[[dict[str, Any]], bool]:
    """A field selector as the API server reads it for ``plural``; an unknown field or operator is a 400."""
    known = SELECTABLE_FIELDS.get(plural, ("metadata.name", "metadata.namespace"))
    tests: list[Callable[[dict[str, Any]], bool]] = []
    for part in (p for p in text.split(",") if p.strip()):
        m = _FIELD_TERM.match(part)
        if m is None:
            raise status_error(400, "BadRequest", f"invalid selector: '{text}'; can't understand '{part}'")
        key, value = m["key"], m["value"]
        if key not in known:
            raise status_error(400, "BadRequest", f'"{key}" is not a known field selector: only {", ".join(known)}')
        if m["op"] == "!=":
            tests.append(lambda obj, k=key, v=value: _field_value(obj, k) != v)
        else:
            tests.append(lambda obj, k=key, v=value: _field_value(obj, k) == v)
    return lambda obj: all(t(obj) for t in tests)


# -- 422 causes -------------------------------------------------------------------------------------------------------


def causes(problems: Iterable[str]) -> list[dict[str, str]]:
    """``details.causes`` of a 422 from the stand-in's problem lines ("spec.containers[0].image: Required value")."""
    found = []
    for problem in problems:
        m = _CAUSE.match(problem)
        field, rest = (m["field"], m["rest"]) if m else ("", problem)
        reason = next((r for prefix, r in _CAUSE_REASONS.items() if rest.startswith(prefix)), "FieldValueInvalid")
        found.append({"reason": reason, "message": rest, "field": field})
    return found


# -- the watch journal ------------------------------------------------------------------------------------------------


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    plural: str
    namespace: str
    obj: dict[str, Any]
    old: dict[str, Any] | None  # the object before a MODIFIED, for selector transitions


class Journal:
    """Every change to the stand-in's pods and secrets, in resourceVersion order, with finite history."""

    def __init__(self, window: int = WINDOW) -> None:
        self.window = window
        self.events: deque[Event] = deque()
        self.compacted = 0  # watches from a version below this are told 410
        self.latest = 0
        self._seen: dict[tuple[str, str, str], dict[str, Any]] = {}

    def sync(self, api: Any) -> None:
        """Record what changed since the last sync; a changed object that kept its resourceVersion gets a new one."""
        now: dict[tuple[str, str, str], Any] = {}
        for plural in SELECTABLE_FIELDS:
            for key, obj in api._live(plural):
                now[(plural, key[1], key[2])] = obj
        found: list[Event] = []
        for key, obj in now.items():
            raw, before = obj.raw, self._seen.get(key)
            if before is not None and raw == before:
                continue
            rv = str((raw.get("metadata") or {}).get("resourceVersion", ""))
            if before is not None and rv == str(before["metadata"].get("resourceVersion")):
                obj.patch({"metadata": {"resourceVersion": api._next_rv()}})  # a write always bumps it
                raw = obj.raw
            snapshot = copy.deepcopy(raw)
            self._seen[key] = snapshot
            found.append(
                Event(
                    int(snapshot["metadata"]["resourceVersion"]),
                    "ADDED" if before is None else "MODIFIED",
                    key[0],
                    key[1],
                    snapshot,
                    before,
                )
            )
        for key in [k for k in self._seen if k not in now]:
            last = self._seen.pop(key)
            gone = copy.deepcopy(last)
            gone["metadata"]["resourceVersion"] = api._next_rv()
            found.append(Event(int(gone["metadata"]["resourceVersion"]), "DELETED", key[0], key[1], gone, None))
        for event in sorted(found, key=lambda e: e.rv):
            self.events.append(event)
            self.latest = max(self.latest, event.rv)
        while len(self.events) > self.window:
            self.compacted = self.events.popleft().rv

    def compact(self) -> None:
        """Forget all history so far, as etcd's compaction does: older versions can no longer be watched from."""
        self.compacted = self.latest
        self.events.clear()

    def after(self, rv: int) -> list[Event]:
        if rv < self.compacted:
            raise TooOld(rv, self.compacted)
        return [e for e in self.events if e.rv > rv]


class TooOld(Exception):
    def __init__(self, asked: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {asked} ({oldest})")
        self.asked, self.oldest = asked, oldest

    def event(self) -> dict[str, Any]:
        return {
            "type": "ERROR",
            "object": {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": str(self),
                "reason": "Expired",
                "code": 410,
            },
        }


def for_watch(event: Event, match: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The event a watch with selector ``match`` sees, or None: an object that leaves the selection is DELETED for
    it, one that enters it is ADDED."""
    now = match(event.obj)
    if event.type == "MODIFIED" and event.old is not None:
        before = match(event.old)
        if before and not now:
            return {"type": "DELETED", "object": event.obj}
        if now and not before:
            return {"type": "ADDED", "object": event.obj}
    return {"type": event.type, "object": event.obj} if now else None


async def serve_watch(api: Any, request: Any, plural: str, match: Callable[[dict[str, Any]], bool]) -> Any:
    """Stream a watch as JSON lines until ``timeoutSeconds`` (default 30 min, as the server's own cap) or the client
    goes. ``api`` is the stand-in (its ``journal``, ``kubelet`` and ``_live``)."""
    params, ns = request.params, request.namespace
    asked = params.get("resourceVersion") or "0"
    try:
        cursor = int(asked)
    except ValueError:
        raise status_error(400, "BadRequest", f'resourceVersion: Invalid value: "{asked}"') from None
    timeout = float(params.get("timeoutSeconds") or 1800)
    response = aiohttp.web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
    await response.prepare(request._raw_request)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout

    async def send(event: dict[str, Any]) -> None:
        await response.write(json.dumps(event).encode() + b"\n")

    api.kubelet()
    api.journal.sync(api)
    try:
        if cursor == 0:  # "get state and start at most recent": every matching object as ADDED first
            for _key, obj in sorted(api._live(plural, ns), key=lambda kv: kv[0][2]):
                if match(obj.raw):
                    await send({"type": "ADDED", "object": copy.deepcopy(obj.raw)})
            cursor = api.journal.latest
        while True:
            try:
                events = api.journal.after(cursor)
            except TooOld as exc:
                await send(exc.event())
                break
            for event in events:
                cursor = event.rv
                if event.plural != plural or event.namespace != ns:
                    continue
                seen = for_watch(event, match)
                if seen is not None:
                    await send(seen)
            if loop.time() >= deadline or request._raw_request.transport is None or api.closing:
                break  # the timeout, the client went away, or the stand-in is stopping
            await asyncio.sleep(min(0.02, max(0.0, deadline - loop.time())))
            api.kubelet()
            api.journal.sync(api)
    except (ConnectionResetError, asyncio.CancelledError):
        return response
    await response.write_eof()
    return response
