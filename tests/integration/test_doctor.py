"""``scaleq doctor`` against a live server with each fault injected: a wrong token, a server that is down, a worker
whose heartbeats stopped, a lease that stopped renewing, a signal endpoint that is down, a provider it cannot reach,
a group without a controller, a clock out of step — and doctor names each one, with a fix. The CLI's exit codes and
JSON, and the health routes the dashboard reads, too."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from scaleq.cli import app
from scaleq.client import Client
from scaleq.doctor.checks import Check, all_ok
from scaleq.doctor.remote import run_checks
from scaleq.grid import Grid, Group, SignalSpec
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.providers.registry import ProviderContext
from scaleq.server.checks import server_side_checks
from scaleq.server.settings import ServerSettings
from scaleq.store.base import GroupStatus
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, eventually, free_port
from tests.helpers.groups import fast_group
from tests.helpers.prometheus import metrics_endpoint
from tests.helpers.prometheus import prometheus as run_prometheus

runner = CliRunner()


# sqlite_live (tests/conftest.py): for checks where the store's dialect does not matter (signals, providers, the CLI)


def group(name: str = "cpu", **kw: object) -> Group:
    return fast_group(name, **{"max_workers": 2, **kw})


def ctx(live: LiveServer, tmp_path: Path) -> ProviderContext:
    return ProviderContext("t", live.url, live.tokens["worker"], tmp_path)


def find(checks: list[Check], hop: str, name: str) -> Check:
    found = [c for c in checks if c.hop == hop and c.name == name]
    assert len(found) == 1, (hop, name, [(c.hop, c.name) for c in checks])
    return found[0]


def failed(checks: list[Check]) -> list[tuple[str, str]]:
    return [(c.hop, c.name) for c in checks if not c.ok]


async def fresh_status(client: Client, g: Group) -> None:
    """What a running controller writes each step."""
    await client.put_group(
        {
            "name": g.name,
            "queue": g.queue,
            "provider": g.provider,
            "min": 0,
            "max": g.max_workers,
            "current": 0,
            "desired": 0,
        }
    )


async def register(client: Client, worker_id: str, queue: str = "q", group_name: str | None = "cpu") -> None:
    await client.register(
        {"id": worker_id, "queue": queue, "group": group_name, "slots": 1, "runtimes": ["process"], "cpus": 1}
    )


# -- all well -----------------------------------------------------------------------------------------------------


async def test_a_healthy_grid_passes_every_check(live: LiveServer, tmp_path: Path) -> None:
    g = group()
    async with live.client("admin") as admin, live.client("worker") as worker:
        await fresh_status(admin, g)
        await register(worker, "w-ok")
        checks = await run_checks(admin, Grid(name="t", groups=[g]), ctx(live, tmp_path))
    assert all_ok(checks), [c for c in checks if not c.ok]
    names = {(c.hop, c.name) for c in checks}
    assert {
        ("server", "reachable"),
        ("server", "version"),
        ("server", "token"),
        ("server", "clock"),
        ("store", "writable"),
        ("server", "lease sweeper"),
        ("server", "host limits"),
        ("group cpu", "signal"),
        ("group cpu", "provider"),
        ("group cpu", "workers heartbeating"),
        ("group cpu", "leases renewing"),
        ("group cpu", "controller"),
    } <= names
    assert "role admin" in find(checks, "server", "token").detail
    assert "1 worker" in find(checks, "group cpu", "workers heartbeating").detail
    # the store check leaves nothing behind
    async with live.client("read") as reader:
        assert [x["name"] for x in await reader.groups()] == ["cpu"]


# -- the server and the token -------------------------------------------------------------------------------------


async def test_a_wrong_token_is_named_with_a_fix(sqlite_live: LiveServer) -> None:
    async with Client(sqlite_live.url, "sq_0000_not-a-token") as client:
        checks = await run_checks(client)
    token = find(checks, "server", "token")
    assert not token.ok and "401" in token.detail and "unknown or revoked token" in token.detail
    assert "--token" in token.fix and "SCALEQ_TOKEN" in token.fix
    assert find(checks, "server", "reachable").ok
    store = find(checks, "store", "writable")
    assert not store.checked and "token refused" in store.detail


async def test_a_server_that_is_down_is_named_and_the_rest_still_runs(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    grid = Grid(name="t", groups=[group()])
    async with Client(url, "sq_whatever") as client:
        checks = await run_checks(client, grid, ProviderContext("t", url, "", tmp_path))
    first = checks[0]
    assert (first.hop, first.name, first.ok) == ("server", "reachable", False)
    assert url in first.detail and "scaleq up" in first.fix
    for hop, name in [("server", "token"), ("server", "clock"), ("store", "writable"), ("group cpu", "signal")]:
        c = find(checks, hop, name)
        assert not c.checked and c.detail == "not checked: server unreachable"
    # the provider does not need the server: still checked
    assert find(checks, "group cpu", "provider").ok


async def test_the_clock_check_allows_for_the_round_trip_and_flags_skew(sqlite_live: LiveServer) -> None:
    async with sqlite_live.client("read") as client:
        behind = await run_checks(client, clock=lambda: time.time() - 10)  # this machine 10 s behind the server
    clock = find(behind, "server", "clock")
    assert not clock.ok and "ahead of" in clock.detail and "round trip" in clock.detail
    assert "chrony" in clock.fix


# -- workers and leases -------------------------------------------------------------------------------------------


# 2 s beats: the beating worker would have to stall 3 s to look silent (at 2 s leases, 0.67 s beats, 1 s did)
@pytest.mark.parametrize("settings", [ServerSettings(lease_seconds=6.0, sweep_interval=0.2, long_poll_max=5.0)])
async def test_a_worker_whose_heartbeats_stopped_is_named(live: LiveServer, settings: ServerSettings) -> None:
    async with live.client("admin") as admin, live.client("worker") as worker:
        await register(worker, "w-silent")
        await register(worker, "w-alive")

        async def beat() -> None:
            while True:
                await worker.heartbeat("w-alive")
                await asyncio.sleep(settings.heartbeat_seconds / 2)

        beating = asyncio.create_task(beat())
        try:
            await asyncio.sleep(2.2 * settings.heartbeat_seconds)
            checks = await run_checks(admin)
        finally:
            beating.cancel()
    beats = find(checks, "group cpu", "workers heartbeating")
    assert not beats.ok
    assert "w-silent" in beats.detail and "w-alive" not in beats.detail and "1 of 2" in beats.detail
    assert "can reach the server" in beats.fix


async def test_a_lease_that_stopped_renewing_is_named(live: LiveServer, settings: ServerSettings) -> None:
    async with live.client("admin") as admin, live.client("worker") as worker:
        job, _ = await admin.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
        await register(worker, "w-lost", group_name=None)
        (claim,) = (await worker.claim("w-lost", 1, wait=0))[0]
        assert claim.job.id == job.id
        # in the window: the worker has not renewed for a while, the lease is about to go
        claimed_at = claim.job.started_at or time.time()
        soon = await server_side_checks(live.store, settings, claimed_at + 0.8 * settings.lease_seconds)
        leases = find(soon, "queue q", "leases renewing")
        assert not leases.ok and job.id[:12] in leases.detail and "w-lost" in leases.detail
        assert "not renewed" in leases.detail and "expires in" in leases.detail
        # long past its expiry and still running: the sweeper would be the problem
        late = await server_side_checks(live.store, settings, claimed_at + settings.lease_seconds + 5)
        sweeper = find(late, "server", "lease sweeper")
        assert not sweeper.ok and job.id[:12] in sweeper.detail and "sweeper" in sweeper.fix
        # the sweeper puts the job back in the queue; doctor reports the lost lease from the attempt history
        await eventually(lambda: _state(admin, job.id, "queued"), what="lease expiry")
        checks = await run_checks(admin)
    leases = find(checks, "queue q", "leases renewing")
    assert not leases.ok
    assert f"job {job.id[:12]} lost its lease on worker w-lost" in leases.detail and "requeued" in leases.detail
    assert "stopped renewing" in leases.fix
    assert find(checks, "server", "lease sweeper").ok


async def _state(client: Client, job_id: str, state: str) -> bool:
    return (await client.get_job(job_id)).state == state


# -- groups: signals, Prometheus, providers, controllers ----------------------------------------------------------


async def test_a_signal_endpoint_that_is_down_is_named(sqlite_live: LiveServer, tmp_path: Path) -> None:
    text_url = f"http://127.0.0.1:{free_port()}/metrics"
    prom_url = f"http://127.0.0.1:{free_port()}"
    text = group("text", signal=SignalSpec(kind="prometheus_text", url=text_url, metric="queue_length", timeout=2))
    prom = group("prom", signal=SignalSpec(kind="promql", url=prom_url, query="sum(queue_length)", timeout=2))
    async with sqlite_live.client("admin") as admin:
        for g in (text, prom):
            await fresh_status(admin, g)
        checks = await run_checks(admin, Grid(name="t", groups=[text, prom]), ctx(sqlite_live, tmp_path))
    signal = find(checks, "group text", "signal")
    assert not signal.ok and text_url in signal.detail and "groups[0].signal" in signal.fix
    assert not find(checks, "group prom", "signal").ok
    prometheus = find(checks, "group prom", "prometheus")
    assert not prometheus.ok and prom_url in prometheus.detail and "start Prometheus" in prometheus.fix
    assert [c for c in checks if c.name == "prometheus"] == [prometheus]  # only promql signals use Prometheus
    # a Prometheus that does not answer cannot say how its scrape targets are doing either
    targets = find(checks, "group prom", "scrape targets")
    assert not targets.ok and f"{prom_url}/api/v1/targets" in targets.detail
    assert set(failed(checks)) == {
        ("group text", "signal"),
        ("group prom", "signal"),
        ("group prom", "prometheus"),
        ("group prom", "scrape targets"),
    }


async def test_a_promql_url_that_is_not_prometheus_is_named(sqlite_live: LiveServer, tmp_path: Path) -> None:
    g = group("prom", signal=SignalSpec(kind="promql", url=sqlite_live.url, query="vector(1)", timeout=2))
    async with sqlite_live.client("admin") as admin:
        await fresh_status(admin, g)
        checks = await run_checks(admin, Grid(name="t", groups=[g]), ctx(sqlite_live, tmp_path))
    prometheus = find(checks, "group prom", "prometheus")
    assert not prometheus.ok and "not a Prometheus server" in prometheus.detail and "base URL" in prometheus.fix
    assert sqlite_live.url in find(checks, "group prom", "signal").detail


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real Prometheus (Debian's, from scripts/prometheus.sh) with nothing to scrape: PromQL still answers."""
    with run_prometheus("global:\n  scrape_interval: 15s\n", tmp_path_factory.mktemp("prometheus")) as prom:
        prom.wait("/-/ready", prom.ready, timeout=30)
        yield prom.url


