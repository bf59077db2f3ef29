"""The server's ``/metrics``: the Prometheus text format, read from the store at scrape time.

Design:

- **One registry per app** (never prometheus_client's global one), so several apps in one process — tests, or an
  embedded server beside a remote one — never mix their series.
- **What the store knows is read at scrape time**: queue counts, jobs by state, workers, groups and the store's own
  health. prometheus_client's ``collect()`` is synchronous and the store is async, so a scrape first awaits
  :meth:`ServerMetrics.refresh` (one snapshot, under a lock) and then renders the registry; :class:`StoreCollector`
  only turns that snapshot into metric families. A store that does not answer gives ``scaleq_store_up 0`` and no
  store-derived series (stale numbers would be worse than none). What it reads is counted by the store (queue
  counts, worker tallies), so a scrape costs the same at 10 workers and at 10,000.
- **What only this process sees is observed in-process**: claim latency and run time (histograms, fed by the worker
  routes through :func:`observe_claimed` and :func:`observe_finished`) and HTTP requests (a tiny ASGI middleware).
  With several servers on one database each has its own; sum them in PromQL.
- **Scaling events are counted from the store**, not by hooks in the controller: an embedded controller and a remote
  ``scaleq autoscale`` both record events there, so the store is the one place that sees all of them. The counter
  starts at this server's first scrape (a counter reset at restart, as Prometheus expects) and each scrape adds the
  events recorded since the previous one (``list_events`` with an ``after`` cursor, bounded per scrape).

``GET /metrics`` needs a bearer token with the ``view`` scope (every role has it): queue names are capabilities.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter as Tally
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from scaleq.jobs import Claim, Job, State
from scaleq.server.auth import require
from scaleq.server.cadence import Cadence
from scaleq.store.base import GroupStatus, QueueStats, Store, WorkerTally

log = logging.getLogger("scaleq.metrics")

#: Seconds a scrape waits for the store before it reports the store as down.
STORE_TIMEOUT = 5.0
#: Most scaling events counted per scrape (more than this between two scrapes is logged and the rest skipped).
EVENTS_PER_SCRAPE = 10_000
#: Event kinds the controller records; their counters exist (at 0) for every known group, so a first event is an
#: increase Prometheus can see rather than a new series.
EVENT_KINDS = ("scale_up", "scale_down", "desired", "adopt", "error", "recovered")

CLAIM_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
PAUSE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
#: up to a minute: a round is logged as slow past 10 s by default, and gone-marks come at 45 s
HOUSEKEEPING_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 45, 60)
RUN_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

T = TypeVar("T")


@dataclass
class Snapshot:
    """What one scrape read from the store."""

    at: float
    store_up: bool
    ping_seconds: float | None = None
    queues: list[QueueStats] = field(default_factory=list)
    workers: list[WorkerTally] = field(default_factory=list)  # counted by the store: a few rows, any fleet
    groups: list[GroupStatus] = field(default_factory=list)


class StoreCollector(Collector):
    """Metric families from the latest :class:`Snapshot`, plus the scaling-event counters it keeps."""

    def __init__(self) -> None:
        self.snapshot = Snapshot(at=0.0, store_up=False)
        self.events: Tally[tuple[str, str]] = Tally()

    def collect(self) -> Iterator[Metric]:
        s = self.snapshot
        up = GaugeMetricFamily("scaleq_store_up", "1 if the store answered this scrape's ping and queries, else 0")
        up.add_metric([], 1.0 if s.store_up else 0.0)
        yield up
        ping = GaugeMetricFamily("scaleq_store_ping_seconds", "How long the store took to answer a ping")
        if s.ping_seconds is not None:
            ping.add_metric([], s.ping_seconds)
        yield ping

        queue_length = GaugeMetricFamily(
            "queue_length", "Jobs waiting in the queue (queued, not running); the original gauge", labels=["queue"]
        )
        jobs = GaugeMetricFamily("scaleq_jobs", "Jobs in the queue by state", labels=["queue", "state"])
        results = GaugeMetricFamily(
            "scaleq_jobs_finished", "Finished jobs still on record, by result", labels=["queue", "result"]
        )
        oldest = GaugeMetricFamily(
            "scaleq_queue_oldest_age_seconds", "Age of the oldest queued job (0 when none waits)", labels=["queue"]
        )
        for q in s.queues:
            queue_length.add_metric([q.queue], q.queued)
            jobs.add_metric([q.queue, State.queued.value], q.queued)
            jobs.add_metric([q.queue, State.running.value], q.running)
            jobs.add_metric([q.queue, State.finished.value], q.finished)
            results.add_metric([q.queue, "success"], q.succeeded)
            results.add_metric([q.queue, "unsuccessful"], q.unsuccessful)
            age = 0.0 if q.oldest_queued_at is None else max(0.0, s.at - q.oldest_queued_at)
            oldest.add_metric([q.queue], age)
        yield from (queue_length, jobs, results, oldest)

        workers = GaugeMetricFamily("scaleq_workers", "Registered workers by state", labels=["queue", "state"])
        slots = GaugeMetricFamily(
            "scaleq_slots",
            "Job slots of registered workers: busy (running a job) or idle (free on an active worker)",
            labels=["queue", "state"],
        )
        busy: Tally[str] = Tally()
        idle: Tally[str] = Tally()
        for t in s.workers:
            workers.add_metric([t.queue, t.state], t.workers)
            busy[t.queue] += t.busy
            idle[t.queue] += t.idle
        for queue in sorted(busy):
            slots.add_metric([queue, "busy"], busy[queue])
            slots.add_metric([queue, "idle"], idle[queue])
        yield from (workers, slots)

        info = GaugeMetricFamily(
            "scaleq_group_info",
            "A worker group: its queue and provider (always 1)",
            labels=["group", "queue", "provider"],
        )
        counts = GaugeMetricFamily(
            "scaleq_group_workers",
            "Workers of a group: current (running, not draining), desired (the policy's target), min and max",
            labels=["group", "kind"],
        )
        updated = GaugeMetricFamily(
            "scaleq_group_updated_timestamp_seconds",
            "When a controller last reported on the group (Unix time); a stale value means no controller runs",
            labels=["group"],
        )
        for g in s.groups:
            info.add_metric([g.name, g.queue, g.provider], 1)
            for kind, value in (
                ("current", g.current),
                ("desired", g.desired),
                ("min", g.min_workers),
                ("max", g.max_workers),
            ):
                counts.add_metric([g.name, kind], value)
            updated.add_metric([g.name], g.updated_at)
        yield from (info, counts, updated)

        events = CounterMetricFamily(
            "scaleq_scaling_events",
            "Scaling events recorded since this server started, by group and kind "
            "(scale_up, scale_down, desired, adopt, error: a provider or signal failed, recovered)",
            labels=["group", "kind"],
        )
        for (group, kind), n in sorted(self.events.items()):
            events.add_metric([group, kind], n)
        yield events


class ServerMetrics:
    """The registry of one app: the store collector and the in-process histograms and counters."""

    def __init__(self, store: Store, clock: Callable[[], float] = time.time, cadence: Cadence | None = None) -> None:
        self.store = store
        self.clock = clock
        self.registry = CollectorRegistry()
        self.collector = StoreCollector()
        self.registry.register(self.collector)
        self.claim_wait = Histogram(
            "scaleq_claim_wait_seconds",
            "From submit to the first claim of a job (first attempts only)",
            ["queue"],
            buckets=CLAIM_WAIT_BUCKETS,
            registry=self.registry,
        )
        self.run_seconds = Histogram(
            "scaleq_run_seconds",
            "From claim to the result a worker reported, by result",
            ["queue", "reason"],
            buckets=RUN_BUCKETS,
            registry=self.registry,
        )
        self.http_requests = Counter(
            "scaleq_http_requests",
            "HTTP requests answered, by route template and status code",
            ["route", "status"],
            registry=self.registry,
        )
        self.gc_full = Histogram(
            "scaleq_gc_full_seconds",
            "The pauses of the server's full garbage collections (scaleq server / up: one a minute)",
            buckets=PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.loop_lag = Histogram(
            "scaleq_event_loop_lag_seconds",
            "How much later than asked the server's event loop ran a timer (sampled every 0.1 s; scaleq server / up)",
            buckets=PAUSE_BUCKETS,
            registry=self.registry,
        )
        self.housekeeping = Histogram(
            "scaleq_housekeeping_seconds",
            "How long each round of the server's housekeeping took (lease sweep, parked workers touched, counts "
            "folded, silent workers marked gone)",
            buckets=HOUSEKEEPING_BUCKETS,
            registry=self.registry,
        )
        if cadence is not None:
            beat = Gauge(
                "scaleq_heartbeat_interval_seconds",
                "How often this server asks busy workers to beat: the settings' interval, slower as the busy workers "
                "pass the heartbeat budget",
                registry=self.registry,
            )
            beat.set_function(lambda: cadence.heartbeat_seconds)
            term = Gauge(
                "scaleq_lease_term_seconds",
                "The term of the leases this server grants now: the settings' lease, three beats past the budget",
                registry=self.registry,
            )
            term.set_function(lambda: cadence.lease_seconds)
        self._lock = asyncio.Lock()
        self._cursor: int | None = None

    async def _timed(self, what: Awaitable[T]) -> T:
        async with asyncio.timeout(STORE_TIMEOUT):  # (not wait_for: scaleq.loop.wait_set says why)
            return await what

    async def refresh(self) -> Snapshot:
        """Read the store into a new snapshot (and count the scaling events recorded since the last one)."""
        async with self._lock:
            now = self.clock()
            try:
                t0 = time.perf_counter()
                await self._timed(self.store.ping())
                ping = time.perf_counter() - t0
                snapshot = Snapshot(
                    at=now,
                    store_up=True,
                    ping_seconds=ping,
                    queues=await self._timed(self.store.queue_stats()),
                    workers=await self._timed(self.store.worker_tallies()),
                    groups=await self._timed(self.store.list_groups()),
                )
                await self._count_events(snapshot.groups)
            except Exception as exc:  # the store is away: say so in the metrics, never fail the scrape
                log.warning("metrics: the store did not answer: %s: %s", type(exc).__name__, exc)
                snapshot = Snapshot(at=now, store_up=False)
            self.collector.snapshot = snapshot
            return snapshot

    async def _count_events(self, groups: list[GroupStatus]) -> None:
        tally = self.collector.events
        for g in groups:
            for kind in EVENT_KINDS:
                tally[(g.name, kind)] += 0
        if self._cursor is None:  # first scrape: count from here on
            latest = await self._timed(self.store.list_events(None, 0, 1))
            self._cursor = latest[0].id if latest else 0
            return
        new = await self._timed(self.store.list_events(None, self._cursor, EVENTS_PER_SCRAPE))
        if len(new) == EVENTS_PER_SCRAPE:
            log.warning("metrics: over %d scaling events since the last scrape; older ones not counted", len(new))
        for e in new:
            tally[(e.group, e.kind)] += 1
        if new:
            self._cursor = max(e.id for e in new)

    async def render(self, accept: str = "") -> tuple[bytes, str]:
        """The exposition (Prometheus text, or OpenMetrics if ``accept`` asks for it) and its content type."""
        await self.refresh()
        encoder, content_type = choose_encoder(accept)
        return encoder(self.registry), content_type

    def families(self) -> Iterable[Metric]:
        """The registry's metric families as of the last :meth:`refresh` (for exporters such as OTLP)."""
        return self.registry.collect()


