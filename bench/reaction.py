"""Reaction from zero: how long from the first submit to the provider's start call, and to the job running.

    PYTHONPATH=src python bench/reaction.py [--rounds 10] [--warm-rounds 5] [--provider local|docker]

Everything real and in one process: a SQLite store in a temp dir, the HTTP server (uvicorn on a free port), the
controller with the in-process observer (woken by the server's notifier, as in ``scaleq up``) and the provider, wrapped
only to note when ``start()`` is called. A group of 0..1 workers; every cold round starts from zero workers (the
previous round's worker is destroyed, and the round waits until the provider lists none), submits a ``true`` process
job through the client and measures, from just before the submit:

* **start call** -- the controller calling ``provider.start()`` (target: within 100 ms; event-driven, not polled);
* **registered** -- the new worker registering with the server (its process start, imports and first request);
* **running** -- the job leaving ``queued``, seen by the client's long-poll (target: within 1 s on the local provider);
* **finished** -- the job finished, seen by the client's long-poll.

Warm rounds then submit to a worker that is already up and idle: the same timings without a start.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import secrets
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from rich.console import Console
from rich.table import Table

from scaleq.client import Client
from scaleq.grid import Group
from scaleq.jobs import JobDefinition, State, SubmitRequest
from scaleq.notify import Notifier
from scaleq.providers.base import DESTROY_GRACE, Health, Provider, ProviderWorker
from scaleq.providers.registry import ProviderContext, make_provider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.server.app import create_app
from scaleq.server.auth import new_token
from scaleq.server.settings import ServerSettings
from scaleq.sim import percentile
from scaleq.store.sqlite import SQLiteStore

START_TARGET = 0.100  # submit -> provider.start() called
RUNNING_TARGET = 1.0  # submit -> job running, local provider


class TimedProvider:
    """The real provider, noting the ``perf_counter`` of every ``start()`` call (and when it returned)."""

    def __init__(self, inner: Provider) -> None:
        self.inner = inner
        self.name = inner.name
        self.calls: list[tuple[float, float, int]] = []  # (called, returned, count)

    async def start(self, group: Group, count: int) -> list[str]:
        called = time.perf_counter()
        ids = await self.inner.start(group, count)
        self.calls.append((called, time.perf_counter(), count))
        return ids

    async def workers(self, group: Group) -> list[ProviderWorker]:
        return await self.inner.workers(group)

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        await self.inner.stop(group, worker_id, force=force)

    async def reap(self, group: Group, worker_ids: Collection[str]) -> set[str]:
        return await self.inner.reap(group, worker_ids)

    async def wait_gone(self, group: Group, timeout: float) -> bool:
        return await self.inner.wait_gone(group, timeout)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        return await self.inner.why_not_up(group, worker_ids)

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        return await self.inner.destroy(group, grace)

    async def health(self) -> Health:
        return await self.inner.health()

    async def close(self) -> None:
        await self.inner.close()


@dataclass
class Round:
    start_call: float | None = None  # seconds after the submit
    start_returned: float | None = None
    registered: float | None = None
    running: float | None = None
    finished: float | None = None
    ok: bool = False


@dataclass
class Bench:
    client: Client
    store: SQLiteStore
    group: Group
    provider: TimedProvider
    nonce: str = field(default_factory=lambda: secrets.token_hex(4))
    count: int = 0

    async def submit_and_follow(self, timeout: float) -> Round:
        self.count += 1
        definition = JobDefinition(command=["true"], env={"BENCH_ROUND": f"{self.nonce}-{self.count}"})
        calls_before = len(self.provider.calls)
        t0, wall0 = time.perf_counter(), time.time()
        job, _ = await self.client.submit(SubmitRequest(queue=self.group.queue, definition=definition))
        r = Round()
        job = await self.client.get_job(job.id, wait=timeout, state=State.queued.value)
        if job.state != State.queued:
            r.running = time.perf_counter() - t0
        job = await self.client.get_job(job.id, wait=timeout, state=State.running.value)
        if job.state == State.finished:
            r.finished = time.perf_counter() - t0
            r.ok = job.reason == "success"
        if len(self.provider.calls) > calls_before:
            called, returned, _ = self.provider.calls[calls_before]
            r.start_call, r.start_returned = called - t0, returned - t0
            if job.worker_id:
                worker = next((w for w in await self.store.list_workers() if w.id == job.worker_id), None)
                if worker is not None:
                    r.registered = worker.started_at - wall0
        return r

    async def to_zero(self, timeout: float = 20.0) -> None:
        """Destroy the group's workers and wait until the provider lists none."""
        await self.provider.destroy(self.group)
        deadline = time.monotonic() + timeout
        while await self.provider.workers(self.group):
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers of group {self.group.name} still there after {timeout:.0f} s")
            await asyncio.sleep(0.05)


