"""7. Tokens and roles, through the CLI (``--token``/``--server`` and ``SCALEQ_TOKEN``), and the raw HTTP API."""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.acceptance.support import HEX64, Grid, base_env, cli

TOKEN = r"\S{20,}"


def concurrently(**calls: Callable[[], subprocess.CompletedProcess[str]]) -> dict[str, subprocess.CompletedProcess]:
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(fn) for name, fn in calls.items()}
        return {name: f.result() for name, f in futures.items()}


def test_tokens_and_roles(shared_grid: Grid, tmp_path: Path) -> None:
    # A directory with no .scaleq in it: only what the test passes reaches the command.
    nowhere = tmp_path / "nowhere"
    nowhere.mkdir()
    url = shared_grid.url

    def as_user(*args: str, token: str, data_dir: bool = False) -> Callable[[], subprocess.CompletedProcess[str]]:
        if data_dir:  # SCALEQ_TOKEN in the environment, the server from the data dir
            return lambda: cli(*args, env=shared_grid.env(SCALEQ_TOKEN=token), cwd=nowhere)
        at = args.index("--") if "--" in args else len(args)  # options go before the job's command
        argv = [*args[:at], "--server", url, "--token", token, *args[at:]]
        return lambda: cli(*argv, env=base_env(), cwd=nowhere)

    created = shared_grid.cli("tokens", "create", "--role", "submit", "--name", "ci")
    assert created.returncode == 0, created.stderr
    submit_token = created.stdout.strip().splitlines()[-1]
    assert re.fullmatch(TOKEN, submit_token), created.stdout
    read = shared_grid.json("tokens", "create", "--role", "read")
    assert {"id", "role", "token"} <= read.keys() and read["role"] == "read"

    tag = uuid.uuid4().hex[:10]
    r = concurrently(
        submit_flags=as_user("submit", "default", "--", "echo", f"flags-{tag}", token=submit_token),
        submit_env=as_user("submit", "default", "--", "echo", f"env-{tag}", token=submit_token, data_dir=True),
        list_as_submit=as_user("tokens", "list", token=submit_token),
        submit_as_read=as_user("submit", "default", "--", "echo", f"read-{tag}", token=read["token"]),
        jobs_as_read=as_user("jobs", "-o", "json", token=read["token"]),
        garbage=as_user("submit", "default", "--", "echo", f"garbage-{tag}", token="sq_garbage_garbage"),
        garbage_env=as_user("jobs", token="not-a-token", data_dir=True),
    )

    for name in ("submit_flags", "submit_env"):
        assert r[name].returncode == 0, f"{name}: {r[name].stderr}"
        assert re.fullmatch(HEX64, r[name].stdout.split()[0])

    assert r["list_as_submit"].returncode == 1
    assert re.search(r"403|forbidden|may not", r["list_as_submit"].stderr, re.I), r["list_as_submit"].stderr
    assert "admin" in r["list_as_submit"].stderr

    assert r["submit_as_read"].returncode == 1
    assert re.search(r"403|forbidden|may not", r["submit_as_read"].stderr, re.I), r["submit_as_read"].stderr
    assert r["jobs_as_read"].returncode == 0, r["jobs_as_read"].stderr
    listed = {j["id"] for j in json.loads(r["jobs_as_read"].stdout)}
    assert r["submit_flags"].stdout.split()[0] in listed or len(listed) == 50  # a read token can read

    for name in ("garbage", "garbage_env"):
        assert r[name].returncode == 1, f"{name}: {r[name].stderr}"
        assert re.search(r"401|unauthori[sz]ed|unknown or revoked token", r[name].stderr, re.I), r[name].stderr

    # Nothing was stored for the refused submits.
    all_jobs = shared_grid.api("GET", "/jobs", params={"limit": 10000}).raise_for_status().json()
    commands = {" ".join(j["definition"]["command"]) for j in all_jobs}
    assert f"echo flags-{tag}" in commands and f"echo env-{tag}" in commands
    assert f"echo read-{tag}" not in commands and f"echo garbage-{tag}" not in commands

    submit_id = re.search(r"token (\S+) \(submit\)", created.stderr).group(1)  # "token ID (submit) created ..."
    revoked = shared_grid.cli("tokens", "revoke", submit_id)
    assert revoked.returncode == 0, revoked.stderr

    r = concurrently(
        after_revoke=as_user("submit", "default", "--", "echo", f"revoked-{tag}", token=submit_token),
        tokens=lambda: shared_grid.cli("tokens", "list", "-o", "json"),
    )
    assert r["after_revoke"].returncode == 1
    assert re.search(r"401|unknown or revoked token", r["after_revoke"].stderr, re.I), r["after_revoke"].stderr
    tokens = {t["id"]: t for t in json.loads(r["tokens"].stdout)}
    assert (tokens[submit_id]["name"], tokens[submit_id]["role"]) == ("ci", "submit")
    assert tokens[submit_id]["revoked_at"] is not None
    assert tokens[read["id"]]["revoked_at"] is None
    assert not any("token" in t for t in tokens.values()), "tokens list never shows secrets"


def test_raw_http_needs_a_token_and_serves_openapi(shared_grid: Grid) -> None:
    url = shared_grid.url
    assert httpx.get(f"{url}/api/v1/jobs").status_code == 401
    assert (
        httpx.post(f"{url}/api/v1/jobs", json={"queue": "default", "definition": {"command": ["true"]}}).status_code
        == 401
    )
    bad = httpx.get(f"{url}/api/v1/jobs", headers={"Authorization": "Bearer sq_nope"})
    assert bad.status_code == 401

    ok = httpx.get(f"{url}/api/v1/jobs", headers={"Authorization": f"Bearer {shared_grid.admin_token}"})
    assert ok.status_code == 200 and isinstance(ok.json(), list)

    spec = httpx.get(f"{url}/api/v1/openapi.json")
    assert spec.status_code == 200
    doc = spec.json()
    assert doc["openapi"].startswith("3.")
    assert "/api/v1/jobs" in doc["paths"]
    assert {"get", "post"} <= doc["paths"]["/api/v1/jobs"].keys()
