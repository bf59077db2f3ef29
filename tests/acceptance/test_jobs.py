"""1-5: submitting, idempotency, inspecting, inputs and cancelling jobs — the CLI against a real ``scaleq up``.

Every command under test runs as ``python -m scaleq ...``; checks that would need many more CLI starts (polling a
job's state, reading logs back) go to the HTTP API directly, to keep the suite fast on small machines.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.acceptance.support import HEX64, Grid, pid_alive
from tests.helpers import wait_for

SUMMARY_KEYS = {
    "id",
    "queue",
    "state",
    "reason",
    "exit_code",
    "error",
    "attempts",
    "submitted_at",
    "started_at",
    "finished_at",
}


def unique() -> str:
    return uuid.uuid4().hex[:10]


def submitted_id(r: subprocess.CompletedProcess[str]) -> str:
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return json.loads(r.stdout)["id"]


# -- 1. submit --wait ------------------------------------------------------------------------------------------------


def test_submit_wait_prints_the_id_and_exits_0(shared_grid: Grid) -> None:
    r = shared_grid.cli("submit", "default", "--wait", "--", "sh", "-c", "echo hi")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip().splitlines()[0].split()[0]
    assert re.fullmatch(HEX64, job_id), r.stdout
    assert "success" in r.stderr, r.stderr  # the outcome, for the person watching
    assert shared_grid.api_logs(job_id) == "hi\n"


def test_submit_wait_json_gives_the_result(shared_grid: Grid) -> None:
    r = shared_grid.cli("submit", "default", "--wait", "--output", "json", "--", "sh", "-c", f"echo {unique()}")
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)  # nothing but JSON on stdout
    assert SUMMARY_KEYS <= job.keys()
    assert re.fullmatch(HEX64, job["id"])
    assert (job["queue"], job["state"], job["reason"], job["exit_code"]) == ("default", "finished", "success", 0)


def test_submit_wait_of_a_failing_command_exits_1_with_reason_and_exit_code(shared_grid: Grid) -> None:
    argv = ["default", "--wait", "--", "sh", "-c", f"echo {unique()} >&2; exit 3"]
    r = shared_grid.cli("submit", *argv)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert re.fullmatch(HEX64, r.stdout.split()[0])
    assert "failed" in r.stderr and "exit 3" in r.stderr, r.stderr

    r = shared_grid.cli("submit", "-o", "json", *argv)  # the same job again: its result, and the same exit code
    assert r.returncode == 1
    job = json.loads(r.stdout)
    assert (job["state"], job["reason"], job["exit_code"]) == ("finished", "failed", 3)


# -- 2. idempotent submit --------------------------------------------------------------------------------------------


def test_the_same_definition_is_the_same_job_and_runs_once(shared_grid: Grid, tmp_path: Path) -> None:
    counter = tmp_path / "runs"
    argv = ["default", "--", "sh", "-c", f"echo ran >> {counter}; echo {unique()}"]

    job_id = submitted_id(shared_grid.cli("submit", "--wait", "-o", "json", *argv))
    again = shared_grid.cli("submit", *argv)
    assert again.returncode == 0, again.stderr
    assert again.stdout.split()[0] == job_id

    time.sleep(0.5)  # give a (wrong) second run the time to start
    job = shared_grid.job(job_id)
    assert job["attempts"] == 1
    assert len(job["attempt_history"]) == 1
    assert counter.read_text() == "ran\n"

    rerun = shared_grid.cli("submit", "--rerun", "--wait", "-o", "json", *argv)
    assert submitted_id(rerun) == job_id
    assert json.loads(rerun.stdout)["reason"] == "success"
    assert counter.read_text() == "ran\nran\n"
    assert len(shared_grid.api_job(job_id)["attempt_history"]) == 2


# -- 3. looking at jobs, queues and workers -----------------------------------------------------------------------


def test_submit_many_from_json_lines_runs_every_job_once(shared_grid: Grid, tmp_path: Path) -> None:
    tag = unique()
    (tmp_path / "params.txt").write_text("alpha\n")
    lines = [json.dumps({"command": ["sh", "-c", f"echo {tag}-{i}"]}) for i in range(7)]
    lines.insert(3, "# a comment, and a blank line, are skipped")
    lines.insert(4, "")
    reads = ["sh", "-c", 'cat "$SCALEQ_INPUTS/params.txt"']
    lines.append(json.dumps({"command": reads, "inputs": ["params.txt"]}))  # relative to the file
    sweep = tmp_path / "sweep.jsonl"
    sweep.write_text("\n".join(lines) + "\n")
    r = shared_grid.cli("submit-many", "default", str(sweep))
    assert r.returncode == 0, r.stderr
    ids = r.stdout.split()
    assert len(ids) == 8 and all(re.fullmatch(HEX64, i) for i in ids)
    assert "8 jobs on default: 8 newly queued" in r.stderr
    results = shared_grid.wait_all_finished(ids, timeout=60)
    assert all(job["reason"] == "success" for job in results.values()), shared_grid.diagnosis(ids)
    assert [shared_grid.api_logs(i) for i in ids] == [f"{tag}-{i}\n" for i in range(7)] + ["alpha\n"]
    # the same file again: the same jobs, found rather than queued twice
    again = shared_grid.cli("submit-many", "default", str(sweep), "--output", "json")
    assert again.returncode == 0, again.stderr
    found = [(j["id"], j["created"], j["state"]) for j in json.loads(again.stdout)]
    assert found == [(i, False, "finished") for i in ids]


def test_submit_many_with_a_bad_line_exits_2_naming_it_and_submits_nothing(shared_grid: Grid, tmp_path: Path) -> None:
    before = shared_grid.json("jobs", "--limit", "10000")
    sweep = tmp_path / "sweep.jsonl"
    good = json.dumps({"command": ["echo", unique()]})
    sweep.write_text(f'{good}\n{{"command": ["true"], "max_duration": -1}}\n')
    r = shared_grid.cli("submit-many", "default", str(sweep))
    assert r.returncode == 2 and f"{sweep}:2: max_duration" in r.stderr, r.stderr
    sweep.write_text(f"{good}\n{{not json\n")
    r = shared_grid.cli("submit-many", "default", str(sweep))
    assert r.returncode == 2 and f"{sweep}:2: not valid JSON" in r.stderr, r.stderr
    assert r.stdout == "" and "Traceback" not in r.stderr
    assert shared_grid.json("jobs", "--limit", "10000") == before


def test_jobs_lists_and_filters(shared_grid: Grid) -> None:
    tag = unique()
    done_id = shared_grid.api_submit("echo", tag)
    other_queue = f"nobody-serves-{tag}"  # no worker group: its job stays queued
    waiting_id = shared_grid.api_submit("echo", tag, queue=other_queue, wait=False)
    try:
        table = shared_grid.cli("jobs")
        assert table.returncode == 0
        assert done_id[:12] in table.stdout and waiting_id[:12] in table.stdout

        finished = shared_grid.json("jobs", "--queue", "default", "--state", "finished", "--limit", "1000")
        assert all(SUMMARY_KEYS <= j.keys() for j in finished)
        assert done_id in {j["id"] for j in finished}
        assert all(j["queue"] == "default" and j["state"] == "finished" for j in finished)

        other = shared_grid.json("jobs", "--queue", other_queue)
        assert [(j["id"], j["queue"], j["state"], j["reason"]) for j in other] == [
            (waiting_id, other_queue, "queued", None)
        ]
    finally:
        shared_grid.api("POST", f"/jobs/{waiting_id}/cancel")


def test_job_accepts_an_8_character_prefix(shared_grid: Grid) -> None:
    tag = unique()
    job_id = shared_grid.api_submit("sh", "-c", "echo $TAG", env={"TAG": tag})

    job = shared_grid.json("job", job_id[:8])
    assert job["id"] == job_id
    assert SUMMARY_KEYS <= job.keys()
    assert job["definition"]["command"] == ["sh", "-c", "echo $TAG"]
    assert job["definition"]["env"] == {"TAG": tag}
    assert [a["outcome"] for a in job["attempt_history"]] == ["success"]
    assert job["attempt_history"][0]["worker_id"]

    table = shared_grid.cli("job", job_id[:8])
    assert table.returncode == 0, table.stderr
    assert job_id in table.stdout and "success" in table.stdout


def test_logs_prints_the_jobs_output(shared_grid: Grid) -> None:
    tag = unique()
    script = f"echo out-{tag}; echo err-{tag} >&2; printf 'no newline'"
    job_id = shared_grid.api_submit("sh", "-c", script)

    r = shared_grid.cli("logs", job_id)
    assert r.returncode == 0
    assert r.stdout == f"out-{tag}\nno newline"
    assert f"err-{tag}" in r.stderr

    chunks = shared_grid.json("logs", job_id)
    assert all({"stream", "data"} <= c.keys() for c in chunks)
    assert "".join(c["data"] for c in chunks if c["stream"] == "stdout") == f"out-{tag}\nno newline"
    assert "".join(c["data"] for c in chunks if c["stream"] == "stderr") == f"err-{tag}\n"


def test_logs_follow_returns_when_the_job_finishes_with_all_output(shared_grid: Grid) -> None:
    tag = unique()
    script = f"for i in 1 2 3 4; do echo {tag}-$i; sleep 0.5; done"
    job_id = shared_grid.api_submit("sh", "-c", script, wait=False)
    follower = subprocess.Popen(
        [sys.executable, "-m", "scaleq", "logs", job_id, "--follow"],
        env=shared_grid.env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = follower.communicate(timeout=30)
    finally:
        follower.kill()
    assert follower.returncode == 0, stderr
    assert stdout == "".join(f"{tag}-{i}\n" for i in range(1, 5))
    assert shared_grid.api_job(job_id)["state"] == "finished"  # it returned because the job ended


def test_outputs_downloads_what_the_job_wrote(shared_grid: Grid, tmp_path: Path) -> None:
    tag = unique()
    script = (
        'mkdir -p "$SCALEQ_OUTPUTS/reports/2024" && '
        f'echo {tag} > "$SCALEQ_OUTPUTS/top.txt" && '
        'printf "nested" > "$SCALEQ_OUTPUTS/reports/2024/deep.txt"'
    )
    job_id = shared_grid.api_submit("sh", "-c", script)

    dest = tmp_path / "out"
    r = shared_grid.cli("outputs", job_id, str(dest))
    assert r.returncode == 0, r.stderr
    assert (dest / "top.txt").read_text() == f"{tag}\n"
    assert (dest / "reports" / "2024" / "deep.txt").read_text() == "nested"
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "reports/2024/deep.txt",
        "top.txt",
    ]

    listing = shared_grid.json("outputs", job_id[:8], str(tmp_path / "again"))
    assert sorted((i["path"], i["size"]) for i in listing) == [("reports/2024/deep.txt", 6), ("top.txt", 11)]
    assert all(re.fullmatch(HEX64, i["sha256"]) for i in listing)
    assert (tmp_path / "again" / "reports" / "2024" / "deep.txt").read_text() == "nested"


def test_queues_and_workers(shared_grid: Grid) -> None:
    shared_grid.api_submit("echo", unique())
    queues = shared_grid.json("queues")
    default = next(q for q in queues if q["name"] == "default")
    assert {"name", "queued", "running", "succeeded", "unsuccessful", "oldest_queued_age"} <= default.keys()
    assert default["succeeded"] >= 1

    workers = shared_grid.json("workers")
    assert workers, "a job just ran, so the embedded group has a worker"
    for w in workers:
        assert {"id", "queue", "group", "slots", "busy", "state", "last_heartbeat"} <= w.keys()
        assert (w["queue"], w["group"], w["state"]) == ("default", "local", "active")
        assert w["slots"] >= 1 and 0 <= w["busy"] <= w["slots"]
        assert time.time() - w["last_heartbeat"] < 60


# -- 4. inputs --------------------------------------------------------------------------------------------------------


def test_input_flag_puts_the_bytes_under_scaleq_inputs(shared_grid: Grid, tmp_path: Path) -> None:
    data = bytes(range(256)) * 3 + uuid.uuid4().bytes
    src = tmp_path / "data.bin"
    src.write_bytes(data)
    script = 'ls "$SCALEQ_INPUTS"; sha256sum < "$SCALEQ_INPUTS/data.bin"'
    r = shared_grid.cli("submit", "default", "-w", "-o", "json", "--input", str(src), "--", "sh", "-c", script)
    job_id = submitted_id(r)
    listing, digest = shared_grid.api_logs(job_id).splitlines()
    assert listing == "data.bin"
    assert digest.split()[0] == hashlib.sha256(data).hexdigest()


def test_job_file_inputs_are_relative_to_the_file(shared_grid: Grid, tmp_path: Path) -> None:
    tag = unique()
    project = tmp_path / "project"
    (project / "data" / "sub").mkdir(parents=True)
    (project / "a.txt").write_text(f"alpha {tag}\n")
    (project / "data" / "sub" / "b.txt").write_text("beta\n")
    (project / "job.toml").write_text(
        'command = ["sh", "-c", "cat $SCALEQ_INPUTS/a.txt $SCALEQ_INPUTS/data/sub/b.txt"]\n'
        'inputs = ["a.txt", "data"]\n'
        "max_duration = 60\n"
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    r = subprocess.run(
        [sys.executable, "-m", "scaleq", "submit", "default", "--file", str(project / "job.toml"), "-w", "-o", "json"],
        env=shared_grid.env(),
        cwd=elsewhere,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    job_id = submitted_id(r)
    assert shared_grid.api_logs(job_id) == f"alpha {tag}\nbeta\n"
    definition = shared_grid.api_job(job_id)["definition"]
    assert sorted(i["path"] for i in definition["inputs"]) == ["a.txt", "data/sub/b.txt"]
    assert definition["max_duration"] == 60


# -- 5. cancel --------------------------------------------------------------------------------------------------------


def test_cancel_stops_a_running_job_and_its_process(shared_grid: Grid, tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = f"echo $$ > {pidfile}.tmp && mv {pidfile}.tmp {pidfile}; sleep 30; echo {unique()}"
    job_id = shared_grid.api_submit("sh", "-c", script, wait=False)
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, what="the job to start"))
    try:
        assert pid_alive(pid)
        assert shared_grid.api_job(job_id)["state"] == "running"

        r = shared_grid.cli("cancel", job_id[:10], "-o", "json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["id"] == job_id

        job = shared_grid.wait_state(job_id, "finished", 5)
        assert job["reason"] == "cancelled"
        wait_for(lambda: not pid_alive(pid), 7, 0.1, f"the job's process {pid} to be gone")
    finally:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_cancel_of_a_queued_job(shared_grid: Grid) -> None:
    job_id = shared_grid.api_submit("true", queue=f"nobody-serves-{unique()}", wait=False)
    r = shared_grid.cli("cancel", job_id)
    assert r.returncode == 0, r.stderr
    assert "cancelled" in r.stdout
    job = shared_grid.api_job(job_id)
    assert (job["state"], job["reason"], job["attempt_history"]) == ("finished", "cancelled", [])


def test_submit_warns_when_nothing_can_run_the_job_but_queues_it(shared_grid: Grid) -> None:
    typo = f"defualt-{unique()}"  # no group of the default grid, no worker, takes this queue
    r = shared_grid.cli("submit", typo, "--", "echo", "lost?")
    assert r.returncode == 0, r.stderr
    job_id = r.stdout.strip()
    assert re.fullmatch(HEX64, job_id) and shared_grid.job(job_id)["state"] == "queued"
    assert f"warning: nothing here runs queue '{typo}'" in r.stderr, r.stderr
    gpu = shared_grid.cli("submit", "default", "--gpus", "1", "--output", "json", "--", "nvidia-smi")
    assert gpu.returncode == 0, gpu.stderr
    warned = json.loads(gpu.stdout)
    assert "group local offers gpus 0, the job needs 1" in warned["warning"]
    fine = shared_grid.cli("submit", "default", "--output", "json", "--", "echo", unique())
    assert "warning" not in json.loads(fine.stdout) and "warning" not in fine.stderr
    for stuck in (job_id, warned["id"]):  # leave the shared grid as it was
        assert shared_grid.cli("cancel", stuck).returncode == 0