async def test_healthy_external_signals_and_prometheus_pass(
    sqlite_live: LiveServer, tmp_path: Path, prometheus: str
) -> None:
    with metrics_endpoint() as endpoint:
        endpoint.gauge.labels(queue="q").set(4)
        text_url = endpoint.url
        text = group("text", signal=SignalSpec(kind="prometheus_text", url=text_url, metric="queue_length"))
        prom = group("prom", queue="q3", signal=SignalSpec(kind="promql", url=prometheus, query="vector(3)"))
        async with sqlite_live.client("admin") as admin:
            for g in (text, prom):
                await fresh_status(admin, g)
            # the server's own counts agree with both signals (doctor compares them)
            for queue, n in (("q", 4), ("q3", 3)):
                for i in range(n):
                    await admin.submit(SubmitRequest(queue=queue, definition=JobDefinition(command=["echo", str(i)])))
            checks = await run_checks(admin, Grid(name="t", groups=[text, prom]), ctx(sqlite_live, tmp_path))
    assert all_ok(checks), [c for c in checks if not c.ok]
    assert find(checks, "group text", "signal").detail == f"queue_length at {text_url} reads 4"
    assert find(checks, "group prom", "signal").detail == f"PromQL 'vector(3)' at {prometheus} reads 3"
    assert find(checks, "group prom", "prometheus").detail == f"Prometheus at {prometheus} is ready"


