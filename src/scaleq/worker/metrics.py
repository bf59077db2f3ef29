"""The worker's own ``/metrics`` (off by default; ``scaleq worker --metrics-port``).

The queue server is the source of truth for queue length (it is there at zero workers); this endpoint exists for
setups built on the original, where a collector scraped every worker: it serves ``queue_length`` as the worker last
saw it, next to the worker's slots, busy slots and finished jobs.

Design: prometheus_client's own threaded HTTP server on a private registry. It runs beside the asyncio agent without
touching its loop (a slow or stuck scraper can never delay a claim or a heartbeat), and it brings content
negotiation, gzip and ``HEAD`` for free. The gauges read the agent's state when scraped (``set_function``); only the
counter of finished jobs and the last seen queue length are pushed by the agent.

No token guards this endpoint, so it never names the queue (a queue name is a capability): ``queue_length`` carries
no labels. Label it in the scrape configuration if you need to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

log = logging.getLogger("scaleq.worker")

#: The reasons a worker counts a job under: the results it reports, and the two ways it lets go of an attempt.
REASONS = ("success", "failed", "timed_out", "cancelled", "abandoned", "handed_back")


class WorkerMetrics:
    def __init__(self, slots: int, busy: Callable[[], int], draining: Callable[[], bool]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("scaleq_worker_slots", "Jobs this worker runs at once", registry=r).set(slots)
        Gauge("scaleq_worker_busy", "Jobs this worker is running now", registry=r).set_function(lambda: busy())
        Gauge("scaleq_worker_draining", "1 while the worker drains (takes no new jobs)", registry=r).set_function(
            lambda: 1.0 if draining() else 0.0
        )
        self._queue_length = Gauge(
            "queue_length",
            "Jobs waiting in this worker's queue, as the worker last read it from the server",
            registry=r,
        )
        self._seen_at = Gauge(
            "scaleq_worker_queue_length_timestamp_seconds",
            "When the worker last read queue_length from the server (Unix time; 0: not yet)",
            registry=r,
        )
        self.jobs = Counter(
            "scaleq_worker_jobs",
            "Jobs this worker ran to an end, by reason (a reported result, abandoned: its lease was lost, "
            "handed_back: given back to the queue when stopped by force)",
            ["reason"],
            registry=r,
        )
        for reason in REASONS:
            self.jobs.labels(reason)
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None

    # -- what the agent reports ---------------------------------------------------------------------------------

    def finished(self, reason: str) -> None:
        self.jobs.labels(reason).inc()

    def saw_queue(self, queued: int, at: float | None = None) -> None:
        self._queue_length.set(queued)
        self._seen_at.set(at if at is not None else time.time())

    async def refresh_queue(self, client: Any, queue: str, timeout: float = 2.0) -> None:
        """Read the queue's length from the server (``GET /api/v1/queues``; any role may). Failures are logged only:
        the metric keeps its last value and its timestamp shows how old it is."""
        try:
            async with asyncio.timeout(timeout):  # (not wait_for, which can lose a cancel: scaleq.loop.wait_set)
                stats = await client.queues()
        except Exception as exc:
            log.debug("metrics: could not read the queue length: %s", exc)
            return
        queued = next((q["queued"] for q in stats if q.get("name") == queue), 0)
        self.saw_queue(int(queued))

    # -- the HTTP endpoint --------------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "0.0.0.0") -> int:
        """Serve ``/metrics`` on ``host:port`` (port 0: any free port) in a thread; return the bound port."""
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.port = int(self._server.server_port)
        log.info("worker metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", self.port)
        return self.port

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(Exception):
                self._server.shutdown()
                self._server.server_close()
            if self._thread is not None:
                self._thread.join(5)
            self._server = self._thread = None
