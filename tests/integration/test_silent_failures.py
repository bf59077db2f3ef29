"""The seed's three silent failure points, injected for real, and named by doctor and by the health API the
dashboard's health view reads:

1. a worker's ``/metrics`` answering 500 (Prometheus scrapes it; the series vanish);
2. Prometheus scraping a closed port (the collector cannot reach its target);
3. the OTLP exporter pushing to a collector that is down.

With the PromQL signal empty, the controller does not size the group to zero: it falls back to the server's own
count and says so in the decision's reason, an event and the group's status."""

from __future__ import annotations

import contextlib
import http.server
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from scaleq.doctor.checks import Check
from scaleq.doctor.remote import run_checks
from scaleq.grid import Grid, Group, SignalSpec
from scaleq.jobs import JobDefinition, RuntimeKind, SubmitRequest
from scaleq.providers.local import LocalProvider
from scaleq.providers.registry import ProviderContext
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.server import otlp
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, serve


@pytest.fixture
async def sqlite_live(sqlite_store: SQLiteStore, settings: ServerSettings) -> AsyncIterator[LiveServer]:
    async with serve(sqlite_store, settings) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"metrics collection failed\n"
        self.send_response(500)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def failing_metrics() -> Iterator[str]:
    """A /metrics endpoint answering 500, as a worker's does when its collection fails; yields host:port."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


CONFIG = """\
global:
  scrape_interval: 1s
scrape_configs:
  - job_name: workers-500
    scrape_timeout: 1s
    static_configs:
      - targets: ["{failing}"]
  - job_name: workers-closed
    scrape_timeout: 1s
    static_configs:
      - targets: ["{closed}"]
