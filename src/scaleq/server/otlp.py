"""Push the server's metrics over OTLP/HTTP, for users who already run an OpenTelemetry collector.

The same registry that serves ``/metrics`` is pushed, so both paths carry the same names, labels and values:

- Every ``interval`` seconds the pusher refreshes the registry from the store (as a scrape does), reads
  ``registry.collect()`` and turns each family into an OTLP metric: a gauge into a Gauge, a counter into a cumulative
  monotonic Sum (named with its ``_total`` suffix, as Prometheus shows it; its ``_created`` sample becomes the start
  time), a histogram into a cumulative explicit-bucket Histogram (Prometheus' cumulative ``le`` buckets become
  per-bucket counts). Labels become attributes.
- Encoding and transport are the OpenTelemetry SDK's own ``OTLPMetricExporter`` (protobuf over HTTP, with its retries,
  timeout and the standard ``OTEL_EXPORTER_OTLP_*`` environment variables for headers, TLS and compression). Building
  the SDK's export data directly, rather than re-observing each series through observable instruments, keeps the
  histograms as histograms and needs no list of series known in advance.
- The export call blocks (``requests``), so it runs in a thread; a collector that is down costs a logged warning per
  interval, never the server — and it is not silent: the pusher keeps an :class:`ExportStatus` (last success, failing
  since, why), which the server's health checks (``otlp exporter``, :mod:`scaleq.server.checks`) report to ``scaleq
  doctor`` and the dashboard.

Needs the ``opentelemetry-sdk`` and ``opentelemetry-exporter-otlp-proto-http`` packages (the ``otlp`` extra).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from prometheus_client.core import Metric as Family

from scaleq import __version__

if TYPE_CHECKING:
    from fastapi import FastAPI

    from scaleq.server.metrics import ServerMetrics

log = logging.getLogger("scaleq.otlp")

DEFAULT_INTERVAL = 15.0
INSTALL_HINT = (
    "OTLP export needs the opentelemetry-sdk and opentelemetry-exporter-otlp-proto-http packages "
    "(pip install 'scaleq[otlp]')"
)


class OtlpUnavailable(RuntimeError):
    """The OpenTelemetry packages are not installed."""


def metrics_url(endpoint: str) -> str:
    """The OTLP/HTTP metrics URL: a bare collector address gets the standard ``/v1/metrics`` path."""
    if "://" not in endpoint:
        endpoint = f"http://{endpoint}"
    parts = urlsplit(endpoint)
    if not parts.scheme or not parts.netloc:
        raise ValueError(f"{endpoint!r} is not an OTLP/HTTP endpoint; give e.g. http://collector:4318")
    return endpoint if parts.path not in ("", "/") else endpoint.rstrip("/") + "/v1/metrics"


def to_metrics_data(families: Iterable[Family], *, start_ns: int, now_ns: int | None = None) -> Any:
    """OpenTelemetry SDK ``MetricsData`` holding the given Prometheus metric families."""
    try:
        from opentelemetry.sdk.metrics.export import (
            AggregationTemporality,
            Gauge,
            Histogram,
            HistogramDataPoint,
            Metric,
            MetricsData,
            NumberDataPoint,
            ResourceMetrics,
            ScopeMetrics,
            Sum,
        )
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
    except ImportError as exc:
        raise OtlpUnavailable(INSTALL_HINT) from exc

    now_ns = now_ns or time.time_ns()
    cumulative = AggregationTemporality.CUMULATIVE
    out = []
    for fam in families:
        unit = fam.unit or ("s" if fam.name.endswith("_seconds") else "")
        if fam.type == "counter":
            created = {_key(s.labels): s.value for s in fam.samples if s.name.endswith("_created")}
            points = [
                NumberDataPoint(
                    attributes=dict(s.labels),
                    start_time_unix_nano=_ns(created.get(_key(s.labels))) or start_ns,
                    time_unix_nano=now_ns,
                    value=s.value,
                )
                for s in fam.samples
                if s.name.endswith("_total")
            ]
            data: Any = Sum(data_points=points, aggregation_temporality=cumulative, is_monotonic=True)
            out.append(Metric(name=f"{fam.name}_total", description=fam.documentation, unit=unit, data=data))
        elif fam.type == "histogram":
            series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
            for s in fam.samples:
                labels = {k: v for k, v in s.labels.items() if k != "le"}
                h = series.setdefault(_key(labels), {"attributes": labels, "buckets": []})
                if s.name.endswith("_bucket"):
                    h["buckets"].append((float(s.labels["le"]), s.value))
                elif s.name.endswith("_count"):
                    h["count"] = s.value
                elif s.name.endswith("_sum"):
                    h["sum"] = s.value
                elif s.name.endswith("_created"):
                    h["created"] = s.value
            hist_points = []
            for h in series.values():
                buckets = sorted(h["buckets"])
                bounds = [le for le, _ in buckets if not math.isinf(le)]
                cumulative_counts = [c for _, c in buckets]
                counts = [
                    int(c - prev) for c, prev in zip(cumulative_counts, [0.0, *cumulative_counts[:-1]], strict=True)
                ]
                hist_points.append(
                    HistogramDataPoint(
                        attributes=h["attributes"],
                        start_time_unix_nano=_ns(h.get("created")) or start_ns,
                        time_unix_nano=now_ns,
                        count=int(h.get("count", sum(counts))),
                        sum=h.get("sum", 0.0),
                        bucket_counts=counts,
                        explicit_bounds=bounds,
                        min=None,
                        max=None,
                    )
                )
            data = Histogram(data_points=hist_points, aggregation_temporality=cumulative)
            out.append(Metric(name=fam.name, description=fam.documentation, unit=unit, data=data))
        else:  # gauges (and anything untyped) are reported as gauges
            points = [
                NumberDataPoint(attributes=dict(s.labels), start_time_unix_nano=0, time_unix_nano=now_ns, value=s.value)
                for s in fam.samples
            ]
            out.append(Metric(name=fam.name, description=fam.documentation, unit=unit, data=Gauge(data_points=points)))
    out = [m for m in out if m.data.data_points]
    resource = Resource.create({"service.name": "scaleq", "service.version": __version__})
    scope = InstrumentationScope("scaleq", __version__)
    return MetricsData(
        resource_metrics=[
            ResourceMetrics(
                resource=resource,
                scope_metrics=[ScopeMetrics(scope=scope, metrics=out, schema_url="")],
                schema_url="",
            )
        ]
    )


def _key(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def _ns(seconds: float | None) -> int:
    return int(seconds * 1e9) if seconds else 0


@dataclass
class ExportStatus:
    """How the pushes have gone: what the ``otlp exporter`` health check judges."""

    url: str  # where the pushes go, in words
    interval: float
    pushed: int = 0
    failed: int = 0
    last_ok_at: float | None = None
    failing_since: float | None = None  # the first failure of the current run of failures; None: the last one worked
    last_error: str = ""


def _why(url: str | None) -> str:
    """Why an export failed, as far as a TCP connect tells (the SDK logs its own error but returns only FAILURE)."""
    if url is None:
        return "the configured endpoint did not take the push"
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=2):
            pass
    except OSError as exc:
        return f"cannot connect to {parts.hostname}:{port}: {exc.strerror or exc}"
    return f"{url} accepts connections but did not take the push (wrong path, TLS or headers?)"


class OtlpPusher:
    """Refresh the app's metrics and push them to an OTLP/HTTP endpoint every ``interval`` seconds."""

    def __init__(
        self,
        metrics: ServerMetrics,
        endpoint: str | None = None,
        *,
        interval: float = DEFAULT_INTERVAL,
        headers: Mapping[str, str] | None = None,
        timeout: float = 10.0,
    ) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        except ImportError as exc:
            raise OtlpUnavailable(INSTALL_HINT) from exc
        if interval <= 0:
            raise ValueError("the OTLP push interval must be positive")
        self.metrics = metrics
        self.interval = interval
        # endpoint None: the exporter reads OTEL_EXPORTER_OTLP_METRICS_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT
        self.url = metrics_url(endpoint) if endpoint else None
        self.exporter = OTLPMetricExporter(endpoint=self.url, headers=dict(headers or {}) or None, timeout=timeout)
        self.start_ns = time.time_ns()
        self.status = ExportStatus(self.url or "the endpoint in OTEL_EXPORTER_OTLP_*", interval)

    async def push_once(self) -> bool:
        """One refresh and export; True if the endpoint took it."""
        from opentelemetry.sdk.metrics.export import MetricExportResult

        await self.metrics.refresh()
        data = to_metrics_data(self.metrics.families(), start_ns=self.start_ns)
        result = await asyncio.to_thread(self.exporter.export, data)
        ok = result == MetricExportResult.SUCCESS
        if ok:
            self.status.pushed += 1
            self.status.last_ok_at, self.status.failing_since = time.time(), None
        else:
            self.failed_with(await asyncio.to_thread(_why, self.url))
        return ok

    def failed_with(self, why: str) -> None:
        s = self.status
        s.failed += 1
        s.last_error = why
        if s.failing_since is None:
            s.failing_since = time.time()
        log.warning("OTLP export to %s failed (%s); next try in %.0f s", s.url, why, self.interval)

    @property
    def pushed(self) -> int:
        return self.status.pushed

    @property
    def failed(self) -> int:
        return self.status.failed

    async def run(self) -> None:
        """Push until cancelled."""
        where = self.url or "the configured endpoint"
        log.info("pushing metrics over OTLP to %s every %.0f s", where, self.interval)
        try:
            while True:
                try:
                    await self.push_once()
                except Exception as exc:  # never let the exporter take the server down
                    log.exception("OTLP export failed")
                    self.failed_with(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(self.interval)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.exporter.shutdown)


def pusher(app: FastAPI, endpoint: str | None = None, **kw: Any) -> OtlpPusher:
    """An :class:`OtlpPusher` for an app built by :func:`scaleq.server.app.create_app`."""
    from scaleq.server.metrics import of

    made = OtlpPusher(of(app), endpoint, **kw)
    app.state.otlp = made.status  # the health checks report it
    return made
