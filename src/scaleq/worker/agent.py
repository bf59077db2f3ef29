"""The worker agent: claim jobs from one queue up to its slots, run them, report, drain on SIGTERM.

Design:

- **One claim loop.** While slots are free it long-polls ``claim`` for up to that many jobs; while none are free it
  waits for a slot. A finished job's result rides along with the claim that its freed slot triggers (one round trip
  per job under load); if the loop is already parked in a long-poll, the result is sent on its own at once.
- **One heartbeat loop** renews the leases the worker holds (running jobs, and results not yet delivered) — only
  those, so a lease it never learnt of (a claim whose answer was lost) expires and its job is queued again. The
  answer lists the leases still live; a running attempt whose lease is gone (cancelled, expired, taken over) is
  abandoned: its task is cancelled, which makes the runtime stop it — unless the heartbeat left before the claim of
  that lease was answered (it may have read the leases before the claim committed). When the server answers the
  registration with ``claim_is_heartbeat`` (:mod:`scaleq.server.liveness`), an idle worker with its claim parked
  skips its beats: the open claim keeps it alive, and a drain reaches it through the claim's answer. So a large idle
  fleet costs the server one re-poll per worker per long-poll, not a heartbeat every couple of seconds.
- **Fencing.** Logs, outputs and the finish all present the attempt's lease; a 409 means the attempt was replaced,
  and the worker stops it without reporting.
- **Server outages** are waited out: jobs keep running, results are retried, and only after ``server_grace`` seconds
  without any answer does the worker stop its jobs and exit. Heartbeats go on until every result has landed, so a
  result the server is slow to take (an outage, or a whole fleet reporting in the same second) keeps its lease.
- **Dead neighbours' runs.** A worker killed mid-job (``kill -9``) leaves its containers running on the engine: at
  start and then once per lease period, the worker lists the runs other workers left on its engines, asks the server
  which of those attempts it has ended (lease lost, cancelled, …) and removes them, so a requeued job does not run
  twice at once on that engine for longer than about a lease. (Process jobs die with their worker by themselves:
  see :mod:`scaleq.worker.runtime.watchdog`.)
- **Drain.** The first SIGTERM (or the server saying ``draining``) stops claiming; running jobs finish; then the
  worker deregisters and exits 0. A second signal stops the jobs and hands them back to the queue.
- **Preemption.** On a machine the provider may take back (a GCP spot VM, a pod on spot nodes, a Fly machine: the
  providers start those workers with ``--on-notice handback``, see ``providers.base.preemptible``) SIGTERM is that
  notice, and there is no time to finish anything: the worker stops claiming, hands every running job back at once
  (``release`` with reason ``preempted``: no attempt spent, the attempt's outcome says why), stops them, deregisters
  and exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import signal
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from scaleq.client import ApiError, Client, Unreachable
from scaleq.jobs import Claim
from scaleq.loop import wait_set
from scaleq.worker import transfer
from scaleq.worker.logship import LogShipper
from scaleq.worker.metrics import WorkerMetrics
from scaleq.worker.runtime.base import RunResult, RunSpec, Runtime

log = logging.getLogger("scaleq.worker")

#: A beat's sleep is a random share of the interval asked for, from this to all of it (see WorkerAgent._beat_wait).
BEAT_JITTER = 0.75


def default_worker_id() -> str:
    return f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"


def total_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


@dataclass
class WorkerConfig:
    server: str
    token: str | None
    queue: str
    runtimes: dict[str, Runtime]
    slots: int = field(default_factory=lambda: os.cpu_count() or 1)
    worker_id: str = field(default_factory=default_worker_id)
    group: str | None = None
    tags: list[str] = field(default_factory=list)
    cpus: float = field(default_factory=lambda: float(os.cpu_count() or 1))
    memory: int | None = field(default_factory=total_memory)
    gpus: int = 0
    allow_host_network: bool = False
    work_dir: Path | None = None
    server_grace: float = 600.0
    metrics_port: int | None = None  # serve /metrics here (0: any free port); None: no endpoint
    metrics_host: str = "0.0.0.0"
    #: What SIGTERM means: ``drain`` (finish what runs), or ``handback`` (a preemption notice: hand the jobs back now).
    on_notice: Literal["drain", "handback"] = "drain"


@dataclass
class Running:
    claim: Claim
    task: asyncio.Task[None]
    abandoned: bool = False
    handed_back: bool = False  # released on a preemption notice: stopped without reporting
    #: When the claim's answer arrived: a heartbeat sent before then may have read the leases before it committed.
    claimed_at: float = field(default_factory=time.monotonic)


class WorkerAgent:
    def __init__(self, config: WorkerConfig) -> None:
        self.cfg = config
        self.id = config.worker_id
        self.client = Client(config.server, config.token)
        self.running: dict[str, Running] = {}
        self.pending_finishes: list[dict[str, Any]] = []
        #: Leases whose result is reported but not yet delivered: still held, so still renewed by heartbeats.
        self._finishing: set[str] = set()
        self.heartbeat_seconds = 5.0
        self._quicker = asyncio.Event()  # the beat asked for got shorter: cut the heartbeat loop's sleep
        self._settings_beat = 5.0  # the server's settings' beat, from the registration's answer
        self._beat_failed = False  # the last beat failed: the next comes at the settings' beat
        self.lease_seconds = 15.0
        self._reaping: asyncio.Task[None] | None = None
        self.long_poll = 20.0
        #: The server counts a parked claim as this worker's heartbeat: idle and parked, it skips its heartbeats.
        self.claim_is_heartbeat = False
        self._claim_state = "active"
        self.draining = False
        self.forced = False
        #: The outcome recorded for the jobs this worker hands back: released, or preempted on a provider's notice.
        self.release_reason = "released"
        self._polling = False
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        self._last_contact = time.monotonic()
        self._tmp: Path | None = None
        self._sending: set[asyncio.Task[None]] = set()
        self.metrics: WorkerMetrics | None = None

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def run(self) -> int:
        """Run until drained; the exit code for the process."""
        self._tmp = Path(tempfile.mkdtemp(prefix=f"scaleq-{self.id}-", dir=self.cfg.work_dir))
        # Traversable, not listable: a job run as another user reaches its own attempt dir (0700) by name only.
        os.chmod(self._tmp, 0o711)
        loop = asyncio.get_running_loop()
        for sig, handler in ((signal.SIGTERM, self.notice), (signal.SIGINT, self.request_drain)):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, handler)
        try:
            if self.cfg.metrics_port is not None:
                self.metrics = WorkerMetrics(self.cfg.slots, lambda: len(self.running), lambda: self.draining)
                try:
                    self.metrics.serve(self.cfg.metrics_port, self.cfg.metrics_host)
                except OSError as exc:
                    raise SystemExit(f"cannot serve metrics on port {self.cfg.metrics_port}: {exc}") from exc
            for runtime in self.cfg.runtimes.values():
                removed = await runtime.cleanup_orphans(self.id)
                if removed:
                    log.info("removed %d leftovers of an earlier run of %s", removed, self.id)
            await self._register()
            self._reap_soon()
            heart = asyncio.create_task(self._heartbeat_loop())
            try:
                code = await self._claim_loop()
                # beating on until the results have landed: a server slow to take them (a whole fleet reporting in
                # the same second) must not let their leases expire meanwhile, which would run the jobs again
                await self._flush_finishes()
            finally:
                heart.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await heart
                if self._reaping is not None:
                    self._reaping.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await self._reaping
            with contextlib.suppress(ApiError, Unreachable):
                await self.client.deregister(self.id)
            log.info("worker %s stopped", self.id)
            return code
        finally:
            if self.metrics is not None:
                self.metrics.stop()
            await self.client.close()
            transfer.remove_tree(self._tmp)

    def notice(self) -> None:
        """SIGTERM: drain, or — on a preemptible machine — hand the jobs back at once."""
        if self.cfg.on_notice == "handback":
            self.hand_back("preemption notice (SIGTERM on a preemptible worker)")
        else:
            self.request_drain()

    def hand_back(self, why: str) -> None:
        """Stop claiming, release every running job with reason ``preempted`` (no attempt spent), stop them, exit."""
        if self.release_reason == "preempted":
            return
        self.release_reason = "preempted"
        log.warning(
            "%s: handing back %d running job(s) without spending an attempt, then exiting", why, len(self.running)
        )
        self.draining = self.forced = True
        handed = [r for r in self.running.values() if not r.abandoned and not r.task.done()]
        for r in handed:
            r.handed_back = True
        task = asyncio.create_task(self._hand_back(handed))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)
        self._wake.set()

    async def _hand_back(self, handed: list[Running]) -> None:
        """Release first (the server may requeue at once), stopping the jobs meanwhile; then tell the server."""
        for r in handed:
            r.task.cancel()

        async def release(r: Running) -> None:
            try:
                await self.client.release(r.claim.lease, "preempted")
                log.info("job %s attempt %d handed back (preempted)", r.claim.job.id[:12], r.claim.attempt)
            except (ApiError, Unreachable) as exc:  # its lease expires instead: the attempt then counts as lost
                log.warning("could not hand back job %s: %s", r.claim.job.id[:12], exc)

        await asyncio.gather(*(release(r) for r in handed))
        await self._announce_drain()

    def request_drain(self) -> None:
        if self.draining:
            log.warning("second stop signal: stopping running jobs and handing them back")
            self.forced = True
            for r in self.running.values():
                r.task.cancel()
        else:
            log.info("draining: no new jobs; %d running will finish", len(self.running))
            self.draining = True
            # tell the server, which also ends our parked claim at once
            task = asyncio.create_task(self._announce_drain())
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._wake.set()

    async def _announce_drain(self) -> None:
        with contextlib.suppress(ApiError, Unreachable):
            await self.client.heartbeat(self.id, draining=True, leases=self._held())

    async def _register(self) -> None:
        cfg = self.cfg
        body = {
            "id": self.id,
            "queue": cfg.queue,
            "group": cfg.group,
            "slots": cfg.slots,
            "runtimes": sorted(cfg.runtimes),
            "cpus": cfg.cpus,
            "memory": cfg.memory,
            "gpus": cfg.gpus,
            "tags": cfg.tags,
            "host_network": cfg.allow_host_network,
            "hostname": socket.gethostname(),
        }
        answer = await self._retrying(lambda: self.client.register(body))
        self._settings_beat = answer["heartbeat_seconds"]  # the settings' (servers with a cadence answer it here)
        self.client.cadence = self._settings_beat
        self._follow_cadence()
        self.lease_seconds = answer["lease_seconds"]
        self.long_poll = answer["long_poll_max"]
        self.claim_is_heartbeat = bool(answer.get("claim_is_heartbeat", False))  # servers before it: False
        log.info("worker %s registered on queue %s with %d slots", self.id, cfg.queue, cfg.slots)

    async def _retrying(self, call: Any) -> Any:
        """Call until the server answers; give up after ``server_grace`` seconds of silence."""
        delay = 0.2
        while True:
            try:
                result = await call()
                self._last_contact = time.monotonic()
                return result
            except Unreachable as exc:
                if time.monotonic() - self._last_contact > self.cfg.server_grace:
                    raise SystemExit(f"server unreachable for over {self.cfg.server_grace:.0f} s: {exc}") from exc
                log.warning("%s; retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # -- claiming ---------------------------------------------------------------------------------------------

    async def _claim_loop(self) -> int:
        while True:
            if self.draining:
                if not self.running:
                    return 0
                await self._wait_wake()
                continue
            free = self.cfg.slots - len(self.running)
            if free <= 0:
                await self._wait_wake()
                continue
            finishes, self.pending_finishes = self.pending_finishes, []
            self._polling = True
            try:
                claims, outcomes, state = await self.client.claim(self.id, free, wait=self.long_poll, finishes=finishes)
                self._last_contact = time.monotonic()
                # quicker only: the leases held already were renewed at their own beat's term, which only a
                # heartbeat (renewing them all at once) may lengthen
                self._follow_cadence(quicker_only=True)
                self._finishing.difference_update(f["lease"] for f in finishes)
            except Unreachable as exc:
                self.pending_finishes[:0] = finishes
                if time.monotonic() - self._last_contact > self.cfg.server_grace:
                    log.error("server unreachable for over %.0f s; stopping", self.cfg.server_grace)
                    self.request_drain()
                    self.request_drain()
                    continue
                log.warning("%s; retrying", exc)
                await asyncio.sleep(1.0)
                continue
            except ApiError as exc:
                self.pending_finishes[:0] = finishes
                if exc.status == 404:
                    await self._register()
                    continue
                raise
            finally:
                self._polling = False
            for o in outcomes:
                if not o["ok"]:
                    log.warning("result of an attempt was refused: %s", o.get("detail"))
            for claim in claims:
                if self.draining:  # claimed while the drain began: hand it straight back, unrun and unspent
                    with contextlib.suppress(ApiError, Unreachable):
                        await self.client.release(claim.lease, self.release_reason)
                else:
                    self._start(claim)
            self._claim_state = state
            if state == "draining" and not self.draining:
                self.request_drain()
            if state == "gone":  # given up on while unreachable: a heartbeat makes it active again
                with contextlib.suppress(ApiError, Unreachable):
                    await self.client.heartbeat(self.id, leases=self._held())
                await asyncio.sleep(0.2)

    async def _wait_wake(self) -> None:
        self._wake.clear()
        await wait_set(self._wake, 5.0)

    # -- heartbeats -------------------------------------------------------------------------------------------

    def _follow_cadence(self, *, quicker_only: bool = False) -> None:
        """Beat as often as the server's last answer asked (:mod:`scaleq.server.cadence`: slower as the fleet grows).
        A lease lasts three of the beats asked for when it was granted or last renewed, so a quicker beat cuts the
        current sleep, and only a heartbeat's answer (which renewed every lease held) may slow it: ``quicker_only``
        for a claim's answer, and for a heartbeat's that left before a lease held now was claimed."""
        asked = self.client.cadence
        if not asked or asked == self.heartbeat_seconds or (quicker_only and asked > self.heartbeat_seconds):
            return
        if asked < self.heartbeat_seconds:
            self._quicker.set()
        self.heartbeat_seconds = asked

    async def _beat_wait(self) -> None:
        """Sleep one beat: a random 75 to 100 % of it (a fleet that got its jobs, or its slower beat, at one moment
        would otherwise beat in step, every worker within the same second; Nomad staggers its clients' heartbeats
        for the same reason). A quicker beat asked for meanwhile cuts the sleep; a slower one never lengthens it.
        After a beat that failed (refused or cut off: a server restarting) the next comes at the settings' beat, so
        that a server back from a restart hears from its busy workers within the grace it gives their leases; after
        one that timed out (a server busy) the beat stays as it was."""
        beat = min(self.heartbeat_seconds, self._settings_beat) if self._beat_failed else self.heartbeat_seconds
        began, share = time.monotonic(), random.uniform(BEAT_JITTER, 1.0)
        deadline = began + share * beat
        self._beat_failed = False
        self._quicker.clear()
        await wait_set(self._quicker, deadline - began)
        left = min(deadline, began + share * self.heartbeat_seconds) - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def _heartbeat_loop(self) -> None:
        reaped = time.monotonic()
        while True:
            await self._beat_wait()
            sent = time.monotonic()
            if sent - reaped >= self.lease_seconds:
                reaped = sent
                self._reap_soon()
            if self.parked_idle():
                if self.metrics is not None:
                    await self.metrics.refresh_queue(self.client, self.cfg.queue)
                continue
            try:
                state, live = await self.client.heartbeat(self.id, leases=self._held())
                self._last_contact = time.monotonic()
                self._follow_cadence(quicker_only=any(r.claimed_at >= sent for r in self.running.values()))
            except Unreachable as exc:
                log.warning("heartbeat failed: %s", exc)
                # A server that timed out is busy, not away: beating more often would only lengthen its line (a
                # fleet whose jobs all ended at once, reporting in the same second), and the beat it may still be
                # taking renews the leases all the same.
                self._beat_failed = not exc.timed_out
                continue
            except ApiError as exc:
                if exc.status == 404:
                    await self._register()
                    continue
                log.warning("heartbeat refused: %s", exc)
                self._beat_failed = True
                continue
            for lease, r in list(self.running.items()):
                # A lease claimed after this heartbeat left may be missing from its answer and yet live (the
                # heartbeat, on this server or another, read the leases before the claim committed).
                if lease not in live and not r.task.done() and r.claimed_at < sent:
                    self._abandon(r, "its lease is no longer live (cancelled, or expired and taken over)")
            if state == "draining" and not self.draining:
                self.request_drain()
            if self.metrics is not None:
                await self.metrics.refresh_queue(self.client, self.cfg.queue)

    def _reap_soon(self) -> None:
        """Look for dead workers' runs in the background (an engine's listing must not delay a heartbeat)."""
        if self._reaping is None or self._reaping.done():
            self._reaping = asyncio.create_task(self._reap_ended_attempts())

    async def _reap_ended_attempts(self) -> None:
        for runtime in self.cfg.runtimes.values():
            try:
                found = await runtime.others_attempts(self.id)
                ended = await self.client.ended_attempts(self.id, sorted(found)[:1000]) if found else set()
                for job_id, attempt in sorted(ended):
                    removed = await runtime.reap_attempt(job_id, attempt)
                    log.warning(
                        "removed the run of job %s attempt %d that its dead worker left (%d objects)",
                        job_id[:12],
                        attempt,
                        removed,
                    )
            except Exception as exc:  # the engine or the server: try again next time
                log.warning("could not look for dead workers' runs on runtime %s: %s", runtime.name, exc)

    def parked_idle(self) -> bool:
        """Idle with a claim parked on a server that counts it as a heartbeat: no beat needed (nothing to renew,
        and a drain or a gone state reaches this worker through the claim's answer)."""
        return self.claim_is_heartbeat and self._polling and self._claim_state == "active" and not self._held()

    def _held(self) -> list[str]:
        """The leases to renew: jobs running, and results not yet delivered. Nothing else — a claim whose answer
        was lost (the server died after committing it) left a lease this worker never learnt of: unrenewed, it
        expires and the job goes back to the queue, instead of being kept alive here forever."""
        return sorted(set(self.running) | self._finishing)

    def _abandon(self, r: Running, why: str) -> None:
        if not r.abandoned:
            log.warning("stopping job %s attempt %d: %s", r.claim.job.id[:12], r.claim.attempt, why)
            r.abandoned = True
            r.task.cancel()

    # -- running a job ----------------------------------------------------------------------------------------

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._run_job(claim), name=f"job-{claim.job.id[:12]}")
        self.running[claim.lease] = Running(claim, task)

    async def _run_job(self, claim: Claim) -> None:
        job, lease = claim.job, claim.lease
        r = self.running[lease]
        assert self._tmp is not None
        base = self._tmp / f"{job.id[:16]}-{claim.attempt}"
        spec = RunSpec(
            job.id,
            claim.attempt,
            self.id,
            job.definition,
            base / "inputs",
            base / "outputs",
            job.array_id,
            job.array_index,
        )
        base.mkdir(mode=0o700, exist_ok=True)
        shipper = LogShipper(
            self.client,
            lease,
            on_stale=lambda: self._abandon(r, "the server refused its logs"),
            give_up_after=self.cfg.server_grace,
        )
        result: RunResult | None = None
        try:
            runtime = self.cfg.runtimes.get(job.definition.runtime.value)
            if runtime is None:
                result = RunResult("failed", error=f"worker {self.id} has no {job.definition.runtime} runtime")
            else:
                await transfer.fetch_inputs(self.client, job.definition, spec.inputs_dir)
                log.info("job %s attempt %d started", job.id[:12], claim.attempt)
                async with shipper:
                    result = await runtime.run(spec, shipper.write)
                if result is not None and not r.abandoned:
                    archive = base / "outputs.tar"  # beside /outputs, never in it; removed with the work dir
                    if await asyncio.to_thread(transfer.pack_outputs, spec.outputs_dir, archive):
                        try:
                            await self._retrying(lambda: self.client.put_outputs(lease, archive))
                        except ApiError as exc:
                            if exc.status not in (400, 413):
                                raise
                            result = RunResult("failed", error=f"outputs refused by the server: {exc.detail}")
        except asyncio.CancelledError:
            if r.handed_back:  # released already (hand_back)
                self._count("handed_back")
                return
            if self.forced and not r.abandoned:
                with contextlib.suppress(ApiError, Unreachable):
                    await self.client.release(lease)
                log.info("job %s handed back", job.id[:12])
            self._count("handed_back" if self.forced and not r.abandoned else "abandoned")
            return
        except ApiError as exc:
            if exc.stale:
                log.warning("job %s attempt %d was replaced; dropping it", job.id[:12], claim.attempt)
                self._count("abandoned")
                return
            result = RunResult("failed", error=f"worker error: {exc}")
        except Exception as exc:  # the job fails, the worker lives on
            log.exception("job %s failed in the worker", job.id[:12])
            result = RunResult("failed", error=f"worker error: {type(exc).__name__}: {exc}")
        finally:
            self.running.pop(lease, None)
            transfer.remove_tree(base)
            self._wake.set()
        self._count("abandoned" if r.abandoned or result is None else result.reason)
        if result is not None and not r.abandoned:
            log.info("job %s attempt %d finished: %s", job.id[:12], claim.attempt, result.reason)
            self._report(
                {"lease": lease, "reason": result.reason, "exit_code": result.exit_code, "error": result.error}
            )

    def _count(self, reason: str) -> None:
        if self.metrics is not None:
            self.metrics.finished(reason)

    def _report(self, finish: dict[str, Any]) -> None:
        self._finishing.add(finish["lease"])
        # Ride along with the next claim if the claim loop is about to make one; otherwise send now.
        if self._polling or self.draining:
            task = asyncio.create_task(self._send_finish(finish))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        else:
            self.pending_finishes.append(finish)
            self._wake.set()

    async def _send_finish(self, finish: dict[str, Any]) -> None:
        try:
            await self._retrying(lambda: self.client.finish(finish))
        except ApiError as exc:
            if not exc.stale:
                raise
            log.warning("result refused (attempt replaced): %s", exc.detail)
        self._finishing.discard(finish["lease"])

    async def _flush_finishes(self) -> None:
        finishes, self.pending_finishes = self.pending_finishes, []
        for f in finishes:
            await self._send_finish(f)
        # results sent on their own may still be in flight: let them land before deregistering
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=self.cfg.server_grace)