async def make_tokens(store: SQLiteStore) -> dict[str, str]:
    tokens = {}
    for role in ("admin", "worker"):
        token_id, token, token_hash = new_token()
        await store.create_token(token_id, f"bench {role}", role, token_hash, time.time())
        tokens[role] = token
    return tokens


@contextlib.asynccontextmanager
async def serving(app: object, host: str) -> AsyncIterator[str]:
    # As `scaleq up` binds it: TCP_NODELAY on the listening socket (inherited by accepted connections), without
    # which Nagle + delayed ACK add ~40 ms to every request on a kept-alive connection.
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on"))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started and not task.done():
        await asyncio.sleep(0.01)
    try:
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        await task


@contextlib.asynccontextmanager
async def running(controller: Controller) -> AsyncIterator[None]:
    task = asyncio.create_task(controller.run())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def make_group(provider: str, image: str | None) -> Group:
    # scale_down_window 0: once the job is done the group wants 0 workers again, so a round's destroy is not undone
    # by the controller keeping the peak of the last minute; idle_timeout (default 60 s) keeps the warm worker up.
    extra = {"image": image} if image else {}
    return Group(
        name="bench",
        queue="q",
        provider=provider,
        min_workers=0,
        max_workers=1,
        runtimes=["process"],
        scale_down_window=0,
        **extra,
    )


async def bench(args: argparse.Namespace, console: Console) -> list[tuple[str, list[Round]]]:
    with tempfile.TemporaryDirectory(prefix="scaleq-bench-") as tmp:
        data_dir = Path(tmp)
        store = SQLiteStore(data_dir / "scaleq.db")
        await store.open()
        try:
            notifier = Notifier()
            app = create_app(store, ServerSettings(), notifier=notifier, manage_store=False)
            tokens = await make_tokens(store)
            # the docker provider runs workers on the host network by default, so loopback reaches them too
            async with serving(app, "127.0.0.1") as local_url:
                group = make_group(args.provider, args.image)
                ctx = ProviderContext("bench", args.worker_server or local_url, tokens["worker"], data_dir)
                provider = TimedProvider(make_provider(group, ctx))
                controller = Controller([(group, provider)], StoreObserver(store, notifier, time.time), tick=1.0)
                async with Client(local_url, tokens["admin"]) as client:
                    b = Bench(client, store, group, provider)
                    try:
                        async with running(controller):
                            return await rounds(b, args, console)
                    finally:
                        await b.to_zero()
        finally:
            await store.close()


async def rounds(b: Bench, args: argparse.Namespace, console: Console) -> list[tuple[str, list[Round]]]:
    await asyncio.sleep(0.2)  # the controller's first look: nothing to do
    cold, warm = [], []
    for i in range(args.rounds):
        await b.to_zero()
        await asyncio.sleep(0.1)  # let the controller look once at zero workers and no demand
        r = await b.submit_and_follow(args.timeout)
        cold.append(r)
        console.print(f"cold {i + 1}/{args.rounds}: {_row(r)}", highlight=False)
    if not await b.provider.workers(b.group):  # a worker up and idle for the warm rounds
        await b.submit_and_follow(args.timeout)
    for i in range(args.warm_rounds):
        r = await b.submit_and_follow(args.timeout)
        warm.append(r)
        console.print(f"warm {i + 1}/{args.warm_rounds}: {_row(r)}", highlight=False)
    return [("cold (from zero)", cold), ("warm (idle worker)", warm)]


