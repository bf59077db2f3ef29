"""Metrics: the server's `/metrics` (a token of any role), its values after real submits, claims and finishes, `promtool
check metrics` on the real output, a real Prometheus (Debian's, installed by scripts/prometheus.sh) scraping the
server with a bearer token and a worker's own `/metrics`, and the OTLP push received by a real OTLP receiver
(`rotel-agent`, from the `rotel` package)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.parser import text_string_to_metric_families

from scaleq.jobs import Job, JobDefinition, SubmitRequest
from scaleq.server import otlp
from scaleq.server.metrics import ServerMetrics
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from scaleq.worker.agent import WorkerAgent
from tests.helpers import LONG_LEASES, LiveServer, eventually, free_port, serve, wait_for, workers
from tests.helpers.processes import background
from tests.helpers.prometheus import prometheus

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# -- helpers ----------------------------------------------------------------------------------------------------------


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(url: str, token: str | None = None, accept: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if accept:
        headers["Accept"] = accept
    async with httpx.AsyncClient(timeout=10) as http:
        return await http.get(url, headers=headers)


async def server_metrics(live: LiveServer) -> Samples:
    r = await scrape(f"{live.url}/metrics", live.tokens["read"])
    assert r.status_code == 200, r.text
    return parse(r.text)


def promtool_check(text: str) -> None:
    """`promtool check metrics` must accept the exposition: no errors, no lint warnings."""
    binary = shutil.which("promtool")
    if binary is None:
        pytest.fail("promtool is not on PATH: run scripts/prometheus.sh (Debian's prometheus package ships it)")
    done = subprocess.run([binary, "check", "metrics"], input=text.encode(), capture_output=True, timeout=30)
    report = (done.stdout + done.stderr).decode()
    assert done.returncode == 0 and not report.strip(), f"promtool check metrics:\n{report}\n--- exposition:\n{text}"


async def submit(live: LiveServer, queue: str, *cmd: str) -> Job:
    async with live.client("submit") as c:
        job, _ = await c.submit(SubmitRequest(queue=queue, definition=JobDefinition(command=list(cmd))))
        return job


def worker_agent(live: LiveServer, queue: str, slots: int, wid: str) -> WorkerAgent:
    return workers.agent(live, wid, slots, queue=queue, metrics_port=0, metrics_host="127.0.0.1")


@contextlib.asynccontextmanager
async def running(agent: WorkerAgent) -> AsyncIterator[str]:
    """Run the agent; yield its metrics URL once it serves."""
    async with workers.running(agent, stop_within=15) as task:

        async def serving() -> bool:
            if task.done():
                task.result()  # raise what stopped it
            return agent.metrics is not None and agent.metrics.port is not None

        await eventually(serving, 10, what="the worker serves /metrics", every=0.02)
        assert agent.metrics is not None
        yield f"http://127.0.0.1:{agent.metrics.port}/metrics"


# -- the server's /metrics --------------------------------------------------------------------------------------------


async def test_metrics_need_a_token_and_every_role_may_read_them(live: LiveServer) -> None:
    url = f"{live.url}/metrics"
    assert (await scrape(url)).status_code == 401
    assert (await scrape(url, "sq_nope_not-a-token")).status_code == 401
    for role in ("read", "submit", "admin", "worker"):
        r = await scrape(url, live.tokens[role])
        assert r.status_code == 200, (role, r.text)
        assert r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.headers["content-type"]
        assert value(parse(r.text), "scaleq_store_up") == 1.0
    # OpenMetrics when asked for (Prometheus asks for it first)
    om = await scrape(url, live.tokens["read"], accept="application/openmetrics-text; version=1.0.0")
    assert om.status_code == 200
    assert om.headers["content-type"].startswith("application/openmetrics-text"), om.headers["content-type"]
    assert om.text.endswith("# EOF\n")


@pytest.mark.parametrize("settings", [LONG_LEASES])  # it finishes its claims without a heartbeat
async def test_values_follow_submits_claims_and_finishes(live: LiveServer) -> None:
    for n in range(3):
        await submit(live, "qa", "echo", str(n))
    await submit(live, "qb", "echo", "b")
    first = await server_metrics(live)  # also the first scrape, from which scaling events are counted
    assert value(first, "queue_length", queue="qa") == 3
    assert value(first, "queue_length", queue="qb") == 1
    assert value(first, "scaleq_jobs", queue="qa", state="queued") == 3
    assert value(first, "scaleq_jobs", queue="qa", state="running") == 0
    assert value(first, "scaleq_queue_oldest_age_seconds", queue="qa") >= 0  # type: ignore[operator]
    assert value(first, "scaleq_store_up") == 1 and value(first, "scaleq_store_ping_seconds") is not None

    async with live.client("worker") as w, live.client("admin") as admin:
        await w.register({"id": "w1", "queue": "qa", "slots": 4, "runtimes": ["process"], "cpus": 4})
        claims, _, _ = await w.claim("w1", 2, wait=0)
        assert len(claims) == 2
        claimed = await server_metrics(live)
        assert value(claimed, "queue_length", queue="qa") == 1
        assert value(claimed, "scaleq_jobs", queue="qa", state="running") == 2
        assert value(claimed, "scaleq_workers", queue="qa", state="active") == 1
        assert value(claimed, "scaleq_slots", queue="qa", state="busy") == 2
        assert value(claimed, "scaleq_slots", queue="qa", state="idle") == 2
        assert value(claimed, "scaleq_claim_wait_seconds_count", queue="qa") == 2
        waited = value(claimed, "scaleq_claim_wait_seconds_sum", queue="qa")
        assert waited is not None and 0 <= waited < 30
        assert value(claimed, "scaleq_claim_wait_seconds_bucket", queue="qa", le="+Inf") == 2

        await asyncio.sleep(0.3)
        ok = {"lease": claims[0].lease, "reason": "success", "exit_code": 0}
        await w.finish(ok)
        await w.finish(ok)  # a repeated finish is answered, but not counted twice
        # a finish riding along with a claim is counted too
        await w.claim("w1", 0, wait=0, finishes=[{"lease": claims[1].lease, "reason": "failed", "exit_code": 1}])
        done = await server_metrics(live)
        assert value(done, "scaleq_run_seconds_count", queue="qa", reason="success") == 1
        assert value(done, "scaleq_run_seconds_count", queue="qa", reason="failed") == 1
        ran = value(done, "scaleq_run_seconds_sum", queue="qa", reason="success")
        assert ran is not None and 0.3 <= ran < 30
        assert value(done, "scaleq_jobs", queue="qa", state="finished") == 2
        assert value(done, "scaleq_jobs_finished", queue="qa", result="success") == 1
        assert value(done, "scaleq_jobs_finished", queue="qa", result="unsuccessful") == 1
        rounds = value(done, "scaleq_housekeeping_seconds_count")  # the server's timer ran its first rounds
        assert rounds is not None and rounds >= 1
        settings = live.app.state.settings  # type: ignore[attr-defined]
        assert value(done, "scaleq_heartbeat_interval_seconds") == settings.heartbeat_seconds
        assert value(done, "scaleq_lease_term_seconds") == settings.lease_seconds
        assert value(done, "scaleq_slots", queue="qa", state="busy") == 0
        assert value(done, "scaleq_slots", queue="qa", state="idle") == 4
        assert value(done, "scaleq_http_requests_total", route="/api/v1/workers/{worker_id}/claim", status="200") == 2
        assert value(done, "scaleq_http_requests_total", route="/api/v1/leases/finish", status="200") == 2

        # groups and scaling events, as a controller (embedded or remote) records them
        group = {"name": "g1", "queue": "qa", "provider": "local", "min": 0, "max": 5, "current": 1, "desired": 2}
        await admin.put_group(group)
        for kind in ("scale_up", "scale_up", "error"):
            await admin.record_event({"group": "g1", "kind": kind, "from": 1, "to": 2, "reason": "test"})
        await admin.drain_worker("w1")
        scaled = await server_metrics(live)
        assert value(scaled, "scaleq_group_info", group="g1", queue="qa", provider="local") == 1
        for kind, n in {"current": 1, "desired": 2, "min": 0, "max": 5}.items():
            assert value(scaled, "scaleq_group_workers", group="g1", kind=kind) == n, kind
        assert abs(value(scaled, "scaleq_group_updated_timestamp_seconds", group="g1") - time.time()) < 60  # type: ignore[operator]
        assert value(scaled, "scaleq_scaling_events_total", group="g1", kind="scale_up") == 2
        assert value(scaled, "scaleq_scaling_events_total", group="g1", kind="error") == 1
        assert value(scaled, "scaleq_scaling_events_total", group="g1", kind="scale_down") == 0  # known, at 0
        assert value(scaled, "scaleq_workers", queue="qa", state="draining") == 1
        assert value(scaled, "scaleq_slots", queue="qa", state="idle") == 0  # a draining worker takes nothing
        # a later scrape adds only what happened since
        await admin.record_event({"group": "g1", "kind": "scale_down", "from": 2, "to": 1, "reason": "test"})
        later = await server_metrics(live)
        assert value(later, "scaleq_scaling_events_total", group="g1", kind="scale_up") == 2
        assert value(later, "scaleq_scaling_events_total", group="g1", kind="scale_down") == 1

    r = await scrape(f"{live.url}/metrics", live.tokens["read"])
    promtool_check(r.text)


class _DownStore:
    """A store whose database is away: every call fails."""

    def __getattr__(self, name: str) -> Callable[..., Awaitable[None]]:
        async def fail(*_: object, **__: object) -> None:
            raise ConnectionError("connection refused")

        return fail


async def test_a_store_that_does_not_answer_is_reported_not_raised() -> None:
    metrics = ServerMetrics(_DownStore())  # type: ignore[arg-type]
    body, content_type = await metrics.render()
    text = body.decode()
    samples = parse(text)
    assert value(samples, "scaleq_store_up") == 0
    assert not [k for k in samples if k[0] in ("queue_length", "scaleq_jobs", "scaleq_group_workers")]
    promtool_check(text)


# -- a real Prometheus ------------------------------------------------------------------------------------------------

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: scaleq-server
    scrape_interval: 1s
    scrape_timeout: 1s
    metrics_path: /metrics
    authorization:
      credentials: "{token}"
    static_configs:
      - targets: ["{server}"]
  - job_name: scaleq-worker
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["{worker}"]
"""


