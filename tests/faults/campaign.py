"""The campaign's two scenarios: real processes killed at random (seeded) while jobs are submitted, then judged.

Design:

- **A, PostgreSQL with two servers**: a throw-away cluster, two ``scaleq server`` processes on fixed ports, local
  ``scaleq worker`` processes split between them; faults are ``kill -9`` of either server (started again on its
  port) or of a worker (a new one takes its place), and PostgreSQL crashes (``pg_ctl stop -m immediate``, then
  start). **B, SQLite with the autoscaler**: ``scaleq up --grid`` with a local group that scales between 0 and
  ``max_workers``, jobs in bursts so that workers start and drain all the time; faults are ``kill -9`` of
  ``scaleq up`` (started again on its port: its workers are to be adopted, not replaced) and of its workers. A
  sampler counts the ``scaleq worker`` processes in the process table throughout.
- One fault at a time: each is injected, held for a random moment, repaired, and its recovery awaited before the
  next, so a recovery time belongs to one fault. The sequence (which fault, which target, how long down, how long
  between) comes from one :class:`random.Random` seeded by the caller; the machine's timing still varies.
- Submitters run beside the faults. A submit whose answer is lost (a refused connection, a timeout, a 5xx) is sent
  again with the **same definition** — to the other server in A — until acknowledged; the id the server gives must
  be the one :func:`scaleq.jobs.job_id` computes, since that is what makes the retry safe.
- Jobs ask for ``max_attempts`` = 10: the campaign is about nothing being lost or finished twice, not about the
  default budget of three lost attempts, which a job unlucky enough to be on three killed workers would spend.
- At the end everything is repaired, every acknowledged job awaited, the server's view read, the parts stopped
  gracefully, and the process table checked (:mod:`tests.faults.parts`); the :class:`~tests.faults.ledger.Ledger`
  gives the verdict and the table.
"""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from scaleq.jobs import JobDefinition, job_id
from tests.acceptance.support import MARKER_VAR as GRID_MARKER_VAR
from tests.acceptance.support import Grid, base_env, cli, pid_alive
from tests.faults.ledger import MARK_SCRIPT, Account, Final, Ledger, SubmitAttempt, parse_marks
from tests.faults.parts import MARKER_VAR, Service, answers, kill_all, leftovers, scaleq_workers
from tests.helpers import free_port, wait_for
from tests.pg import Cluster

QUEUE = "q"
KINDS_A = ["kill server", "kill worker", "crash postgres"]
KINDS_B = ["kill scaleq up", "kill worker"]
MAX_ATTEMPTS = 10


@dataclass(frozen=True)
class Settings:
    seconds: float  # how long faults are injected (and jobs submitted)
    seed: int
    lease_seconds: float = 4.0
    job_seconds: tuple[float, float] = (0.2, 1.0)
    fault_gap: tuple[float, float] = (1.5, 4.0)  # between one fault's recovery and the next fault
    down: tuple[float, float] = (0.3, 2.0)  # how long a killed part stays down
    submit_gap: tuple[float, float] = (0.3, 1.0)  # per submitter
    drain_timeout: float = 180.0  # for every acknowledged job to finish after the faults stop


@dataclass
class Result:
    account: Account
    table: str
    problems: list[str] = field(default_factory=list)  # besides the ledger's: leftovers, exits, over max, adoption

    def failures(self) -> list[str]:
        return self.account.failures() + self.problems


class Jobs:
    """The campaign's jobs: the mark script, the shared marks file, and definitions with unique labels."""

    def __init__(self, work: Path, settings: Settings) -> None:
        self.script = work / "mark.sh"
        self.script.write_text(MARK_SCRIPT)
        self.marks = work / "marks"
        self.marks.touch()
        self.marks.chmod(0o666)  # a root worker runs the jobs as nobody (--job-user): they append to it
        self.tag = uuid.uuid4().hex[:8]
        self.settings = settings

    def definition(self, rng: random.Random, label: str) -> dict[str, Any]:
        seconds = rng.uniform(*self.settings.job_seconds)
        return {"command": ["sh", str(self.script), str(self.marks), f"{seconds:.2f}", f"{self.tag}-{label}"]}


