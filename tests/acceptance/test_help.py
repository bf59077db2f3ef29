"""11. ``scaleq --help`` and every subcommand's ``--help`` exit 0 and mention their options; bad options exit 2."""

from __future__ import annotations

import re
import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.acceptance.support import base_env, cli

CLIENT = ["--server", "--token", "--data-dir"]

HELP = {
    (): [
        "--help",
        "--version",
        "up",
        "worker",
        "submit",
        "jobs",
        "job",
        "logs",
        "outputs",
        "cancel",
        "why",
        "queues",
        "workers",
        "tokens",
    ],
    ("up",): ["--grid", "--host", "--port", "--store", "--lease-seconds", "--data-dir", "--verbose"],
    ("worker",): [
        "--queue",
        "--runtime",
        "--slots",
        "--worker-id",
        "--group",
        "--tag",
        "--cpus",
        "--memory",
        "--gpus",
        "--allow-host-network",
        "--docker-outputs",
        "--server-grace",
        *CLIENT,
    ],
    ("submit",): [
        "--image",
        "--env",
        "--max-duration",
        "--cpus",
        "--memory",
        "--gpus",
        "--input",
        "--tag",
        "--workdir",
        "--file",
        "--priority",
        "--max-attempts",
        "--rerun",
        "--wait",
        "--output",
        *CLIENT,
    ],
    ("jobs",): ["--queue", "--state", "--limit", "--output", *CLIENT],
    ("job",): ["--output", *CLIENT],
    ("logs",): ["--follow", "--attempt", "--output", *CLIENT],
    ("outputs",): ["--output", *CLIENT],
    ("cancel",): ["--output", *CLIENT],
    ("why",): ["--output", *CLIENT],
    ("queues",): ["--output", *CLIENT],
    ("workers",): ["--all", "--output", *CLIENT],
    ("tokens",): ["create", "list", "revoke"],
    ("tokens", "create"): ["--role", "--name", "--output", *CLIENT],
    ("tokens", "list"): ["--output", *CLIENT],
    ("tokens", "revoke"): CLIENT,
}


def wide_env() -> dict[str, str]:
    return base_env(COLUMNS="200")


@pytest.fixture(scope="module")
def helps() -> dict[tuple[str, ...], subprocess.CompletedProcess[str]]:
    """Every ``--help`` (and a few ``-h``), run concurrently once: each CLI start costs half a second."""
    runs = [(*c, "--help") for c in HELP] + [("submit", "-h"), ("--version",)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(runs, pool.map(lambda a: cli(*a, env=wide_env()), runs), strict=True))


@pytest.mark.parametrize("command", list(HELP), ids=lambda c: " ".join(c) or "scaleq")
def test_help_exits_0_and_lists_the_options(command: tuple[str, ...], helps: dict) -> None:
    r = helps[(*command, "--help")]
    assert r.returncode == 0, r.stderr
    assert "Usage: " in r.stdout
    words = set(re.findall(r"--?[a-z][a-z-]*|\b[a-z]+\b", r.stdout))
    missing = [opt for opt in HELP[command] if opt not in words]
    assert not missing, f"scaleq {' '.join(command)} --help does not mention {missing}:\n{r.stdout}"


def test_short_help_is_the_same_help(helps: dict) -> None:
    for command in [("submit",)]:
        short = helps[(*command, "-h")]
        assert short.returncode == 0
        assert short.stdout == helps[(*command, "--help")].stdout


@pytest.mark.parametrize(
    "args", [("--bogus",), ("submit", "default", "--no-such-flag", "--", "true")], ids=lambda a: " ".join(a)
)
def test_unknown_option_exits_2_and_names_it(args: tuple[str, ...]) -> None:
    r = cli(*args, env=wide_env())
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    bad = next(a for a in args if a.startswith("-") and a != "--")
    assert bad in r.stderr, r.stderr


def test_unknown_command_exits_2() -> None:
    r = cli("frobnicate", env=wide_env())
    assert r.returncode == 2
    assert "frobnicate" in r.stderr


def test_version(helps: dict) -> None:
    r = helps[("--version",)]
    assert r.returncode == 0
    assert re.fullmatch(r"scaleq \d+\.\d+\.\d+\S*\n", r.stdout)


def test_help_shows_the_defaults_its_options_document(helps: dict) -> None:
    """Option help says e.g. "Port to listen on; 0 picks a free one [default: 8765]" in the source; a user reading
    ``--help`` must see that default, not "Port to listen on; 0 picks a free one ." """
    up = " ".join(helps[("up", "--help")].stdout.replace("│", " ").split())
    assert "8765" in up, up
    assert "127.0.0.1" in up, up
    assert ".scaleq" in up, up  # --data-dir's default
    logs = " ".join(helps[("logs", "--help")].stdout.replace("│", " ").split())
    assert "latest" in logs, logs  # --attempt's default