async def test_a_real_prometheus_scrapes_the_server_with_a_read_token_and_a_worker(
    sqlite_store: SQLiteStore, settings: ServerSettings, tmp_path: Path
) -> None:
    async with serve(sqlite_store, settings) as live:
        for n in range(2):
            await submit(live, "prom", "echo", str(n))  # no worker takes queue "prom"
        agent = worker_agent(live, "wq", slots=3, wid="wp")
        async with running(agent) as worker_url:
            config = PROMETHEUS_CONFIG.format(
                token=live.tokens["read"],
                server=live.url.removeprefix("http://"),
                worker=worker_url.removeprefix("http://").removesuffix("/metrics"),
            )
            with prometheus(config, tmp_path) as prom:
                async with httpx.AsyncClient(base_url=prom.url, timeout=5) as http:

                    async def query(q: str) -> list[float] | None:
                        prom.check_alive()
                        # Until its TSDB is ready Prometheus answers 503 with a plain-text body.
                        with contextlib.suppress(httpx.HTTPError, ValueError):
                            body = (await http.get("/api/v1/query", params={"query": q})).json()
                            if body.get("status") == "success":
                                return [float(s["value"][1]) for s in body["data"]["result"]]
                        return None

                    async def equals(q: str, expected: list[float]) -> bool:
                        return await query(q) == expected

                    server_series = 'queue_length{job="scaleq-server",queue="prom"}'
                    try:
                        await eventually(
                            lambda: equals(server_series, [2.0]), 30, what=f"{server_series} == 2", every=0.25
                        )
                        await eventually(
                            lambda: equals('scaleq_worker_slots{job="scaleq-worker"}', [3.0]),
                            15,
                            what="worker slots",
                            every=0.25,
                        )
                        # the plain query the original autoscaling used sees the new value within a scrape or two
                        await submit(live, "prom", "echo", "third")
                        await eventually(
                            lambda: equals(server_series, [3.0]), 15, what=f"{server_series} == 3", every=0.25
                        )
                    except AssertionError:
                        targets = (await http.get("/api/v1/targets")).json()
                        raise AssertionError(f"targets: {targets}\nlog:\n{prom.log_tail()}") from None
                    health = (await http.get("/api/v1/targets")).json()["data"]["activeTargets"]
                    assert {t["labels"]["job"]: t["health"] for t in health} == {
                        "scaleq-server": "up",
                        "scaleq-worker": "up",
                    }, health


