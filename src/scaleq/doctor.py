"""``scaleq doctor``: check every hop of the chain and say, in words, what is wrong and how to fix it.

The checks are data — :class:`Check` ``(hop, name, ok, detail, fix)`` — so the CLI prints them as a table, scripts
read them as JSON and the dashboard shows them. Two entry points:

- :func:`server_side_checks` runs inside the server over its store, for the hops the server itself can see: the
  store takes writes, the lease sweeper keeps up, registered workers heartbeat, running jobs' leases are renewed,
  and each group's controller keeps its status fresh. ``GET /api/v1/health`` and ``GET /api/v1/health/checks``
  serve them.
- :func:`run_checks` is what ``scaleq doctor`` runs from anywhere: the server answers (``/healthz``) and runs the same
  version, the token is accepted (``/api/v1/whoami``), the clocks agree, the server-side checks above, and — given a
  grid file — each group's signal, its Prometheus and its provider, read from where the controller reads them.

Neither ever raises: a check that cannot run becomes a failed check that says why. When the server does not answer,
the checks that need it are reported as *not checked* (``checked=False``) with the reason, and the ones that do not
(external signals, Prometheus, providers) still run.

Leases are renewed by heartbeats, so a lease's expiry is ``max(claimed at, worker's last heartbeat) + lease_seconds``
(the store keeps the exact value; this is the same up to the grace a server restart adds). Side effects: none anyone
can see. The store check's write puts the empty blob (:data:`EMPTY_BLOB`); providers are only asked for their
health — never ``list``, which keeps house; no token is made.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import httpx

from scaleq import __version__
from scaleq.client import ApiError, Unreachable, format_detail
from scaleq.jobs import Job, Worker
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Attempt, Event, GroupStatus, Store

if TYPE_CHECKING:
    from scaleq.client import Client
    from scaleq.grid import Grid, Group
    from scaleq.providers.registry import ProviderContext

#: A worker silent for this many heartbeat intervals is not heartbeating.
HEARTBEAT_MISSES = 2
#: A group whose status the controller has not written for this long has no controller running.
STATUS_STALE_AFTER = 30.0
#: The controller's longest wait before it retries a failing group (it records an error event at each try).
CONTROLLER_BACKOFF_MAX = 60.0
#: Leases lost (expired and swept) this recently are reported.
LOST_LEASE_WINDOW = 300.0
#: Clocks further apart than this are out of step.
CLOCK_SKEW_MAX = 2.0
#: The store check's write: the blob of no bytes. Blobs are content-addressed and never listed, so putting it changes
#: nothing anyone can see (an empty input file is this same blob). After the first time the insert meets its own row
#: and does nothing, but it is still an INSERT: SQLite must take the write lock (a read-only or locked file fails)
#: and PostgreSQL refuses it in a read-only transaction (a replica after a failover).
EMPTY_BLOB = hashlib.sha256(b"").hexdigest()

FIX_SERVER = (
    "start the server ('scaleq up'), or point --server / SCALEQ_SERVER (or --data-dir) at the running one; "
    "check the URL's host and port and any firewall between here and there"
)
FIX_TOKEN = (
    "pass a valid token with --token or SCALEQ_TOKEN (the data dir of 'scaleq up' holds admin.token); an admin "
    "makes others with 'scaleq tokens create ROLE'"
)
FIX_STORE_DOWN = (
    "the server cannot reach its database: for SQLite check the file's disk and permissions, for PostgreSQL that it "
    "is up and the store URL ([store] url) is right; the server answers 503 until it is back"
)
FIX_STORE_WRITE = (
    "the database answers but refuses writes: free disk space, fix the file's permissions, or point the store at the "
    "PostgreSQL primary rather than a read-only replica"
)
FIX_HEARTBEAT = (
    "check that the worker still runs ('scaleq workers', the provider, its log) and can reach the server; "
    "a worker that died is marked gone after {gone} and its jobs return to the queue when their leases expire"
)
FIX_LEASE = (
    "the worker stopped renewing (crashed, was killed, paused or cut off from the server): look at its log or the "
    "provider; once a lease expires its job goes back to the queue (delivery is at-least-once), or finishes as "
    "worker_lost when its retry budget is spent"
)
FIX_SWEEPER = (
    "the server's lease sweeper is not running or cannot write: look for 'housekeeping failed' in the server log and "
    "restart the server (just after a restart, leases get lease_seconds of grace: check again after that)"
)
FIX_NO_CONTROLLER = (
    "no controller is running for this group: run 'scaleq up --grid FILE' or 'scaleq autoscale --grid FILE'"
)
FIX_CONTROLLER_ERROR = (
    "see this group's signal and provider checks ('scaleq doctor --grid FILE') and 'scaleq events --group {name}'; "
    "the controller retries with backoff"
)
FIX_CLOCK = (
    "run time sync (chrony, systemd-timesyncd or ntpd) on both machines: leases, heartbeats and group status are "
    "timed on the server's clock, and controllers and workers elsewhere compare theirs with it"
)
FIX_VERSION = "run the same scaleq version here and on the server (pip install 'scaleq=={version}')"
PROVIDER_FIX = {
    "docker": (
        "start the Docker Engine, or set DOCKER_HOST to a running one in the environment of the controller "
        "('scaleq up' / 'scaleq autoscale') and of doctor"
    ),
    "local": "the local provider runs 'scaleq worker' with this Python: reinstall scaleq in it",
    "kubernetes": (
        "set the group's kubeconfig/context, or $KUBECONFIG, or run in-cluster with the Role in docs/providers.md"
    ),
    "gcp": "set up application default credentials (gcloud auth application-default login, or a service account)",
    "fly": "set FLY_API_TOKEN (fly tokens create deploy) and create the app (fly apps create)",
}
PROVIDER_FIX_DEFAULT = "check the provider's API endpoint and credentials in the environment of the controller"


@dataclass(frozen=True)
class Check:
    """One hop's check: ``ok`` or not, what was seen, and how to fix it. ``checked=False``: it could not run."""

    hop: str
    name: str
    ok: bool
    detail: str
    fix: str = ""
    checked: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else "failed" if self.checked else "not checked"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        return cls(
            hop=str(data["hop"]),
            name=str(data["name"]),
            ok=bool(data["ok"]),
            detail=str(data.get("detail", "")),
            fix=str(data.get("fix", "")),
            checked=bool(data.get("checked", True)),
        )


