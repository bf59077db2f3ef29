"""Two `scaleq server` processes on one PostgreSQL, a `scaleq worker` behind each: every job runs exactly once,
whichever server it was submitted to; the schema is migrated by scaleq and a newer one is refused."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg

from tests.acceptance.support import base_env, cli
from tests.helpers import wait_for


@contextlib.contextmanager
def process(args: list[str], log: Path, env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "scaleq", *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def started(data_dir: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    def ready() -> str | None:
        assert proc.poll() is None, log.read_text()
        try:
            return json.loads((data_dir / "server.json").read_text())["url"]
        except (OSError, ValueError):
            return None

    return wait_for(ready, 30, 0.1, "scaleq server to start")


def test_two_servers_one_database_workers_on_both(pg_url: str, tmp_path: Path) -> None:
    env = base_env()
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    server = ["server", "--port", "0", "--store", pg_url]
    with (
        process([*server, "--data-dir", str(a_dir)], tmp_path / "a.log", env) as a,
        process([*server, "--data-dir", str(b_dir)], tmp_path / "b.log", env) as b,
    ):
        url_a, url_b = started(a_dir, a, tmp_path / "a.log"), started(b_dir, b, tmp_path / "b.log")
        admin_a = (a_dir / "admin.token").read_text().strip()
        made = cli("tokens", "create", "--role", "worker", "--data-dir", str(b_dir))  # a token made through B …
        assert made.returncode == 0, made.stderr
        worker_token = made.stdout.strip().splitlines()[-1]
        worker = ["worker", "--queue", "q", "--runtime", "process", "--slots", "2", "--token", worker_token]
        with (
            process([*worker, "--server", url_a], tmp_path / "wa.log", env),  # … works on A: one database
            process([*worker, "--server", url_b], tmp_path / "wb.log", env),
        ):
            ids = []
            for n in range(40):
                url = url_a if n % 2 else url_b
                body = {"queue": "q", "definition": {"command": ["sh", "-c", f"echo {n}"]}}
                r = httpx.post(f"{url}/api/v1/jobs", json=body, headers={"Authorization": f"Bearer {admin_a}"})
                ids.append(r.raise_for_status().json()["job"]["id"])
            headers = {"Authorization": f"Bearer {admin_a}"}

            def all_done() -> bool:
                jobs = httpx.get(f"{url_b}/api/v1/jobs", params={"queue": "q", "limit": 100}, headers=headers).json()
                return len(jobs) == 40 and all(j["state"] == "finished" for j in jobs)

            wait_for(all_done, 60, 0.3, "40 jobs to finish across two servers")
            for job_id in ids:
                attempts = httpx.get(f"{url_a}/api/v1/jobs/{job_id}/attempts", headers=headers).json()
                assert [x["outcome"] for x in attempts] == ["success"], attempts
            workers = httpx.get(f"{url_a}/api/v1/workers", headers=headers).json()
            assert len({w["id"] for w in workers}) == 2


def test_a_database_newer_than_the_code_is_refused(pg_url: str, tmp_path: Path) -> None:
    first = tmp_path / "first"
    with process(
        ["server", "--port", "0", "--store", pg_url, "--data-dir", str(first)], tmp_path / "1.log", base_env()
    ) as proc:
        started(first, proc, tmp_path / "1.log")  # scaleq made its schema
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("INSERT INTO scaleq_schema (version) VALUES (999)")
    refused = cli("server", "--port", "0", "--store", pg_url, "--data-dir", str(tmp_path / "second"), timeout=30)
    assert refused.returncode == 1
    assert "schema version 999" in refused.stderr and "upgrade scaleq" in refused.stderr