# -- the worker's /metrics --------------------------------------------------------------------------------------------


async def test_worker_metrics_serve_slots_busy_queue_length_and_jobs(
    sqlite_store: SQLiteStore, settings: ServerSettings, tmp_path: Path
) -> None:
    async with serve(sqlite_store, settings) as live:
        agent = worker_agent(live, "q", slots=1, wid="wm")
        async with running(agent) as url:

            async def worker() -> Samples:
                r = await scrape(url)
                assert r.status_code == 200
                return parse(r.text)

            idle = await worker()
            assert value(idle, "scaleq_worker_slots") == 1
            assert value(idle, "scaleq_worker_busy") == 0
            assert value(idle, "scaleq_worker_draining") == 0
            assert value(idle, "scaleq_worker_jobs_total", reason="success") == 0

            # one slot: the first job runs until the test opens its gate, the second waits in the queue
            gate = tmp_path / "gate"
            await submit(live, "q", "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done")
            await submit(live, "q", "true")

            async def busy_with_one_waiting() -> Samples | None:
                s = await worker()
                return s if value(s, "scaleq_worker_busy") == 1 and value(s, "queue_length") == 1 else None

            seen = await eventually(busy_with_one_waiting, 10, what="busy 1 and queue_length 1 (read on a heartbeat)")
            assert abs(value(seen, "scaleq_worker_queue_length_timestamp_seconds") - time.time()) < 30  # type: ignore[operator]
            promtool_check((await scrape(url)).text)
            gate.touch()

            async def both_done() -> bool:
                s = await worker()
                return value(s, "scaleq_worker_jobs_total", reason="success") == 2 and value(s, "queue_length") == 0

            await eventually(both_done, 15, what="2 jobs counted and queue_length back to 0")
            assert value(await worker(), "scaleq_worker_busy") == 0
        # the endpoint goes away with the worker
        with pytest.raises(httpx.TransportError):
            await scrape(url)