def not_checked(hop: str, name: str, reason: str) -> Check:
    return Check(hop, name, False, f"not checked: {reason}", "", checked=False)


def all_ok(checks: Iterable[Check]) -> bool:
    return all(c.ok for c in checks)


def secs(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def _err(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{format_detail(exc.detail)} (HTTP {exc.status})"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def group_hop(name: str) -> str:
    return f"group {name}"


def queue_hop(name: str) -> str:
    return f"queue {name}"


# -- server side: what the server sees in its store ----------------------------------------------------------------


@dataclass
class Seen:
    """What the server-side checks judge: read from the store once."""

    workers: list[Worker]  # including gone ones (a lost lease's worker may be gone)
    running: list[Job]
    lost: list[tuple[Job, Attempt]]  # attempts that lost their lease within LOST_LEASE_WINDOW
    statuses: dict[str, GroupStatus]
    last_events: dict[str, Event] = field(default_factory=dict)


async def check_store(store: Store, now: float) -> Check:
    """The store answers a ping and takes a write: the empty blob, put again (see :data:`EMPTY_BLOB`)."""
    started = time.perf_counter()
    try:
        await store.ping()
    except Exception as exc:
        return Check("store", "writable", False, f"the store does not answer: {_err(exc)}", FIX_STORE_DOWN)
    try:
        await store.put_blob(EMPTY_BLOB, b"")
    except Exception as exc:
        return Check("store", "writable", False, f"the store answers but refuses a write: {_err(exc)}", FIX_STORE_WRITE)
    took = (time.perf_counter() - started) * 1000
    kind = type(store).__name__.removesuffix("Store") or "store"
    return Check("store", "writable", True, f"{kind} answers and takes writes ({took:.0f} ms for a ping and a write)")


async def read_seen(store: Store, now: float, groups: Sequence[str] = ()) -> Seen:
    workers = await store.list_workers(include_gone=True)
    running = await store.list_jobs(queue=None, state="running", limit=10_000)
    # A lease lost once shows as a queued or running job with attempts left over, or as worker_lost.
    queued = await store.list_jobs(queue=None, state="queued", limit=500)
    finished = await store.list_jobs(queue=None, state="finished", limit=500)
    candidates = [j for j in queued if j.attempts > 0]
    candidates += [j for j in running if j.attempts > 1]
    candidates += [j for j in finished if j.reason == "worker_lost" and (j.finished_at or 0) >= now - LOST_LEASE_WINDOW]
    lost: list[tuple[Job, Attempt]] = []
    for job in candidates[:50]:
        for a in await store.list_attempts(job.id):
            if a.outcome == "lost" and a.ended_at is not None and a.ended_at >= now - LOST_LEASE_WINDOW:
                lost.append((job, a))
    statuses = {g.name: g for g in await store.list_groups()}
    last_events: dict[str, Event] = {}
    for e in await store.list_events(None, 0, 200):  # newest first: groups whose controller fails right now
        if e.group not in last_events:
            last_events[e.group] = e
    last_events = {
        name: e
        for name, e in last_events.items()
        if e.kind == "error" and now - e.at <= STATUS_STALE_AFTER + CONTROLLER_BACKOFF_MAX
    }
    for name in sorted({*statuses, *groups} - set(last_events)):
        events = await store.list_events(name, 0, 1)
        if events:
            last_events[name] = events[0]
    return Seen(workers, running, lost, statuses, last_events)


def judge(
    seen: Seen,
    settings: ServerSettings,
    now: float,
    groups: Sequence[str] = (),
    *,
    status_stale_after: float = STATUS_STALE_AFTER,
) -> list[Check]:
    """The server-side checks over what was read: pure, so the server and tests share it."""
    by_id = {w.id: w for w in seen.workers}
    lease, beat = settings.lease_seconds, settings.heartbeat_seconds
    stale_after = HEARTBEAT_MISSES * beat

    def hop_of(worker: Worker | None, queue: str) -> str:
        if worker is not None and worker.group:
            return group_hop(worker.group)
        return queue_hop(worker.queue if worker is not None else queue)

    live_workers: dict[str, list[Worker]] = {}
    for w in seen.workers:
        if w.state != "gone":
            live_workers.setdefault(hop_of(w, w.queue), []).append(w)
    running: dict[str, list[tuple[Job, Worker | None]]] = {}
    for j in seen.running:
        w = by_id.get(j.worker_id or "")
        running.setdefault(hop_of(w, j.queue), []).append((j, w))
    lost: dict[str, list[tuple[Job, Attempt]]] = {}
    for j, a in seen.lost:
        lost.setdefault(hop_of(by_id.get(a.worker_id), j.queue), []).append((j, a))

    declared = [group_hop(g) for g in groups]
    known = {*live_workers, *running, *lost, *(group_hop(g) for g in (*seen.statuses, *seen.last_events))}
    hops = declared + sorted(h for h in known if h.startswith("group ") and h not in declared)
    hops += sorted(h for h in known if h.startswith("queue "))

    checks = [_sweeper(seen.running, by_id, settings, now)]
    for hop in hops:
        checks.append(_heartbeats(hop, live_workers.get(hop, []), stale_after, beat, settings, now))
        checks.append(_leases(hop, running.get(hop, []), lost.get(hop, []), lease, stale_after, now))
        if hop.startswith("group "):
            name = hop.removeprefix("group ")
            checks.append(
                _controller(name, seen.statuses.get(name), seen.last_events.get(name), now, status_stale_after)
            )
    return checks


def _renewed_at(job: Job, worker: Worker | None) -> float:
    return max(job.started_at or 0.0, worker.last_heartbeat if worker is not None else 0.0)


def _sweeper(running: list[Job], by_id: dict[str, Worker], settings: ServerSettings, now: float) -> Check:
    margin = max(3 * settings.sweep_interval, 1.0)
    overdue = []
    for j in running:
        expired = now - (_renewed_at(j, by_id.get(j.worker_id or "")) + settings.lease_seconds)
        if expired > margin:
            overdue.append(f"job {j.id[:12]} (worker {j.worker_id}) expired {secs(expired)} ago")
    if overdue:
        return Check(
            "server",
            "lease sweeper",
            False,
            f"{len(overdue)} lease(s) expired but their jobs still show running: " + "; ".join(overdue[:5]),
            FIX_SWEEPER,
        )
    return Check(
        "server",
        "lease sweeper",
        True,
        f"no expired lease left unswept ({len(running)} running, swept every {secs(settings.sweep_interval)})",
    )


def _heartbeats(
    hop: str, workers: list[Worker], stale_after: float, beat: float, settings: ServerSettings, now: float
) -> Check:
    if not workers:
        return Check(hop, "workers heartbeating", True, "no workers registered")
    silent = sorted((w for w in workers if now - w.last_heartbeat > stale_after), key=lambda w: w.last_heartbeat)
    if silent:
        names = "; ".join(f"worker {w.id} last heartbeat {secs(now - w.last_heartbeat)} ago" for w in silent[:10])
        return Check(
            hop,
            "workers heartbeating",
            False,
            f"{len(silent)} of {len(workers)} worker(s) stopped heartbeating (expected every {secs(beat)}): {names}",
            FIX_HEARTBEAT.format(gone=secs(settings.worker_gone_after)),
        )
    latest = max(now - w.last_heartbeat for w in workers)
    return Check(hop, "workers heartbeating", True, f"{len(workers)} worker(s), all heard within {secs(latest)}")


def _leases(
    hop: str,
    running: list[tuple[Job, Worker | None]],
    lost: list[tuple[Job, Attempt]],
    lease: float,
    stale_after: float,
    now: float,
) -> Check:
    problems = []
    for j, w in running:
        renewed = _renewed_at(j, w)
        if now - renewed > stale_after:
            left = renewed + lease - now
            when = f"expires in {secs(left)}" if left >= 0 else f"expired {secs(-left)} ago"
            problems.append(
                f"job {j.id[:12]} on worker {j.worker_id}: lease not renewed for {secs(now - renewed)}, {when}"
            )
    for j, a in sorted(lost, key=lambda p: p[1].ended_at or 0.0, reverse=True):
        if j.state == "finished":
            then = f"finished {j.reason} after {j.attempts} attempt(s)"
        elif j.state == "running":
            then = "requeued and running again"
        else:
            then = "requeued"
        problems.append(
            f"job {j.id[:12]} lost its lease on worker {a.worker_id} {secs(now - (a.ended_at or now))} ago "
            f"(attempt {a.attempt}; {then})"
        )
    if problems:
        return Check(hop, "leases renewing", False, "; ".join(problems[:10]), FIX_LEASE)
    if not running:
        return Check(
            hop, "leases renewing", True, f"no running jobs; no lease lost in the last {secs(LOST_LEASE_WINDOW)}"
        )
    return Check(hop, "leases renewing", True, f"{len(running)} running job(s), leases renewed (lease {secs(lease)})")


def _controller(name: str, status: GroupStatus | None, last: Event | None, now: float, stale_after: float) -> Check:
    hop = group_hop(name)
    if last is not None and last.kind == "error" and now - last.at <= stale_after + CONTROLLER_BACKOFF_MAX:
        # the controller runs (it recorded this), but its steps fail: the signal or the provider is the cause
        detail = f"the controller runs, but its last step failed {secs(now - last.at)} ago: {last.reason}"
        return Check(hop, "controller", False, detail, FIX_CONTROLLER_ERROR.format(name=name))
    if status is None:
        return Check(hop, "controller", False, "no controller has reported this group's status", FIX_NO_CONTROLLER)
    age = now - status.updated_at
    if age > stale_after:
        detail = f"the group's status was last updated {secs(age)} ago"
        return Check(hop, "controller", False, detail, FIX_NO_CONTROLLER)
    return Check(
        hop,
        "controller",
        True,
        f"status updated {secs(age)} ago: {status.current} current, {status.desired} desired "
        f"(min {status.min_workers}, max {status.max_workers})",
    )


async def server_side_checks(
    store: Store,
    settings: ServerSettings,
    now: float,
    groups: Sequence[str] = (),
    *,
    status_stale_after: float = STATUS_STALE_AFTER,
) -> list[Check]:
    """The hops the server can see, for ``/api/v1/health`` and the dashboard. ``groups`` are group names that must
    be reported even when the store knows nothing of them (the groups of a grid file). Never raises."""
    store_check = await check_store(store, now)
    if not store_check.ok:
        return [store_check, not_checked("server", "lease sweeper", "the store does not work")]
    try:
        seen = await read_seen(store, now, groups)
        return [store_check, *judge(seen, settings, now, groups, status_stale_after=status_stale_after)]
    except Exception as exc:
        return [
            store_check,
            Check("store", "readable", False, f"reading workers, jobs and groups failed: {_err(exc)}", FIX_STORE_DOWN),
        ]


# -- from anywhere: what `scaleq doctor` runs ----------------------------------------------------------------------


async def _guard(hop: str, name: str, fix: str, fn: Callable[[], Awaitable[Check]]) -> Check:
    try:
        return await fn()
    except Exception as exc:
        return Check(hop, name, False, f"the check itself failed: {_err(exc)}", fix)


@dataclass
class _Server:
    checks: list[Check]
    blocked: str | None  # why the checks that need the server cannot run, or None


SERVER_CHECKS = ("reachable", "version", "token", "clock")


async def _server_checks(client: Client | None, clock: Callable[[], float], unconfigured: str) -> _Server:
    """reachable, version, token, clock; those that cannot run once one fails are reported as not checked."""
    server = await _server_hops(client, clock, unconfigured)
    if server.blocked:
        done = {c.name for c in server.checks}
        server.checks += [not_checked("server", n, server.blocked) for n in SERVER_CHECKS if n not in done]
    return server


async def _server_hops(client: Client | None, clock: Callable[[], float], unconfigured: str) -> _Server:
    if client is None:
        detail = unconfigured or "no server given"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "no server to ask")
    checks: list[Check] = []
    started = time.perf_counter()
    try:
        r = await client.request("GET", f"{client.server}/healthz", timeout=10)
        body = r.json()
        version = body["version"]
    except Unreachable as exc:
        if isinstance(exc.__cause__, httpx.TransportError):
            return _Server([Check("server", "reachable", False, str(exc), FIX_SERVER)], "server unreachable")
        detail = f"{exc}; the store behind it may be down"
        return _Server(
            [Check("server", "reachable", False, detail, FIX_STORE_DOWN + "; else see the server log")],
            "server unavailable",
        )
    except ApiError as exc:
        if exc.status >= 500:
            detail = f"the server at {client.server} fails its health check: {_err(exc)}"
            return _Server([Check("server", "reachable", False, detail, FIX_STORE_DOWN)], "server unavailable")
        detail = f"something answers at {client.server}, but not a scaleq server: /healthz gave {_err(exc)}"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "not a scaleq server")
    except (ValueError, KeyError, TypeError):
        detail = f"something answers at {client.server}, but not a scaleq server: /healthz is not scaleq's"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "not a scaleq server")
    took = (time.perf_counter() - started) * 1000
    checks.append(Check("server", "reachable", True, f"scaleq {version} at {client.server} ({took:.0f} ms)"))
    if version == __version__:
        checks.append(Check("server", "version", True, f"server and this client run scaleq {version}"))
    else:
        checks.append(
            Check(
                "server",
                "version",
                False,
                f"the server runs scaleq {version}, this client {__version__}",
                FIX_VERSION.format(version=version),
            )
        )

    t0 = clock()
    try:
        who = await client.request("GET", "/whoami", timeout=10)
        t1 = clock()
        body = who.json()
        role, server_time = str(body["role"]), float(body["server_time"])
    except ApiError as exc:
        if exc.status in (401, 403):
            checks.append(Check("server", "token", False, f"the server refused the token: {_err(exc)}", FIX_TOKEN))
            return _Server(checks, "token refused")
        checks.append(
            Check("server", "token", False, f"/api/v1/whoami failed: {_err(exc)}", FIX_VERSION.format(version=version))
        )
        return _Server(checks, "token not checked")
    except Unreachable as exc:
        checks.append(Check("server", "token", False, str(exc), FIX_SERVER))
        return _Server(checks, "server unreachable")
    checks.append(Check("server", "token", True, f"accepted: role {role}"))
    checks.append(_clock(server_time, t0, t1))
    return _Server(checks, None)