def submit_until_acknowledged(
    ledger: Ledger, label: str, definition: dict[str, Any], urls: list[Callable[[], str]], token: str, first: int
) -> str:
    """Submit ``definition`` until a server acknowledges it, each retry to the next of ``urls``; the job id."""
    expected = job_id(QUEUE, JobDefinition.model_validate(definition))
    body = {"queue": QUEUE, "definition": definition, "max_attempts": MAX_ATTEMPTS}
    deadline = time.monotonic() + 180
    for n in range(10**9):
        which = (first + n) % len(urls)
        at = time.time()
        error = None
        try:
            r = httpx.post(
                f"{urls[which]()}/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10
            )
            if r.is_success:
                got = r.json()["job"]["id"]
                assert got == expected, f"{label}: the server gave id {got}, the definition hashes to {expected}"
                ledger.attempt(SubmitAttempt(label, str(which), at, job_id=got))
                return got
            assert r.status_code >= 500, f"{label}: {r.status_code} {r.text}"  # a 4xx is the campaign's bug
            error = f"HTTP {r.status_code}"
        except httpx.HTTPError as exc:
            error = type(exc).__name__
        ledger.attempt(SubmitAttempt(label, str(which), at, error=error))
        assert time.monotonic() < deadline, f"{label}: no server acknowledged it in 180 s (last: {error})"
        time.sleep(0.2)
    raise AssertionError("unreachable")


class Submitters:
    """Threads that submit jobs until stopped; ``bursts`` submits a few at once, then pauses (workers drain)."""

    def __init__(
        self,
        ledger: Ledger,
        jobs: Jobs,
        urls: list[Callable[[], str]],
        token: str,
        seed: int,
        threads: int,
        bursts: bool = False,
    ) -> None:
        self.stop = threading.Event()
        self.errors: list[str] = []
        self._threads = [
            threading.Thread(
                target=self._run, args=(ledger, jobs, urls, token, random.Random(seed * 1000 + i), i, bursts)
            )
            for i in range(threads)
        ]

    def __enter__(self) -> Submitters:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(200)

    def _run(
        self,
        ledger: Ledger,
        jobs: Jobs,
        urls: list[Callable[[], str]],
        token: str,
        rng: random.Random,
        me: int,
        bursts: bool,
    ) -> None:
        n = 0
        try:
            while not self.stop.is_set():
                for _ in range(rng.randint(1, 6) if bursts else 1):
                    label = f"{me}-{n}"
                    submit_until_acknowledged(ledger, label, jobs.definition(rng, label), urls, token, me + n)
                    n += 1
                pause = rng.uniform(1.0, 4.0) if bursts else rng.uniform(*jobs.settings.submit_gap)
                self.stop.wait(pause)
        except AssertionError as exc:
            self.errors.append(str(exc))


def final_states(ids: list[str], url: Callable[[], str], token: str, timeout: float) -> tuple[dict, dict]:
    """Wait until every job in ``ids`` is finished (or ``timeout``); the server's :class:`Final` of each, and
    (job id, attempt) → worker id from its attempt records."""
    headers = {"Authorization": f"Bearer {token}"}
    pending = set(ids)
    deadline = time.monotonic() + timeout
    with httpx.Client(headers=headers, timeout=10) as client:
        while pending and time.monotonic() < deadline:
            for job in sorted(pending):
                try:
                    r = client.get(f"{url()}/api/v1/jobs/{job}")
                except httpx.HTTPError:
                    break
                if r.is_success and r.json()["state"] == "finished":
                    pending.discard(job)
            if pending:
                time.sleep(0.5)
        final: dict[str, Final] = {}
        workers: dict[tuple[str, int], str] = {}
        for job in ids:
            summary = client.get(f"{url()}/api/v1/jobs/{job}")
            if summary.status_code == 404:
                continue
            attempts = client.get(f"{url()}/api/v1/jobs/{job}/attempts").raise_for_status().json()
            s = summary.raise_for_status().json()
            final[job] = Final(s["state"], s["reason"], sum(a["outcome"] == "success" for a in attempts))
            workers |= {(job, a["attempt"]): a["worker_id"] for a in attempts}
    return final, workers


