"""The fly provider: workers are Fly Machines, made and ended through the Machines REST API (httpx).

Design:

- **One machine per worker** in the group's Fly app (``[groups.fly] app``), created with
  ``POST /v1/apps/{app}/machines`` (base ``[groups.fly] api_url``, default ``https://api.machines.dev``). The machine's
  ``name`` is the worker id; its ``config`` runs ``group.image`` with ``init.cmd`` = ``scaleq worker --server …
  --worker-id …`` (``cmd`` overrides the image's CMD and keeps its ENTRYPOINT, as the docker provider does), the size
  from ``[groups.fly]`` as ``guest`` (``cpu_kind``, ``cpus``, ``memory_mb``), ``restart: {policy: "no"}`` and
  ``auto_destroy: true``: a worker that drained exits, and Fly destroys its machine — nothing is left to pay for.
  ``stop_config`` asks Fly itself to stop with SIGTERM and a long timeout, should Fly stop a machine (host
  maintenance, ``fly machine stop``): that is a preemption notice, and the worker (``--on-notice handback``, as
  every Fly worker runs) hands its jobs back at once, unspent.
- **The worker token** goes in ``config.env`` as ``SCALEQ_TOKEN``, next to ``group.env``. Fly *secrets* are app-level
  and set with flyctl (``fly secrets set``) or the GraphQL API; the Feb-2024 Machines API (the spec this provider is
  written and tested against) has no secrets endpoint, so ``env`` is what it offers. Anyone whose Fly token can read
  the app's machines can read the worker token in their config.
- **Metadata is the state**: ``scaleq_managed=true``, ``scaleq_grid``, ``scaleq_group``, ``scaleq_worker_id`` and
  ``scaleq_version`` (``Group.version()``) in ``config.metadata``. ``workers`` asks for the app's machines (with
  ``metadata.<key>=<value>`` filters, which the current API honours and the 2024 one ignores) and keeps only those
  whose metadata match, so a restarted controller, another provider instance, ``destroy`` and ``doctor`` see what
  Fly runs. States: ``created``/``starting`` → starting, ``started`` → running, ``stopping``/``destroying`` →
  stopping; ``stopped`` (and ``failed``, ``suspended``) machines are housekeeping: ``workers`` destroys them, logging
  the exit code of those that failed; ``destroyed`` ones are gone.
- **Stopping**: ``stop`` sends ``SIGINT`` (``POST …/signal``), which a worker always reads as "drain" (SIGTERM being
  Fly's notice, above): the worker drains, exits 0 and its machine is destroyed; ``stop`` returns at once. A machine
  not started yet has nothing to drain and is destroyed at once. ``force`` sends SIGTERM (the worker hands its jobs
  back to the queue) and ``POST …/stop`` with a short timeout, after which Fly kills it. ``destroy`` drains every
  machine of the group, after ``grace`` seconds forces what is left, then deletes every machine of the group with
  ``?force=true``.
- **Credentials** from the usual places: ``FLY_API_TOKEN``, then ``FLY_ACCESS_TOKEN``, then flyctl's
  ``~/.fly/config.yml`` (``access_token``), sent as ``Authorization: Bearer <token>`` (a ``FlyV1 …`` macaroon token is
  sent as it is, as flyctl does). A missing or refused token, or a missing app, is a :class:`ProviderError` (from
  ``workers``/``start``, so from ``plan``/``apply``) and an unhealthy :class:`Health` (``doctor``) that says what to do.
- **Retries**: 429 and 5xx answers and transport errors are retried with bounded exponential backoff (honouring a
  ``Retry-After`` of a few seconds). A create that may have happened (a 5xx, a lost answer) is looked up by name
  before it is sent again, so a retry never makes a second machine for one worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Collection
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlparse

import httpx

from scaleq.grid import FlySettings, Group
from scaleq.providers.base import (
    DESTROY_GRACE,
    CapacityRefused,
    Health,
    ProviderBase,
    ProviderError,
    ProviderWorker,
    Status,
    new_worker_id,
    start_each,
    worker_args,
)

log = logging.getLogger(__name__)

DEFAULT_API_URL = "https://api.machines.dev"
MANAGED = "scaleq_managed"
#: Where the Fly API token is looked for first, in this order (then flyctl's ~/.fly/config.yml).
TOKEN_VARIABLES = ("FLY_API_TOKEN", "FLY_ACCESS_TOKEN")
#: Transient answers: retried with backoff.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
#: How long ``destroy`` waits after forcing (jobs handed back) before it deletes with force.
HANDBACK_GRACE = 5.0
#: ``stop(force=True)``: Fly kills the worker if it has not exited this long after the signal.
FORCE_TIMEOUT = 10
#: Machine sizes Fly offers (fly-go ``MachinePresets`` and memory bounds per CPU).
CPU_COUNTS = {"shared": (1, 2, 4, 6, 8), "performance": (1, 2, 4, 6, 8, 10, 12, 14, 16)}
MEMORY_PER_CPU_MB = {"shared": (256, 2048), "performance": (2048, 8192)}
_STARTING = {"created", "starting"}
_STOPPING = {"stopping", "destroying"}
_ENDED = {"stopped", "failed", "suspended", "suspending", "launch_failed"}
_ACCESS_TOKEN = re.compile(r"^access_token:\s*['\"]?([^'\"\s#]+)", re.MULTILINE)


def find_token(environ: dict[str, str] | None = None, home: Path | None = None) -> tuple[str | None, str]:
    """The Fly API token and where it came from: the environment, then flyctl's config file."""
    env = os.environ if environ is None else environ
    for name in TOKEN_VARIABLES:
        if env.get(name, "").strip():
            return env[name].strip(), name
    config = (home or Path.home()) / ".fly" / "config.yml"
    try:
        m = _ACCESS_TOKEN.search(config.read_text())
    except OSError:
        m = None
    if m:
        return m.group(1), str(config)
    return None, ""