# -- hooks for the routes ---------------------------------------------------------------------------------------------


def of(app: FastAPI) -> ServerMetrics:
    """The app's metrics (made on first use, so an app built without :func:`install` still works)."""
    metrics = getattr(app.state, "metrics", None)
    if metrics is None:
        cadence = getattr(app.state, "cadence", None)
        metrics = app.state.metrics = ServerMetrics(app.state.store, app.state.clock, cadence)
    return metrics


def observe_claimed(app: FastAPI, claims: Iterable[Claim]) -> None:
    """Submit → claim latency of each job claimed for the first time (its claim time is the attempt's start).

    Only first attempts count: the store keeps the first submit time, not when a retried or rerun job was queued again.
    """
    hist = of(app).claim_wait
    for c in claims:
        if c.attempt == 1 and c.job.started_at is not None:
            hist.labels(c.job.queue).observe(max(0.0, c.job.started_at - c.job.submitted_at))


def observe_finished(app: FastAPI, job: Job, now: float) -> None:
    """Run time of an attempt whose result a worker just reported. A repeated finish (the store answers with the job
    as the first one left it, so its ``finished_at`` is not ``now``) is not counted twice."""
    if job.finished_at != now or job.started_at is None or job.reason is None:
        return
    of(app).run_seconds.labels(job.queue, job.reason.value).observe(max(0.0, now - job.started_at))


