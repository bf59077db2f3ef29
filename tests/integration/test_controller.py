"""The controller with the real local provider against a live server: scale from zero and back, adopt after a
restart, survive provider failures, never stop busy workers, and destroy everything apply created."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import pytest

from scaleq.client import Client
from scaleq.deploy import Deployer, Refused, state_path
from scaleq.grid import Grid, Group
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.notify import Notifier
from scaleq.providers.base import DESTROY_GRACE, Health, ProviderBase, ProviderWorker
from scaleq.providers.local import LocalProvider
from scaleq.providers.registry import ProviderContext
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver, StoreObserver
from scaleq.scaling.policy import PolicyState, decide
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LONG_LEASES, LiveServer, controlling, eventually
from tests.helpers.drivers import never_registering
from tests.helpers.groups import fast_group


def group(name: str = "cpu", **kw: object) -> Group:
    return fast_group(name, **{"lookahead": 1.0, **kw})  # a local worker registers in well under a second


def local(live: LiveServer, tmp_path: Path) -> LocalProvider:
    return LocalProvider(
        grid="t",
        server=live.url,
        token=live.tokens["worker"],
        state_dir=tmp_path / "workers",
        log_dir=tmp_path / "logs",
    )


async def submit(c: Client, *cmd: str) -> str:
    job, _ = await c.submit(SubmitRequest(queue="q", definition=JobDefinition(command=list(cmd))))
    return job.id


async def test_scales_from_zero_to_max_and_back_to_zero(live: LiveServer, tmp_path: Path, open_tmp_path: Path) -> None:
    g, provider = group(), local(live, tmp_path)
    admin = live.client("admin")
    controller = Controller([(g, provider)], RemoteObserver(admin), tick=0.2)
    try:
        async with controlling(controller):
            # the jobs hold until the group is at its max (run as nobody by root workers: an open dir)
            gate = open_tmp_path / "gate"
            ids = [
                await submit(admin, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo {i}")
                for i in range(6)
            ]
            # (worker processes get 30 s to start and register: three Python processes on a loaded 2-core machine)
            await eventually(lambda: _count(provider, g, 3), timeout=30)
            # the status says what the start-time estimate needs: slots, boots seen, none still starting
            await eventually(lambda: _capacity_said(admin, g.slots), timeout=30)
            gate.touch()
            for job_id in ids:
                await eventually(lambda j=job_id: _finished(admin, j), timeout=30)
            await eventually(lambda: _count(provider, g, 0), timeout=20)
            await eventually(lambda: _status(admin, current=0, max=3))
        events = await admin.events(group="cpu", limit=100)
        kinds = [e["kind"] for e in events]
        assert "scale_up" in kinds and "scale_down" in kinds
        assert all(e["reason"] for e in events)
        up = next(e for e in reversed(events) if e["kind"] == "scale_up")
        assert "waiting" in up["reason"] and "starting" in up["reason"]
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


async def _count(provider: LocalProvider, g: Group, n: int) -> bool:
    return len([w for w in await provider.workers(g) if w.status == "running"]) == n


async def _status(c: Client, **expected: int) -> bool:
    (status,) = await c.groups()
    return all(status[k] == v for k, v in expected.items())


async def _capacity_said(c: Client, slots: int) -> bool:
    (status,) = await c.groups()
    boot = status["boot_seconds"]
    return status["slots"] == slots and status["starting"] == [] and boot is not None and 0 < boot < 30


async def _finished(c: Client, job_id: str) -> bool:
    job = await c.get_job(job_id)
    return job.state == "finished" and job.reason == "success"


@pytest.mark.parametrize("settings", [LONG_LEASES])  # one attempt: a stalled beat must not cost the lease
async def test_scale_in_never_stops_a_busy_worker(live: LiveServer, tmp_path: Path, open_tmp_path: Path) -> None:
    g, provider = group(max_workers=2), local(live, tmp_path)
    admin = live.client("admin")
    controller = Controller([(g, provider)], RemoteObserver(admin), tick=0.2)
    try:
        async with controlling(controller):
            gate = open_tmp_path / "gate"  # the long job holds until the test has seen the idle worker go
            long_job = await submit(admin, "sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.05; done; echo long")
            short_job = await submit(admin, "sh", "-c", "echo short")
            await eventually(lambda: _finished(admin, short_job), timeout=30)  # a worker process's start included
            # the idle worker goes after its 1 s idle timeout; the busy one must stay until its job is done
            await eventually(lambda: _count(provider, g, 1), timeout=15)
            job = await admin.get_job(long_job)
            assert job.state == "running"
            gate.touch()
            await eventually(lambda: _finished(admin, long_job), timeout=15)
            (attempt,) = await admin.attempts(long_job)
            assert attempt["outcome"] == "success"
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


async def test_a_restarted_controller_adopts_running_workers(live: LiveServer, tmp_path: Path) -> None:
    g = group(min_workers=2, max_workers=2, idle_timeout=60)
    admin = live.client("admin")
    first = local(live, tmp_path)
    try:
        async with controlling(Controller([(g, first)], RemoteObserver(admin), tick=0.2)):
            await eventually(lambda: _count(first, g, 2))
        before = {w.id for w in await first.workers(g)}
        seen = {e["id"] for e in await admin.events(group="cpu")}
        second = local(live, tmp_path)  # a new process would start with nothing in memory

        async def new_events() -> list[dict[str, Any]]:
            return [e for e in await admin.events(group="cpu") if e["id"] not in seen]

        async def adopted() -> bool:
            return any(e["kind"] == "adopt" and e["to"] == 2 for e in await new_events())

        async with controlling(Controller([(g, second)], RemoteObserver(admin), tick=0.2)):
            await eventually(adopted, 30, what="the second controller's adopt event")
            await asyncio.sleep(1.0)  # a few more of its ticks: none of them starts a worker
            assert {w.id for w in await second.workers(g)} == before
        events = await new_events()
        assert not [e for e in events if e["kind"] == "scale_up"], events
    finally:
        await first.destroy(g, grace=5)
        await admin.close()


class FlakyProvider:
    """A provider whose API fails for a while (a stand-in for a cloud outage), then recovers."""

    name = "flaky"

    def __init__(self, inner: LocalProvider, failures: int) -> None:
        self.inner = inner
        self.failures = failures

    async def workers(self, g: Group) -> list[ProviderWorker]:
        if self.failures > 0:
            self.failures -= 1
            raise ConnectionError("provider API unreachable")
        return await self.inner.workers(g)

    async def start(self, g: Group, count: int) -> list[str]:
        return await self.inner.start(g, count)

    async def stop(self, g: Group, worker_id: str, *, force: bool = False) -> None:
        await self.inner.stop(g, worker_id, force=force)

    async def reap(self, g: Group, worker_ids: Collection[str]) -> set[str]:
        return await self.inner.reap(g, worker_ids)

    async def preempted(self, g: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return await self.inner.preempted(g, worker_ids)

    async def wait_gone(self, g: Group, timeout: float) -> bool:
        return await self.inner.wait_gone(g, timeout)

    async def why_not_up(self, g: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return await self.inner.why_not_up(g, worker_ids)

    async def destroy(self, g: Group, grace: float = DESTROY_GRACE) -> list[str]:
        return await self.inner.destroy(g, grace)

    async def health(self) -> Health:
        return Health(self.failures == 0, "flaky")

    async def close(self) -> None:
        await self.inner.close()


async def test_provider_failure_is_reported_retried_and_spares_other_groups(live: LiveServer, tmp_path: Path) -> None:
    bad, good = group("bad", queue="q"), group("good", queue="other")
    flaky = FlakyProvider(local(live, tmp_path), failures=2)
    healthy = local(live, tmp_path)
    admin = live.client("admin")
    try:
        async with controlling(Controller([(bad, flaky), (good, healthy)], RemoteObserver(admin), tick=0.2)):
            job, _ = await admin.submit(SubmitRequest(queue="other", definition=JobDefinition(command=["true"])))
            await eventually(lambda: _finished(admin, job.id), timeout=15)
            stuck = await submit(admin, "echo", "after the outage")
            await eventually(lambda: _finished(admin, stuck), timeout=20)
        events = await admin.events(group="bad")
        errors = [e for e in events if e["kind"] == "error"]
        assert errors and "provider API unreachable" in errors[-1]["reason"] and "retry" in errors[-1]["reason"]
        assert any(e["kind"] == "recovered" for e in events)
    finally:
        await healthy.destroy(good, grace=5)
        await flaky.inner.destroy(bad, grace=5)
        await admin.close()


async def test_apply_then_destroy_leaves_nothing(live: LiveServer, tmp_path: Path) -> None:
    g = group(min_workers=2, idle_timeout=60)
    grid = Grid(name="t", groups=[g])
    admin = live.client("admin")
    ctx = ProviderContext("t", live.url, live.tokens["worker"], tmp_path)
    deployer = Deployer(grid, tmp_path, admin, ctx)
    try:
        plans = await deployer.plan()
        assert [(p.name, p.action) for p in plans] == [("cpu", "create")]
        applied = await deployer.apply()
        assert sum(1 for line in applied[0].done if line.startswith("started")) == 2
        assert state_path(tmp_path, "t").exists()
        provider = local(live, tmp_path)
        pids = [int(w.detail.split()[1]) for w in await provider.workers(g)]
        assert len(pids) == 2
        assert [p.action for p in await deployer.plan()] == ["none"]
        # a changed group is an update; apply drains the out-of-date workers
        changed = Deployer(
            Grid(name="t", groups=[group(min_workers=2, idle_timeout=60, slots=2)]), tmp_path, admin, ctx
        )
        assert [p.action for p in await changed.plan()] == ["update"]
        removed = await deployer.destroy()
        assert removed and removed[0].action == "remove"
        assert not state_path(tmp_path, "t").exists()
        assert await provider.workers(g) == []
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or b"zombie" in Path(f"/proc/{pid}/status").read_bytes().lower()
        assert await admin.groups() == []
    finally:
        await admin.close()


async def test_plan_apply_and_destroy_beside_a_running_controller(live: LiveServer, tmp_path: Path) -> None:
    g = group()
    grid = Grid(name="t", groups=[g])
    admin = live.client("admin")
    ctx = ProviderContext("t", live.url, live.tokens["worker"], tmp_path)
    deployer = Deployer(grid, tmp_path, admin, ctx)
    provider = local(live, tmp_path)
    try:
        async with controlling(Controller([(g, provider)], RemoteObserver(admin), tick=0.2)):
            await eventually(admin.groups, what="the controller's first status")
            (p,) = await deployer.plan()
            assert p.action == "running" and "live controller" in p.reason, p  # not "create"
            (p,) = await deployer.apply()
            assert p.action == "running" and p.done == [
                "left to the controller that runs it (stop it to apply a change)"
            ]
            assert not state_path(tmp_path, "t").exists()
            with pytest.raises(Refused) as refused:
                await deployer.destroy()
            assert "group cpu" in str(refused.value) and "Stop it first" in str(refused.value)
        # a controller that stops says so: destroy goes ahead at once
        (status,) = await admin.groups()
        assert status["reporter"] == "stopped"
        assert [p.action for p in await deployer.plan()] == ["create"]
        assert await deployer.destroy() == []
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


async def test_workers_that_die_before_registering_pause_the_group(live: LiveServer, tmp_path: Path) -> None:
    """A refused worker token (or a broken image) must not become a restart loop: the group pauses and says why."""
    g = group(max_workers=1)
    provider = LocalProvider(
        grid="t", server=live.url, token="sq_revoked_token", state_dir=tmp_path / "workers", log_dir=tmp_path / "logs"
    )
    admin = live.client("admin")
    try:
        async with controlling(Controller([(g, provider)], RemoteObserver(admin), tick=0.2)):
            await submit(admin, "true")

            async def paused() -> list[dict]:
                return [e for e in await admin.events(group="cpu") if "before registering" in e["reason"]]

            (error,) = (await eventually(paused, 30))[:1]
            assert error["kind"] == "error" and "token" in error["reason"]
            starts = len([e for e in await admin.events(group="cpu") if e["kind"] == "scale_up"])
            await asyncio.sleep(2.0)  # paused: no new starts while it backs off
            assert len([e for e in await admin.events(group="cpu") if e["kind"] == "scale_up"]) == starts
        assert starts <= 4
        logs = list((tmp_path / "logs").glob("*.log"))
        assert logs and "refused this worker" in logs[0].read_text()
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


async def test_observers_count_the_queue_only_as_far_as_the_group_can_run(live: LiveServer) -> None:
    g = group(max_workers=2, slots=3)  # at most 6 jobs at once: 6 queued or 600 decide the same
    async with live.client("submit") as c:
        for i in range(10):
            await c.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["echo", str(i)])))
    async with live.client("admin") as admin:
        remote = await RemoteObserver(admin).demand(g)
        assert (remote.queued, remote.capped) == (6, True)
        assert (await admin.demand("q", g.capabilities().model_dump(mode="json")))["queued"] == 10
    local = await StoreObserver(live.store, Notifier(), time.time).demand(g)
    assert (local.queued, local.capped) == (6, True)
    # and the decision says so: at least 6 waiting, not 6
    assert decide(local, [], g.policy(), PolicyState(), local.at).reason.startswith("≥6 jobs waiting")
    roomy = await StoreObserver(live.store, Notifier(), time.time).demand(group(max_workers=20, slots=1))
    assert (roomy.queued, roomy.capped) == (10, False)


async def test_local_workers_that_never_register_are_replaced_never_piled_up(
    sqlite_store: SQLiteStore, tmp_path: Path
) -> None:
    """Issue 10's runaway: workers that never come up (here: a server address nothing answers) are stopped after
    startup_grace with the reason, and the group never has more than max_workers processes."""
    g = group(max_workers=2, startup_grace=60)
    provider = LocalProvider(
        grid="t", server="http://127.0.0.1:9", token="t", state_dir=tmp_path / "workers", log_dir=tmp_path / "logs"
    )

    async def processes() -> int:
        return sum(1 for w in await provider.workers(g) if w.status != "stopping" or _alive(w))

    try:
        events = await never_registering(provider, g, sqlite_store, processes)
    finally:
        await provider.destroy(g, grace=5)
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 3 * g.max_workers  # three rounds, each stopping every worker it started
    assert all("did not register within startup_grace (60 s): process running; its log" in e.reason for e in lapsed)


def _alive(w: ProviderWorker) -> bool:
    return Path(f"/proc/{w.detail.split()[1]}").exists()


class CountingProvider(LocalProvider):
    """The local provider, noting the most workers it ever ran for the group right after each start."""

    most = 0

    async def start(self, group: Group, n: int) -> list[str]:
        started = await super().start(group, n)
        self.most = max(self.most, len(await self.workers(group)))
        return started


async def test_draining_workers_count_toward_max_until_they_are_gone(
    live: LiveServer, tmp_path: Path, open_tmp_path: Path
) -> None:
    g = group(max_workers=3)
    provider = CountingProvider(
        grid="t", server=live.url, token=live.tokens["worker"], state_dir=tmp_path / "w", log_dir=tmp_path / "l"
    )
    gate = open_tmp_path / "gate"  # where the jobs, run as nobody by root workers, can see it
    admin = live.client("admin")
    controller = Controller([(g, provider)], RemoteObserver(admin), tick=0.2)
    try:
        async with controlling(controller):
            wait = f"while [ ! -e {gate} ]; do sleep 0.05; done"
            ids = [await submit(admin, "sh", "-c", f"{wait}; echo {i}") for i in range(5)]
            await eventually(lambda: _count(provider, g, 3), timeout=15)
            busy = await eventually(lambda: _busy_workers(admin, 3), timeout=15)
            await admin.drain_worker(busy[0])
            # the controller sees the drain and wants a replacement, but holds it while the drained worker runs
            await eventually(lambda: _decided(controller, "1 draining count toward max 3 until they are gone"))
            assert len(await provider.workers(g)) == 3
            gate.touch()
            for job_id in ids:
                await eventually(lambda j=job_id: _finished(admin, j), timeout=30)
        assert provider.most <= 3
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


async def _busy_workers(c: Client, n: int) -> list[str] | None:
    busy = [w.id for w in await c.workers() if w.busy]
    return busy if len(busy) == n else None


async def _decided(controller: Controller, words: str) -> bool:
    last = controller.loops[0].last
    return last is not None and words in last.reason


async def test_jobs_no_worker_of_the_group_can_run_are_said(live: LiveServer, tmp_path: Path) -> None:
    g = group(max_workers=2)
    admin = live.client("admin")
    provider = local(live, tmp_path)
    try:
        for i in range(3):  # the group's workers run process jobs only: docker jobs are not theirs
            await admin.submit(SubmitRequest(queue="q", definition=JobDefinition(image="alpine", command=[str(i)])))
        controller = Controller([(g, provider)], RemoteObserver(admin))
        decision = await controller.step_group(controller.loops[0])
        assert decision is not None and decision.desired == 0 and decision.reason.startswith("0 jobs waiting")
        (said,) = [e for e in await admin.events(group="cpu") if e["kind"] == "unrunnable"]
        assert "3 job(s) queued on queue q that this group cannot run" in said["reason"]
        (status,) = await admin.groups()
        assert "3 queued job(s) on queue q it cannot run" in status["note"]
    finally:
        await provider.destroy(g, grace=5)
        await admin.close()


class SpotProvider(ProviderBase):
    """A stand-in for a cloud whose machines are taken back: it lists the given workers and reports those in
    ``taken`` preempted, in its own words, recording what it was asked."""

    name = "spot"

    def __init__(self, listed: list[str], taken: set[str]) -> None:
        self.listed, self.taken = listed, taken
        self.asked: list[list[str]] = []

    async def workers(self, g: Group) -> list[ProviderWorker]:
        return [ProviderWorker(i, g.name, 0.0, "running") for i in self.listed]

    async def start(self, g: Group, count: int) -> list[str]:
        return []

    async def stop(self, g: Group, worker_id: str, *, force: bool = False) -> None:
        return None

    async def health(self) -> Health:
        return Health(True, "spot")

    async def preempted(self, g: Group, worker_ids: Collection[str]) -> dict[str, str]:
        self.asked.append(sorted(worker_ids))
        return {i: f"instance {i}: compute.instances.preempted" for i in worker_ids if i in self.taken}


@pytest.mark.parametrize("settings", [LONG_LEASES])  # handed back inside its lease, not swept as lost first
@pytest.mark.parametrize("remote", [True, False], ids=["remote", "in-process"])
async def test_jobs_of_a_worker_the_provider_reports_preempted_come_back_unspent(
    live: LiveServer, remote: bool
) -> None:
    g = group(max_workers=3)
    provider = SpotProvider(["spot-1", "spot-2", "alive"], taken={"spot-1"})
    admin, worker = live.client("admin"), live.client("worker")
    try:
        jobs = {}
        for wid in ("spot-1", "spot-2", "alive"):  # each claims one job, then (but for "alive") falls silent
            await worker.register(
                {"id": wid, "queue": "q", "group": g.name, "slots": 1, "runtimes": ["process"], "cpus": 1}
            )
            job, _ = await admin.submit(
                SubmitRequest(queue="q", definition=JobDefinition(command=["x", wid]), max_attempts=1)
            )
            (claim,), _, _ = await worker.claim(wid, 1, wait=0)
            jobs[wid] = claim.job.id
        # the controller's clock runs ahead: the workers' heartbeats look older than SILENT_AFTER
        ahead = lambda: time.time() + 10  # noqa: E731
        observer = RemoteObserver(admin) if remote else StoreObserver(live.store, Notifier(), ahead)
        async with controlling(Controller([(g, provider)], observer, tick=0.2, clock=ahead)):

            async def preempted() -> list[dict]:
                return [e for e in await admin.events(group=g.name) if e["kind"] == "preempted"]

            (event,) = await eventually(preempted, what="a preempted event")
            while True:  # keep "alive" alive: it is asked about (silent by the clock ahead) but not taken
                await worker.heartbeat("alive", leases=None)
                if len(provider.asked) >= 2:
                    break
                await asyncio.sleep(0.1)
        assert "spot-1 was preempted (instance spot-1: compute.instances.preempted)" in event["reason"]
        assert "1 job(s) back in the queue" in event["reason"]
        back = await admin.get_job(jobs["spot-1"])
        assert (back.state, back.attempts) == ("queued", 0)  # max_attempts 1, and not spent
        assert [a["outcome"] for a in await admin.attempts(back.id)] == ["preempted"]
        for wid in ("spot-2", "alive"):  # not taken: their jobs are left to their leases (running, or lost)
            assert [a["outcome"] for a in await admin.attempts(jobs[wid])] in ([None], ["lost"])
        assert provider.asked[0] == ["alive", "spot-1", "spot-2"]
    finally:
        await admin.close()
        await worker.close()