async def test_worker_cli_serves_metrics_on_the_port_it_logs(
    sqlite_store: SQLiteStore, settings: ServerSettings
) -> None:
    async with serve(sqlite_store, settings) as live:
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "scaleq", "worker", "--queue", "q", "--runtime", "process", "--slots", "2"),
            *("--metrics-port", "0", "--metrics-host", "127.0.0.1", "--server", live.url, "--token"),
            live.tokens["worker"],
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert proc.stderr is not None
        lines: list[str] = []
        try:
            port = None
            async with asyncio.timeout(20):
                while port is None:
                    line = (await proc.stderr.readline()).decode()
                    assert line, f"worker exited before serving metrics:\n{''.join(lines)}"
                    lines.append(line)
                    if m := re.search(r"worker metrics on http://127\.0\.0\.1:(\d+)/metrics", line):
                        port = int(m.group(1))
            r = await scrape(f"http://127.0.0.1:{port}/metrics")
            assert r.status_code == 200
            assert value(parse(r.text), "scaleq_worker_slots") == 2
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
            rest = await asyncio.wait_for(proc.stderr.read(), 20)
            code = await asyncio.wait_for(proc.wait(), 20)
        assert code == 0, "".join(lines) + rest.decode()


# -- OTLP -------------------------------------------------------------------------------------------------------------


def test_otlp_endpoint_gets_the_metrics_path_only_when_it_has_none() -> None:
    assert otlp.metrics_url("127.0.0.1:4318") == "http://127.0.0.1:4318/v1/metrics"
    assert otlp.metrics_url("http://collector:4318/") == "http://collector:4318/v1/metrics"
    assert otlp.metrics_url("https://otel.example/custom/metrics") == "https://otel.example/custom/metrics"
    with pytest.raises(ValueError):
        otlp.metrics_url("http://")


def test_prometheus_families_become_otlp_metrics_faithfully() -> None:
    registry = CollectorRegistry()
    h = Histogram("h_seconds", "a histogram", ["queue"], buckets=(1, 5), registry=registry)
    for v in (0.5, 0.7, 3, 9):
        h.labels("a").observe(v)
    c = Counter("c", "a counter", ["kind"], registry=registry)
    c.labels("x").inc(4)
    data = otlp.to_metrics_data(registry.collect(), start_ns=1)
    (scope,) = data.resource_metrics[0].scope_metrics
    by_name = {m.name: m for m in scope.metrics}
    (hp,) = by_name["h_seconds"].data.data_points
    assert dict(hp.attributes) == {"queue": "a"}
    assert (list(hp.explicit_bounds), list(hp.bucket_counts), hp.count, hp.sum) == ([1.0, 5.0], [2, 1, 1], 4, 13.2)
    assert hp.start_time_unix_nano > 1  # from the histogram's _created
    assert by_name["h_seconds"].unit == "s"
    counter = by_name["c_total"].data
    assert counter.is_monotonic and [p.value for p in counter.data_points] == [4.0]


