"""Fleet scale: how many workers one ``scaleq server`` carries (issue 11), measured with N simulated workers.

    python bench/fleet.py --workers 100,1000 --setups sqlite --duration 30        # a quick look, ~2 min
    python bench/fleet.py                     # the full matrix (see docs/benchmarks.md for sizes and times)
    python bench/fleet.py --output json > fleet.json

**Setups.** ``sqlite``: one ``scaleq server`` over SQLite in its data dir; ``postgres``: one over a throw-away
PostgreSQL cluster (``tests/pg.py``, default settings, ``max_connections=200``); ``postgres-2``: two servers on that
one database, the workers split between them (and the submitter's batches alternating). Each server is ``scaleq
server --port 0`` in a process of its own, started fresh for each row; its tokens are the ones it writes into its
data dir, as in the other benches. The file-descriptor limit is raised to the hard limit (or more, as root) for the
servers and the generators, and each generator connects from a loopback address of its own (``127.1.r.k``) so that
neither fds nor ephemeral ports cap the fleet before the server does. ``--server-cpu PCT`` holds each server to PCT %
of one core (a cgroup of its own with a CFS quota; root): on a machine whose cores the servers, the database and the
generators all share, that is how two servers can be compared with one.

**Workers.** Each simulated worker speaks the worker protocol as ``scaleq worker`` (``worker/agent.py``) speaks it,
at the HTTP level: the same requests, bodies and timeouts as ``scaleq.client.Client``, over two keep-alive connections
per worker (the parked claim's and the one heartbeats take, as httpx's pool holds them):

* ``POST /workers`` (1 slot, the process runtime) — the answer gives ``heartbeat_seconds`` and ``long_poll_max``;
* a claim loop: ``POST /workers/{id}/claim {"max": 1, "wait": long_poll_max, "finishes": […]}``; a job is "run" by
  sleeping 1 s; its finish rides along with the next claim (the agent's path with one slot); 404 → register again;
* a heartbeat loop: sleep ``heartbeat_seconds``, then ``POST /workers/{id}/heartbeat {"leases": held}``; a held
  lease missing from the answer (and claimed before the heartbeat left) is abandoned, as the agent does. The beat
  follows the ``heartbeat_seconds`` of the last claim's or heartbeat's answer (the grid's cadence, slower as it
  grows), each sleep a random 75-100 % of it and a shorter one cutting the current sleep, as the agent does. When the
  registration answered ``claim_is_heartbeat`` the beat is skipped while the worker holds no lease (idle, its claim
  parked), as the agent skips it;
* a worker the server does not accept (registration retried until the row ends) is counted as *never registered*
  and takes no further part; the row goes on.
* at the end: ``heartbeat draining``, the last finish on its own (``POST /leases/finish``, tried again after no
  answer or a 502-504, heartbeats going on until it has landed, as the agent does), ``DELETE /workers/{id}``.

The HTTP client is a minimal HTTP/1.1 one on asyncio streams (uvloop, as the agent runs): httpx costs ~0.2-0.3 ms of
CPU per request, and 10,000 workers make thousands of requests a second (idle: re-polls; busy: beats every 2 s
below the heartbeat budget, up to 15 s past it) — httpx alone would need most of the machine's two cores. The
workers are spread over ``--generators`` processes (default: one per 2,500 workers), each with its own event loop;
each reports its CPU over the measured window and its event-loop lag (the submitter its CPU), and a row where one
exceeded 70 % of a core is flagged: its latencies may be the generator's, not the server's.

**Modes.** ``idle``: no jobs (heartbeats and re-polled long-polls only). ``flow``: a submitter process (the project's
``Client.submit_many``, a batch every 0.2 s) submits ``N / 10 / J`` jobs of ``J = --job-seconds`` s per second (default
1 s: ``N / 10`` jobs a second), which keeps a tenth of the fleet busy. With one-second jobs the row is as much a
dispatch-throughput test as a fleet test (5,000 workers: 500 jobs/s, near one SQLite server's 1-slot drain rate in
``bench/dispatch.py``); longer jobs at the same busy share measure what a fleet of batch workers costs. ``busy``:
``N`` jobs submitted as the ramp ends, one per worker, each running until the fleet leaves: the whole fleet holds a
lease through the window and its heartbeats are the load (long batch jobs; the grid's cadence slows the beat past
its budget).

**Timeline of a row.** Workers register spread over ``--ramp`` s (default 20: one long-poll, so the re-polls are
spread too); the jobs start with the last registration; after 5 s more, ``--duration`` s are measured (in busy mode
the window's first seconds still hold the tail of the burst of every worker claiming its job at once); then the
workers drain and leave (spread over 5 s). Only requests *sent* inside the measured window count.

**Per row.**

* *server CPU* (% of one core, user+system from ``/proc`` over the window; with two servers the sum, each in JSON),
  *RSS* (the largest sample, per server), *PostgreSQL CPU* and *connections* (largest count in ``pg_stat_activity``
  for the row's database, this bench's own connection excluded);
* *heartbeat* p50 / p99: round trip of ``POST …/heartbeat``; "—" when no worker needed one (idle, parked on a
  server that answers ``claim_is_heartbeat``: the claim's answer is then the liveness latency);
* *claim answer* p50 / p99: how late a claim is answered after it could have been — for a claim that gets a job,
  answer - max(claim sent, job submitted); for one that comes back empty, answer - (sent + its wait). An overloaded
  server shows here first: parked claims answered late, finishes riding along processed late;
* *submit → claimed* p99 (flow): the claim's answer - the job's ``submitted_at`` (the server's clock, same host);
* *spurious* lease expiries — every worker is alive and heartbeating throughout, so any lost attempt is spurious:
  attempts the server ended ``lost`` (a lease expired), jobs finished ``worker_lost``, leases a worker had to
  abandon (its heartbeat's answer no longer listed them), finishes refused, and workers the server marked gone
  while they were beating — counted from the server's own log (its housekeeping's "stopped heartbeating; marked
  gone" lines for this row's workers, those whose silence began before the fleet started leaving; the rest, workers
  that left without managing to deregister, are ``marked_gone_after_leaving`` in the JSON), never from a listing of
  states: a worker that deregisters is ``gone`` too. Lost attempts are counted over the whole row, ramp and leaving
  included (``lost_in_window`` in the JSON: those whose lease expired inside the window). Counted from the store
  after the row (SQL on ``attempts`` and ``jobs``), from the server's log and from the workers;
* *server loop* (JSON ``server_loop``, per server): its event loop's lag over the window (p99 and the largest, as
  the upper bounds of ``scaleq_event_loop_lag_seconds``' buckets) and its full garbage collections (count, mean
  pause: ``scaleq_gc_full_seconds``), read from its ``/metrics`` at both ends of the window: why a row is late;
  and how long the longer of those two scrapes took (``metrics_scrape_ms``: what Prometheus meets at this size);
* *errors*: requests sent inside the window that failed (timeouts, resets, 5xx), by kind, in JSON; those sent
  during the ramp or the teardown (a fleet of thousands registering or leaving within seconds) are reported apart,
  as ``errors_outside_window``, and do not count in the verdict;
* *listen overflows* (JSON ``listen_overflows``): connections the kernel dropped over the row, ramp and teardown
  included, because the server's accept queue was full (machine-wide: ``TcpExtListenOverflows``). Each such client
  waits out TCP's retransmit timer while the server may sit idle;
* *machine probe* (JSON ``machine_probe_ms``): how long a fixed piece of Python took before the row and after it
  (``_pg.speed_probe_ms``). These VMs drift in speed by a third and more over minutes: compare rows whose probes
  agree, and read a row whose probes differ as run on a machine that changed under it;
* *verdict*: ``ok`` when spurious = 0, no failed requests and heartbeat and claim-answer p99 < 250 ms (issue 11's
  limits), else what missed; ``gen!`` marks a row whose generator was saturated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import math
import multiprocessing as mp
import os
import random
import re
import resource
import secrets
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pg
from rich.console import Console
from rich.table import Table

SETUPS = ("sqlite", "postgres", "postgres-2")
MODES = ("idle", "flow", "busy")
BUSY_SHARE = 0.1  # flow: a tenth of the fleet busy
SETTLE = 5.0  # seconds between the end of the ramp and the measured window
TEARDOWN = 5.0  # workers leave spread over this long
KEEP_ALIVE = 15.0  # an idle connection is dropped after this long, as scaleq.client.KEEP_ALIVE
GONE_AFTER = 45.0  # the servers' worker_gone_after (the default), for a gone-mark whose log line does not say it
HB_P99_LIMIT = 0.250
GEN_CPU_LIMIT = 70.0  # % of a core
WORKERS_PER_GENERATOR = 2500

console = Console(width=180, stderr=True)


def pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    s = sorted(values)
    return s[max(0, min(len(s) - 1, math.ceil(p / 100 * len(s)) - 1))]


def raise_fd_limit(wanted: int) -> int:
    """Raise RLIMIT_NOFILE (inherited by the servers started after): to ``wanted`` if we may (root), else the hard
    limit. The new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(wanted, soft), max(wanted, hard)))
        return max(wanted, soft)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    return soft