def _clock(server_time: float, t0: float, t1: float) -> Check:
    """The server's clock against ours, allowing for the round trip: it read its clock somewhere in [t0, t1]."""
    rtt = max(0.0, t1 - t0)
    trip = f"round trip {rtt * 1000:.0f} ms"
    if t0 <= server_time <= t1:
        return Check("server", "clock", True, f"in step: the server's time fell within the {trip}")
    skew, way = (server_time - t1, "ahead of") if server_time > t1 else (t0 - server_time, "behind")
    detail = f"the server's clock is {secs(skew)} {way} this machine's ({trip})"
    if skew > CLOCK_SKEW_MAX:
        return Check("server", "clock", False, f"{detail}: more than {secs(CLOCK_SKEW_MAX)} apart", FIX_CLOCK)
    return Check("server", "clock", True, f"{detail}: within {secs(CLOCK_SKEW_MAX)}")


async def _remote_health(client: Client, groups: Sequence[str]) -> list[Check]:
    params = [("group", g) for g in groups]
    try:
        r = await client.request("GET", "/health", params=params, timeout=30)
        return [Check.from_dict(c) for c in r.json()["checks"]]
    except Exception as exc:
        return [Check("server", "health", False, f"GET /api/v1/health failed: {_err(exc)}", FIX_STORE_DOWN)]