# -- HTTP -------------------------------------------------------------------------------------------------------------


class _CountRequests:
    """ASGI middleware: count responses by route template (never the raw path: ids would explode the series)."""

    def __init__(self, app: Any, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status: int | None = None

        async def send_status(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:
            status = status or 499  # the client went away before the answer (nginx's code for it)
            raise
        except Exception:
            status = status or 500  # the server's error handler answers 500
            raise
        finally:
            self.metrics.http_requests.labels(route_template(scope), str(status or 500)).inc()


def route_template(scope: dict[str, Any]) -> str:
    """The matched route's path template with the prefix it was included under, e.g. ``/api/v1/jobs/{job_id}``.

    Some FastAPI versions put the included route itself (its path without the router's prefix) in the scope: the
    prefix is then what the request path has before the rendered route path.
    """
    route = scope.get("route")
    template = getattr(route, "path_format", None)
    if not template:
        return "(unmatched)"
    path: str = scope.get("path", "")
    try:
        rendered = template.format(**scope.get("path_params", {}))
    except (KeyError, IndexError, ValueError):
        return template
    return path[: len(path) - len(rendered)] + template if path.endswith(rendered) else template


router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    dependencies=[require("view")],
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format (or OpenMetrics)"}},
)
async def metrics_endpoint(request: Request) -> Response:
    """Queue, job, worker, group and store metrics for Prometheus. Needs a token with the ``view`` scope."""
    body, content_type = await of(request.app).render(request.headers.get("accept", ""))
    return Response(body, media_type=content_type)


def install(app: FastAPI) -> None:
    """Give the app its metrics, the request counter and ``GET /metrics``."""
    metrics = of(app)
    app.add_middleware(_CountRequests, metrics=metrics)
    app.include_router(router)