def check_size(fly: FlySettings) -> str | None:
    """Why Fly would refuse the group's machine size, or None (bounds as in fly-go's presets)."""
    counts, (low, high) = CPU_COUNTS[fly.cpu_kind], MEMORY_PER_CPU_MB[fly.cpu_kind]
    if fly.cpus not in counts:
        return f"{fly.cpu_kind} machines have {', '.join(map(str, counts))} CPUs, not {fly.cpus}"
    if fly.memory_mb % 256:
        return f"memory_mb must be a multiple of 256, not {fly.memory_mb}"
    if not low * fly.cpus <= fly.memory_mb <= high * fly.cpus:
        return (
            f"a {fly.cpu_kind} machine with {fly.cpus} CPU(s) has {low * fly.cpus} to {high * fly.cpus} MB of memory, "
            f"not {fly.memory_mb}"
        )
    return None


class FlyProvider(ProviderBase):
    name = "fly"
    poll_every = 0.5

    def __init__(
        self,
        *,
        grid: str,
        server: str,
        token: str,
        settings: FlySettings | None = None,
        api_token: str | None = None,
        retries: int = 4,
        backoff: float = 0.25,
        api_timeout: float = 30.0,
        server_grace: float = 300.0,
        stop_timeout: float = 300.0,
    ) -> None:
        """``settings``: the group's ``[groups.fly]``, for ``health`` (which has no group); ``api_token``: instead of
        FLY_API_TOKEN & co.; ``stop_timeout``: how long Fly lets a worker drain when Fly itself stops it."""
        self.grid = grid
        self.server = server
        self.token = token
        self.settings = settings
        self.api_token, self.token_source = (api_token, "the api_token argument") if api_token else find_token()
        self.retries = retries
        self.backoff = backoff
        self.api_timeout = api_timeout
        self.server_grace = server_grace
        self.stop_timeout = stop_timeout
        self._client: httpx.AsyncClient | None = None
        self._client_loop: asyncio.AbstractEventLoop | None = None
        self._ids: dict[str, str] = {}  # worker id → machine id
        self._stopping: set[str] = set()

    # -- the API ----------------------------------------------------------------------------------------------------

    def _http(self) -> httpx.AsyncClient:
        """One client per event loop (a client's connections belong to the loop that made them)."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._client_loop is not loop:
            self._client = httpx.AsyncClient(timeout=self.api_timeout, headers={"User-Agent": "scaleq"})
            self._client_loop = loop
        return self._client

    async def close(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            if self._client_loop is asyncio.get_running_loop():
                await client.aclose()

    def _authorization(self, fly: FlySettings | None) -> str:
        if not self.api_token:
            app = fly.app if fly else "<app>"
            raise ProviderError(
                f"FLY_API_TOKEN is not set: create a token with `fly tokens create deploy -a {app}` (or take yours "
                "with `fly auth token`) and export it as FLY_API_TOKEN where the controller ('scaleq up' / 'scaleq "
                "autoscale'), plan/apply/destroy and doctor run"
            )
        return self.api_token if self.api_token.startswith("FlyV1 ") else f"Bearer {self.api_token}"

    def _delay(self, attempt: int, response: httpx.Response | None = None) -> float:
        delay = min(self.backoff * 2**attempt, 8.0)
        if response is not None:
            try:
                delay = max(delay, min(float(response.headers.get("retry-after", "")), 10.0))
            except ValueError:
                pass
        return delay

    async def _send(
        self,
        fly: FlySettings,
        method: str,
        path: str,
        *,
        what: str,
        json: Any = None,
        params: dict[str, Any] | None = None,
        idempotent: bool = True,
    ) -> httpx.Response:
        """One API call, retried on 429/5xx/transport errors (only where a repeat cannot do the thing twice)."""
        url = f"{fly.api_url.rstrip('/')}/v1{path}"
        headers = {"Authorization": self._authorization(fly)}
        client = self._http()
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = await client.request(method, url, json=json, params=params, headers=headers)
            except httpx.TransportError as exc:
                # a request that never connected was never sent; anything else may have been done
                if last or not (idempotent or isinstance(exc, httpx.ConnectError)):
                    raise ProviderError(
                        f"cannot reach the Fly Machines API at {fly.api_url} to {what}: {type(exc).__name__}: {exc}"
                    ) from exc
                log.info("fly: %s: %s; retrying", what, exc)
                await asyncio.sleep(self._delay(attempt))
                continue
            retry = r.status_code == 429 or (idempotent and r.status_code in RETRY_STATUSES)
            if not retry or last:
                return r
            log.info("fly: %s: the API answered %d; retrying", what, r.status_code)
            await asyncio.sleep(self._delay(attempt, r))
        raise AssertionError("unreachable")

    def _refusal(self, r: httpx.Response, fly: FlySettings, what: str) -> ProviderError:
        error = _error_text(r)
        if r.status_code in (401, 403):
            return ProviderError(
                f"FLY_API_TOKEN is missing or wrong: the Fly Machines API at {fly.api_url} refused the token from "
                f"{self.token_source or 'nowhere'} ({r.status_code}: {error}) when asked to {what}. Create one with "
                f"`fly tokens create deploy -a {fly.app}` and export it as FLY_API_TOKEN"
            )
        if r.status_code == 404 and "machine" not in error.lower():
            return ProviderError(
                f"Fly app {fly.app} does not exist (or this token cannot see it): create it with "
                f"`fly apps create {fly.app}`, or set groups.fly.app to an existing app ({r.status_code}: {error})"
            )
        if r.status_code == 429:  # still, after the retries
            return CapacityRefused(
                f"the Fly Machines API at {fly.api_url} is rate-limiting: cannot {what}: {r.status_code} {error}",
                "rate_limited",
            )
        return ProviderError(f"the Fly Machines API at {fly.api_url} refused to {what}: {r.status_code} {error}")

    async def _call(self, fly: FlySettings, method: str, path: str, *, what: str, **kw: Any) -> Any:
        r = await self._send(fly, method, path, what=what, **kw)
        if r.status_code >= 300:
            raise self._refusal(r, fly, what)
        return r.json() if r.content else None

    # -- what a worker machine is -----------------------------------------------------------------------------------

    def _settings(self, group: Group) -> FlySettings:
        if group.fly is None:
            raise ProviderError(f"group {group.name}: a fly group needs a [groups.fly] table with at least app")
        return group.fly

    def _metadata(self, group: Group) -> dict[str, str]:
        return {MANAGED: "true", "scaleq_grid": self.grid, "scaleq_group": group.name}

    def _ours(self, machine: dict[str, Any], group: Group) -> bool:
        metadata = (machine.get("config") or {}).get("metadata") or {}
        return all(metadata.get(k) == v for k, v in self._metadata(group).items())

    def worker_argv(self, group: Group, worker_id: str) -> list[str]:
        return ["scaleq", *worker_args(group, self.server, worker_id, self.server_grace)]

    def machine_config(self, group: Group, worker_id: str) -> dict[str, Any]:
        fly = self._settings(group)
        return {
            "image": group.image,
            "init": {"cmd": self.worker_argv(group, worker_id)},
            "env": {"PYTHONUNBUFFERED": "1", **group.env, "SCALEQ_TOKEN": self.token},
            "guest": {"cpu_kind": fly.cpu_kind, "cpus": fly.cpus, "memory_mb": fly.memory_mb},
            "metadata": {**self._metadata(group), "scaleq_worker_id": worker_id, "scaleq_version": group.version()},
            "restart": {"policy": "no"},
            "auto_destroy": True,
            "stop_config": {"signal": "SIGTERM", "timeout": f"{self.stop_timeout:.0f}s"},
        }

    def _check_group(self, group: Group, fly: FlySettings) -> None:
        """Refuse, before asking Fly, what Fly would refuse or what could never work."""
        if not group.image:
            raise ProviderError(f"group {group.name}: a fly group needs image (the worker image its machines run)")
        if problem := check_size(fly):
            raise ProviderError(f"group {group.name}: Fly has no such machine size: {problem} (see [groups.fly])")
        if group.resources.gpus:
            raise ProviderError(f"group {group.name}: GPU machines on Fly are not supported by scaleq yet")
        host = urlparse(self.server).hostname or ""
        if fly.api_url.rstrip("/") == DEFAULT_API_URL and (host in ("localhost", "::1") or host.startswith("127.")):
            raise ProviderError(
                f"the server is at {self.server}, on this host's loopback, which Fly Machines cannot reach: set "
                "[server] public_url in the grid file to an address they can reach"
            )

    def _view(self, m: dict[str, Any], group: Group) -> ProviderWorker:
        """The worker a machine (not ended) is."""
        state = m.get("state", "")
        config = m.get("config") or {}
        metadata = config.get("metadata") or {}
        worker_id = _worker_id(m)
        status: Status
        if state in _STARTING:
            status = "starting"
        elif state in _STOPPING or worker_id in self._stopping:
            status = "stopping"
        else:  # started, replacing, updating, …: the worker process runs
            status = "running"
        return ProviderWorker(
            worker_id,
            group.name,
            _timestamp(m.get("created_at")),
            status,
            f"machine {m.get('id')} in {m.get('region', '?')} ({config.get('image', '?')}): {state}",
            metadata.get("scaleq_version", ""),
        )

    async def _machines(self, fly: FlySettings, group: Group) -> list[dict[str, Any]]:
        """The group's machines (any state but destroyed), from the API, by metadata."""
        params = {f"metadata.{k}": v for k, v in self._metadata(group).items()}
        found = await self._call(
            fly, "GET", f"/apps/{_q(fly.app)}/machines", what=f"list the machines of app {fly.app}", params=params
        )
        return [m for m in found or [] if self._ours(m, group) and m.get("state") != "destroyed"]

    # -- the provider interface -------------------------------------------------------------------------------------

    async def workers(self, group: Group) -> list[ProviderWorker]:
        fly = self._settings(group)
        found, live = [], set()
        for m in await self._machines(fly, group):
            worker_id = _worker_id(m)
            self._ids[worker_id] = m["id"]
            if m.get("state") in _ENDED:
                await self._housekeep(fly, m, worker_id)
                continue
            found.append(self._view(m, group))
            live.add(worker_id)
        for gone in [w for w in self._ids if w not in live]:
            self._ids.pop(gone, None)
            self._stopping.discard(gone)
        return sorted(found, key=lambda w: (w.started_at, w.id))

    async def _housekeep(self, fly: FlySettings, m: dict[str, Any], worker_id: str) -> None:
        """Destroy a machine whose worker ended (it was not auto-destroyed), saying why if it failed."""
        code = _exit_code(m)
        if code != 0:
            log.warning(
                "worker %s on machine %s ended (%s, exit code %s): see `fly logs -a %s -i %s`",
                worker_id,
                m["id"],
                m.get("state"),
                "unknown" if code is None else code,
                fly.app,
                m["id"],
            )
        r = await self._send(fly, "DELETE", f"/apps/{_q(fly.app)}/machines/{_q(m['id'])}", what="destroy a machine")
        if r.status_code >= 300 and r.status_code != 404:
            log.warning("fly: could not destroy ended machine %s: %s %s", m["id"], r.status_code, _error_text(r))

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        fly = self._settings(group)
        self._check_group(group, fly)
        ids = [new_worker_id(self.grid, group.name) for _ in range(count)]
        return await start_each(group, ids, lambda i: self._create(fly, group, i))

    async def _create(self, fly: FlySettings, group: Group, worker_id: str) -> str:
        body = {"name": worker_id, "region": fly.region, "config": self.machine_config(group, worker_id)}
        what = f"create machine {worker_id} in app {fly.app}"
        path = f"/apps/{_q(fly.app)}/machines"
        for attempt in range(self.retries + 1):
            last = attempt == self.retries
            try:
                r = await self._send(fly, "POST", path, what=what, json=body, idempotent=False)
            except ProviderError:
                if last:
                    raise
                r = None
            if r is not None and r.status_code < 300:
                self._ids[worker_id] = r.json()["id"]
                return worker_id
            if r is not None and (r.status_code not in RETRY_STATUSES or last):
                raise self._refusal(r, fly, what)
            # the create may have happened: look before asking again
            for m in await self._machines(fly, group):
                if m.get("name") == worker_id:
                    self._ids[worker_id] = m["id"]
                    return worker_id
            await asyncio.sleep(self._delay(attempt, r))
        raise AssertionError("unreachable")

    async def _find(self, fly: FlySettings, group: Group, worker_id: str) -> dict[str, Any] | None:
        machine_id = self._ids.get(worker_id)
        if machine_id is not None:
            r = await self._send(fly, "GET", f"/apps/{_q(fly.app)}/machines/{_q(machine_id)}", what="get a machine")
            if r.status_code == 404:
                self._ids.pop(worker_id, None)
                return None
            if r.status_code >= 300:
                raise self._refusal(r, fly, f"get machine {machine_id}")
            m = r.json()
            return m if self._ours(m, group) and m.get("state") != "destroyed" else None
        for m in await self._machines(fly, group):
            if m.get("name") == worker_id:
                self._ids[worker_id] = m["id"]
                return m
        return None

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        fly = self._settings(group)
        m = await self._find(fly, group, worker_id)
        if m is None:  # gone, or not ours
            self._stopping.discard(worker_id)
            return
        path = f"/apps/{_q(fly.app)}/machines/{_q(m['id'])}"
        state = m.get("state")
        if state in _STARTING or state in _ENDED:  # nothing runs that could drain
            r = await self._send(fly, "DELETE", path, what=f"destroy machine {m['id']}", params={"force": "true"})
            if r.status_code >= 300 and r.status_code != 404:
                raise self._refusal(r, fly, f"destroy machine {m['id']} of worker {worker_id}")
            return
        if not force and (worker_id in self._stopping or state in _STOPPING):
            return  # already asked: a second signal would make the worker hand its jobs back
        self._stopping.add(worker_id)  # before the signal: a workers() call meanwhile must not call it running
        # SIGINT drains; SIGTERM (the force) hands the jobs back at once
        drain = {"signal": "SIGTERM" if force else "SIGINT"}
        r = await self._send(fly, "POST", f"{path}/signal", what="signal a machine", json=drain)
        if force:
            r = await self._send(
                fly,
                "POST",
                f"{path}/stop",
                what="stop a machine",
                json={"signal": "SIGTERM", "timeout": f"{FORCE_TIMEOUT}s"},
            )
        if r.status_code in (401, 403) or r.status_code >= 500:
            raise self._refusal(r, fly, f"stop machine {m['id']} of worker {worker_id}")
        if r.status_code >= 300:  # 404, 409, 412: it is not running any more; workers() cleans up
            log.debug("fly: stop %s: %s %s", worker_id, r.status_code, _error_text(r))

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """The machine's state and its latest event (an exit says its code), as ``fly machine status`` shows."""
        fly = self._settings(group)
        found = {}
        for worker_id in worker_ids:
            m = await self._find(fly, group, worker_id)
            if m is None:
                continue
            what = f"machine {m['id']} in {m.get('region', '?')}: {m.get('state', '?')}"
            if (code := _exit_code(m)) is not None:
                what += f", its worker exited with code {code}"
            events = m.get("events") or []
            if events:
                latest = events[0]
                what += f"; latest event: {latest.get('type', '?')} {latest.get('status', '')}".rstrip()
            found[worker_id] = f"{what} (see `fly logs -a {fly.app} -i {m['id']}`)"
        return found

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        """Drain every worker of the group; after ``grace`` s force the rest; then delete every machine."""
        fly = self._settings(group)
        machines = await self._machines(fly, group)
        removed = [_worker_id(m) for m in machines]  # ended machines too: workers() destroys those
        await self.drain_then_force(group, grace, HANDBACK_GRACE)
        for m in await self._machines(fly, group):
            r = await self._send(
                fly, "DELETE", f"/apps/{_q(fly.app)}/machines/{_q(m['id'])}", what="destroy", params={"force": "true"}
            )
            if r.status_code >= 300 and r.status_code != 404:
                raise self._refusal(r, fly, f"destroy machine {m['id']}")
        for worker_id in removed:
            self._ids.pop(worker_id, None)
            self._stopping.discard(worker_id)
        return removed

    async def health(self) -> Health:
        fly = self.settings
        try:
            self._authorization(fly)
            if fly is None:
                return Health(True, f"a Fly API token from {self.token_source} (no app to check)")
            if problem := check_size(fly):
                return Health(False, f"Fly has no such machine size: {problem} (see [groups.fly])")
            r = await self._send(fly, "GET", f"/apps/{_q(fly.app)}", what=f"look up app {fly.app}")
        except ProviderError as exc:
            return Health(False, str(exc))
        if r.status_code >= 300:
            return Health(False, str(self._refusal(r, fly, f"look up app {fly.app}")))
        app = r.json() or {}
        org = (app.get("organization") or {}).get("slug")
        return Health(
            True,
            f"Fly app {fly.app} ({app.get('status') or 'no status'}{f', org {org}' if org else ''}) at {fly.api_url}, "
            f"token from {self.token_source}",
        )


def _worker_id(m: dict[str, Any]) -> str:
    return ((m.get("config") or {}).get("metadata") or {}).get("scaleq_worker_id") or m.get("name", "")


def _q(segment: str) -> str:
    return quote(segment, safe="")


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:200] or r.reason_phrase
    if isinstance(body, dict) and body.get("error"):
        return str(body["error"])
    return str(body)[:200]


def _timestamp(value: str | None) -> float:
    if not value:
        return 0.0
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def _exit_code(m: dict[str, Any]) -> int | None:
    """The exit code of the machine's latest exit event (newest first, as the API lists them), if any."""
    for event in m.get("events") or []:
        if event.get("type") == "exit":
            request = event.get("request") or {}
            exit_event = request.get("exit_event") or (request.get("MonitorEvent") or {}).get("exit_event") or {}
            code = exit_event.get("exit_code")
            return code if isinstance(code, int) else 0
    return None


__all__ = ["FlyProvider", "check_size", "find_token"]