def _blocked_remote(reason: str, groups: Sequence[str]) -> list[Check]:
    checks = [not_checked("store", "writable", reason), not_checked("server", "lease sweeper", reason)]
    if not groups:
        checks += [
            not_checked("all queues", "workers heartbeating", reason),
            not_checked("all queues", "leases renewing", reason),
        ]
    for g in groups:
        hop = group_hop(g)
        checks += [
            not_checked(hop, "workers heartbeating", reason),
            not_checked(hop, "leases renewing", reason),
            not_checked(hop, "controller", reason),
        ]
    return checks


async def _signal(client: Client | None, g: Group, index: int, blocked: str | None) -> Check:
    from scaleq.scaling.signals import SignalError, describe, read_external

    hop, spec = group_hop(g.name), g.signal
    if spec.kind == "server":
        if client is None or blocked:
            return not_checked(hop, "signal", blocked or "no server to ask")
        try:
            d = await client.demand(g.queue, g.capabilities().model_dump(mode="json"))
        except (ApiError, Unreachable) as exc:
            return Check(
                hop, "signal", False, f"the server's demand for queue {g.queue} failed: {_err(exc)}", FIX_SERVER
            )
        return Check(
            hop,
            "signal",
            True,
            f"the server counts {d['queued']} queued and {d['running']} running job(s) this group can run "
            f"on queue {g.queue}",
        )
    fix = (
        f"make {spec.url} answer from where the controller runs (is the exporter / Prometheus up?) and check "
        f"groups[{index}].signal in the grid file (url, "
        + ("metric, labels" if spec.kind == "prometheus_text" else "query")
        + ", bearer_token)"
    )
    try:
        d = await read_external(spec)
    except SignalError as exc:
        return Check(hop, "signal", False, str(exc), fix)
    return Check(hop, "signal", True, f"{describe(spec)} reads {d.queued}")


