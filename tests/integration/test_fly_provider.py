"""The fly provider (httpx) against a local stand-in of the Fly Machines API built from Fly's Feb-2024 OpenAPI spec
(``tests/standins/fly_machines.py``): every request body the provider sends is validated against the spec (strictly:
unknown fields are refused), and every answer the stand-in gives is checked against it too. The real Fly API is not
reached from here."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import scaleq.providers.fly as fly_module
from scaleq.client import Client
from scaleq.grid import FlySettings, Group
from scaleq.jobs import JobDefinition, Requirements, SubmitRequest
from scaleq.providers.base import ProviderError
from scaleq.providers.fly import FlyProvider
from scaleq.providers.registry import ProviderContext, make_provider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, controlling, eventually
from tests.helpers.drivers import never_registering, refused_then_retried
from tests.helpers.groups import fast_group
from tests.standins.fly_machines import FlyMachines, serve_fly

APP = "scaleq-test"
IMAGE = "registry.fly.io/scaleq-test:worker-1"
SERVER = "https://grid.example.com"


@pytest.fixture(autouse=True)
def fly_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No token from the machine running the tests: no FLY_* variables, and a HOME without ~/.fly."""
    for name in ("FLY_API_TOKEN", "FLY_ACCESS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def fly(monkeypatch: pytest.MonkeyPatch) -> Iterator[FlyMachines]:
    with serve_fly(start_delay=0.2) as standin:
        monkeypatch.setenv("FLY_API_TOKEN", standin.token)
        yield standin
        assert standin.problems == []  # every answer matched the spec


def group(standin: FlyMachines, name: str = "fly", *, app: str = APP, **kw: object) -> Group:
    settings = FlySettings(app=app, region="ams", cpus=1, memory_mb=512, api_url=standin.url)
    fields = {"provider": "fly", "image": IMAGE, "resources": Requirements(cpus=1), "fly": settings}
    return fast_group(name, **{**fields, **kw})


def provider(g: Group, *, grid: str = "t", server: str = SERVER, **kw: object) -> FlyProvider:
    return FlyProvider(grid=grid, server=server, token="worker-token", settings=g.fly, backoff=0.01, **kw)


async def running(p: FlyProvider, g: Group, n: int) -> bool:
    return len([w for w in await p.workers(g) if w.status == "running"]) == n


async def test_start_creates_named_labelled_machines_with_a_valid_config(fly: FlyMachines) -> None:
    # the machines stay "starting" until the test starts them below: a 0.2 s start delay raced the checks in between
    fly.start_delay = 60
    g = group(fly)
    p = provider(g)
    ids = await p.start(g, 2)
    assert len(set(ids)) == 2 and all(i.startswith("t-fly-") for i in ids)
    creates = fly.calls_to("POST", f"/apps/{APP}/machines")
    assert [c.status for c in creates] == [200, 200]  # the bodies passed the spec's (strict) schema
    for worker_id in ids:
        m = fly.by_name(worker_id)
        assert m.region == "ams"
        c = m.config
        assert c["image"] == IMAGE
        argv = c["init"]["cmd"]
        assert argv[:4] == ["scaleq", "worker", "--server", SERVER]
        assert argv[argv.index("--worker-id") + 1] == worker_id
        assert argv[argv.index("--queue") + 1] == "q" and argv[argv.index("--group") + 1] == "fly"
        assert c["env"]["SCALEQ_TOKEN"] == "worker-token"
        assert c["guest"] == {"cpu_kind": "shared", "cpus": 1, "memory_mb": 512}
        assert c["metadata"] == {
            "scaleq_managed": "true",
            "scaleq_grid": "t",
            "scaleq_group": "fly",
            "scaleq_worker_id": worker_id,
            "scaleq_version": g.version(),
        }
        assert c["restart"] == {"policy": "no"} and c["auto_destroy"] is True
        # Fly's own stop (host maintenance) is a preemption notice: the worker hands its jobs back
        assert c["stop_config"]["signal"] == "SIGTERM" and argv[-2:] == ["--on-notice", "handback"]
    assert {w.status for w in await p.workers(g)} == {"starting"}
    for worker_id in ids:  # Fly starts them now
        fly.by_name(worker_id).start_due = time.time()
    await eventually(lambda: running(p, g, 2), timeout=30)
    assert {(w.id, w.version) for w in await p.workers(g)} == {(i, g.version()) for i in ids}
    await p.close()


async def test_another_provider_instance_finds_the_groups_machines_by_metadata(fly: FlyMachines) -> None:
    g, other_group = group(fly), group(fly, "other")
    first = provider(g)
    ids = await first.start(g, 2)
    await provider(other_group).start(other_group, 1)  # same app, another group
    await provider(g, grid="elsewhere").start(g, 1)  # same app and group name, another grid
    async with httpx.AsyncClient(base_url=f"{fly.url}/v1", headers={"Authorization": f"Bearer {fly.token}"}) as raw:
        r = await raw.post(f"/apps/{APP}/machines", json={"name": "not-ours", "config": {"image": "nginx"}})
        assert r.status_code == 200
    second = provider(g)  # a restarted controller: nothing in memory
    adopted = await second.workers(g)
    assert sorted(w.id for w in adopted) == sorted(ids)
    assert all(w.group == "fly" and w.version == g.version() and w.started_at > time.time() - 60 for w in adopted)
    assert len(fly.live(APP)) == 5


async def test_stop_signals_exactly_that_machine_and_its_exit_removes_it(fly: FlyMachines) -> None:
    g = group(fly)
    p = provider(g)
    a, b = await p.start(g, 2)
    await eventually(lambda: running(p, g, 2), timeout=30)
    await p.stop(g, a)
    await p.stop(g, a)  # asked twice: still one SIGINT (a second signal would make the worker hand its jobs back)
    assert fly.by_name(a).signals == ["SIGINT"] and fly.by_name(b).signals == []
    (signal,) = fly.calls_to("POST", "/signal")
    assert signal.path.endswith(f"/machines/{fly.by_name(a).id}/signal") and signal.body == {"signal": "SIGINT"}
    assert {w.id: w.status for w in await provider(g).workers(g)} == {a: "running", b: "running"}
    assert {w.id: w.status for w in await p.workers(g)} == {a: "stopping", b: "running"}
    machine = fly.by_name(a)
    fly.exit(machine.id)  # the drained worker exits 0; restart "no" + auto_destroy: Fly destroys the machine
    assert [w.id for w in await p.workers(g)] == [b]
    assert fly.machines[machine.id].state == "destroyed"
    assert not fly.calls_to("DELETE")  # nothing left for scaleq to clean up


async def test_stop_of_a_machine_not_started_yet_destroys_it(fly: FlyMachines) -> None:
    fly.start_delay = 60
    g = group(fly)
    p = provider(g)
    (worker,) = await p.start(g, 1)
    machine = fly.by_name(worker)
    await p.stop(g, worker)
    assert fly.machines[machine.id].state == "destroyed" and machine.signals == []
    assert await p.workers(g) == []


async def test_force_stop_hands_jobs_back_and_lets_fly_kill_after_a_short_timeout(fly: FlyMachines) -> None:
    g = group(fly)
    p = provider(g)
    (worker,) = await p.start(g, 1)
    await eventually(lambda: running(p, g, 1), timeout=30)
    await p.stop(g, worker, force=True)
    (stop,) = fly.calls_to("POST", "/stop")
    assert stop.body == {"signal": "SIGTERM", "timeout": f"{fly_module.FORCE_TIMEOUT}s"}
    assert fly.by_name(worker).signals == ["SIGTERM", "SIGTERM"]  # drain, then hand the jobs back
    assert fly.by_name(worker).state == "stopping"
    assert [w.status for w in await p.workers(g)] == ["stopping"]


async def test_a_failed_worker_that_fly_did_not_destroy_is_cleaned_up(
    fly: FlyMachines, caplog: pytest.LogCaptureFixture
) -> None:
    g = group(fly)
    p = provider(g)
    config = {**p.machine_config(g, "t-fly-legacy"), "auto_destroy": False}
    async with httpx.AsyncClient(base_url=f"{fly.url}/v1", headers={"Authorization": f"Bearer {fly.token}"}) as raw:
        r = await raw.post(f"/apps/{APP}/machines", json={"name": "t-fly-legacy", "config": config})
        assert r.status_code == 200
    await eventually(lambda: running(p, g, 1), timeout=30)
    fly.exit(r.json()["id"], code=3)
    assert fly.machines[r.json()["id"]].state == "stopped"
    with caplog.at_level(logging.WARNING, logger="scaleq.providers.fly"):
        assert await p.workers(g) == []
    assert fly.machines[r.json()["id"]].state == "destroyed"
    assert "t-fly-legacy" in caplog.text and "exit code 3" in caplog.text and f"fly logs -a {APP}" in caplog.text


async def test_destroy_drains_then_removes_every_machine_of_the_group_only(fly: FlyMachines) -> None:
    fly.term_exit_after = 0.2  # workers drain quickly when told to
    g, other = group(fly), group(fly, "other")
    p = provider(g)
    ids = await p.start(g, 3)
    (kept,) = await provider(other).start(other, 1)
    await eventually(lambda: running(p, g, 3), timeout=30)
    removed = await p.destroy(g, grace=5)
    assert sorted(removed) == sorted(ids)
    assert await p.workers(g) == []
    assert [m.name for m in fly.live(APP)] == [kept]
    assert fly.by_name(kept).signals == []
    assert len(fly.calls_to("POST", "/signal")) == 3


@pytest.mark.timeout(30)  # the stand-in's machines never stop by themselves: only the force ends destroy
async def test_destroy_forces_workers_that_do_not_drain(fly: FlyMachines, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fly_module, "HANDBACK_GRACE", 0.5)
    g = group(fly)
    p = provider(g)
    ids = await p.start(g, 2)
    await eventually(lambda: running(p, g, 2), timeout=30)
    assert sorted(await p.destroy(g, grace=0.5)) == sorted(ids)
    assert fly.live(APP) == []
    assert {c.query.get("force") for c in fly.calls_to("DELETE")} == {"true"}


async def test_a_missing_token_is_a_clear_error_from_health_and_list(
    fly: FlyMachines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLY_API_TOKEN")
    g = group(fly)
    p = provider(g)
    health = await p.health()
    assert not health.ok and "FLY_API_TOKEN is not set" in health.message
    assert "fly tokens create" in health.message
    with pytest.raises(ProviderError, match="FLY_API_TOKEN is not set"):
        await p.workers(g)
    with pytest.raises(ProviderError, match="FLY_API_TOKEN is not set"):
        await p.start(g, 1)
    assert fly.calls == []  # nothing was sent without a token


async def test_a_wrong_token_and_a_missing_app_are_clear_errors(
    fly: FlyMachines, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLY_API_TOKEN", "not-the-token")
    g = group(fly)
    p = provider(g)
    health = await p.health()
    assert not health.ok and "FLY_API_TOKEN is missing or wrong" in health.message and "401" in health.message
    with pytest.raises(ProviderError, match="FLY_API_TOKEN is missing or wrong"):
        await p.workers(g)
    monkeypatch.setenv("FLY_API_TOKEN", fly.token)
    missing = group(fly, app="no-such-app")
    p = provider(missing)
    health = await p.health()
    assert not health.ok and "does not exist" in health.message and "fly apps create no-such-app" in health.message
    with pytest.raises(ProviderError, match="fly apps create no-such-app"):
        await p.start(missing, 1)
    statuses = [c.status for c in fly.calls]
    assert statuses.count(401) == 2 and statuses.count(404) == 2  # health and one call each: no retries


async def test_the_token_comes_from_the_usual_places(
    fly: FlyMachines, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    g = group(fly)
    health = await make_provider(g, ProviderContext("t", SERVER, "worker-token", tmp_path)).health()
    assert health.ok and f"Fly app {APP}" in health.message and "FLY_API_TOKEN" in health.message
    monkeypatch.delenv("FLY_API_TOKEN")
    monkeypatch.setenv("FLY_ACCESS_TOKEN", fly.token)
    assert (await provider(g).health()).message.endswith("token from FLY_ACCESS_TOKEN")
    monkeypatch.delenv("FLY_ACCESS_TOKEN")
    config = tmp_path / "home" / ".fly" / "config.yml"
    config.parent.mkdir(parents=True)
    config.write_text(f"access_token: {fly.token}\nlast_login: now\n")
    health = await provider(g).health()
    assert health.ok and str(config) in health.message


async def test_sizes_fly_does_not_offer_and_unreachable_servers_are_refused_before_any_call(fly: FlyMachines) -> None:
    big = group(fly, fly=FlySettings(app=APP, cpu_kind="performance", cpus=1, memory_mb=1024, api_url=fly.url))
    p = provider(big)
    with pytest.raises(ProviderError, match="2048 to 8192 MB"):
        await p.start(big, 1)
    health = await p.health()
    assert not health.ok and "no such machine size" in health.message
    real = group(fly, fly=FlySettings(app=APP))  # the real API's URL: never called here
    with pytest.raises(ProviderError, match="public_url"):
        await provider(real, server="http://127.0.0.1:8765").start(real, 1)
    assert fly.calls == []


async def test_429_and_5xx_are_retried_with_bounds(fly: FlyMachines) -> None:
    g = group(fly)
    p = provider(g)
    fly.fail(503, times=2, method="GET", path="/machines")
    assert await p.workers(g) == []
    assert [c.status for c in fly.calls_to("GET", "/machines")] == [503, 503, 200]
    fly.fail(429, method="POST", retry_after="0")
    (worker,) = await p.start(g, 1)
    assert [c.status for c in fly.calls_to("POST", "/machines")] == [429, 200]
    fly.fail(500, method="POST", path="/machines", after=True)  # created, but the answer is lost
    (second,) = await p.start(g, 1)
    assert [m.name for m in fly.live(APP)].count(second) == 1  # looked up by name, not created twice
    assert len(fly.live(APP)) == 2
    fly.fail(502, times=100, method="GET")
    with pytest.raises(ProviderError, match="502"):
        await p.workers(g)
    # 3 for the first list, 1 lookup after the lost answer, then retries + 1 attempts and no more
    assert len(fly.calls_to("GET", "/machines")) == 3 + 1 + p.retries + 1
    fly.heal()
    assert {w.id for w in await p.workers(g)} == {worker, second}


async def test_the_standin_holds_requests_to_the_spec(fly: FlyMachines) -> None:
    """Guards the guard: a stand-in that accepted anything would prove nothing about the provider's requests."""
    async with httpx.AsyncClient(base_url=f"{fly.url}/v1") as raw:
        assert (await raw.get(f"/apps/{APP}/machines")).status_code == 401
        raw.headers["Authorization"] = f"Bearer {fly.token}"
        bad = {"config": {"image": IMAGE, "guest": {"cpu_kind": "shared", "cpus": 1, "memory": 512}}}
        r = await raw.post(f"/apps/{APP}/machines", json=bad)
        assert r.status_code == 400 and "memory" in r.json()["error"]
        r = await raw.post(f"/apps/{APP}/machines", json={"config": {"image": IMAGE}, "labels": {}})
        assert r.status_code == 400
        r = await raw.post(f"/apps/{APP}/machines", json={"config": {"image": IMAGE, "init": {"cmd": "scaleq"}}})
        assert r.status_code == 400
        assert (await raw.get(f"/apps/{APP}/machines/x/nonsense")).status_code == 404
        assert (await raw.put(f"/apps/{APP}/machines")).status_code == 405
        r = await raw.post(f"/apps/{APP}/machines", json={"config": {"image": IMAGE}})
        machine_id = r.json()["id"]
        await eventually(lambda: _state(raw, machine_id, "started"), timeout=30)
        assert (await raw.delete(f"/apps/{APP}/machines/{machine_id}")).status_code == 412
        r = await raw.post(f"/apps/{APP}/machines/{machine_id}/signal", json={"signal": "SIGWHATEVER"})
        assert r.status_code == 400
        assert (await raw.delete(f"/apps/{APP}/machines/{machine_id}", params={"force": "true"})).status_code == 200


async def _state(raw: httpx.AsyncClient, machine_id: str, state: str) -> bool:
    return (await raw.get(f"/apps/{APP}/machines/{machine_id}")).json()["state"] == state


# -- end to end: the real controller, a live server, the stand-in ----------------------------------------------------


async def test_controller_scales_fly_machines_with_the_queue(live: LiveServer, fly: FlyMachines) -> None:
    g = group(fly, max_workers=2)
    p = FlyProvider(grid="t", server=live.url, token=live.tokens["worker"], settings=g.fly, backoff=0.01)
    admin = live.client("admin")
    worker = live.client("worker")
    try:
        async with controlling(Controller([(g, p)], RemoteObserver(admin), tick=0.2)):
            job, _ = await admin.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
            (machine,) = await eventually(lambda: _machines(fly, 1), timeout=10, what="a machine for the job")
            assert machine.config["init"]["cmd"][3] == live.url
            assert machine.config["env"]["SCALEQ_TOKEN"] == live.tokens["worker"]
            # the worker in the machine registers under the machine's name, runs the job and goes idle
            await worker.register(
                {"id": machine.name, "queue": "q", "group": "fly", "slots": 1, "runtimes": ["process"], "cpus": 1}
            )
            claims, _, _ = await worker.claim(machine.name, 1, wait=5)
            assert [c.job.id for c in claims] == [job.id]
            await worker.finish({"lease": claims[0].lease, "reason": "success", "exit_code": 0})
            # idle past its timeout: the controller drains it through the server ...
            await eventually(lambda: _draining(worker, machine.name), timeout=15, what="the drain")
            assert machine.signals == []  # scale-in goes through the server, not a signal
            # ... the worker exits (simulated), and Fly destroys its machine
            await worker.deregister(machine.name)
            fly.exit(machine.id)
            await eventually(lambda: _none(p, g), timeout=5, what="the machine gone from list")
            await eventually(lambda: _current(admin, 0), timeout=5, what="current 0")
        events = await admin.events(group="fly", limit=100)
        up = next(e for e in reversed(events) if e["kind"] == "scale_up")
        assert up["to"] == 1 and "starting" in up["reason"]
        down = next(e for e in events if e["kind"] == "scale_down")
        assert down["to"] == 0 and "idle" in down["reason"]
        assert not [e for e in events if e["kind"] == "error"], events
        assert len(fly.calls_to("POST", f"/apps/{APP}/machines")) == 1
    finally:
        await p.destroy(g, grace=1)
        await p.close()
        await admin.close()
        await worker.close()


async def _machines(fly: FlyMachines, n: int) -> list | None:
    found = fly.live(APP)
    return found if len(found) == n else None


async def _draining(worker: Client, worker_id: str) -> bool:
    state, _ = await worker.heartbeat(worker_id)
    return state == "draining"


async def _none(p: FlyProvider, g: Group) -> bool:
    return await p.workers(g) == []


async def _current(c: Client, n: int) -> bool:
    return any(s["name"] == "fly" and s["current"] == n for s in await c.groups())


async def test_machines_whose_workers_never_register_are_replaced_never_piled_up(
    fly: FlyMachines, sqlite_store: SQLiteStore
) -> None:
    """Machines start but their workers never reach the server: after startup_grace each is stopped (and, ended,
    destroyed), its state said in an event, and the app never holds more than max_workers of the group's machines."""
    g = group(fly, max_workers=2, startup_grace=60)

    async def machines() -> int:
        return len(fly.live())

    p = provider(g)
    try:
        events = await never_registering(p, g, sqlite_store, machines, rounds=2)
    finally:
        await p.close()
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 2 * g.max_workers
    assert all("startup_grace (60 s): machine" in e.reason and "latest event: launch" in e.reason for e in lapsed)


async def test_a_rate_limit_that_outlasts_the_retries_is_the_groups_state(
    fly: FlyMachines, sqlite_store: SQLiteStore
) -> None:
    g = group(fly, max_workers=2)
    p = provider(g, retries=2)
    try:
        refused, recovered = await refused_then_retried(
            p, g, sqlite_store, lambda: fly.rate_limit(50, method="POST"), fly.heal
        )
    finally:
        await p.close()
    assert refused.state == "rate_limited" and "429 rate limit exceeded" in refused.message
    assert (recovered.state, recovered.current) == ("ok", 1)
