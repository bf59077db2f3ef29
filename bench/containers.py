"""Container overhead: the same small image run N times bare and as scaleq jobs, side by side in one run.

    DOCKER_HOST=unix:///…/docker.sock python bench/containers.py [-n 20] [--image scaleq-test/busybox:latest]

Needs a Docker Engine (``scripts/docker-engine.sh`` starts a private one and prints its ``DOCKER_HOST``) with the
image present. Six ways of running ``IMAGE true``, interleaved round by round (so that drift in the machine's load
hits them alike), after one warm-up run each:

* **docker CLI** — ``docker run --rm IMAGE true`` (a subprocess: the CLI's own start-up is included);
* **SDK bare** — the Docker SDK for Python: ``containers.create`` + ``start`` + ``wait`` + ``remove`` (what a
  program that runs containers must do at least), with the engine's default network;
* **SDK bare, network none** — the same with ``network_mode="none"``: the isolation scaleq gives every job that does
  not ask for the host network (what ``docker run --network none`` does);
* **SDK bare, network none, no sandbox** — the same isolation the way scaleq's runtime now gets it on a local engine:
  ``network_mode="none"`` plus ``network_disabled=True`` (a network namespace of its own with only ``lo``, without
  the engine's network sandbox and its prestart hook), so the like-for-like baseline of the runtime;
* **scaleq runtime** — ``scaleq.worker.runtime.docker.DockerRuntime.run`` on a job definition, as the worker calls
  it (on a local engine: create with ``/outputs`` bind-mounted and limits, attach for logs, start, wait, adopt
  ``/outputs``, remove; image presence checked once);
* **scaleq grid** — the whole path: ``scaleq up`` (SQLite) in one process, ``scaleq worker --runtime docker
  --slots 1`` in another, the job submitted with ``Client.submit`` and followed with ``get_job(wait=…)``: from
  before the submit until the client sees it finished.

Then one more run of the runtime and of the bare SDK with every Engine API request timed, to show where the
difference goes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _pg
import docker
from rich.console import Console
from rich.table import Table

from scaleq.client import Client
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.worker.runtime.base import RunSpec
from scaleq.worker.runtime.docker import DockerRuntime

console = Console(width=160)
TARGET = 0.05  # scaleq adds at most 5 % to the bare time


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def run_cli(image: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(["docker", "run", "--rm", image, "true"], check=True, capture_output=True)
    return time.perf_counter() - t0


def run_sdk(client: docker.DockerClient, image: str, network: str | None = None, sandbox: bool = True) -> float:
    t0 = time.perf_counter()
    container = client.containers.create(image, ["true"], network_mode=network, network_disabled=not sandbox)
    container.start()
    status = container.wait()
    container.remove(force=True)
    elapsed = time.perf_counter() - t0
    assert status["StatusCode"] == 0, status
    return elapsed


async def run_runtime(runtime: DockerRuntime, image: str, work: Path, n: int) -> float:
    spec = RunSpec(
        job_id=secrets.token_hex(32),
        attempt=1,
        worker_id="bench",
        definition=JobDefinition(image=image, command=["true"], env={"N": str(n)}),
        inputs_dir=work / f"in-{n}",
        outputs_dir=work / f"out-{n}",
    )
    spec.inputs_dir.mkdir()
    spec.outputs_dir.mkdir()

    async def sink(stream: str, data: bytes) -> None:
        pass

    t0 = time.perf_counter()
    result = await runtime.run(spec, sink)
    elapsed = time.perf_counter() - t0
    assert result.reason == "success", result
    return elapsed


async def run_grid(client: Client, image: str, nonce: str, n: int) -> float:
    req = SubmitRequest(
        queue="containers", definition=JobDefinition(image=image, command=["true"], env={"N": f"{nonce}{n}"})
    )
    t0 = time.perf_counter()
    job, _ = await client.submit(req)
    while job.state != "finished":
        job = await client.get_job(job.id, wait=20, state=job.state)
    elapsed = time.perf_counter() - t0
    assert job.reason == "success", job
    return elapsed


@contextlib.contextmanager
def grid_worker(server: _pg.Server) -> Iterator[subprocess.Popen[bytes]]:
    """``scaleq worker --runtime docker --slots 1`` in its own process, drained (SIGTERM) at the end."""
    cmd = [sys.executable, "-m", "scaleq", "worker", "--queue", "containers", "--runtime", "docker", "--slots", "1"]
    cmd += ["--server", server.url, "--token", server.worker_token, "--worker-id", f"bench-{secrets.token_hex(3)}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class ApiTimer:
    """Times every Engine API request the Docker SDK makes (by method and path, ids folded)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, float]] = []
        self._orig: Any = None

    def __enter__(self) -> ApiTimer:
        from docker.api.client import APIClient

        self._orig = APIClient.send
        timer = self

        def send(session: Any, request: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return timer._orig(session, request, **kw)
            finally:
                timer.calls.append((f"{request.method} {_fold(request.path_url)}", time.perf_counter() - t0))

        APIClient.send = send  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        from docker.api.client import APIClient

        APIClient.send = self._orig  # type: ignore[method-assign]


def _fold(path: str) -> str:
    parts = path.split("?")[0].split("/")
    out = []
    for p in parts:
        out.append("{id}" if len(p) >= 12 and all(c in "0123456789abcdef" for c in p) else p)
    path = "/".join(out)
    if "/containers/" in path and "{id}" not in path and path.count("/") > 3:
        pieces = path.split("/")
        pieces[3] = "{id}"  # container names (scaleq-…) as ids
        path = "/".join(pieces)
    return path.replace("/v1.41", "")


async def main_async(n: int, image: str) -> int:
    client = docker.from_env()
    client.ping()
    client.images.get(image)
    runtime = DockerRuntime()
    work = Path(tempfile.mkdtemp(prefix="scaleq-bench-containers-"))
    times: dict[str, list[float]] = defaultdict(list)
    order = [
        "docker CLI",
        "SDK bare",
        "SDK bare, network none",
        "SDK bare, network none, no sandbox",
        "scaleq runtime",
        "scaleq grid",
    ]
    try:
        with _pg.scaleq_server(None) as server, grid_worker(server):
            async with Client(server.url, server.admin_token) as api:
                deadline = time.monotonic() + 30
                while not await api.workers():  # the worker registered
                    assert time.monotonic() < deadline, "the docker worker did not register"
                    await asyncio.sleep(0.1)
                nonce = secrets.token_hex(4)
                for warm in (True, False):
                    rounds = 1 if warm else n
                    for i in range(rounds):
                        k = i if not warm else -1
                        got = {
                            "docker CLI": await asyncio.to_thread(run_cli, image),
                            "SDK bare": await asyncio.to_thread(run_sdk, client, image),
                            "SDK bare, network none": await asyncio.to_thread(run_sdk, client, image, "none"),
                            "SDK bare, network none, no sandbox": await asyncio.to_thread(
                                run_sdk, client, image, "none", False
                            ),
                            "scaleq runtime": await run_runtime(runtime, image, work, k + 1_000_000 * warm),
                            "scaleq grid": await run_grid(api, image, nonce, k + 1_000_000 * warm),
                        }
                        if not warm:
                            for name, t in got.items():
                                times[name].append(t)
                    if not warm:
                        console.print(f"  {n} rounds done")
            with ApiTimer() as sdk_calls:
                await asyncio.to_thread(run_sdk, client, image, "none")
            with ApiTimer() as bare_calls:
                await asyncio.to_thread(run_sdk, client, image, "none", False)
            with ApiTimer() as rt_calls:
                await run_runtime(runtime, image, work, 2_000_000)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    none = pct(times["SDK bare, network none"], 50)
    base = pct(times["SDK bare, network none, no sandbox"], 50)
    plain = pct(times["SDK bare"], 50)
    t = Table(title=f"{image} `true`, {n} runs each (ms)")
    cols = ("how", "p50", "p95", "mean", "vs SDK bare", "vs network none", "vs no sandbox", "added", "target: ≤ +5 %")
    for col in cols:
        t.add_column(col, justify="left" if col == "how" else "right")
    for name in order:
        v = times[name]
        p50 = pct(v, 50)
        over = p50 / base - 1
        verdict = "met" if over <= TARGET else f"missed by {(over - TARGET) * 100:.0f} points"
        t.add_row(
            name,
            f"{p50 * 1000:.0f}",
            f"{pct(v, 95) * 1000:.0f}",
            f"{sum(v) / len(v) * 1000:.0f}",
            f"{p50 / plain:.2f}x",
            f"{p50 / none:.2f}x",
            f"{p50 / base:.2f}x",
            f"{(p50 - base) * 1000:+.0f} ms",
            verdict if name.startswith("scaleq") else "",
        )
    console.print(t)
    console.print(
        "(p50s; 'added' and the target are against the bare SDK run with the same isolation got the same way: network "
        "none without the engine's sandbox, what scaleq's runtime does on a local engine; 'vs network none' is against "
        "the bare run with the engine's own network none)"
    )
    timed = (
        ("SDK bare, network none", sdk_calls.calls),
        ("SDK bare, network none, no sandbox", bare_calls.calls),
        ("scaleq runtime", rt_calls.calls),
    )
    for title, calls in timed:
        total = sum(d for _, d in calls) * 1000
        t = Table(title=f"Engine API requests of one run: {title} ({len(calls)} requests, {total:.0f} ms)")
        t.add_column("request")
        t.add_column("ms", justify="right")
        for what, d in calls:
            t.add_row(what, f"{d * 1000:.1f}")
        console.print(t)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-n", type=int, default=20, help="runs of each (default 20)")
    ap.add_argument("--image", default="scaleq-test/busybox:latest")
    args = ap.parse_args()
    if not os.environ.get("DOCKER_HOST"):
        console.print("[yellow]DOCKER_HOST is not set: using the default engine socket[/yellow]")
    console.print(f"[bold]machine[/bold]: {_pg.machine()}")
    console.print(f"Docker Engine {docker.from_env().version().get('Version')}, docker SDK {docker.__version__}")
    started = time.monotonic()
    code = asyncio.run(main_async(args.n, args.image))
    console.print(f"[dim]{time.monotonic() - started:.0f} s[/dim]")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
