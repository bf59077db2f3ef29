"""A ``scaleq server`` process and its host's limits: a fleet holds two connections per worker and reconnects in
bursts, so the server raises its own open-file limit and listens with an accept queue sized for thousands."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx

from scaleq.server.hostlimits import LISTEN_BACKLOG
from tests.helpers import eventually, free_port

#: The soft limit the server is started with: what most systems give a process (1,024) would do, this is lower so
#: that the test's connections clearly pass it.
STARTED_WITH = 256
CONNECTIONS = 600


def soft_open_files(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit listed")


@contextlib.contextmanager
def server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    port = free_port()
    argv = [sys.executable, "-m", "scaleq", "server", "--port", str(port), "--store", str(tmp_path / "scaleq.db")]
    with (tmp_path / "server.log").open("wb") as log:
        proc = subprocess.Popen(
            [*argv, "--data-dir", str(tmp_path / "data")],
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (STARTED_WITH, hard)),
        )
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(30)


async def answering(proc: subprocess.Popen[bytes], port: int, tmp_path: Path) -> None:
    async def up() -> bool:
        assert proc.poll() is None, (tmp_path / "server.log").read_text()
        with contextlib.suppress(httpx.HTTPError):
            async with httpx.AsyncClient() as c:
                return (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200
        return False

    await eventually(up, timeout=60, what="the server answers")


async def test_the_server_raises_its_open_file_limit_and_carries_more_connections_than_it_started_with(
    tmp_path: Path,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert hard >= CONNECTIONS + 200, f"this host's hard open-file limit ({hard}) is too low for the test"
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, CONNECTIONS + 200), hard))  # the test's own clients
    with server(tmp_path) as (proc, port):
        await answering(proc, port, tmp_path)
        assert soft_open_files(proc.pid) == hard > STARTED_WITH
        assert "open-file limit" in (tmp_path / "server.log").read_text()

        # all open at once, then each asks: more connections than the limit the server was started with
        opened = await asyncio.gather(*(asyncio.open_connection("127.0.0.1", port) for _ in range(CONNECTIONS)))
        try:
            for _, writer in opened:
                writer.write(b"GET /healthz HTTP/1.1\r\nhost: test\r\n\r\n")
            heads = await asyncio.wait_for(asyncio.gather(*(r.readline() for r, _ in opened)), 60)
        finally:
            for _, writer in opened:
                writer.close()
        assert [h.split()[1] for h in heads] == [b"200"] * CONNECTIONS


async def test_the_server_listens_with_an_accept_queue_for_a_fleet_reconnecting_at_once(tmp_path: Path) -> None:
    # the kernel caps a listening socket's queue at net.core.somaxconn; uvicorn's own default is 2,048
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    with server(tmp_path) as (proc, port):
        await answering(proc, port, tmp_path)
        ss = await asyncio.create_subprocess_exec("ss", "-Hltn", f"sport = :{port}", stdout=asyncio.subprocess.PIPE)
        out, _ = await ss.communicate()
        # ss -l: State Recv-Q Send-Q Local Peer; for a listening socket Send-Q is its backlog
        assert int(out.split()[2]) == min(LISTEN_BACKLOG, somaxconn) > 2048