# -- a minimal HTTP/1.1 client ----------------------------------------------------------------------------------


class Down(Exception):
    """No answer: connection refused, reset or closed, or a timeout (the client's ``Unreachable``)."""


class Conn:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after the server closed it."""

    def __init__(self, host: str, port: int, local: str, token: str) -> None:
        self.host, self.port, self.local = host, port, local
        self.head = (
            f"host: {host}:{port}\r\naccept: */*\r\naccept-encoding: gzip, deflate\r\nconnection: keep-alive\r\n"
            f"user-agent: scaleq-fleet-bench\r\nauthorization: Bearer {token}\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float) -> tuple[int, Any]:
        """Status and parsed JSON (None when empty). Raises :class:`Down` when nothing answered."""
        data = json.dumps(body, separators=(",", ":")).encode() if body is not None else None
        msg = f"{method} /api/v1{path} HTTP/1.1\r\n".encode() + self.head
        if data is not None:
            msg += b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)
        else:
            msg += b"\r\n"
        try:
            async with asyncio.timeout(timeout):
                if self.reader is None or self.writer is None or self.reader.at_eof() or self.writer.is_closing():
                    self.close()
                    async with asyncio.timeout(5.0):  # httpx's connect timeout in the client
                        self.reader, self.writer = await asyncio.open_connection(
                            self.host, self.port, local_addr=(self.local, 0)
                        )
                self.writer.write(msg)
                head = await self.reader.readuntil(b"\r\n\r\n")
                lines = head.split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                length, chunked, close = 0, False, False
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"transfer-encoding" and b"chunked" in value.lower():
                        chunked = True
                    elif name == b"connection" and b"close" in value.lower():
                        close = True
                if chunked:
                    content = b""
                    while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
                        content += (await self.reader.readexactly(size + 2))[:-2]
                    await self.reader.readuntil(b"\r\n")
                else:
                    content = await self.reader.readexactly(length) if length else b""
                if close:
                    self.close()
        except (OSError, TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError) as exc:
            self.close()
            raise Down(type(exc).__name__) from exc
        except BaseException:
            self.close()
            raise
        return status, (json.loads(content) if content else None)


class Pool:
    """A worker's connections, as httpx's pool keeps them: an idle one is reused (closed after 15 s idle, the
    client's keep-alive expiry), a new one opened while all are busy — so a worker holds two: its parked claim's and
    the one its heartbeats take."""

    def __init__(self, server: str, local: str, token: str) -> None:
        host, port = server.removeprefix("http://").rsplit(":", 1)
        self.host, self.port, self.local, self.token = host, int(port), local, token
        self.idle: list[tuple[Conn, float]] = []

    async def request(self, method: str, path: str, body: Any = None, *, timeout: float) -> tuple[int, Any]:
        conn = None
        while self.idle:
            candidate, since = self.idle.pop()
            if time.monotonic() - since < KEEP_ALIVE:
                conn = candidate
                break
            candidate.close()
        if conn is None:
            conn = Conn(self.host, self.port, self.local, self.token)
        answer = await conn.request(method, path, body, timeout=timeout)  # closed (not kept) on failure
        if conn.writer is not None:
            self.idle.append((conn, time.monotonic()))
        return answer

    def close(self) -> None:
        for conn, _ in self.idle:
            conn.close()
        self.idle.clear()


# -- the simulated workers (one generator process) --------------------------------------------------------------


@dataclass
class Window:
    """The wall-clock plan of a row, the same in every process."""

    start: float  # first registration
    ramp: float
    measure_from: float
    measure_to: float
    stop: float  # workers start leaving

    def inside(self, t: float) -> bool:
        return self.measure_from <= t < self.measure_to


@dataclass
class GenStats:
    heartbeat: list[float] = field(default_factory=list)
    claim_answer: list[float] = field(default_factory=list)
    claim_answer_job: list[float] = field(default_factory=list)
    claim_late_empty: list[float] = field(default_factory=list)
    submit_to_claimed: list[float] = field(default_factory=list)
    loop_lag: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)  # requests sent inside the window that failed
    errors_outside: Counter[str] = field(default_factory=Counter)  # ...sent during the ramp or the teardown
    requests: int = 0  # sent inside the window
    jobs: int = 0  # claimed inside the window
    abandoned: int = 0  # leases a heartbeat no longer listed (the agent would stop the job)
    refused: int = 0  # finishes the server refused ("this attempt no longer owns its job")
    registered: int = 0
    register_failed: int = 0  # workers the server never accepted (retried until the row ended)
    left: int = 0  # deregistered at the end
    cpu: float = 0.0  # seconds of CPU in the window


class SimWorker:
    def __init__(
        self, wid: str, queue: str, server: str, local: str, token: str, w: Window, stats: GenStats, job_seconds: float
    ) -> None:
        self.id, self.queue, self.w, self.stats, self.job_seconds = wid, queue, w, stats, job_seconds
        self.http = Pool(server, local, token)
        self.heartbeat_seconds = 5.0
        self.quicker = asyncio.Event()  # the beat asked for got shorter: cut the current sleep (as the agent does)
        self.settings_beat = 5.0  # the registration's beat: the server's settings'
        self.beat_failed = False
        self.timed_out = False  # the last call met a timeout (the agent's Unreachable.timed_out)
        self.long_poll = 20.0
        self.claim_is_heartbeat = False  # the server counts a parked claim as this worker's heartbeat
        self.running: dict[str, float] = {}  # lease -> when its claim was answered (monotonic)
        self.job: asyncio.Task[None] | None = None
        self.pending: list[dict[str, Any]] = []
        self.finishing: set[str] = set()
        self.abandoned: set[str] = set()
        self.draining = False
        self.free = asyncio.Event()
        self.free.set()

    def _error(self, what: str, exc_or_status: Any, sent: float) -> None:
        tally = self.stats.errors if self.w.inside(sent) else self.stats.errors_outside
        tally[f"{what} {exc_or_status}"] += 1

    async def call(self, what: str, method: str, path: str, body: Any, timeout: float) -> Any:
        """One request; the answer's JSON, or None after a failure (counted)."""
        sent = time.time()
        if self.w.inside(sent):
            self.stats.requests += 1
        self.timed_out = False
        try:
            status, data = await self.http.request(method, path, body, timeout=timeout)
        except Down as exc:
            self._error(what, exc, sent)
            self.timed_out = str(exc) == "TimeoutError"
            return None
        if status >= 400:
            self._error(what, status, sent)
            if status == 404 and what != "deregister":
                await self.register()
            return None
        if what == "heartbeat" and self.w.inside(sent):
            self.stats.heartbeat.append(time.time() - sent)
        return data if data is not None else {}

    async def call_until_answered(self, what: str, method: str, path: str, body: Any, timeout: float) -> Any:
        """:meth:`call`, tried again after no answer or a 502-504, as the agent's ``_retrying`` (0.2 s doubling to
        2 s), until the row's teardown ends; the answer's JSON, or None."""
        delay = 0.2
        while True:
            sent = time.time()
            try:
                status, data = await self.http.request(method, path, body, timeout=timeout)
            except Down as exc:
                self._error(what, exc, sent)
            else:
                if status not in (502, 503, 504):
                    if status >= 400:
                        self._error(what, status, sent)
                        return None
                    return data if data is not None else {}
                self._error(what, status, sent)
            if time.time() + delay > self.w.stop + TEARDOWN + 80:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def register(self) -> bool:
        """Register (again); False when the server never accepted it before the row ended (counted, not fatal: a
        fleet the server cannot take in is a result, not a crash)."""
        body = {
            "id": self.id,
            "queue": self.queue,
            "group": None,
            "slots": 1,
            "runtimes": ["process"],
            "cpus": 1.0,
            "memory": 2**30,
            "gpus": 0,
            "tags": [],
            "host_network": False,
            "hostname": "fleet-bench",
        }
        delay = 0.2
        while time.time() < self.w.stop + 30:
            sent = time.time()
            try:
                status, data = await self.http.request("POST", "/workers", body, timeout=30)
            except Down as exc:
                self._error("register", exc, sent)
            else:
                if status < 400:
                    self.heartbeat_seconds = self.settings_beat = data["heartbeat_seconds"]
                    self.long_poll = data["long_poll_max"]
                    self.claim_is_heartbeat = bool(data.get("claim_is_heartbeat", False))
                    return True
                self._error("register", status, sent)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        return False

    def held(self) -> list[str]:
        return sorted(set(self.running) | self.finishing)

    def follow(self, data: dict[str, Any], quicker_only: bool) -> None:
        """The beat an answer asks for (the grid's cadence), followed as the agent follows it: a claim's answer, or
        a heartbeat's that left before a lease held now was claimed, may only quicken it."""
        asked = data.get("heartbeat_seconds")
        if not asked or asked == self.heartbeat_seconds or (quicker_only and asked > self.heartbeat_seconds):
            return
        if asked < self.heartbeat_seconds:
            self.quicker.set()
        self.heartbeat_seconds = asked

    async def beat_wait(self) -> None:
        """One beat's sleep, as the agent's: a random 75-100 % of the beat, cut short when the beat quickens, never
        lengthened; after a beat refused or cut off (not timed out), the settings' beat."""
        beat = min(self.heartbeat_seconds, self.settings_beat) if self.beat_failed else self.heartbeat_seconds
        began, share = time.monotonic(), random.uniform(0.75, 1.0)
        deadline = began + share * beat
        self.beat_failed = False
        self.quicker.clear()
        with contextlib.suppress(TimeoutError):  # (not wait_for, which can lose the cancel: see scaleq.loop.wait_set)
            async with asyncio.timeout(deadline - began):
                await self.quicker.wait()
        left = min(deadline, began + share * self.heartbeat_seconds) - time.monotonic()
        if left > 0:
            await asyncio.sleep(left)

    async def heartbeats(self) -> None:
        while True:
            await self.beat_wait()
            if self.claim_is_heartbeat and not self.held():
                continue  # idle: the parked claim keeps this worker alive (as the agent skips its beat)
            sent = time.monotonic()
            body = {"draining": False, "leases": self.held()}
            data = await self.call("heartbeat", "POST", f"/workers/{self.id}/heartbeat", body, 10)
            if not data:
                self.beat_failed = not self.timed_out  # (a busy server: the beat stays, as the agent's)
                continue
            live = set(data["leases"])
            self.follow(data, quicker_only=any(claimed_at >= sent for claimed_at in self.running.values()))
            for lease, claimed_at in list(self.running.items()):
                if lease not in live and claimed_at < sent and lease not in self.abandoned:
                    self.abandoned.add(lease)
                    self.stats.abandoned += 1
                    if self.job is not None:
                        self.job.cancel()

    async def run_job(self, lease: str) -> None:
        try:
            # (busy mode, job_seconds 0: the job runs until the fleet leaves)
            await asyncio.sleep(self.job_seconds or max(0.0, self.w.stop - time.time()))
        except asyncio.CancelledError:
            self.running.pop(lease, None)
            self.free.set()
            return
        self.running.pop(lease, None)
        self.finishing.add(lease)
        self.pending.append({"lease": lease, "reason": "success", "exit_code": 0, "error": None})
        self.free.set()

    async def claims(self) -> None:
        while not self.draining:
            await self.free.wait()
            if self.draining:
                break
            finishes, self.pending = self.pending, []
            sent = time.time()
            body = {"max": 1, "wait": self.long_poll, "finishes": finishes}
            try:
                data = await self.call("claim", "POST", f"/workers/{self.id}/claim", body, self.long_poll + 30)
            except asyncio.CancelledError:  # (the leaving worker gave up on this claim: its results go on their own)
                self.pending[:0] = finishes
                raise
            if data is None:
                self.pending[:0] = finishes
                await asyncio.sleep(1.0)
                continue
            answered = time.time()
            self.follow(data, quicker_only=True)
            self.finishing.difference_update(f["lease"] for f in finishes)
            self.stats.refused += sum(1 for o in data["finished"] if not o["ok"])
            for c in data["claims"]:
                if self.draining:  # claimed as the drain began: hand it straight back
                    await self.call("release", "POST", "/leases/release", {"lease": c["lease"]}, 30)
                    continue
                self.running[c["lease"]] = time.monotonic()
                self.free.clear()
                self.job = asyncio.create_task(self.run_job(c["lease"]))
                # a claim counts when the moment it could be answered falls in the window
                submitted = c["job"]["submitted_at"]
                if self.w.inside(max(sent, submitted)):
                    self.stats.jobs += 1
                    self.stats.submit_to_claimed.append(answered - submitted)
                    late = answered - max(sent, submitted)
                    self.stats.claim_answer.append(late)
                    self.stats.claim_answer_job.append(late)
            if not data["claims"] and self.w.inside(sent + self.long_poll) and data["state"] == "active":
                late = max(0.0, answered - (sent + self.long_poll))
                self.stats.claim_answer.append(late)
                self.stats.claim_late_empty.append(late)
            if data["state"] == "draining":
                self.draining = True

    async def run(self, slot: float) -> None:
        await asyncio.sleep(max(0.0, slot - time.time()))
        if not await self.register():
            self.stats.register_failed += 1
            self.http.close()
            return
        self.stats.registered += 1
        beat = asyncio.create_task(self.heartbeats())
        claiming = asyncio.create_task(self.claims())
        await asyncio.sleep(max(0.0, self.w.stop + random.uniform(0, TEARDOWN) - time.time()))
        # leave as the agent does: announce the drain (ends the parked claim), let the job finish, report, go
        self.draining = True
        self.free.set()
        body = {"draining": True, "leases": self.held()}
        await self.call("drain", "POST", f"/workers/{self.id}/heartbeat", body, 10)
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await asyncio.wait_for(claiming, self.long_poll + 35)
        if self.job is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self.job
        # the results, retried until the server takes them and beating on meanwhile (as the agent does)
        for f in self.pending:
            await self.call_until_answered("finish", "POST", "/leases/finish", f, 30)
            self.finishing.discard(f["lease"])
        beat.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await beat
        if await self.call("deregister", "DELETE", f"/workers/{self.id}", None, 30) is not None:
            self.stats.left += 1
        self.http.close()


async def _loop_lag(w: Window, stats: GenStats) -> None:
    """How late a 100 ms sleep wakes up: a saturated generator's loop falls behind."""
    while time.time() < w.measure_to:
        t0 = time.monotonic()
        await asyncio.sleep(0.1)
        if w.inside(time.time()):
            stats.loop_lag.append(time.monotonic() - t0 - 0.1)


async def _cpu_window(w: Window, stats: GenStats) -> None:
    await asyncio.sleep(max(0.0, w.measure_from - time.time()))
    c0 = time.process_time()
    await asyncio.sleep(max(0.0, w.measure_to - time.time()))
    stats.cpu = time.process_time() - c0


async def generate(spec: dict[str, Any], w: Window) -> dict[str, Any]:
    stats = GenStats()
    workers = []
    for index, wid, server in spec["workers"]:
        slot = w.start + w.ramp * index / spec["n_total"]
        sim = SimWorker(wid, spec["queue"], server, spec["local"], spec["token"], w, stats, spec["job_seconds"])
        workers.append(asyncio.create_task(sim.run(slot)))
    helpers = [asyncio.create_task(_loop_lag(w, stats)), asyncio.create_task(_cpu_window(w, stats))]
    done, pending = await asyncio.wait(workers, timeout=max(0.0, w.stop - time.time()) + TEARDOWN + 90)
    # (leaving is after the window: an overloaded server's slow goodbyes, not the row's failures), counted by where
    # each was still waiting: the line of SimWorker.run (the step of leaving)
    for t in pending:
        at = [f"line {frame.f_lineno}" for frame in t.get_stack(limit=1)]
        stats.errors_outside[f"worker did not leave in time ({', '.join(at) or '?'})"] += 1
        t.cancel()
    await asyncio.gather(*helpers, *pending, return_exceptions=True)
    failed = [t.exception() for t in done if not t.cancelled() and t.exception() is not None]
    if failed:
        stats.errors[f"worker crashed: {failed[0]!r}"] += len(failed)
    out = asdict(stats)
    out["errors"] = dict(stats.errors)
    out["errors_outside"] = dict(stats.errors_outside)
    out["workers"] = len(spec["workers"])
    return out


def _generator_proc(spec: dict[str, Any], plan: Any, out: Any) -> None:
    """A generator process: ready, then the plan from the parent, then the fleet, then its stats."""
    from scaleq import loop

    raise_fd_limit(4 * len(spec["workers"]) + 1024)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops the row
    out.put({"ready": spec["k"]})
    w = Window(**plan.get())
    try:
        out.put({"k": spec["k"], "stats": loop.run(generate(spec, w))})
    except BaseException as exc:
        out.put({"k": spec["k"], "error": f"{type(exc).__name__}: {exc}"})
        raise


# -- the submitter (flow mode) ----------------------------------------------------------------------------------


async def submit_flow(
    servers: list[str], token: str, queue: str, rate: float, job_seconds: float, w: Window, once: int = 0
) -> dict[str, Any]:
    """``rate`` jobs a second through the window; or, with ``once``, that many jobs as the ramp ends (busy mode)."""
    from scaleq.client import Client
    from scaleq.jobs import JobDefinition, SubmitRequest

    nonce = secrets.token_hex(4)
    clients = [Client(url, token) for url in servers]
    sent = errors = i = batches = 0
    latencies: list[float] = []
    tick = 0.2
    await asyncio.sleep(max(0.0, w.start + w.ramp - time.time()))
    t0 = time.monotonic()
    first, cpu0 = t0, time.process_time()
    owed = 0.0
    try:
        while time.time() < w.measure_to:
            owed += rate * tick + once
            once = 0
            n, owed = int(owed), owed - int(owed)
            if n:
                jobs = [
                    SubmitRequest(
                        queue=queue,
                        definition=JobDefinition(command=["sleep", str(job_seconds)], env={"J": f"{nonce}-{i + k}"}),
                    )
                    for k in range(n)
                ]
                i += n
                batches += 1
                client = clients[batches % len(clients)]  # two servers: alternate
                started = time.monotonic()
                try:
                    for start in range(0, n, 1000):
                        await client.submit_many(jobs[start : start + 1000])
                    sent += n
                    latencies.append(time.monotonic() - started)
                except Exception:
                    errors += n
            t0 += tick
            await asyncio.sleep(max(0.0, t0 - time.monotonic()))
    finally:
        for c in clients:
            await c.close()
    cpu = 100 * (time.process_time() - cpu0) / max(time.monotonic() - first, 1e-9)
    return {"submitted": sent, "failed": errors, "batch_p99": pct(latencies, 99), "cpu_pct": round(cpu, 1)}


def _submitter_proc(
    servers: list[str], token: str, queue: str, rate: float, job_seconds: float, plan: Any, out: Any, once: int = 0
) -> None:
    from scaleq import loop

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    out.put({"ready": "submitter"})
    w = Window(**plan.get())
    try:
        out.put({"submitter": loop.run(submit_flow(servers, token, queue, rate, job_seconds, w, once))})
    except BaseException as exc:
        out.put({"submitter": {"error": f"{type(exc).__name__}: {exc}"}})
        raise


# -- the servers ------------------------------------------------------------------------------------------------


class SetupFailed(Exception):
    pass


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    url: str
    admin_token: str
    worker_token: str
    cgroup: Path | None = None  # --server-cpu: the cgroup holding it to its share of a core


CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")


def cap_cpu(pid: int, percent: float) -> Path:
    """Hold process ``pid`` (all its threads) to ``percent`` of one core: a cgroup of its own with a CFS quota (v1's
    ``cpu.cfs_quota_us``, or v2's ``cpu.max``). The cgroup's directory; raises :class:`SetupFailed` where there is
    no writable cpu controller."""
    period = 10_000  # 10 ms: a throttled server waits at most the rest of one such period, not of 100 ms
    quota = max(1000, int(period * percent / 100))
    name = f"scaleq-fleet-{pid}"
    v1 = (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists()
    # v2: a child group has cpu.max only where the parent hands the cpu controller down to its children
    if not v1 and "cpu" not in _words(CGROUP_V2 / "cgroup.subtree_control"):
        raise SetupFailed(
            f"--server-cpu: no cgroup cpu controller here (v1 {CGROUP_V1_CPU}, or 'cpu' in v2's "
            f"{CGROUP_V2 / 'cgroup.subtree_control'})"
        )
    group = (CGROUP_V1_CPU if v1 else CGROUP_V2) / name
    try:
        group.mkdir()
        if v1:
            (group / "cpu.cfs_period_us").write_text(str(period))
            (group / "cpu.cfs_quota_us").write_text(str(quota))
        else:
            (group / "cpu.max").write_text(f"{quota} {period}")
        (group / "cgroup.procs").write_text(str(pid))
    except OSError as exc:
        uncap_cpu(group)
        raise SetupFailed(f"--server-cpu: cannot make a cgroup ({exc}); it needs root and a writable cgroupfs") from exc
    return group


def _words(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def uncap_cpu(group: Path) -> None:
    """Remove a cgroup made by :func:`cap_cpu`, moving what still runs in it to the hierarchy's root first (the
    server is stopped by then: at most a process on its way out)."""
    for pid in _words(group / "cgroup.procs"):
        with contextlib.suppress(OSError):  # (one that exits meanwhile cannot be moved)
            (group.parent / "cgroup.procs").write_text(pid)
    with contextlib.suppress(OSError):
        group.rmdir()


def start_server(store: str | None, cpu_percent: float | None = None) -> Server:
    """``scaleq server --port 0`` in a process of its own, with a fresh data dir (held to ``cpu_percent`` of a core
    when given); raises :class:`SetupFailed`."""
    data_dir = Path(tempfile.mkdtemp(prefix="scaleq-fleet-"))
    cmd = [sys.executable, "-m", "scaleq", "server", "--port", "0", "--data-dir", str(data_dir)]
    if store:
        cmd += ["--store", store]
    log = open(data_dir / "server.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    cgroup = None
    if cpu_percent is not None:
        try:
            cgroup = cap_cpu(proc.pid, cpu_percent)
        except SetupFailed:
            proc.kill()
            proc.wait()
            raise
    deadline = time.monotonic() + 60
    info = data_dir / "server.json"
    while True:
        if proc.poll() is not None:
            text = (data_dir / "server.log").read_text(errors="replace")[-2000:]
            raise SetupFailed(f"scaleq server exited {proc.returncode}:\n{text}")
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(info.read_text())
            if data.get("pid") == proc.pid and (data_dir / "worker.token").exists():
                break
        if time.monotonic() > deadline:
            stop_server(Server(proc, data_dir, "", "", "", cgroup))
            raise SetupFailed("scaleq server did not start within 60 s")
        time.sleep(0.05)
    import httpx

    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(data["url"] + "/healthz", timeout=2).status_code == 200:
                break
        if time.monotonic() > deadline:
            stop_server(Server(proc, data_dir, "", "", "", cgroup))
            raise SetupFailed(f"{data['url']}/healthz did not answer")
        time.sleep(0.05)
    read = lambda name: (data_dir / name).read_text().strip()  # noqa: E731
    return Server(proc, data_dir, data["url"], read("admin.token"), read("worker.token"), cgroup)


def stop_server(s: Server) -> None:
    if s.proc.poll() is None:
        s.proc.terminate()
        try:
            s.proc.wait(30)
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.proc.wait()
    if s.cgroup is not None:
        uncap_cpu(s.cgroup)


def lost_in_store(store: str | None, sqlite_dir: Path, window: tuple[float, float]) -> dict[str, int]:
    """What the store says was lost over the whole row: attempts ended ``lost`` (an expired lease) and jobs finished
    ``worker_lost``; and of those attempts, the ones whose lease expired inside the measured ``window``, and before it
    (the ramp: in busy mode, the burst of every worker claiming at once)."""
    sql = (
        "SELECT (SELECT count(*) FROM attempts WHERE outcome = 'lost'),"
        " (SELECT count(*) FROM jobs WHERE reason = 'worker_lost'),"
        " (SELECT count(*) FROM attempts),"
        " (SELECT count(*) FROM attempts WHERE outcome = 'lost' AND ended_at >= {0} AND ended_at < {1}),"
        " (SELECT count(*) FROM attempts WHERE outcome = 'lost' AND ended_at < {0})"
    ).format(*(repr(float(t)) for t in window))
    if store:
        import psycopg

        with psycopg.connect(store) as conn:
            row = conn.execute(sql).fetchone()
    else:
        with contextlib.closing(sqlite3.connect(sqlite_dir / "scaleq.db")) as conn:
            row = conn.execute(sql).fetchone()
    assert row is not None
    return {
        "lost_attempts": int(row[0]),
        "worker_lost": int(row[1]),
        "attempts": int(row[2]),
        "lost_in_window": int(row[3]),
        "lost_before_window": int(row[4]),
    }


# -- one row ----------------------------------------------------------------------------------------------------


@dataclass
class Args:
    duration: float
    ramp: float
    generators: int | None
    profile: Path | None = None  # py-spy the server(s) during the window, into this directory
    job_seconds: float = 1.0  # flow: how long each job runs
    server_cpu: float | None = None  # % of a core each server is held to (a cgroup's CPU quota), or no limit
    pg_statements: bool = False  # the database's statements over the window (pg_stat_statements), in the JSON


@dataclass
class Measured:
    """What the parent reads while a row runs."""

    wall: float = 0.0
    server_cpu: list[float] = field(default_factory=list)  # seconds, per server, over the window
    rss: list[int] = field(default_factory=list)  # largest sample, per server
    pg_cpu: float = 0.0
    pg_conns: int = 0
    listed_gone: int = 0  # our workers the server listed as gone when asked after the window (those leaving count)
    active: int = 0
    stats: list[dict[str, Any]] = field(default_factory=list)  # one per generator
    submitter: dict[str, Any] = field(default_factory=dict)
    loop: list[dict[str, Any]] = field(default_factory=list)  # per server: its event-loop lag and GC pauses
    pg_statements: list[dict[str, Any]] = field(default_factory=list)  # the top ones by time over the window
    window: tuple[float, float] = (0.0, 0.0)  # the measured window, wall-clock
    stop: float = 0.0  # when the workers start leaving, wall-clock


def run_row(n: int, setup: str, mode: str, a: Args, pg: Any, row_no: int) -> dict[str, Any]:
    """Fresh server(s) (and database), the fleet, the readings, then the store's count of lost attempts."""
    db = store = None
    if setup != "sqlite":
        import psycopg

        db = f"fleet_{row_no}_{secrets.token_hex(3)}"
        with psycopg.connect(pg.url, autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {db}")
        store = _pg.db_url(pg, db)
    servers: list[Server] = []
    probes = [_pg.speed_probe_ms()]
    try:
        for _ in range(2 if setup == "postgres-2" else 1):
            servers.append(start_server(store, a.server_cpu))
        overflows = listen_overflows()
        m = drive(n, setup, mode, a, servers, pg, db, row_no)
        overflows = listen_overflows() - overflows
        for s in servers:
            stop_server(s)
        lost = lost_in_store(store, servers[0].data_dir, m.window)
        marks = [marked_gone(s, f"fleet-{row_no}-", m.stop) for s in servers]
        lost["marked_gone_while_alive"] = sum(alive for alive, _ in marks)
        lost["marked_gone_after_leaving"] = sum(later for _, later in marks)
        warnings = [server_warnings(s) for s in servers]
        probes.append(_pg.speed_probe_ms())
    finally:
        for s in servers:
            stop_server(s)
            shutil.rmtree(s.data_dir, ignore_errors=True)
        if db:
            import psycopg

            with contextlib.suppress(Exception), psycopg.connect(pg.url, autocommit=True) as conn:
                conn.execute(f"DROP DATABASE {db} WITH (FORCE)")
    row = summarise(n, setup, mode, a, m, lost)
    row["server_warnings"] = warnings
    row["listen_overflows"] = overflows
    row["machine_probe_ms"] = probes  # before the row and after it (bench/_pg.py speed_probe_ms)
    if m.pg_statements:
        row["postgres_statements"] = m.pg_statements
    return row


def listen_overflows() -> int:
    """The kernel's count of connections it dropped because a listening socket's accept queue was full (machine-wide,
    ``TcpExtListenOverflows``): a fleet reconnecting in a burst larger than the server's backlog shows here, as
    requests that time out while the server sits idle."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        names, values = [line.split() for line in Path("/proc/net/netstat").read_text().splitlines()[:2]]
        return int(values[names.index("ListenOverflows")])
    return 0


def marked_gone(s: Server, prefix: str, stop: float) -> tuple[int, int]:
    """How many times this server's housekeeping marked a worker named ``prefix…`` gone (it logs each mark, with how
    long the worker had been silent; a deregistration is not logged so, and a gone worker is not marked again unless
    it registered again): (marks of workers whose silence began while the whole fleet was alive — ramp included —,
    the later ones: workers that left at ``stop`` without managing to deregister from an overloaded server)."""
    pattern = re.compile(
        r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+) .*worker " + re.escape(prefix) + r"\S+ stopped heartbeating"
        r"(?: \(silent for over (\d+) s\))?; marked gone",
        re.MULTILINE,
    )
    alive = later = 0
    for stamp, silent in pattern.findall(server_log(s)):
        logged = datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f")  # the server logs local time
        at = time.mktime(logged.timetuple()) + logged.microsecond / 1e6
        if at - float(silent or GONE_AFTER) < stop:
            alive += 1
        else:
            later += 1
    return alive, later


def server_log(s: Server) -> str:
    """The server's log of the row ('' when it cannot be read)."""
    try:
        return (s.data_dir / "server.log").read_text(errors="replace")
    except OSError:
        return ""


def server_warnings(s: Server) -> dict[str, Any]:
    """What a server logged at WARNING or above over the row: how many lines, by message with ids and numbers blanked
    (a few examples each) — why a row went wrong, in the server's own words."""
    kinds: Counter[str] = Counter()
    first: dict[str, str] = {}
    for line in server_log(s).splitlines():
        if not re.search(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback", line):
            continue
        kind = re.sub(r"[0-9a-f]{6,}|\d+(\.\d+)?", "#", line)[-160:]
        kinds[kind] += 1
        first.setdefault(kind, line[-300:])
    return {"lines": sum(kinds.values()), "kinds": [{"count": c, "example": first[k]} for k, c in kinds.most_common(5)]}


def drive(
    n: int, setup: str, mode: str, a: Args, servers: list[Server], pg: Any, db: str | None, row_no: int
) -> Measured:
    """Start the generators (and the submitter), give them the plan, read the servers during the window."""
    ctx = mp.get_context("spawn")
    queue = f"fleet-{secrets.token_hex(4)}"
    k_gen = a.generators or max(1, math.ceil(n / WORKERS_PER_GENERATOR))
    out: Any = ctx.Queue()
    procs: list[tuple[Any, Any]] = []  # (process, its plan queue)
    for k in range(k_gen):
        spec = {
            "k": k,
            "workers": [(i, f"fleet-{row_no}-{i:05d}", servers[i % len(servers)].url) for i in range(k, n, k_gen)],
            "n_total": n,
            "job_seconds": a.job_seconds if mode == "flow" else 0.0,
            "queue": queue,
            "token": servers[0].worker_token,
            "local": f"127.1.{row_no % 250}.{k + 1}",  # a source address per generator: ports enough for all
        }
        plan = ctx.Queue()
        procs.append((ctx.Process(target=_generator_proc, args=(spec, plan, out), daemon=True), plan))
    if mode in ("flow", "busy"):
        plan = ctx.Queue()
        args = (
            [s.url for s in servers],
            servers[0].admin_token,
            queue,
            n * BUSY_SHARE / a.job_seconds if mode == "flow" else 0.0,
            a.job_seconds,
            plan,
            out,
            n if mode == "busy" else 0,
        )
        procs.append((ctx.Process(target=_submitter_proc, args=args, daemon=True), plan))
    try:
        for p, _ in procs:
            p.start()
        for _ in procs:
            got = out.get(timeout=120)
            if "error" in got:
                raise RuntimeError(f"generator {got.get('k')}: {got['error']}")
        start = time.time() + 1.0
        measure_from = start + a.ramp + SETTLE
        w = Window(start, a.ramp, measure_from, measure_from + a.duration, measure_from + a.duration + 1.0)
        for _, plan in procs:
            plan.put(asdict(w))
        console.print(
            f"[dim]{setup} {mode} N={n:,}: {k_gen} generator(s), servers {', '.join(s.url for s in servers)}; "
            f"measuring {a.duration:.0f} s after a {a.ramp:.0f} s ramp[/dim]"
        )
        spies = profile(a, w, servers, f"{setup}-{mode}-{n}")
        m = sample(w, servers, pg, db, a.pg_statements)
        m.window, m.stop = (w.measure_from, w.measure_to), w.stop
        for spy in spies:
            spy.wait()
        m.listed_gone, m.active = workers_by_state(servers[0], queue)
        for _ in procs:
            got = out.get(timeout=a.duration + 600)
            if "stats" in got:
                m.stats.append(got["stats"])
            elif "submitter" in got:
                m.submitter = got["submitter"]
            else:
                raise RuntimeError(f"generator {got.get('k')}: {got.get('error')}")
        for p, _ in procs:
            p.join(30)
        return m
    finally:
        for p, _ in procs:
            if p.is_alive():
                p.kill()


def _py_spy() -> str | None:
    beside = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(beside) if beside.exists() else None)


def profile(a: Args, w: Window, servers: list[Server], name: str) -> list[subprocess.Popen[bytes]]:
    """``py-spy record`` of each server over the window (collapsed stacks of the threads on CPU)."""
    if a.profile is None:
        return []
    a.profile.mkdir(parents=True, exist_ok=True)
    py_spy = _py_spy()
    assert py_spy is not None  # (checked with the arguments)
    time.sleep(max(0.0, w.measure_from - time.time()))
    spies = []
    for i, s in enumerate(servers):
        seconds = str(max(1, int(w.measure_to - time.time())))
        out = str(a.profile / f"{name}-{i}.txt")
        cmd = [py_spy, "record", "--pid", str(s.proc.pid), "--rate", "100", "--format", "raw", "--nonblocking"]
        cmd += ["--duration", seconds, "--output", out]
        spies.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    return spies


def sample(w: Window, servers: list[Server], pg: Any, db: str | None, statements: bool = False) -> Measured:
    """CPU over the window, and the largest RSS and PostgreSQL connection count seen in it (sampled every second);
    the servers' own event-loop lag and GC pauses over the window (their ``/metrics``, read at both ends); with
    ``statements``, what the database spent its time on over the window (pg_stat_statements)."""
    pids = [s.proc.pid for s in servers]
    m = Measured(rss=[0] * len(pids))
    time.sleep(max(0.0, w.measure_from - time.time()))
    hist0 = [server_histograms(s) for s in servers]
    cpu0 = [_pg.cpu_seconds([p]) for p in pids]
    pg0 = _pg.postgres_cpu(pg) if db else 0.0
    t0 = time.monotonic()
    conn = None
    if db:
        import psycopg

        conn = psycopg.connect(pg.url, autocommit=True)
        if statements:
            conn.execute("SELECT pg_stat_statements_reset()")
    try:
        while time.time() < w.measure_to:
            for i, p in enumerate(pids):
                with contextlib.suppress(OSError):
                    m.rss[i] = max(m.rss[i], _pg.rss_bytes(p))
            if conn is not None:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()", (db,)
                ).fetchone()
                m.pg_conns = max(m.pg_conns, int(row[0]) if row else 0)
            time.sleep(min(1.0, max(0.0, w.measure_to - time.time())))
        if conn is not None and statements:
            m.pg_statements = _pg.top_statements(conn, db)
    finally:
        if conn is not None:
            conn.close()
    m.wall = time.monotonic() - t0
    m.server_cpu = [_pg.cpu_seconds([p]) - c for p, c in zip(pids, cpu0, strict=True)]
    m.loop = [loop_health(before, server_histograms(s)) for s, before in zip(servers, hist0, strict=True)]
    m.pg_cpu = _pg.postgres_cpu(pg) - pg0 if db else 0.0
    return m


Histograms = dict[str, dict[str, float]]  # metric -> {"le" bound or "sum" or "count": value}


def server_histograms(server: Server) -> Histograms:
    """The server's event-loop lag and GC-pause histograms and the heartbeat cadence it asks for, from its
    ``/metrics`` (empty when it did not answer)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    wanted = {"scaleq_event_loop_lag_seconds", "scaleq_gc_full_seconds", "scaleq_heartbeat_interval_seconds"}
    out: Histograms = {name: {} for name in wanted}
    with contextlib.suppress(httpx.HTTPError):
        started = time.perf_counter()
        text = httpx.get(
            server.url + "/metrics", headers={"Authorization": f"Bearer {server.admin_token}"}, timeout=60
        ).text
        out["scrape"] = {"seconds": time.perf_counter() - started}  # what a Prometheus scrape takes at this size
        for family in text_string_to_metric_families(text):
            if family.name in wanted:
                for smp in family.samples:
                    key = smp.labels.get("le") or smp.name.rsplit("_", 1)[-1]
                    out[family.name][key] = smp.value
    return out


def loop_health(before: Histograms, after: Histograms) -> dict[str, Any]:
    """Over the window: the loop lag's p99 and largest bucket (upper bounds), the full collections' pauses, the
    heartbeat interval asked for at its end, and the longer of the two scrapes of ``/metrics`` (one at each end)."""

    def delta(name: str) -> dict[str, float]:
        return {k: v - before[name].get(k, 0.0) for k, v in after[name].items()}

    lag, gcs = delta("scaleq_event_loop_lag_seconds"), delta("scaleq_gc_full_seconds")
    bounds = sorted((float(k), v) for k, v in lag.items() if k not in ("sum", "count", "created"))
    total = lag.get("count", 0.0)
    p99 = next((b for b, n in bounds if total and n >= 0.99 * total), None)
    worst = next((b for b, n in bounds if total and n >= total), None)
    pauses = gcs.get("count", 0.0)
    return {
        "loop_lag_p99_ms": None if p99 is None else round(p99 * 1000),
        "loop_lag_max_ms": None if worst is None else round(worst * 1000),
        "gc_full_collections": int(pauses),
        "gc_full_mean_ms": round(1000 * gcs.get("sum", 0.0) / pauses) if pauses else None,
        "heartbeat_interval_s": after.get("scaleq_heartbeat_interval_seconds", {}).get("seconds"),
        "metrics_scrape_ms": round(1000 * max(h.get("scrape", {}).get("seconds", 0.0) for h in (before, after)), 1),
    }


def workers_by_state(server: Server, queue: str) -> tuple[int, int]:
    """(gone, active) among the fleet's workers, as the server lists them once the window is over: those that have
    begun to leave by the time it answers are listed gone (or draining), so this is no count of spurious marks."""
    import httpx

    with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
        listed = httpx.get(
            server.url + "/api/v1/workers",
            params={"all": "true", "queue": queue},
            headers={"Authorization": f"Bearer {server.admin_token}"},
            timeout=120,
        ).json()
        return sum(1 for x in listed if x["state"] == "gone"), sum(1 for x in listed if x["state"] == "active")
    return 0, 0


def summarise(n: int, setup: str, mode: str, a: Args, m: Measured, lost: dict[str, int]) -> dict[str, Any]:
    stats, submitter, wall = m.stats, m.submitter, m.wall

    def merged(key: str) -> list[float]:
        return [x for s in stats for x in s[key]]

    errors: Counter[str] = Counter()
    outside: Counter[str] = Counter()
    for s in stats:
        errors.update(s["errors"])
        outside.update(s["errors_outside"])
    gen_cpu = [round(100 * s["cpu"] / wall, 1) for s in stats]
    abandoned = sum(s["abandoned"] for s in stats)
    refused = sum(s["refused"] for s in stats)
    spurious = lost["lost_attempts"] + lost["worker_lost"] + lost["marked_gone_while_alive"] + abandoned + refused
    hb, claim, s2c = merged("heartbeat"), merged("claim_answer"), merged("submit_to_claimed")
    server_cpu = [round(100 * c / wall, 1) for c in m.server_cpu]
    row = {
        "workers": n,
        "setup": setup if a.server_cpu is None else f"{setup} @{a.server_cpu:g}%",
        "server_cpu_limit_pct": a.server_cpu,
        "mode": f"flow {a.job_seconds:g}s" if mode == "flow" else mode,
        "job_seconds": a.job_seconds if mode == "flow" else None,
        "duration": a.duration,
        "generators": len(stats),
        "server_cpu_pct": round(sum(server_cpu), 1),
        "server_cpu_pct_each": server_cpu,
        "server_rss_mib": [round(r / 2**20) for r in m.rss],
        "postgres_cpu_pct": round(100 * m.pg_cpu / wall, 1) if setup != "sqlite" else None,
        "postgres_connections": m.pg_conns if setup != "sqlite" else None,
        "requests_per_s": round(sum(s["requests"] for s in stats) / wall),
        "heartbeats": len(hb),
        "heartbeat_p50_ms": _ms(pct(hb, 50)),
        "heartbeat_p99_ms": _ms(pct(hb, 99)),
        "claim_answer_p50_ms": _ms(pct(claim, 50)),
        "claim_answer_p99_ms": _ms(pct(claim, 99)),
        "claim_answer_job_p99_ms": _ms(pct(merged("claim_answer_job"), 99)),
        "claim_late_empty_p99_ms": _ms(pct(merged("claim_late_empty"), 99)),
        "submit_to_claimed_p50_ms": _ms(pct(s2c, 50)) if mode == "flow" else None,
        "submit_to_claimed_p99_ms": _ms(pct(s2c, 99)) if mode == "flow" else None,
        "jobs_claimed": sum(s["jobs"] for s in stats),
        "jobs_submitted": submitter.get("submitted"),
        "submit_failed": submitter.get("failed"),
        "submitter_cpu_pct": submitter.get("cpu_pct"),
        "spurious": spurious,
        "spurious_detail": {
            **lost,
            "abandoned_by_workers": abandoned,
            "finishes_refused": refused,
        },
        "workers_listed_gone_after_window": m.listed_gone,
        "workers_registered": sum(s["registered"] for s in stats),
        "workers_register_failed": sum(s.get("register_failed", 0) for s in stats),
        "workers_active_at_end": m.active,
        "workers_left": sum(s["left"] for s in stats),
        "errors": dict(errors),
        "errors_outside_window": dict(outside),
        "server_loop": m.loop,
        "generator_cpu_pct": gen_cpu,
        "generator_loop_lag_p99_ms": [_ms(pct(s["loop_lag"], 99)) for s in stats],
        "generator_saturated": any(c > GEN_CPU_LIMIT for c in [*gen_cpu, submitter.get("cpu_pct") or 0.0]),
    }
    misses = []
    if spurious:
        misses.append(f"{spurious} spurious")
    # no heartbeat at all: every worker idle on a server that counts its parked claim as its heartbeat
    if row["heartbeat_p99_ms"] is not None and row["heartbeat_p99_ms"] >= HB_P99_LIMIT * 1000:
        misses.append(f"hb p99 {row['heartbeat_p99_ms']} ms")
    if row["claim_answer_p99_ms"] is not None and row["claim_answer_p99_ms"] >= HB_P99_LIMIT * 1000:
        misses.append(f"claim p99 {row['claim_answer_p99_ms']} ms")
    failed = sum(errors.values())
    if failed:
        misses.append(f"{failed} failed requests")
    if row["workers_registered"] < n:
        misses.append(f"{n - row['workers_registered']} never registered")
    if mode in ("flow", "busy") and submitter.get("failed"):
        misses.append(f"{submitter['failed']} submits failed")
    row["verdict"] = "ok" if not misses else "MISSED: " + ", ".join(misses)
    return row


def _ms(v: float | None) -> float | None:
    return None if v is None else round(v * 1000, 1)


# -- report -----------------------------------------------------------------------------------------------------


def report(rows: list[dict[str, Any]]) -> None:
    out = Console(width=200)
    t = Table(title="Fleet: N simulated workers against scaleq server(s)")
    cols = (
        "N",
        "setup",
        "mode",
        "server CPU",
        "RSS MiB",
        "req/s",
        "hb p50",
        "hb p99",
        "claim p50",
        "claim p99",
        "sub→claimed p99",
        "spurious",
        "PG conns",
        "PG CPU",
        "gen CPU (max)",
        "verdict",
    )
    for c in cols:
        t.add_column(c, justify="left" if c in ("setup", "mode", "verdict") else "right")

    def f(v: float | None) -> str:
        return "—" if v is None else f"{v:,.1f}"

    for r in rows:
        gen = max(r["generator_cpu_pct"], default=0.0)
        t.add_row(
            f"{r['workers']:,}",
            r["setup"],
            r["mode"],
            " + ".join(f"{c:.0f} %" for c in r["server_cpu_pct_each"]),
            " / ".join(str(x) for x in r["server_rss_mib"]),
            f"{r['requests_per_s']:,}",
            f(r["heartbeat_p50_ms"]),
            f(r["heartbeat_p99_ms"]),
            f(r["claim_answer_p50_ms"]),
            f(r["claim_answer_p99_ms"]),
            f(r["submit_to_claimed_p99_ms"]),
            str(r["spurious"]),
            "—" if r["postgres_connections"] is None else str(r["postgres_connections"]),
            "—" if r["postgres_cpu_pct"] is None else f"{r['postgres_cpu_pct']:.0f} %",
            f"{gen:.0f} %" + (" gen!" if r["generator_saturated"] else ""),
            r["verdict"],
        )
    out.print(t)
    out.print("latencies in ms; CPU in % of one core over the measured window; 'gen!': a generator process over 70 %")
    for r in rows:
        if r["errors"]:
            out.print(f"[dim]{r['setup']} {r['mode']} N={r['workers']:,} errors: {r['errors']}[/dim]")
        if r["errors_outside_window"]:
            where = f"{r['setup']} {r['mode']} N={r['workers']:,}"
            out.print(f"[dim]{where} errors during the ramp or teardown: {r['errors_outside_window']}[/dim]")
    for setup in dict.fromkeys(r["setup"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            mine = [r for r in rows if r["setup"] == setup and r["mode"] == mode]
            if mine:
                held = [r["workers"] for r in mine if r["verdict"] == "ok"]
                note = (
                    " (a generator was saturated in some rows)" if any(r["generator_saturated"] for r in mine) else ""
                )
                best = f"{max(held):,}" if held else "none of the sizes tried"
                out.print(f"{setup} {mode}: largest N within the limits: {best}{note}")


# -- main -------------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(x.replace("_", "")) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of numbers: {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"worker counts must be positive: {text!r}")
    return values


def _choices(allowed: tuple[str, ...]) -> Any:
    def parse(text: str) -> list[str]:
        values = [x for x in text.split(",") if x]
        bad = [x for x in values if x not in allowed]
        if bad or not values:
            raise argparse.ArgumentTypeError(f"{','.join(bad) or text!r}: choose from {', '.join(allowed)}")
        return values

    return parse


def main() -> int:
    ap = argparse.ArgumentParser(
        prog="bench/fleet.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--workers", type=_ints, default=[100, 1000, 5000, 10000], help="fleet sizes (default %(default)s)")
    ap.add_argument("--setups", type=_choices(SETUPS), default=list(SETUPS), help="sqlite,postgres,postgres-2")
    ap.add_argument("--modes", type=_choices(MODES), default=list(MODES), help="idle,flow,busy")
    ap.add_argument("--duration", type=float, default=60.0, help="measured seconds per row (default 60)")
    ap.add_argument("--ramp", type=float, default=20.0, help="seconds over which the workers register (default 20)")
    ap.add_argument("--generators", type=int, default=None, help="generator processes (default: one per 2,500)")
    ap.add_argument("--output", choices=("table", "json"), default="table")
    ap.add_argument(
        "--profile", type=Path, default=None, help="py-spy record the server(s) during the window, into DIR"
    )
    ap.add_argument(
        "--pg-statements",
        action="store_true",
        help="PostgreSQL rows: the database's top statements by time over the window (pg_stat_statements), in JSON",
    )
    ap.add_argument(
        "--job-seconds",
        type=float,
        default=1.0,
        help="flow: each job runs this long; N/10/J jobs a second keep a tenth of the fleet busy (default 1)",
    )
    ap.add_argument(
        "--server-cpu",
        type=float,
        default=None,
        metavar="PCT",
        help="hold each server to PCT %% of one core (a cgroup CPU quota; needs root): servers as if each had a "
        "small machine of its own, so that two can show what they carry against one on a machine whose cores the "
        "servers, the database and the generators share",
    )
    args = ap.parse_args()
    if args.server_cpu is not None and not 1 <= args.server_cpu <= 100 * (os.cpu_count() or 1):
        ap.error("--server-cpu must be between 1 and 100 x the cores")
    if args.job_seconds <= 0:
        ap.error("--job-seconds must be > 0")
    if args.duration <= 0 or args.ramp < 0:
        ap.error("--duration must be > 0 and --ramp >= 0")
    if args.generators is not None and args.generators < 1:
        ap.error("--generators must be at least 1")
    if args.profile is not None and _py_spy() is None:
        ap.error("--profile needs py-spy (pip install -e '.[bench]'), found neither on PATH nor beside this Python")
    a = Args(
        args.duration, args.ramp, args.generators, args.profile, args.job_seconds, args.server_cpu, args.pg_statements
    )
    fds = raise_fd_limit(4 * max(args.workers) + 4096)
    most = max(args.workers)
    if 2 * most + 512 > fds:  # two connections per worker, all on one server in the sqlite and postgres setups
        console.print(
            f"[yellow]warning: the open-file limit is {fds} (hard limit; raising it needs root/CAP_SYS_RESOURCE): "
            f"a server holding {most:,} workers needs ~{2 * most + 512:,}; above ~{(fds - 512) // 2:,} workers per "
            "server the rows measure this limit (ulimit -Hn), not scaleq[/yellow]"
        )
    console.print(f"[bold]machine[/bold]: {_pg.machine()}; open-file limit {fds}")
    rows: list[dict[str, Any]] = []
    started = time.monotonic()
    needs_pg = any(s != "sqlite" for s in args.setups)
    try:
        with contextlib.ExitStack() as stack:
            pg = None
            if needs_pg:
                try:
                    pg = stack.enter_context(_pg.cluster(statements=args.pg_statements))
                except Exception as exc:
                    raise SetupFailed(f"PostgreSQL cannot start: {exc}") from exc
                console.print(f"PostgreSQL {_pg.pg_version(pg)} (default settings, max_connections=200)")
            row_no = 0
            for setup in args.setups:
                for mode in args.modes:
                    for n in args.workers:
                        row_no += 1
                        try:
                            row = run_row(n, setup, mode, a, pg, row_no)
                        except SetupFailed as exc:
                            raise SetupFailed(f"setup {setup} cannot start: {exc}") from exc
                        rows.append(row)
                        console.print(
                            f"  {setup} {mode} N={n:,}: server CPU {row['server_cpu_pct']:.0f} %, "
                            f"hb p99 {row['heartbeat_p99_ms']} ms, claim p99 {row['claim_answer_p99_ms']} ms, "
                            f"spurious {row['spurious']}, generators {row['generator_cpu_pct']} % CPU, "
                            f"machine probe {row['machine_probe_ms']} ms → {row['verdict']}"
                        )
                        if row["generator_saturated"]:
                            console.print(
                                f"  [yellow]a generator process used over {GEN_CPU_LIMIT:.0f} % of a core: "
                                "rerun with more --generators (or on a quieter machine)[/yellow]"
                            )
    except SetupFailed as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 1
    if args.output == "json":
        print(json.dumps({"machine": _pg.machine(), "rows": rows}, indent=2))
    else:
        report(rows)
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