async def _prometheus(g: Group) -> Check:
    hop, spec = group_hop(g.name), g.signal
    url = (spec.url or "").rstrip("/") + "/-/ready"
    headers = {"Authorization": f"Bearer {spec.bearer_token}"} if spec.bearer_token else {}
    try:
        async with httpx.AsyncClient(timeout=spec.timeout) as http:
            r = await http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return Check(
            hop,
            "prometheus",
            False,
            f"Prometheus at {spec.url} does not answer: {_err(exc)}",
            f"start Prometheus or fix the signal's url ({spec.url}); it must be reachable from the controller",
        )
    if r.status_code == 404:
        return Check(
            hop,
            "prometheus",
            False,
            f"{spec.url} is not a Prometheus server: {url} answered 404",
            "a promql signal's url is the Prometheus base URL (e.g. http://prometheus:9090), not an API path",
        )
    if r.status_code != 200:
        return Check(
            hop,
            "prometheus",
            False,
            f"Prometheus at {spec.url} is not ready: {url} answered {r.status_code} {r.text[:200].strip()}",
            "wait for Prometheus to finish starting (replaying its WAL) or look at its log",
        )
    return Check(hop, "prometheus", True, f"Prometheus at {spec.url} is ready")


async def _provider(g: Group, ctx: ProviderContext | None) -> Check:
    from scaleq.providers.registry import make_provider

    hop = group_hop(g.name)
    fix = PROVIDER_FIX.get(g.provider, PROVIDER_FIX_DEFAULT)
    if ctx is None:
        return not_checked(hop, "provider", "no provider context (doctor needs --grid)")
    provider = None
    try:
        provider = make_provider(g, ctx)
        health = await provider.health()
    except Exception as exc:
        return Check(hop, "provider", False, f"{g.provider}: {_err(exc)}", fix)
    finally:
        if provider is not None:
            try:
                await provider.close()
            except Exception:  # closing a client must not turn a verdict into an error
                pass
    if not health.ok:
        return Check(hop, "provider", False, f"{g.provider}: {health.message}", fix)
    return Check(hop, "provider", True, f"{g.provider}: {health.message}")