def settle_processes(marker: str, timeout: float, needle: str = "", var: str = MARKER_VAR) -> dict[int, str]:
    """Wait up to ``timeout`` for the campaign's processes (with ``needle``) to be gone; those still there."""
    deadline = time.monotonic() + timeout
    while (left := leftovers(marker, needle, var)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def judge(
    ledger: Ledger, jobs: Jobs, final: dict, workers: dict, settings: Settings, title: str
) -> tuple[Account, str]:
    runs = parse_marks(jobs.marks.read_text())
    # a run's worker as the server recorded it, where the job could not tell (a worker started by the autoscaler)
    runs = [
        r if r.worker != "-" else type(r)(**{**r.__dict__, "worker": workers.get((r.job_id, r.attempt), "-")})
        for r in runs
    ]
    ledger.dump(jobs.marks.with_name("ledger.json"))
    account = ledger.account(final, runs, settings.lease_seconds, ended=time.time())
    return account, account.table(title)


# -- A: PostgreSQL, two servers ----------------------------------------------------------------------------------


def postgres_campaign(cluster: Cluster, work: Path, settings: Settings, workers_per_server: int = 2) -> Result:
    rng = random.Random(settings.seed)
    marker = uuid.uuid4().hex
    env = base_env(**{MARKER_VAR: marker})
    ledger, jobs, problems = Ledger(), Jobs(work, settings), []
    servers: list[Service] = []
    urls: list[str] = []
    for name in ("a", "b"):
        port = free_port()
        data_dir = work / f"server-{name}"
        args = ["server", "--port", str(port), "--store", cluster.url, "--data-dir", str(data_dir)]
        servers.append(
            Service(name, [*args, "--lease-seconds", f"{settings.lease_seconds:g}"], env, work / f"{name}.log")
        )
        urls.append(f"http://127.0.0.1:{port}")
        servers[-1].start()
        wait_for((data_dir / "server.json").exists, 60, 0.1, f"server {name} to start")
    token = (work / "server-a" / "admin.token").read_text().strip()
    for s, url in zip(servers, urls, strict=True):
        wait_for(functools.partial(answers, url, token), 60, 0.2, f"server {s.name} to answer")
    made = cli("tokens", "create", "--role", "worker", "--data-dir", str(work / "server-a"))
    assert made.returncode == 0, made.stderr
    worker_token = made.stdout.strip().splitlines()[-1]
    generation = iter(range(10**6))

    def worker(slot: int) -> Service:
        wid = f"w{slot}-{next(generation)}"
        url = urls[slot % 2]
        args = ["worker", "--server", url, "--queue", QUEUE, "--runtime", "process", "--slots", "1"]
        args += ["--worker-id", wid, "--token", worker_token, "--cpus", "1"]
        service = Service(wid, args, {**env, "FAULTS_WORKER": wid}, work / f"worker-{slot}.log")
        service.start()
        return service

    workers = [worker(slot) for slot in range(2 * workers_per_server)]
    url_of: list[Callable[[], str]] = [functools.partial(str, u) for u in urls]
    try:
        with Submitters(ledger, jobs, url_of, token, settings.seed, threads=2) as submitters:
            end = time.monotonic() + settings.seconds
            first_kinds = iter(rng.sample(KINDS_A, len(KINDS_A)))  # each kind once, early, then at random
            while time.monotonic() < end:
                time.sleep(rng.uniform(*settings.fault_gap))
                kind = next(first_kinds, None) or rng.choices(KINDS_A, [3, 3, 2])[0]
                down = rng.uniform(*settings.down)
                if kind == "kill server":
                    i = rng.randrange(2)
                    fault = ledger.fault(kind, servers[i].name, time.time())
                    servers[i].kill()
                    time.sleep(down)
                    servers[i].start()
                    wait_for(functools.partial(answers, urls[i], token), 90, 0.1, f"server {servers[i].name} back")
                    fault.recovered_at = time.time()
                elif kind == "kill worker":
                    slot = rng.randrange(len(workers))
                    ledger.fault(kind, workers[slot].name, time.time())  # recovery: read from the jobs' marks
                    workers[slot].kill()
                    time.sleep(down)
                    workers[slot] = worker(slot)
                else:
                    fault = ledger.fault(kind, "postgres", time.time())
                    cluster.stop("immediate")
                    time.sleep(down)
                    cluster.start()
                    wait_for(lambda: all(answers(u, token) for u in urls), 90, 0.1, "both servers on the database")
                    fault.recovered_at = time.time()
                for s in servers:
                    s.check()
                for w in workers:
                    w.check()
        problems += submitters.errors
        final, attempt_workers = final_states(
            sorted(ledger.acknowledged()), lambda: urls[0], token, settings.drain_timeout
        )
        left_jobs = settle_processes(marker, 15, needle=str(jobs.script))
        problems += [f"a job process left behind after every job finished: {p} {c}" for p, c in left_jobs.items()]
        for service in [*workers, *servers]:
            service.stop()
        left = settle_processes(marker, 15)
        problems += [f"a process left behind after the parts stopped: {p} {c}" for p, c in left.items()]
        problems += [
            f"{s.name} exited by itself (exit {codes})" for s in [*servers, *workers] if (codes := s.unexpected_exits)
        ]
        account, table = judge(ledger, jobs, final, attempt_workers, settings, "PostgreSQL, two servers")
        table += f"\n\nsubmit answers lost and retried: {ledger.lost_answers()}; seed {settings.seed}"
        return Result(account, table, problems)
    finally:
        for service in [*workers, *servers]:
            service.stop(5)
        kill_all(leftovers(marker))


# -- B: SQLite, the autoscaler ------------------------------------------------------------------------------------

GRID = """\
name = "faults"

[[groups]]
name = "cpu"
queue = "{queue}"
provider = "local"
min_workers = 0
max_workers = {max_workers}
slots = 1
runtimes = ["process"]
idle_timeout = 1
scale_down_window = 1
"""


class Sampler:
    """Counts the campaign's ``scaleq worker`` processes in the process table every 0.1 s, in a thread."""

    def __init__(self, marker: str) -> None:
        self.marker = marker
        self.samples: list[tuple[float, int, list[int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            pids = sorted(scaleq_workers(self.marker, var=GRID_MARKER_VAR))
            self.samples.append((time.time(), len(pids), pids))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def adopted(grid: Grid) -> bool:
    """The restarted server knows every worker process still running: it adopted them instead of starting others."""
    try:
        listed = {w["id"] for w in grid.api("GET", "/workers").raise_for_status().json()}
    except httpx.HTTPError:
        return False
    running = {i for i, r in grid.worker_records().items() if pid_alive(r["pid"])}
    return running <= listed


def autoscale_campaign(work: Path, settings: Settings, max_workers: int = 3) -> Result:
    rng = random.Random(settings.seed)
    grid_file = work / "grid.toml"
    grid_file.write_text(GRID.format(queue=QUEUE, max_workers=max_workers))
    grid = Grid(work / "data", lease_seconds=settings.lease_seconds, grid_file=grid_file, port=free_port())
    ledger, jobs, problems = Ledger(), Jobs(work, settings), []
    url = f"http://127.0.0.1:{grid.port}"
    try:
        grid.start(timeout=60)
        token = grid.admin_token
        with Sampler(grid.marker) as sampler:
            with Submitters(ledger, jobs, [lambda: url], token, settings.seed, threads=1, bursts=True) as submitters:
                end = time.monotonic() + settings.seconds
                while time.monotonic() < end:
                    time.sleep(rng.uniform(*settings.fault_gap))
                    kind = rng.choices(["kill scaleq up", "kill worker"], [3, 1])[0]
                    down = rng.uniform(*settings.down)
                    if kind == "kill scaleq up":
                        fault = ledger.fault(kind, "up", time.time())
                        grid.kill_server()
                        time.sleep(down)
                        grid.start(timeout=90)
                        try:
                            wait_for(lambda: adopted(grid), 30, 0.1, "the running workers adopted")
                        except AssertionError as exc:
                            problems.append(f"after a restart: {exc}")
                        fault.recovered_at = time.time()
                    else:
                        alive = sorted((i, r["pid"]) for i, r in grid.worker_records().items() if pid_alive(r["pid"]))
                        if not alive:
                            continue
                        wid, pid = rng.choice(alive)
                        ledger.fault(kind, wid, time.time())
                        os.kill(pid, signal.SIGKILL)
            problems += submitters.errors
            final, attempt_workers = final_states(
                sorted(ledger.acknowledged()), lambda: url, token, settings.drain_timeout
            )
            left_jobs = settle_processes(grid.marker, 15, needle=str(jobs.script), var=GRID_MARKER_VAR)
            problems += [f"a job process left behind after every job finished: {p} {c}" for p, c in left_jobs.items()]
            # min_workers is 0: with the queue empty, every worker drains and goes; one that stays has leaked
            deadline = time.monotonic() + 60
            while scaleq_workers(grid.marker, var=GRID_MARKER_VAR) and time.monotonic() < deadline:
                time.sleep(0.2)
            still = scaleq_workers(grid.marker, var=GRID_MARKER_VAR)
            problems += [f"a worker still running with the queue empty for 60 s: {p} {c}" for p, c in still.items()]
        over = [(t, n, pids) for t, n, pids in sampler.samples if n > max_workers]
        problems += [f"{n} worker processes > max_workers {max_workers} at {t:.1f}: {pids}" for t, n, pids in over[:5]]
        started = len(worker_ids(grid))
        assert grid.proc is not None
        grid.proc.send_signal(signal.SIGTERM)
        grid.proc.wait(30)
        left = settle_processes(grid.marker, 15, var=GRID_MARKER_VAR)
        problems += [f"a process left behind after scaleq up stopped: {p} {c}" for p, c in left.items()]
        account, table = judge(ledger, jobs, final, attempt_workers, settings, "SQLite, the autoscaler")
        peak = max((n for _, n, _ in sampler.samples), default=0)
        table += (
            f"\n\nworker processes at most {peak} (max_workers {max_workers}); "
            f"workers started {started}; seed {settings.seed}"
        )
        return Result(account, table, problems)
    finally:
        grid.stop()


def worker_ids(grid: Grid) -> set[str]:
    """Every worker the server ever registered (gone ones too)."""
    try:
        return {w["id"] for w in grid.api("GET", "/workers", params={"all": True}).json()}
    except (httpx.HTTPError, json.JSONDecodeError):
        return set()