async def test_a_provider_it_cannot_reach_is_named(
    sqlite_live: LiveServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    socket_path = tmp_path / "no-such-docker.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{socket_path}")
    g = group("boxes", provider="docker")
    async with sqlite_live.client("admin") as admin:
        await fresh_status(admin, g)
        checks = await run_checks(admin, Grid(name="t", groups=[g]), ctx(sqlite_live, tmp_path))
    provider = find(checks, "group boxes", "provider")
    assert not provider.ok and str(socket_path) in provider.detail and provider.detail.startswith("docker:")
    assert "DOCKER_HOST" in provider.fix
    assert failed(checks) == [("group boxes", "provider")]


async def test_a_group_without_a_running_controller_is_named(live: LiveServer, settings: ServerSettings) -> None:
    now = time.time()
    await live.store.put_group(GroupStatus("old", "q", "local", 0, 2, 1, 1, now - 120))
    async with live.client("admin") as admin:
        await admin.record_event({"group": "broken", "kind": "error", "reason": "provider docker failed (boom)"})
    checks = await server_side_checks(live.store, settings, time.time(), ["declared", "old", "broken"])
    old = find(checks, "group old", "controller")
    assert not old.ok and "last updated 2m" in old.detail and "scaleq autoscale" in old.fix
    declared = find(checks, "group declared", "controller")
    assert not declared.ok and "no controller has reported" in declared.detail and "scaleq up --grid" in declared.fix
    broken = find(checks, "group broken", "controller")
    assert not broken.ok and "boom" in broken.detail and "events --group broken" in broken.fix
    # without naming the groups, a group whose controller fails right now still shows up
    unnamed = await server_side_checks(live.store, settings, time.time())
    assert not find(unnamed, "group broken", "controller").ok