async def _group_checks(
    client: Client | None, g: Group, index: int, ctx: ProviderContext | None, blocked: str | None
) -> list[Check]:
    hop = group_hop(g.name)
    jobs = [
        _guard(hop, "signal", "see the grid file's signal section", lambda: _signal(client, g, index, blocked)),
    ]
    if g.signal.kind == "promql":
        jobs.append(_guard(hop, "prometheus", "check the signal's url", lambda: _prometheus(g)))
    jobs.append(_guard(hop, "provider", PROVIDER_FIX_DEFAULT, lambda: _provider(g, ctx)))
    return list(await asyncio.gather(*jobs))


async def run_checks(
    client: Client | None,
    grid: Grid | None = None,
    provider_ctx: ProviderContext | None = None,
    clock: Callable[[], float] = time.time,
    *,
    unconfigured: str = "",
) -> list[Check]:
    """Every hop, from this machine: server, token, clock, the server-side checks and, with a grid, each group's
    signal, Prometheus and provider. ``client`` is None when no server is configured (``unconfigured`` says why).
    ``clock`` is this machine's clock (injectable to test the skew check). Never raises."""
    try:
        return await _run_checks(client, grid, provider_ctx, clock, unconfigured)
    except Exception as exc:  # a bug in a check must still leave the user a verdict
        return [Check("doctor", "run", False, f"doctor failed: {_err(exc)}", "report this as a scaleq bug")]


