"""``scaleq up``: the server, the store and the autoscaler with its providers, in one process.

Start-up order: raise the open-file limit (two connections per worker), open the store, make sure the admin and
worker tokens exist (reusing the ones recorded in the data dir), bind the listening socket (so the URL is known, also
with port 0; its accept queue sized for a fleet reconnecting at once), write ``server.json``, then serve and run the
controller side by side. On SIGINT/SIGTERM the controller stops first, local workers are asked to drain (and killed
after a grace period; their jobs come back through lease expiry), then the server stops.

Local process jobs must not reach the data dir: when ``scaleq up`` runs as root its workers run them as an
unprivileged user (``--job-user``, ``nobody`` by default; see :mod:`scaleq.worker.runtime.jobuser`); when it does not,
they run as its user, and a warning at start says what that means.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import uvicorn

from scaleq.config import private_dir, write_server_info
from scaleq.grid import Grid, Group
from scaleq.jobs import RuntimeKind
from scaleq.notify import Notifier
from scaleq.providers.base import Provider
from scaleq.providers.local import LocalProvider
from scaleq.providers.registry import ProviderContext, make_provider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import StoreObserver
from scaleq.server import hostlimits, looplag, metrics
from scaleq.server.app import create_app
from scaleq.server.auth import hash_token, new_token
from scaleq.server.gcpolicy import GcPolicy
from scaleq.server.settings import ServerSettings
from scaleq.store import open_store
from scaleq.store.base import Store

log = logging.getLogger("scaleq.up")


async def ensure_token(store: Store, path: Path, role: str, name: str) -> str:
    """The token recorded at ``path`` if the store still knows it, else a new one written there (0600)."""
    existing = _read(path)
    if existing and await store.find_token(hash_token(existing)):
        return existing
    token_id, token, token_hash = new_token()
    await store.create_token(token_id, name, role, token_hash, time.time())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600)
    path.write_text(token + "\n")
    return token


def _bind(host: str, port: int, data_dir: Path) -> socket.socket:
    """Bind the listening socket. With port 0, prefer the port of the previous run from this data dir, so workers
    left running by a crashed server find the restarted one at the same URL."""
    candidates = [port]
    if port == 0:
        previous = data_dir / "server.json"
        with contextlib.suppress(OSError, ValueError, KeyError):
            candidates.insert(0, int(json.loads(previous.read_text())["url"].rsplit(":", 1)[1]))
    for n, candidate in enumerate(candidates):
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # accepted connections inherit this; without it Nagle + delayed ACK add ~40 ms per request
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((host, candidate))
            return sock
        except OSError:
            sock.close()
            if n == len(candidates) - 1:
                raise
    raise OSError("no port to bind")


def _read(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


async def serve(
    grid: Grid,
    data_dir: Path,
    *,
    host: str,
    port: int,
    store_url: str | None = None,
    lease_seconds: float | None = None,
    otlp_endpoint: str | None = None,
    ready: asyncio.Event | None = None,
    job_user: str | None = None,
) -> None:
    private_dir(data_dir)
    _warn_if_jobs_share_the_user(grid, job_user)
    hostlimits.raise_open_file_limit()
    store = open_store(store_url or grid.store.url or str(data_dir / "scaleq.db"), durability=grid.store.durability)
    await store.open()
    gc_policy: GcPolicy | None = None
    collecting: asyncio.Task[None] | None = None
    try:
        admin = await ensure_token(store, data_dir / "admin.token", "admin", "admin (scaleq up)")
        worker_token = await ensure_token(store, data_dir / "worker.token", "worker", "local workers (scaleq up)")
        sock = _bind(host, port, data_dir)
        hostlimits.listening()
        url = f"http://{host if ':' not in host else f'[{host}]'}:{sock.getsockname()[1]}"
        settings = ServerSettings(
            lease_seconds=lease_seconds or grid.server.lease_seconds,
            heartbeat_budget=grid.server.heartbeat_budget,
            max_output_bytes=grid.server.max_output_bytes,
            max_log_bytes=grid.server.max_log_bytes,
        )
        notifier = Notifier()
        app = create_app(store, settings, notifier=notifier, manage_store=False, groups=grid.groups or None)
        pusher = None
        if otlp_endpoint:
            from scaleq.server import otlp

            pusher = otlp.pusher(app, otlp_endpoint)  # fails here, at start, if the packages are missing
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                log_level="warning",
                access_log=False,
                lifespan="on",
                timeout_keep_alive=settings.keep_alive_seconds,
                backlog=hostlimits.LISTEN_BACKLOG,
            )
        )
        # our handlers, not uvicorn's: on SIGINT/SIGTERM the API must keep serving while local workers drain
        server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign, assignment]
        pctx = ProviderContext(grid.name, url, worker_token, data_dir, grid.server.public_url, job_user)
        groups = [(g, make_provider(g, pctx)) for g in grid.groups]
        controller = Controller(groups, StoreObserver(store, notifier, time.time))
        write_server_info(data_dir, url, admin)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not serving.done():
            await asyncio.sleep(0.01)
        controlling = asyncio.create_task(controller.run())
        gc_policy = GcPolicy(observe=metrics.of(app).gc_full.observe)
        gc_policy.install()  # after start-up, so that what it built is frozen
        collecting = asyncio.create_task(gc_policy.run())
        watching = asyncio.create_task(looplag.watch(metrics.of(app).loop_lag.observe))
        pushing = asyncio.create_task(pusher.run()) if pusher else None
        log.info(
            "scaleq serving on %s (dashboard %s/, data dir %s, admin token in %s)",
            url,
            url,
            data_dir,
            data_dir / "admin.token",
        )
        if ready is not None:
            ready.set()
        await asyncio.wait([asyncio.create_task(stop.wait()), serving], return_when=asyncio.FIRST_COMPLETED)
        for task in (controlling, pushing, watching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        force = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, force.set)
        await _drain_local(groups, force)
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await serving
        (data_dir / "server.json").unlink(missing_ok=True)
    finally:
        if collecting is not None:  # collected on a timer until the last worker has drained
            collecting.cancel()
        if gc_policy is not None:
            gc_policy.uninstall()
        await store.close()


def _warn_if_jobs_share_the_user(grid: Grid, job_user: str | None) -> None:
    """Local process jobs of a server that is not root run as its user, next to its data dir: say so at start."""
    if os.geteuid() == 0 or job_user is not None:
        return
    if any(g.provider == "local" and RuntimeKind.process in g.runtimes for g in grid.groups):
        log.warning(
            "process jobs run as your user (%s is not root): a job can read what you can, this data dir's tokens "
            "and database included. Submit only trusted jobs here, or run container jobs (a grid file with "
            'runtimes = ["docker"]), or run scaleq up as root so that jobs run as an unprivileged user',
            "scaleq up",
        )


async def _drain_local(groups: list[tuple[Group, Provider]], force: asyncio.Event) -> None:
    """Local workers are this process's children: drain them on the way out (remote ones keep running).

    Running jobs finish while the API keeps serving; a second Ctrl-C (``force``) makes the workers hand their jobs
    back to the queue instead, and whatever is still there 10 s later is killed.
    """
    local = [(g, p) for g, p in groups if isinstance(p, LocalProvider)]
    workers = [(g, p, w) for g, p in local for w in await p.workers(g)]
    if not workers:
        return
    log.info(
        "stopping: draining %d local worker(s); running jobs finish (Ctrl-C again to hand them back)", len(workers)
    )
    for g, p, w in workers:
        await p.stop(g, w.id)
    gone = asyncio.ensure_future(asyncio.gather(*(p.wait_gone(g, 1e9) for g, p in local)))
    forced = asyncio.ensure_future(force.wait())
    either: set[asyncio.Future[Any]] = {gone, forced}
    await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
    if not gone.done():
        log.warning("stopping now: workers hand their jobs back to the queue")
        for g, p in local:
            for w in await p.workers(g):
                await p.stop(g, w.id)  # the second SIGTERM: hand back and exit
        for g, p in local:
            if not await p.wait_gone(g, 10.0):
                for w in await p.workers(g):
                    await p.stop(g, w.id, force=True)
    gone.cancel()
    forced.cancel()
    log.info("all local workers stopped")
