"""The checks the server runs over its own store: the hops the server itself can see.

The store takes writes, the server's host holds the live fleet (:mod:`scaleq.server.hostlimits`), the lease
sweeper keeps up, registered workers heartbeat, running jobs' leases are renewed, each group's controller keeps its
status fresh (with the controller's checks of an external signal: read, its scrape targets up, agreeing with the
server's count), and the OTLP push, when the server pushes, reaches its collector. ``GET /api/v1/health`` and
``GET /api/v1/health/checks`` (:mod:`scaleq.server.routes.health`) serve them, and ``scaleq doctor``
(:mod:`scaleq.doctor.remote`) reads them from there. :func:`server_side_checks` never raises (see
:mod:`scaleq.doctor.checks`).

Leases are renewed by heartbeats, so a lease's expiry is ``max(claimed at, worker's last heartbeat) + lease_seconds``
(the store keeps the exact value; this is the same up to the grace a server restart adds). Side effects: none anyone
can see. The store check's write puts the empty blob (:data:`EMPTY_BLOB`).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from scaleq.doctor.checks import FIX_STORE_DOWN, Check, error_text, group_hop, not_checked, queue_hop, secs
from scaleq.jobs import Job, Worker
from scaleq.server import hostlimits
from scaleq.server.cadence import Cadence
from scaleq.server.otlp import ExportStatus
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Attempt, Event, GroupStatus, Store

#: A worker silent for this many heartbeat intervals is not heartbeating.
HEARTBEAT_MISSES = 2
#: A group whose status the controller has not written for this long has no controller running.
STATUS_STALE_AFTER = 30.0
#: The controller's longest wait before it retries a failing group (it records an error event at each try).
CONTROLLER_BACKOFF_MAX = 60.0
#: Leases lost (expired and swept) this recently are reported.
LOST_LEASE_WINDOW = 300.0
#: The store check's write: the blob of no bytes. Blobs are content-addressed and never listed, so putting it changes
#: nothing anyone can see (an empty input file is this same blob). After the first time the insert meets its own row
#: and does nothing, but it is still an INSERT: SQLite must take the write lock (a read-only or locked file fails)
#: and PostgreSQL refuses it in a read-only transaction (a replica after a failover).
EMPTY_BLOB = hashlib.sha256(b"").hexdigest()

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
FIX_REFUSED = {
    "quota": (
        "the provider refuses more machines for a quota: raise it (GCP: IAM & Admin > Quotas; Kubernetes: the "
        "namespace's ResourceQuota; Fly: your organisation's limits) or lower max_workers; the controller retries "
        "with backoff"
    ),
    "rate_limited": (
        "the provider is rate-limiting the controller's calls: it backs off and retries; if this lasts, look for "
        "other clients of the same project, namespace or token"
    ),
}
FIX_OTLP = (
    "start the OpenTelemetry collector or fix --otlp-endpoint (host, port 4318 for OTLP/HTTP, path /v1/metrics); "
    "the server keeps pushing every {interval} and this check passes after the next push it takes"
)
FIX_CONTROLLER_ERROR = (
    "see this group's signal and provider checks ('scaleq doctor --grid FILE') and 'scaleq events --group {name}'; "
    "the controller retries with backoff"
)


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
        return Check("store", "writable", False, f"the store does not answer: {error_text(exc)}", FIX_STORE_DOWN)
    try:
        await store.put_blob(EMPTY_BLOB, b"")
    except Exception as exc:
        return Check(
            "store", "writable", False, f"the store answers but refuses a write: {error_text(exc)}", FIX_STORE_WRITE
        )
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
    cadence: Cadence | None = None,
) -> list[Check]:
    """The server-side checks over what was read: pure, so the server and tests share it. ``cadence``: the beat and
    lease terms the server grants now (default: the settings', as for a small fleet)."""
    by_id = {w.id: w for w in seen.workers}
    cadence = cadence or Cadence(settings)
    # the slowest beat and longest term a worker may still hold: just after the beat quickened, those of before
    lease, beat = cadence.longest_term(), cadence.slowest_beat()
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
        holder = by_id.get(j.worker_id or "")
        running.setdefault(hop_of(holder, j.queue), []).append((j, holder))
    lost: dict[str, list[tuple[Job, Attempt]]] = {}
    for j, a in seen.lost:
        lost.setdefault(hop_of(by_id.get(a.worker_id), j.queue), []).append((j, a))

    declared = [group_hop(g) for g in groups]
    known = {*live_workers, *running, *lost, *(group_hop(g) for g in (*seen.statuses, *seen.last_events))}
    hops = declared + sorted(h for h in known if h.startswith("group ") and h not in declared)
    hops += sorted(h for h in known if h.startswith("queue "))

    checks = [_sweeper(seen.running, by_id, settings, cadence.longest_term(), now)]
    for hop in hops:
        checks.append(_heartbeats(hop, live_workers.get(hop, []), stale_after, beat, cadence.gone_after(), now))
        checks.append(_leases(hop, running.get(hop, []), lost.get(hop, []), lease, stale_after, now))
        if hop.startswith("group "):
            name = hop.removeprefix("group ")
            status = seen.statuses.get(name)
            checks.append(_controller(name, status, seen.last_events.get(name), now, status_stale_after))
            if status is not None:
                checks += _signal_checks(status, now, status_stale_after)
    return checks


def _signal_checks(status: GroupStatus, now: float, stale_after: float) -> list[Check]:
    """The controller's checks of the group's external signal, as it wrote them with the status (none for the
    server's own signal); only as fresh as the status, so a stale one is reported as not checked."""
    age = now - status.updated_at
    if status.reporter != "controller" or age > stale_after:
        why = f"no controller has reported this group for {secs(age)}"
        return [not_checked(c.hop, c.name, why) for c in status.checks]
    return list(status.checks)


def _renewed_at(job: Job, worker: Worker | None) -> float:
    return max(job.started_at or 0.0, worker.last_heartbeat if worker is not None else 0.0)


def _sweeper(running: list[Job], by_id: dict[str, Worker], settings: ServerSettings, term: float, now: float) -> Check:
    margin = max(3 * settings.sweep_interval, 1.0)
    overdue = []
    for j in running:
        expired = now - (_renewed_at(j, by_id.get(j.worker_id or "")) + term)
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
    hop: str, workers: list[Worker], stale_after: float, beat: float, gone_after: float, now: float
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
            FIX_HEARTBEAT.format(gone=secs(gone_after)),
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
    fresh = status is not None and status.reporter == "controller" and now - status.updated_at <= stale_after
    if status is not None and fresh and status.state in FIX_REFUSED:
        since = f" for {secs(now - status.state_since)}" if status.state_since is not None else ""
        what = "a quota" if status.state == "quota" else "a rate limit"
        detail = f"the provider refuses for {what} ({status.state}{since}): {status.message}"
        return Check(hop, "controller", False, detail, FIX_REFUSED[status.state])
    if last is not None and last.kind == "error" and now - last.at <= stale_after + CONTROLLER_BACKOFF_MAX:
        # the controller runs (it recorded this), but its steps fail: the signal or the provider is the cause
        detail = f"the controller runs, but its last step failed {secs(now - last.at)} ago: {last.reason}"
        return Check(hop, "controller", False, detail, FIX_CONTROLLER_ERROR.format(name=name))
    if status is None:
        return Check(hop, "controller", False, "no controller has reported this group's status", FIX_NO_CONTROLLER)
    age = now - status.updated_at
    if status.reporter != "controller":
        by = "its controller stopped" if status.reporter == "stopped" else f"'scaleq {status.reporter}' wrote it"
        detail = f"no controller runs this group: {by} {secs(age)} ago"
        return Check(hop, "controller", False, detail, FIX_NO_CONTROLLER)
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


def exporter_check(status: ExportStatus, now: float) -> Check:
    """The OTLP push (``scaleq up --otlp-endpoint``): failing while the last push failed, with why and since when."""
    s = status
    if s.failing_since is not None:
        last_ok = f"; last push taken {secs(now - s.last_ok_at)} ago" if s.last_ok_at is not None else "; none taken"
        detail = (
            f"pushing metrics to {s.url} fails since {secs(now - s.failing_since)} ago ({s.failed} failed, "
            f"{s.pushed} taken{last_ok}): {s.last_error}"
        )
        return Check("server", "otlp exporter", False, detail, FIX_OTLP.format(interval=secs(s.interval)))
    if s.last_ok_at is None:
        return Check("server", "otlp exporter", True, f"pushing metrics to {s.url} every {secs(s.interval)}: none yet")
    return Check(
        "server",
        "otlp exporter",
        True,
        f"pushing metrics to {s.url} every {secs(s.interval)}: {s.pushed} taken, "
        f"the last {secs(now - s.last_ok_at)} ago",
    )


async def server_side_checks(
    store: Store,
    settings: ServerSettings,
    now: float,
    groups: Sequence[str] = (),
    *,
    status_stale_after: float = STATUS_STALE_AFTER,
    exporter: ExportStatus | None = None,
    cadence: Cadence | None = None,
) -> list[Check]:
    """The hops the server can see, for ``/api/v1/health`` and the dashboard. ``groups`` are group names that must
    be reported even when the store knows nothing of them (the groups of a grid file); ``exporter``: the OTLP push,
    when the server pushes; ``cadence``: see :func:`judge`. Never raises."""
    store_check = await check_store(store, now)
    pushing = [exporter_check(exporter, now)] if exporter is not None else []
    if not store_check.ok:
        return [store_check, not_checked("server", "lease sweeper", "the store does not work"), *pushing]
    try:
        seen = await read_seen(store, now, groups)
        live = sum(1 for w in seen.workers if w.state != "gone")
        return [
            store_check,
            *pushing,
            hostlimits.check(live, hostlimits.open_files(), hostlimits.accept_queue()),
            *judge(
                seen,
                settings,
                now,
                groups,
                status_stale_after=status_stale_after,
                cadence=cadence,
            ),
        ]
    except Exception as exc:
        return [
            store_check,
            *pushing,
            Check(
                "store",
                "readable",
                False,
                f"reading workers, jobs and groups failed: {error_text(exc)}",
                FIX_STORE_DOWN,
            ),
        ]