async def _run_checks(
    client: Client | None,
    grid: Grid | None,
    provider_ctx: ProviderContext | None,
    clock: Callable[[], float],
    unconfigured: str,
) -> list[Check]:
    server = await _server_checks(client, clock, unconfigured)
    names = [g.name for g in grid.groups] if grid else []
    groups_task = asyncio.gather(
        *(_group_checks(client, g, i, provider_ctx, server.blocked) for i, g in enumerate(grid.groups if grid else []))
    )
    if server.blocked is None and client is not None:
        remote = await _remote_health(client, names)
    else:
        remote = _blocked_remote(server.blocked or "no server", names)
    per_group = await groups_task

    ordered = [*server.checks, *(c for c in remote if not c.hop.startswith(("group ", "queue ", "all ")))]
    for name, own in zip(names, per_group, strict=True):
        hop = group_hop(name)
        ordered += own
        ordered += [c for c in remote if c.hop == hop]
    ordered += [
        c
        for c in remote
        if c.hop.startswith(("group ", "queue ", "all ")) and c.hop not in {group_hop(n) for n in names}
    ]
    return ordered


def summary(checks: Sequence[Check]) -> str:
    failed = [c for c in checks if c.checked and not c.ok]
    skipped = [c for c in checks if not c.checked]
    if not failed and not skipped:
        return f"all {len(checks)} checks passed"
    parts = [f"{len(failed)} of {len(checks)} checks failed"]
    if skipped:
        parts.append(f"{len(skipped)} not checked")
    return ", ".join(parts)