async def test_a_group_refused_for_a_quota_or_a_rate_limit_says_so_over_the_api(
    live: LiveServer, settings: ServerSettings
) -> None:
    """The controller writes the state through the API (a remote ``scaleq autoscale``); doctor and groups read it."""
    now = time.time()
    async with live.client("admin") as admin:
        for name, state, message in (
            ("gce", "quota", "provider gcp refused: QUOTA_EXCEEDED: Quota 'CPUS' exceeded"),
            ("fly", "rate_limited", "provider fly refused: 429 rate limit exceeded"),
        ):
            await admin.put_group(
                {
                    "name": name,
                    "queue": "q",
                    "provider": name,
                    "min": 0,
                    "max": 2,
                    "current": 0,
                    "desired": 1,
                    "state": state,
                    "message": message,
                    "state_since": now - 90,
                }
            )
        listed = {g["name"]: (g["state"], g["message"]) for g in await admin.groups()}
    assert listed["gce"] == ("quota", "provider gcp refused: QUOTA_EXCEEDED: Quota 'CPUS' exceeded")
    checks = await server_side_checks(live.store, settings, time.time(), ["gce", "fly"])
    gce, fly = find(checks, "group gce", "controller"), find(checks, "group fly", "controller")
    assert not gce.ok and "quota (quota for 1m" in gce.detail and "Quota 'CPUS'" in gce.detail
    assert "Quotas" in gce.fix and "lower max_workers" in gce.fix
    assert not fly.ok and "rate limit (rate_limited" in fly.detail and "backs off" in fly.fix


class Refusing:
    """A store whose database answers but refuses writes (or, with ``down``, does not answer at all)."""

    def __init__(self, inner: SQLiteStore, *, down: bool = False) -> None:
        self.inner, self.down = inner, down

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    async def ping(self) -> None:
        if self.down:
            raise sqlite3.OperationalError("unable to open database file")

    async def put_blob(self, sha256: str, data: bytes) -> None:
        raise sqlite3.OperationalError("attempt to write a readonly database")


async def test_a_store_that_refuses_writes_or_is_down_is_named(
    sqlite_store: SQLiteStore, settings: ServerSettings
) -> None:
    checks = await server_side_checks(Refusing(sqlite_store), settings, time.time())  # type: ignore[arg-type]
    store = find(checks, "store", "writable")
    assert not store.ok and "refuses a write" in store.detail and "readonly database" in store.detail
    assert "read-only replica" in store.fix
    down = await server_side_checks(Refusing(sqlite_store, down=True), settings, time.time())  # type: ignore[arg-type]
    assert "does not answer" in find(down, "store", "writable").detail
    assert not find(down, "server", "lease sweeper").checked


# -- the routes the dashboard reads -------------------------------------------------------------------------------


