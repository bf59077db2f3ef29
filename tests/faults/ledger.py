"""The campaign's ledger: everything the campaign did and saw, and the accounting that turns it into a verdict.

Design:

- The ledger is written by the driver as things happen and judged only at the end, from records alone: every submit
  *attempt* (which server, when, acknowledged with which id or failed how), every fault (kind, target, when, when
  the system answered again), and every run of a job as the job itself wrote it down (:data:`MARK_SCRIPT` appends a
  ``start`` line, then ``end`` or ``term`` to one shared file). The server's view (state, reason, successful
  attempts per job) is read once at the end and handed to :meth:`Ledger.account`.
- What counts as a fault of scaleq is decided here and nowhere else, so the unit tests can feed synthetic records
  and check that each fault is caught: a **lost** job is acknowledged but not ``finished``/``success`` at the end; a
  job **finished twice** has more than one successful attempt on the server; an **overlap** is two runs of one job
  at the same time on the jobs' own clock, a failure only when it lasts longer than the lease (a worker that lost
  its lease may run on until its next heartbeat says so, never longer). A run with no end line is taken to run until
  the end of the campaign: a run whose end nobody saw must not hide an overlap.
- **Re-runs** (a job run more than once) are not failures: delivery is at-least-once. They are counted, as is the
  recovery time of each fault (for a killed worker, from the kill until every job it was running started again,
  read from the marks; for the others, until the component answered again, as the driver saw it).
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import threading
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

#: The job every campaign submits: ``sh MARK_SCRIPT MARKS SECONDS LABEL``. It marks its start, sleeps, and marks its
#: end; a SIGTERM (the worker's watchdog, a cancel), SIGHUP or SIGPIPE (its dead worker's pipes) marks ``term`` at
#: once. The label only makes each job's definition, hence its id, unique.
MARK_SCRIPT = """\
marks=$1
mark() { echo "$1 $SCALEQ_JOB_ID $SCALEQ_ATTEMPT ${FAULTS_WORKER:--} $$ $(date +%s.%N)" >> "$marks"; }
trap 'mark term; exit 143' TERM HUP PIPE
mark start
sleep "$2" &
wait $!
mark end
"""


@dataclass(frozen=True)
class SubmitAttempt:
    """One try at submitting a job: ``job_id`` when the server acknowledged it, ``error`` when the answer was lost."""

    label: str
    server: str
    at: float
    job_id: str | None = None
    error: str | None = None


@dataclass
class Fault:
    kind: str
    target: str
    at: float
    recovered_at: float | None = None  # when the driver saw the component answer again (None: measured from marks)


@dataclass(frozen=True)
class Run:
    """One run of a job as the job wrote it down; ``end`` None if nobody saw it end."""

    job_id: str
    attempt: int
    worker: str
    pid: int
    start: float
    end: float | None
    how: str | None  # "end" (ran to completion) or "term" (stopped), None if no end line


@dataclass(frozen=True)
class Final:
    """The server's last word on a job."""

    state: str
    reason: str | None
    successes: int  # attempts whose outcome was success


@dataclass(frozen=True)
class Overlap:
    job_id: str
    first: Run
    second: Run
    seconds: float


@dataclass
class Account:
    jobs: int
    lost: list[str]
    twice: list[str]
    overlaps: list[Overlap]
    reruns: int
    unended: int
    faults: Counter[str]
    recovery: list[float]
    lease_seconds: float

    @property
    def long_overlaps(self) -> list[Overlap]:
        return [o for o in self.overlaps if o.seconds > self.lease_seconds]

    def failures(self) -> list[str]:
        """What went wrong, one line each; empty when the campaign passed."""
        out = [f"lost (acknowledged, not finished with success): {job[:12]}" for job in self.lost]
        out += [f"finished twice: {job[:12]}" for job in self.twice]
        out += [
            f"runs of {o.job_id[:12]} overlap {o.seconds:.2f} s > lease {self.lease_seconds:g} s: "
            f"attempt {o.first.attempt} on {o.first.worker} and attempt {o.second.attempt} on {o.second.worker}"
            for o in self.long_overlaps
        ]
        return out

    def table(self, title: str) -> str:
        """The campaign's result as a Markdown table (it reads the same in a terminal and in the docs)."""
        faults = ", ".join(f"{kind} {n}" for kind, n in sorted(self.faults.items())) or "none"
        rec = f"{statistics.median(self.recovery):.1f} s / {max(self.recovery):.1f} s" if self.recovery else "n/a"
        rows = [
            ("faults", f"{sum(self.faults.values())} ({faults})"),
            ("jobs acknowledged", str(self.jobs)),
            ("lost", str(len(self.lost))),
            ("finished twice", str(len(self.twice))),
            ("re-runs", str(self.reruns)),
            (
                "overlapping runs",
                f"{len(self.overlaps)} (longest {max((o.seconds for o in self.overlaps), default=0):.2f} s; "
                f"lease {self.lease_seconds:g} s)",
            ),
            ("runs with no end mark", str(self.unended)),
            ("recovery p50 / max", rec),
        ]
        width = max(len(k) for k, _ in rows)
        lines = [f"**{title}**", "", f"| {'':<{width}} | result |", f"|{'-' * (width + 2)}|--------|"]
        lines += [f"| {k:<{width}} | {v} |" for k, v in rows]
        return "\n".join(lines)