def rotel_agent() -> Path:
    try:
        import rotel
    except ImportError:
        pytest.fail("the rotel package (an OTLP receiver, rotel-agent) is missing: pip install --pre rotel (dev extra)")
    binary = Path(rotel.__file__).parent / "rotel-agent"
    if not binary.exists():
        pytest.fail(f"rotel-agent not found at {binary}")
    return binary


@contextlib.contextmanager
def otlp_receiver(work: Path) -> Iterator[tuple[str, Path, subprocess.Popen[bytes]]]:
    """rotel-agent receiving OTLP/HTTP and logging every metric it gets; yields (endpoint, its log, process)."""
    binary = rotel_agent()
    http_port, grpc_port = free_port(), free_port()
    log = work / "rotel.log"
    argv = [
        str(binary),
        "start",
        f"--otlp-http-endpoint=127.0.0.1:{http_port}",
        f"--otlp-grpc-endpoint=127.0.0.1:{grpc_port}",
        "--exporter=blackhole",
        "--debug-log=metrics",
        "--debug-log-verbosity=detailed",
        f"--pid-file={work / 'rotel.pid'}",
        f"--log-file={work / 'rotel-agent.log'}",
    ]
    with background(argv, log) as proc:

        def listening() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"rotel-agent exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", http_port), timeout=1):
                return True
            return False

        wait_for(listening, 15, 0.1, f"rotel-agent to listen on {http_port} (log: {log})")
        yield f"http://127.0.0.1:{http_port}", log, proc


def received(log: Path, metric: str) -> list[str]:
    """The data-point blocks rotel logged for a metric (its detailed debug log: one `Metric #n` block per metric)."""
    points: list[str] = []
    for block in re.split(r"^Metric #\d+\n", log.read_text(), flags=re.M)[1:]:
        if re.search(rf"-> Name: {re.escape(metric)}\n", block):
            points += re.split(r"^\w+DataPoints #\d+\n", block, flags=re.M)[1:]
    return points


@pytest.mark.parametrize("settings", [LONG_LEASES])  # the claimed job must stay claimed: its queue length is 1
async def test_otlp_push_reaches_a_real_receiver(
    sqlite_store: SQLiteStore, settings: ServerSettings, tmp_path: Path
) -> None:
    with otlp_receiver(tmp_path) as (endpoint, log, _):
        async with serve(sqlite_store, settings) as live:
            for n in range(2):
                await submit(live, "otq", "echo", str(n))
            async with live.client("worker") as w:  # one claim, so the histogram has a data point
                await w.register({"id": "wo", "queue": "otq", "slots": 1, "runtimes": ["process"], "cpus": 1})
                assert len((await w.claim("wo", 1, wait=0))[0]) == 1
            pusher = otlp.pusher(live.app, endpoint, interval=0.2)  # type: ignore[arg-type]
            assert await pusher.push_once()

            def queue_length_arrived() -> bool:
                return any(
                    "-> queue: Str(otq)" in p and re.search(r"^Value: 1$", p, re.M)
                    for p in received(log, "queue_length")
                )

            async def check() -> bool:
                return queue_length_arrived()

            await eventually(check, 10, what=f"queue_length{{queue=otq}} = 1 in rotel's log {log}")
            (hist,) = [p for p in received(log, "scaleq_claim_wait_seconds") if "Str(otq)" in p]
            assert re.search(r"^Count: 1$", hist, re.M), hist
            assert received(log, "scaleq_http_requests_total"), "the request counter (a Sum) arrived"
            assert "DataType: Sum" in log.read_text() and "DataType: Histogram" in log.read_text()

            # run() keeps pushing until cancelled
            task = asyncio.create_task(pusher.run())
            try:
                await eventually(lambda: asyncio.sleep(0, pusher.pushed >= 3), 10, what="3 pushes")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            assert pusher.failed == 0


async def test_otlp_push_to_a_receiver_that_is_down_fails_softly(
    sqlite_store: SQLiteStore, settings: ServerSettings
) -> None:
    async with serve(sqlite_store, settings) as live:
        pusher = otlp.pusher(live.app, f"http://127.0.0.1:{free_port()}", timeout=1)  # type: ignore[arg-type]
        assert not await pusher.push_once()
        assert pusher.failed == 1