async def test_health_routes(sqlite_live: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=sqlite_live.url + "/api/v1") as http:
        for role, token in sqlite_live.tokens.items():
            who = (await http.get("/whoami", headers={"Authorization": f"Bearer {token}"})).json()
            assert who["role"] == role and abs(who["server_time"] - time.time()) < 5
        assert (await http.get("/whoami")).status_code == 401
        assert (await http.get("/health/checks")).status_code == 401
        read = {"Authorization": f"Bearer {sqlite_live.tokens['read']}"}
        body = (await http.get("/health", headers=read, params=[("group", "a"), ("group", "b")])).json()
        assert body["lease_seconds"] == 2.0 and body["version"]
        hops = {(c["hop"], c["name"]) for c in body["checks"]}
        assert {("store", "writable"), ("group a", "controller"), ("group b", "workers heartbeating")} <= hops
        assert not body["ok"]  # groups a and b have no controller
        checks = (await http.get("/health/checks", headers=read)).json()
        assert checks and all(c["ok"] and c["status"] == "ok" and c["checked"] for c in checks)
        assert set(checks[0]) == {"hop", "name", "ok", "status", "checked", "detail", "fix"}


# -- the CLI ------------------------------------------------------------------------------------------------------


def invoke(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["doctor", *args])
    return result.exit_code, result.output


async def test_cli_exit_codes_and_json(sqlite_live: LiveServer, tmp_path: Path) -> None:
    common = ["--server", sqlite_live.url, "--data-dir", str(tmp_path)]
    code, output = await asyncio.to_thread(invoke, *common, "--token", sqlite_live.tokens["admin"], "-o", "json")
    assert code == 0, output
    body = json.loads(output)
    assert body["ok"] and body["summary"].startswith("all ") and all(c["status"] == "ok" for c in body["checks"])

    code, output = await asyncio.to_thread(invoke, *common, "--token", sqlite_live.tokens["admin"])
    assert code == 0, output
    assert "reachable" in output and "✓" in output and "passed" in output

    code, output = await asyncio.to_thread(invoke, *common, "--token", "sq_0000_wrong")
    assert code == 1, output
    assert "token" in output and "✗" in output and "401" in output

    code, output = await asyncio.to_thread(invoke, *common, "--token", "sq_0000_wrong", "-o", "json")
    assert code == 1
    body = json.loads(output)
    token = next(c for c in body["checks"] if c["name"] == "token")
    assert not body["ok"] and token["status"] == "failed" and "SCALEQ_TOKEN" in token["fix"]


async def test_cli_with_a_grid_file(sqlite_live: LiveServer, tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{free_port()}/metrics"
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(
        f'name = "t"\n[[groups]]\nname = "ext"\nqueue = "q"\n'
        f'[groups.signal]\nkind = "prometheus_text"\nurl = "{down}"\nmetric = "queue_length"\ntimeout = 2\n'
    )
    args = ["--server", sqlite_live.url, "--token", sqlite_live.tokens["admin"], "--data-dir", str(tmp_path)]
    code, output = await asyncio.to_thread(invoke, *args, "--grid", str(grid_file), "-o", "json")
    assert code == 1, output
    by_name = {(c["hop"], c["name"]): c for c in json.loads(output)["checks"]}
    assert down in by_name["group ext", "signal"]["detail"]
    assert by_name["group ext", "provider"]["ok"]
    assert not (tmp_path / "worker.token").exists()  # doctor makes no tokens


def test_cli_bad_grid_file_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "grid.toml"
    bad.write_text('[[groups]]\nname = "x"\nmin_workers = 3\nmax_workers = 1\n')
    code, output = invoke("--grid", str(bad), "--server", "http://127.0.0.1:9", "--data-dir", str(tmp_path))
    assert code == 2
    assert "max_workers" in output


def test_cli_without_any_server_names_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SCALEQ_SERVER", raising=False)
    monkeypatch.delenv("SCALEQ_TOKEN", raising=False)
    code, output = invoke("--data-dir", str(tmp_path / "nothing"), "-o", "json")
    assert code == 1
    body = json.loads(output)
    assert body["checks"][0]["name"] == "reachable" and "scaleq up" in body["checks"][0]["detail"]
    assert all(not c["checked"] for c in body["checks"][1:])
