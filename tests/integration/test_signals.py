"""External signals against real endpoints: a Prometheus text endpoint served by prometheus_client, a real Prometheus
server (Debian's, installed by scripts/prometheus.sh) scraping it, and the controller scaling a group of real local
workers on such a signal while the queue server's own queue stays empty."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from scaleq.grid import GridFileError, SignalSpec, load
from scaleq.providers.local import LocalProvider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.scaling.signals import SignalError, read_external
from tests.helpers import LiveServer, controlling, eventually, free_port
from tests.helpers.groups import fast_group
from tests.helpers.prometheus import Endpoint, metrics_endpoint
from tests.helpers.prometheus import prometheus as run_prometheus

# -- a real metrics endpoint ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def endpoint() -> Iterator[Endpoint]:
    with metrics_endpoint() as ep:
        ep.gauge.labels(queue="a").set(5)
        ep.gauge.labels(queue="b").set(2)
        yield ep


def text_signal(url: str, metric: str = "queue_length", **labels: str) -> SignalSpec:
    return SignalSpec(kind="prometheus_text", url=url, metric=metric, labels=labels)


# -- prometheus_text --------------------------------------------------------------------------------------------------


async def test_text_signal_sums_the_series_whose_labels_match(endpoint: Endpoint) -> None:
    a = await read_external(text_signal(endpoint.url, queue="a"))
    assert (a.queued, a.running) == (5, 0)
    both = await read_external(text_signal(endpoint.url))
    assert (both.queued, both.running) == (7, 0)
    assert abs(both.at - time.time()) < 5


async def test_text_signal_without_the_metric_names_the_url_and_the_metric(endpoint: Endpoint) -> None:
    with pytest.raises(SignalError) as missing:
        await read_external(text_signal(endpoint.url, metric="no_such_metric"))
    assert endpoint.url in str(missing.value) and "no_such_metric" in str(missing.value)
    # the metric is there, but no series has these labels: as missing, and the message shows the labels
    with pytest.raises(SignalError) as unmatched:
        await read_external(text_signal(endpoint.url, queue="zzz"))
    assert endpoint.url in str(unmatched.value) and 'queue_length{queue="zzz"}' in str(unmatched.value)


@pytest.mark.parametrize("kind", ["prometheus_text", "promql"])
async def test_an_endpoint_that_is_down_names_the_url(kind: str) -> None:
    url = f"http://127.0.0.1:{free_port()}/metrics"  # nothing listens there
    spec = SignalSpec(kind=kind, url=url, metric="queue_length", query="sum(queue_length)", timeout=2)  # type: ignore[arg-type]
    with pytest.raises(SignalError) as down:
        await read_external(spec)
    assert url in str(down.value) and kind in str(down.value)


async def test_text_signal_from_something_that_is_not_metrics_names_the_url(prometheus: str) -> None:
    # Prometheus' own readiness page is plain text, but not the exposition format
    url = f"{prometheus}/-/ready"
    with pytest.raises(SignalError) as wrong:
        await read_external(text_signal(url))
    assert url in str(wrong.value) and "Prometheus text format" in str(wrong.value)


# -- a real Prometheus server -----------------------------------------------------------------------------------------

PROMETHEUS_CONFIG = """\
global:
  scrape_interval: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: scaleq-signals
    scrape_interval: 1s
    scrape_timeout: 1s
    static_configs:
      - targets: ["{target}"]
"""


@pytest.fixture(scope="module")
def prometheus(endpoint: Endpoint, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus scraping `endpoint` every second; yields its base URL once it has the endpoint's series."""
    target = endpoint.url.removeprefix("http://").removesuffix("/metrics")
    with run_prometheus(PROMETHEUS_CONFIG.format(target=target), tmp_path_factory.mktemp("prometheus")) as prom:

        def scraped() -> bool:  # both series of the endpoint are in (targets appear ~5-7 s after start)
            body = httpx.get(f"{prom.url}/api/v1/query", params={"query": "count(queue_length)"}, timeout=2).json()
            return [float(s["value"][1]) for s in body["data"]["result"]] == [2.0]

        prom.wait("/-/ready", prom.ready, timeout=30)
        prom.wait("queue_length series from the endpoint", scraped, timeout=30)
        yield prom.url


def promql(url: str, query: str) -> SignalSpec:
    return SignalSpec(kind="promql", url=url, query=query)


@pytest.mark.parametrize(
    ("query", "jobs"),
    [
        ("sum(queue_length)", 7),
        ('queue_length{queue="a"}', 5),
        ("queue_length", 7),  # several series: summed
        ("scalar(sum(queue_length))", 7),  # a scalar result
        ("sum(queue_length) / 2", 4),  # 3.5 jobs: rounded up, never down
    ],
)
async def test_promql_signal(prometheus: str, query: str, jobs: int) -> None:
    demand = await read_external(promql(prometheus, query))
    assert (demand.queued, demand.running) == (jobs, 0)


@pytest.mark.parametrize("query", ['queue_length{queue="nobody"}', "sum(queue_length) - sum(queue_length) / 0 * 0"])
async def test_promql_signal_with_no_series_or_nan_is_an_error_not_zero(prometheus: str, query: str) -> None:
    # an empty vector is what a worker whose /metrics fails or a scrape of a closed port leaves: never read as 0
    with pytest.raises(SignalError) as empty:
        await read_external(promql(prometheus, query))
    message = str(empty.value)
    assert query in message and prometheus in message and 'empty = "zero"' in message
    # unless the grid says so explicitly
    zero = SignalSpec(kind="promql", url=prometheus, query=query, empty="zero")
    assert (await read_external(zero)).queued == 0