"""


@pytest.fixture(scope="module")
def broken_scrapes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """A real Prometheus scraping a /metrics that answers 500 and a closed port; yields (url, failing, closed) once
    it has tried both."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not on PATH: run scripts/prometheus.sh (Debian's prometheus package)")
    with failing_metrics() as failing:
        closed = f"127.0.0.1:{free_port()}"  # nothing listens there
        work = tmp_path_factory.mktemp("prometheus")
        (work / "prometheus.yml").write_text(CONFIG.format(failing=failing, closed=closed))
        port = free_port()
        with open(work / "prometheus.log", "wb") as log:
            proc = subprocess.Popen(
                [
                    binary,
                    f"--config.file={work / 'prometheus.yml'}",
                    f"--storage.tsdb.path={work / 'data'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 45
            while True:  # both targets scraped at least once, and found down
                with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                    active = httpx.get(f"{url}/api/v1/targets", timeout=1).json()["data"]["activeTargets"]
                    if len(active) == 2 and all(t["health"] == "down" and t["lastError"] for t in active):
                        break
                assert proc.poll() is None, (work / "prometheus.log").read_text()[-2000:]
                assert time.monotonic() < deadline, "prometheus did not scrape both targets in 45 s"
                time.sleep(0.25)
            yield url, failing, closed
        finally:
            proc.terminate()
            proc.wait(10)


def group(name: str, queue: str, prometheus: str, job: str) -> Group:
    return Group(
        name=name,
        queue=queue,
        provider="local",
        max_workers=1,
        runtimes=[RuntimeKind.process],
        signal=SignalSpec(kind="promql", url=prometheus, query=f'sum(queue_length{{job="{job}"}})', timeout=2),
    )


def find(checks: list[Check], hop: str, name: str) -> Check:
    found = [c for c in checks if c.hop == hop and c.name == name]
    assert len(found) == 1, (hop, name, [(c.hop, c.name) for c in checks])
    return found[0]


async def test_the_three_silent_failures_are_named_and_the_group_is_not_sized_to_zero(
    sqlite_live: LiveServer, tmp_path: Path, broken_scrapes: tuple[str, str, str]
) -> None:
    prometheus, failing, closed = broken_scrapes
    g500 = group("g500", "q500", prometheus, "workers-500")
    gclosed = group("gclosed", "qclosed", prometheus, "workers-closed")
    provider = LocalProvider(
        grid="t",
        server=sqlite_live.url,
        token=sqlite_live.tokens["worker"],
        state_dir=tmp_path / "workers",
        log_dir=tmp_path / "logs",
    )
    pusher = otlp.pusher(sqlite_live.app, f"http://127.0.0.1:{free_port()}", timeout=1)  # type: ignore[arg-type]
    async with sqlite_live.client("admin") as admin:
        try:
            for queue in ("q500", "qclosed"):
                for i in range(2):  # two jobs each, for groups of at most one worker
                    definition = JobDefinition(command=["sh", "-c", f"sleep 30; echo {i}"])
                    await admin.submit(SubmitRequest(queue=queue, definition=definition))
            assert not await pusher.push_once()  # 3. the exporter's push to a dead collector

            controller = Controller([(g500, provider), (gclosed, provider)], RemoteObserver(admin))
            await controller.step()
            for loop in controller.loops:
                # the signal's empty vector is not read as 0: the server's count (2 queued) sizes the group
                assert loop.last is not None and loop.last.desired == 1 and loop.last.start == 1, loop.last

            for g in (g500, gclosed):
                events = await admin.events(group=g.name)
                (fallback,) = [e for e in events if e["kind"] == "fallback"]
                assert "no series" in fallback["reason"] and "server's own count" in fallback["reason"]
                (up,) = [e for e in events if e["kind"] == "scale_up"]
                # the server counts the queue only as far as the group can run (1 worker): "≥1 job waiting"
                assert "sized on the server's own count" in up["reason"] and "≥1 job waiting" in up["reason"]
                assert "capped at max_workers 1" in up["reason"], up["reason"]
            statuses = {s["name"]: s for s in await admin.groups()}
            for g in (g500, gclosed):
                note = statuses[g.name]["note"]
                assert "capped at max_workers 1 (more wanted)" in note and "server's own count" in note, note

            # the health API the dashboard's health view reads, and doctor, name each failure with a fix
            served = (await admin.request("GET", "/health/checks")).json()
            health = [Check.from_dict(c) for c in served]
            checks = await run_checks(
                admin,
                Grid(name="t", groups=[g500, gclosed]),
                ProviderContext("t", sqlite_live.url, sqlite_live.tokens["worker"], tmp_path),
            )
            for seen in (health, checks):
                signal = find(seen, "group g500", "signal")
                assert not signal.ok and "no series" in signal.detail and signal.fix
                targets = find(seen, "group g500", "scrape targets")
                assert not targets.ok and failing in targets.detail and "500" in targets.detail, targets
                assert "--metrics-port" in targets.fix
                targets = find(seen, "group gclosed", "scrape targets")
                assert not targets.ok and closed in targets.detail and "connection refused" in targets.detail
                exporter = find(seen, "server", "otlp exporter")
                assert not exporter.ok and "cannot connect" in exporter.detail and "--otlp-endpoint" in exporter.fix
            assert "sizes the group on the server's own count" in find(health, "group g500", "signal").detail
        finally:
            for g in (g500, gclosed):
                await provider.destroy(g, grace=5)


async def test_a_signal_that_disagrees_with_the_server_is_named(sqlite_live: LiveServer, tmp_path: Path) -> None:
    # a signal that reads 5 while the server has nothing for the group: counting another queue, a stale gauge
    spec = SignalSpec(kind="prometheus_text", url=f"{sqlite_live.url}/metrics", metric="queue_length")
    g = Group(name="odd", queue="empty", max_workers=1, runtimes=[RuntimeKind.process], signal=spec)
    async with sqlite_live.client("admin") as admin:
        await admin.submit(SubmitRequest(queue="other", definition=JobDefinition(command=["true"])))
        spec = spec.model_copy(update={"bearer_token": sqlite_live.tokens["read"]})
        g = g.model_copy(update={"signal": spec})
        checks = await run_checks(admin, Grid(name="t", groups=[g]), None)
        agrees = find(checks, "group odd", "signal agrees")
        assert not agrees.ok and "reads 1" in agrees.detail and "the server counts 0 queued" in agrees.detail
        assert "another queue" in agrees.fix
