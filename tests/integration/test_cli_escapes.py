"""`scaleq logs` and `scaleq job` never write a job's escape sequences raw to a terminal: they show them as \\xNN.
A pipe gets the log as the job wrote it, and so does a terminal with ``--raw``. The CLI runs in a real pseudo-terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import sys

from scaleq.jobs import JobDefinition, SubmitRequest
from tests.helpers import LiveServer

HOSTILE = "\x1b]0;pwned\x07\x1b[2J\x9b1;1H"  # retitle the window, clear the screen, C1 cursor move
SHOWN = "\\x1b]0;pwned\\x07\\x1b[2J\\x9b1;1H"


async def _cli(live: LiveServer, *args: str, tty: bool) -> bytes:
    """Run ``scaleq ARGS`` against the live server, its stdout a pseudo-terminal (``tty``) or a pipe."""
    argv = [sys.executable, "-m", "scaleq", *args, "--server", live.url, "--token", live.tokens["admin"]]
    env = {**os.environ, "COLUMNS": "250", "TERM": "xterm"}
    if not tty:
        proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE, env=env)
        stdout, _ = await proc.communicate()
        assert proc.returncode == 0
        return stdout
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(*argv, stdout=slave, env=env)
    os.close(slave)
    chunks = []
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = await loop.run_in_executor(None, os.read, master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    with contextlib.suppress(OSError):
        os.close(master)
    assert await proc.wait() == 0
    return b"".join(chunks)


async def test_logs_and_job_show_escape_sequences_instead_of_obeying_them(live: LiveServer) -> None:
    definition = JobDefinition(command=["echo", f"cmd{HOSTILE}"], env={"LABEL": f"env{HOSTILE}"})
    async with live.client("submit") as s, live.client("worker") as w:
        job, _ = await s.submit(SubmitRequest(queue="q", definition=definition))
        await w.register({"id": "w1", "queue": "q", "slots": 1, "runtimes": ["process"], "cpus": 1})
        claims, _, _ = await w.claim("w1", 1, wait=0)
        lease = claims[0].lease
        await w.append_logs(lease, [("stdout", f"log{HOSTILE}\tend\n".encode())])
        await w.finish({"lease": lease, "reason": "failed", "exit_code": 1, "error": f"err{HOSTILE}"})

    on_terminal = (await _cli(live, "logs", job.id, tty=True)).decode()
    assert "\x1b" not in on_terminal and "\x9b" not in on_terminal and "\x07" not in on_terminal
    assert f"log{SHOWN}\tend" in on_terminal  # tab and newline are kept

    piped = (await _cli(live, "logs", job.id, tty=False)).decode()
    assert piped == f"log{HOSTILE}\tend\n"  # a pipe or a file gets what the job wrote
    raw = (await _cli(live, "logs", job.id, "--raw", tty=True)).decode()
    assert HOSTILE in raw

    for tty in (True, False):
        shown = (await _cli(live, "job", job.id, tty=tty)).decode()
        # on a terminal the table has its own styling; none of the job's sequences get through
        assert "pwned\x07" not in shown and "\x1b[2J" not in shown and "\x9b" not in shown
        for field in ("cmd", "env", "err"):
            assert f"{field}{SHOWN}" in shown, (field, shown)