async def test_text_signal_without_the_series_reads_zero_only_when_the_grid_says_so(endpoint: Endpoint) -> None:
    spec = SignalSpec(kind="prometheus_text", url=endpoint.url, metric="queue_length", labels={"queue": "zzz"})
    with pytest.raises(SignalError):
        await read_external(spec)
    assert (await read_external(spec.model_copy(update={"empty": "zero"}))).queued == 0


async def test_promql_signal_with_a_bad_query_carries_prometheus_error(prometheus: str) -> None:
    query = "sum(queue_length"
    async with httpx.AsyncClient() as http:
        body = (await http.get(f"{prometheus}/api/v1/query", params={"query": query})).json()
    assert body["status"] == "error" and body["error"]
    with pytest.raises(SignalError) as bad:
        await read_external(promql(prometheus, query))
    message = str(bad.value)
    assert body["error"] in message and prometheus in message and query in message


async def test_promql_signal_refuses_an_infinite_demand(prometheus: str) -> None:
    query = "sum(queue_length) / 0"
    with pytest.raises(SignalError) as inf:
        await read_external(promql(prometheus, query))
    assert query in str(inf.value) and "+Inf" in str(inf.value)


async def test_promql_signal_refuses_a_range_vector(prometheus: str) -> None:
    with pytest.raises(SignalError) as matrix:
        await read_external(promql(prometheus, "queue_length[5s]"))
    assert "matrix" in str(matrix.value)


# -- the grid file ----------------------------------------------------------------------------------------------------

GRID = """\
[[groups]]
name = "cpu"
queue = "q"
max_workers = 2

[groups.signal]
{signal}
"""


def test_grid_file_accepts_a_signal_table(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(
        GRID.format(
            signal='kind = "prometheus_text"\nurl = "http://127.0.0.1:9100/metrics"\nmetric = "queue_length"\n'
            'labels = { queue = "a" }'
        )
    )
    (g,) = load(path).groups
    assert g.signal == text_signal("http://127.0.0.1:9100/metrics", queue="a")
    path.write_text(GRID.format(signal='kind = "promql"\nurl = "http://127.0.0.1:9090"\nquery = "sum(queue_length)"'))
    (g,) = load(path).groups
    assert (g.signal.kind, g.signal.query) == ("promql", "sum(queue_length)")


def test_grid_file_refuses_a_promql_signal_without_a_query(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(GRID.format(signal='kind = "promql"\nurl = "http://127.0.0.1:9090"'))
    with pytest.raises(GridFileError) as err:
        load(path)
    message = str(err.value)
    assert str(path) in message and "groups[0].signal" in message and "query" in message


# -- the controller on a Prometheus signal ----------------------------------------------------------------------------


async def test_controller_scales_a_group_on_a_prometheus_text_signal(live: LiveServer, tmp_path: Path) -> None:
    admin = live.client("admin")
    with metrics_endpoint() as ep:
        ep.gauge.labels(queue="a").set(5)
        ep.gauge.labels(queue="b").set(100)  # another queue's series: must not count
        g = fast_group("ext", max_workers=2, signal=text_signal(ep.url, queue="a"))
        provider = LocalProvider(
            grid="t",
            server=live.url,
            token=live.tokens["worker"],
            state_dir=tmp_path / "workers",
            log_dir=tmp_path / "logs",
        )
        observer = RemoteObserver(admin)
        most = 0

        async def running(n: int) -> bool:
            nonlocal most
            count = len([w for w in await provider.workers(g) if w.status == "running"])
            most = max(most, count)
            return count == n

        async def registered_idle(n: int) -> bool:
            return sum(1 for w in await observer.registered(g) if w.state == "active" and w.busy == 0) == n

        try:
            # the queue server has nothing for this group: the demand can only come from the gauge
            own = await observer.demand(g)
            assert (own.queued, own.running) == (0, 0)
            async with controlling(Controller([(g, provider)], observer, tick=0.2)):
                await eventually(lambda: running(2), 10, what="2 workers started for queue_length{queue=a} = 5")
                # (30 s: two Python worker processes starting on a loaded 2-core machine)
                await eventually(lambda: registered_idle(2), 30, what="both workers registered")
                await asyncio.sleep(1.5)  # several ticks at demand 5: still 2, the max
                assert await running(2)
                ep.gauge.labels(queue="a").set(0)
                await eventually(lambda: running(0), 20, what="workers drained after queue_length{queue=a} fell to 0")
            assert most == 2
            events = await admin.events(group="ext", limit=100)
            ups = [e for e in events if e["kind"] == "scale_up"]
            assert len(ups) == 1 and ups[0]["to"] == 2
            assert "5 jobs waiting" in ups[0]["reason"] and "capped at max_workers 2" in ups[0]["reason"], ups[0][
                "reason"
            ]
            downs = [e for e in events if e["kind"] == "scale_down"]
            assert downs and downs[-1]["to"] == 0, downs
            assert not [e for e in events if e["kind"] == "error"]
        finally:
            await provider.destroy(g, grace=5)
            await admin.close()
