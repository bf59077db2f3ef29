"""The fault campaign's ledger catches each fault it is there to catch, in synthetic records: a lost job, a job
finished twice, runs that overlap longer than the lease — and counts re-runs and recovery without failing on them."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.faults.ledger import MARK_SCRIPT, Final, Ledger, Run, SubmitAttempt, parse_marks

OK = Final("finished", "success", 1)


def ledger_of(*jobs: str) -> Ledger:
    ledger = Ledger()
    for n, job in enumerate(jobs):
        ledger.attempt(SubmitAttempt(f"job-{n}", "a", 10.0 + n, error="ReadTimeout"))  # an answer lost …
        ledger.attempt(SubmitAttempt(f"job-{n}", "b", 11.0 + n, job_id=job))  # … retried, acknowledged
    return ledger


def run(job: str, attempt: int, start: float, end: float | None, worker: str = "w1") -> Run:
    return Run(job, attempt, worker, 1000 + attempt, start, end, None if end is None else "end")


def test_a_clean_campaign_passes_and_counts_reruns() -> None:
    ledger = ledger_of("j1", "j2")
    runs = [run("j1", 1, 0.0, 1.0), run("j2", 1, 0.0, 0.5, "w2"), run("j2", 2, 4.0, 5.0)]  # j2 ran again after
    account = ledger.account({"j1": OK, "j2": OK}, runs, lease_seconds=3.0, ended=100.0)
    assert account.failures() == []
    assert (account.jobs, account.reruns, account.overlaps, ledger.lost_answers()) == (2, 1, [], 2)


def test_a_job_not_finished_or_not_successful_or_unknown_is_lost() -> None:
    ledger = ledger_of("j1", "j2", "j3", "j4")
    final = {
        "j1": OK,
        "j2": Final("queued", None, 0),
        "j3": Final("finished", "worker_lost", 0),  # j4: the server does not know it at all
    }
    account = ledger.account(final, [], lease_seconds=3.0, ended=100.0)
    assert account.lost == ["j2", "j3", "j4"]
    assert len(account.failures()) == 3 and all(f.startswith("lost") for f in account.failures())


def test_a_failed_submit_that_was_never_acknowledged_is_not_a_job() -> None:
    ledger = Ledger()
    ledger.attempt(SubmitAttempt("never", "a", 1.0, error="ConnectError"))
    assert ledger.account({}, [], lease_seconds=3.0, ended=10.0).jobs == 0


def test_two_successful_attempts_are_finished_twice() -> None:
    account = ledger_of("j1", "j2").account(
        {"j1": OK, "j2": Final("finished", "success", 2)}, [], lease_seconds=3.0, ended=100.0
    )
    assert account.twice == ["j2"]
    assert account.failures() == ["finished twice: j2"]


def test_an_overlap_longer_than_the_lease_fails_a_shorter_one_is_counted() -> None:
    runs = [
        run("j1", 1, 0.0, 5.0, "w1"),
        run("j1", 2, 1.0, 6.0, "w2"),  # 4 s together, lease 3 s: a failure
        run("j2", 1, 0.0, 2.0, "w1"),
        run("j2", 2, 1.5, 3.0, "w2"),  # 0.5 s together: within the lease
    ]
    account = ledger_of("j1", "j2").account({"j1": OK, "j2": OK}, runs, lease_seconds=3.0, ended=100.0)
    assert sorted((o.job_id, o.seconds) for o in account.overlaps) == [("j1", 4.0), ("j2", 0.5)]
    assert [o.job_id for o in account.long_overlaps] == ["j1"]
    (failure,) = account.failures()
    assert "overlap 4.00 s > lease 3 s" in failure and "w1" in failure and "w2" in failure


def test_a_run_that_never_marked_its_end_is_taken_to_run_to_the_end() -> None:
    runs = [run("j1", 1, 0.0, None, "w1"), run("j1", 2, 50.0, 51.0, "w2")]
    account = ledger_of("j1").account({"j1": OK}, runs, lease_seconds=3.0, ended=60.0)
    assert [o.seconds for o in account.overlaps] == [1.0]  # the unended run covers the second one whole
    assert account.unended == 1


def test_recovery_of_a_killed_worker_is_read_from_the_marks() -> None:
    ledger = ledger_of("j1", "j2", "j3")
    ledger.fault("kill worker", "w1", 2.0)  # w1 runs j1 and j2 at the kill; j3 had ended on it before
    ledger.fault("kill worker", "w9", 2.0)  # ran nothing: no recovery to measure
    server = ledger.fault("kill server", "a", 3.0)
    server.recovered_at = 4.5
    runs = [
        run("j1", 1, 1.0, 2.5, "w1"),
        run("j1", 2, 6.0, 7.0, "w2"),
        run("j2", 1, 1.5, None, "w1"),
        run("j2", 2, 9.0, 10.0, "w2"),
        run("j3", 1, 0.0, 1.0, "w1"),
    ]
    account = ledger.account({"j1": OK, "j2": OK, "j3": OK}, runs, lease_seconds=3.0, ended=20.0)
    assert sorted(account.recovery) == [1.5, 7.0]  # the server's 1.5 s; w1's jobs back 4 s and 7 s after the kill
    assert account.faults == {"kill worker": 2, "kill server": 1}
    table = account.table("synthetic")
    assert "| faults" in table and "3 (kill server 1, kill worker 2)" in table
    assert "4.2 s / 7.0 s" in table  # p50 / max of [1.5, 7.0]


def test_the_mark_script_writes_what_parse_marks_reads(tmp_path: Path) -> None:
    script, marks = tmp_path / "mark.sh", tmp_path / "marks"
    script.write_text(MARK_SCRIPT)
    env = {"PATH": "/usr/bin:/bin", "SCALEQ_JOB_ID": "a" * 64, "SCALEQ_ATTEMPT": "2", "FAULTS_WORKER": "w7"}
    subprocess.run(["sh", str(script), str(marks), "0.05", "label"], env=env, check=True)
    term = subprocess.Popen(["sh", str(script), str(marks), "30", "label"], env=env, start_new_session=True)
    deadline = time.monotonic() + 10
    while marks.read_text().count("start") < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    term.terminate()
    assert term.wait(10) == 143
    done, stopped = parse_marks(marks.read_text())
    assert (done.job_id, done.attempt, done.worker, done.how) == ("a" * 64, 2, "w7", "end")
    assert stopped.how == "term" and stopped.end is not None and stopped.end >= stopped.start
    assert done.end is not None and done.end - done.start >= 0.05