def _ms(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds * 1000:,.0f} ms"


def _row(r: Round) -> str:
    return (
        f"start call {_ms(r.start_call)}, registered {_ms(r.registered)}, running {_ms(r.running)}, "
        f"finished {_ms(r.finished)}{'' if r.ok else ' [NOT OK]'}"
    )


METRICS = (
    ("submit → start call", "start_call"),
    ("start call returned", "start_returned"),
    ("submit → worker registered", "registered"),
    ("submit → job running", "running"),
    ("submit → job finished", "finished"),
)


def render(provider: str, cases: list[tuple[str, list[Round]]], note: str = "") -> tuple[Table, Table, bool]:
    table = Table(title=f"reaction on the {provider} provider{note}", title_justify="left")
    for name, justify in (("case", "left"), ("metric", "left"), ("n", "right"), ("p50", "right"), ("p95", "right")):
        table.add_column(name, justify=justify)  # type: ignore[arg-type]
    table.add_column("max", justify="right")
    stats: dict[tuple[str, str], tuple[float, float, float]] = {}
    for case, rounds in cases:
        table.add_section()
        for label, attr in METRICS:
            values = sorted(v for r in rounds if (v := getattr(r, attr)) is not None)
            if not values:
                continue
            p50, p95, top = percentile(values, 50), percentile(values, 95), values[-1]
            stats[(case, attr)] = (p50, p95, top)
            table.add_row(case, label, str(len(values)), _ms(p50), _ms(p95), _ms(top))

    targets = Table(title="targets", title_justify="left")
    for name in ("target", "p95", "max", "met"):
        targets.add_column(name, justify="left" if name == "target" else "right")
    all_met = True
    checks = [("submit → start call ≤ 100 ms (cold)", ("cold (from zero)", "start_call"), START_TARGET)]
    if provider == "local":
        checks.append(("submit → job running ≤ 1 s (cold)", ("cold (from zero)", "running"), RUNNING_TARGET))
    for label, key, limit in checks:
        p50, p95, top = stats.get(key, (float("nan"),) * 3)
        met = p95 <= limit
        all_met &= met
        verdict = "[green]met[/green]" if met else "[red]missed[/red]"
        margin = f" ({(limit - p95) * 1000:+,.0f} ms)"
        targets.add_row(label, _ms(p95), _ms(top), verdict + margin)
    cold_ok = all(r.ok for _, rounds in cases for r in rounds)
    return table, targets, all_met and cold_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=10, help="cold rounds, each from zero workers")
    ap.add_argument("--warm-rounds", type=int, default=5, help="rounds with a worker already idle")
    ap.add_argument("--provider", choices=("local", "docker"), default="local")
    ap.add_argument("--image", help="worker image, for --provider docker")
    ap.add_argument(
        "--worker-server",
        help="server URL as workers reach it (default: loopback; docker workers use the host network)",
    )
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for each state change")
    args = ap.parse_args(argv)
    console = Console(width=120)
    if args.provider == "docker" and importlib.util.find_spec("scaleq.providers.docker") is None:
        console.print(
            "[red]error:[/red] --provider docker needs scaleq.providers.docker (the Docker provider), which this "
            "checkout does not have yet"
        )
        return 2
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    cases = asyncio.run(bench(args, console))
    note = ""
    table, targets, ok = render(args.provider, cases, note)
    console.print(table)
    console.print(targets)
    console.print(f"{args.rounds} cold + {args.warm_rounds} warm rounds in {time.perf_counter() - started:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