def parse_marks(text: str) -> list[Run]:
    """Runs from the marks file: a ``start`` line paired with the ``end``/``term`` line of the same process."""
    starts: dict[tuple[str, int, int], tuple[str, float]] = {}
    ends: dict[tuple[str, int, int], tuple[str, float]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 6:  # a line cut short by a kill -9 mid-write: it cannot be attributed
            continue
        event, job_id, attempt, worker, pid, at = parts
        key = (job_id, int(attempt), int(pid))
        if event == "start":
            starts[key] = (worker, float(at))
        elif event in ("end", "term"):
            ends[key] = (event, float(at))
    runs = []
    for key, (worker, start) in starts.items():
        how, end = ends.get(key, (None, None))
        runs.append(Run(key[0], key[1], worker, key[2], start, end, how))
    return sorted(runs, key=lambda r: r.start)


@dataclass
class Ledger:
    """Thread-safe record of a campaign: submit attempts and faults (written while it runs)."""

    attempts: list[SubmitAttempt] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def attempt(self, attempt: SubmitAttempt) -> None:
        with self._lock:
            self.attempts.append(attempt)

    def fault(self, kind: str, target: str, at: float) -> Fault:
        f = Fault(kind, target, at)
        with self._lock:
            self.faults.append(f)
        return f

    def acknowledged(self) -> dict[str, str]:
        """Job id → label of every job some server acknowledged."""
        with self._lock:
            return {a.job_id: a.label for a in self.attempts if a.job_id is not None}

    def lost_answers(self) -> int:
        """Submit attempts whose answer never came (each retried with the same definition)."""
        with self._lock:
            return sum(1 for a in self.attempts if a.error is not None)

    def dump(self, path: Path) -> None:
        """The records as JSON, for a look after a failed campaign."""
        with self._lock:
            records = {
                "attempts": [dataclasses.asdict(a) for a in self.attempts],
                "faults": [dataclasses.asdict(f) for f in self.faults],
            }
        path.write_text(json.dumps(records, indent=1))

    def account(self, final: dict[str, Final], runs: list[Run], lease_seconds: float, ended: float) -> Account:
        """Judge the campaign: ``final`` is the server's view of every acknowledged job, ``runs`` the jobs' own
        marks, ``ended`` when the campaign stopped (the end assumed for runs that never marked theirs)."""
        acked = self.acknowledged()
        lost = sorted(j for j in acked if (f := final.get(j)) is None or (f.state, f.reason) != ("finished", "success"))
        twice = sorted(j for j in acked if (f := final.get(j)) is not None and f.successes > 1)
        by_job: dict[str, list[Run]] = defaultdict(list)
        for run in runs:
            by_job[run.job_id].append(run)
        overlaps = [o for job_runs in by_job.values() for o in _overlaps(job_runs, ended)]
        reruns = sum(len(r) - 1 for r in by_job.values() if len(r) > 1)
        recovery = [r for f in self.faults if (r := _recovery(f, by_job)) is not None]
        return Account(
            jobs=len(acked),
            lost=lost,
            twice=twice,
            overlaps=overlaps,
            reruns=reruns,
            unended=sum(1 for r in runs if r.end is None),
            faults=Counter(f.kind for f in self.faults),
            recovery=recovery,
            lease_seconds=lease_seconds,
        )


def _overlaps(runs: list[Run], ended: float) -> list[Overlap]:
    found = []
    ordered = sorted(runs, key=lambda r: r.start)
    for i, first in enumerate(ordered):
        first_end = first.end if first.end is not None else ended
        for second in ordered[i + 1 :]:
            if second.start >= first_end:
                break
            second_end = second.end if second.end is not None else ended
            found.append(Overlap(first.job_id, first, second, min(first_end, second_end) - second.start))
    return found


def _recovery(fault: Fault, by_job: dict[str, list[Run]]) -> float | None:
    """Seconds until the system recovered from ``fault``: as the driver saw it, or for a killed worker, until each
    job it was running at the kill started again (None if it ran none, or if one never started again)."""
    if fault.recovered_at is not None:
        return fault.recovered_at - fault.at
    if fault.kind != "kill worker":
        return None
    waits = []
    for job_runs in by_job.values():
        hit = [r for r in job_runs if r.worker == fault.target and r.start <= fault.at and (r.end or 1e100) >= fault.at]
        if not hit:
            continue
        later = [r.start for r in job_runs if r.start > fault.at]
        if not later:
            return None
        waits.append(min(later) - fault.at)
    return max(waits) if waits else None
