"""The docker provider: workers are containers of the group's worker image on a Docker Engine (or Podman).

Design:

- **One container per worker**, of ``group.image`` (default ``scaleq/worker:latest``, built locally by
  ``scripts/worker-image.sh``), named ``scaleq-<worker id>`` and running ``scaleq worker --server … --worker-id …``
  with the group's queue, slots, runtimes, resources and tags. The worker token goes in as ``SCALEQ_TOKEN`` (the
  worker removes it from the environment its jobs inherit; anyone who can ``docker inspect`` can read it, but they
  control the engine anyway), next to ``group.env``.
- **Labels are the state**: ``scaleq.managed=true``, ``scaleq.grid``, ``scaleq.group``, ``scaleq.worker-id`` and
  ``scaleq.version`` (``Group.version()``). ``workers`` finds workers by label only, so a restarted controller,
  another provider instance, ``destroy`` and ``doctor`` all see what the engine runs. ``workers`` also keeps house: a
  worker that drained exits 0 and an exited container has no use, so ``workers`` removes exited containers (and
  anything the dead worker's jobs left labelled with its id), logging the output of those that failed. The worker
  id is ``scaleq.worker-id``, not ``scaleq.worker``: the docker runtime labels a worker's *job* containers and
  volumes ``scaleq.managed=true, scaleq.worker=<id>``, and a starting worker removes everything so labelled as the
  orphans of an earlier crash — its own container too, had it carried that label.
- **Networking**: ``network_mode="host"`` by default, so a worker reaches a server on the host's ``127.0.0.1`` —
  the engine scaleq's tests start runs with ``--bridge=none`` (no default bridge network, no iptables), where host
  networking is the only way out. Another mode (a user-defined network) is a constructor option; the server URL
  must then be reachable from it (a loopback URL is refused with a clear error). Process jobs run inside the
  worker's container and so share its network.
- **Container jobs** (``runtimes`` includes ``docker``) run docker-out-of-docker: the engine's socket (from
  ``DOCKER_HOST``) is mounted into the worker at ``/var/run/docker.sock`` and ``DOCKER_HOST`` points at it, so job
  containers are siblings of the worker on the same engine. Inputs and outputs move through the engine's API
  (volumes, put/get archive): the docker runtime's probe finds that the engine does not see the worker's files, so
  it never bind-mounts and no host path has to exist inside the worker. Mounting
  the socket gives the worker root on the engine's host: only do it for workers you would trust with that. A
  ``tcp://`` engine is passed through as it is (reachable over the host network; TLS material is not copied).
- **Limits** from ``group.resources``: ``nano_cpus`` and ``mem_limit`` (no swap beyond it), GPUs as a device
  request. No restart policy: the controller replaces workers, and a drained worker must stay gone. An init process
  (``init=True``) is PID 1 and forwards signals, so ``SIGTERM`` reaches ``scaleq worker`` and drains it.
- **Stopping**: ``stop`` sends ``SIGTERM`` (drain: the worker finishes its jobs, then exits 0) and returns at once,
  like the local provider — a ``container.stop(timeout)`` would block, and kill the worker mid-job when the
  timeout ran out. ``force`` kills. ``destroy`` sends ``SIGTERM``, waits ``grace`` seconds, sends a second
  ``SIGTERM`` to what is left (the worker hands its jobs back to the queue), waits a little more, then removes every
  container of the group with force, and whatever job containers and volumes carry those workers' ids.
- The SDK is synchronous: every call runs in ``asyncio.to_thread``. Engine trouble becomes :class:`ProviderError`
  with what to do: an unreachable engine names ``DOCKER_HOST``; a missing image names the build script.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Collection
from typing import Any, TypeVar
from urllib.parse import urlparse

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.types import DeviceRequest, Mount

from scaleq.grid import Group
from scaleq.jobs import RuntimeKind
from scaleq.providers.base import (
    Health,
    ProviderBase,
    ProviderError,
    ProviderWorker,
    Status,
    new_worker_id,
    start_each,
    worker_args,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

DEFAULT_IMAGE = "scaleq/worker:latest"
IMAGE_SCRIPT = "scripts/worker-image.sh"
DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
SOCKET_IN_WORKER = "/var/run/docker.sock"
MANAGED = "scaleq.managed"
WORKER_LABEL = "scaleq.worker-id"  # the worker a container *is*; job containers carry scaleq.worker (who ran them)
#: How long ``destroy`` waits after the second SIGTERM (jobs handed back) before it removes with force.
HANDBACK_GRACE = 5.0
_EXITED = re.compile(r"Exited \((-?\d+)\)")


class DockerProvider(ProviderBase):
    name = "docker"
    poll_every = 0.2
    force_grace = HANDBACK_GRACE

    def __init__(
        self,
        *,
        grid: str,
        server: str,
        token: str,
        docker_host: str | None = None,
        network_mode: str = "host",
        api_timeout: float = 30.0,
        server_grace: float = 300.0,
    ) -> None:
        self.grid = grid
        self.server = server
        self.token = token
        self.docker_host = docker_host or os.environ.get("DOCKER_HOST") or DEFAULT_DOCKER_HOST
        self.network_mode = network_mode
        self.api_timeout = api_timeout
        self.server_grace = server_grace
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        self._stopping: set[str] = set()

    # -- the engine -------------------------------------------------------------------------------------------------

    def _engine(self) -> docker.DockerClient:
        """The SDK client, made on first use (it contacts the engine), in the calling thread."""
        with self._lock:
            if self._client is None:
                self._client = docker.DockerClient.from_env(
                    environment={**os.environ, "DOCKER_HOST": self.docker_host},
                    timeout=int(self.api_timeout),
                )
            return self._client

    def _unreachable(self, exc: BaseException) -> ProviderError:
        return ProviderError(
            f"cannot reach the Docker Engine at DOCKER_HOST={self.docker_host}: {_explain(exc)}. Start the engine "
            '(eval "$(scripts/docker-engine.sh | tail -n1)" starts a private one and exports DOCKER_HOST) or point '
            "DOCKER_HOST at a running one."
        )

    async def _call(self, what: str, fn: Callable[[docker.DockerClient], T]) -> T:
        """Run ``fn(client)`` in a thread; engine errors become ProviderError saying ``what`` failed."""

        def run() -> T:
            return fn(self._engine())

        try:
            return await asyncio.to_thread(run)
        except ProviderError:
            raise
        except APIError as exc:
            raise ProviderError(f"the Docker Engine at {self.docker_host} refused to {what}: {_explain(exc)}") from exc
        except (DockerException, OSError) as exc:
            raise self._unreachable(exc) from exc

    async def close(self) -> None:
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None

    # -- what a worker container is ---------------------------------------------------------------------------------

    def _filters(self, group: Group) -> dict[str, Any]:
        return {"label": [f"{MANAGED}=true", f"scaleq.grid={self.grid}", f"scaleq.group={group.name}"]}

    def worker_argv(self, group: Group, worker_id: str) -> list[str]:
        return ["scaleq", *worker_args(group, self.server, worker_id, self.server_grace)]

    def _engine_access(self, group: Group) -> tuple[dict[str, str], list[Mount]]:
        """Environment and mounts that let a worker with the docker runtime use this same engine."""
        if RuntimeKind.docker not in group.runtimes:
            return {}, []
        if self.docker_host.startswith("unix://"):
            socket_path = self.docker_host.removeprefix("unix://")
            return {"DOCKER_HOST": f"unix://{SOCKET_IN_WORKER}"}, [Mount(SOCKET_IN_WORKER, socket_path, type="bind")]
        return {"DOCKER_HOST": self.docker_host}, []

    def _check_reachable_server(self) -> None:
        host = urlparse(self.server).hostname or ""
        if self.network_mode != "host" and (host in ("localhost", "::1") or host.startswith("127.")):
            raise ProviderError(
                f"the server is at {self.server}, on this host's loopback, which worker containers on network "
                f"{self.network_mode!r} cannot reach: use network_mode 'host', or serve on an address they can reach"
            )

    def _create_and_start(self, group: Group, image: str, worker_id: str) -> str:
        client = self._engine()
        engine_env, mounts = self._engine_access(group)
        res = group.resources
        labels = {
            MANAGED: "true",
            "scaleq.grid": self.grid,
            "scaleq.group": group.name,
            WORKER_LABEL: worker_id,
            "scaleq.version": group.version(),
            "scaleq.started-at": f"{time.time():.3f}",
        }
        container = client.containers.create(
            image,
            self.worker_argv(group, worker_id),
            name=f"scaleq-{worker_id}",
            labels=labels,
            environment={"PYTHONUNBUFFERED": "1", **engine_env, **group.env, "SCALEQ_TOKEN": self.token},
            network_mode=self.network_mode,
            init=True,
            nano_cpus=int(res.cpus * 1e9),
            mem_limit=res.memory,
            memswap_limit=res.memory,
            device_requests=[DeviceRequest(count=res.gpus, capabilities=[["gpu"]])] if res.gpus else None,
            mounts=mounts,
        )
        try:
            container.start()
        except BaseException:
            _remove(container)
            raise
        return worker_id

    # -- the provider interface -------------------------------------------------------------------------------------

    async def workers(self, group: Group) -> list[ProviderWorker]:
        def scan(client: docker.DockerClient) -> tuple[list[ProviderWorker], list[str]]:
            found, gone = [], []
            for c in client.containers.list(all=True, filters=self._filters(group), sparse=True):
                labels, state = c.attrs.get("Labels") or {}, c.attrs.get("State", "")
                worker_id = labels.get(WORKER_LABEL, "")
                if state in ("exited", "dead"):
                    self._housekeep(client, c, worker_id)
                    gone.append(worker_id)
                    continue
                status: Status
                if state == "created":
                    status = "starting"
                elif state == "removing" or worker_id in self._stopping:
                    status = "stopping"
                else:  # running, restarting, paused
                    status = "running"
                started = labels.get("scaleq.started-at")
                found.append(
                    ProviderWorker(
                        worker_id,
                        group.name,
                        float(started) if started else float(c.attrs.get("Created", 0)),
                        status,
                        f"container {(c.id or '')[:12]} ({c.attrs.get('Image', '')}): {c.attrs.get('Status', state)}",
                        labels.get("scaleq.version", ""),
                    )
                )
            return sorted(found, key=lambda w: (w.started_at, w.id)), gone

        found, gone = await self._call(f"list the workers of group {group.name}", scan)
        self._stopping.difference_update(gone)
        return found

    def _housekeep(self, client: docker.DockerClient, c: Container, worker_id: str) -> None:
        """Remove an exited worker container, saying why it exited if it failed, and what its jobs left behind."""
        status = c.attrs.get("Status", "")
        m = _EXITED.search(status)
        if m is None or m.group(1) != "0":
            tail = ""
            try:
                tail = c.logs(tail=20).decode(errors="replace").strip()
            except DockerException:
                pass
            log.warning("worker %s exited (%s); its last output:\n%s", worker_id, status, tail or "(none)")
        _remove(c)
        if worker_id:
            _sweep_jobs(client, worker_id)

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        self._check_reachable_server()
        image = group.image or DEFAULT_IMAGE

        def check_image(client: docker.DockerClient) -> None:
            try:
                client.images.get(image)
            except ImageNotFound:
                how = IMAGE_SCRIPT if image == DEFAULT_IMAGE else f"{IMAGE_SCRIPT} --image {image}"
                raise ProviderError(
                    f"image {image} not found on the Docker Engine at {self.docker_host}: build it with {how} "
                    "(or load it there with docker load / docker pull)"
                ) from None

        await self._call(f"look up image {image}", check_image)
        ids = [new_worker_id(self.grid, group.name) for _ in range(count)]
        return await start_each(
            group,
            ids,
            lambda i: self._call(
                f"start worker {i} of group {group.name}", lambda _: self._create_and_start(group, image, i)
            ),
        )

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        def signal(client: docker.DockerClient) -> bool:
            try:
                c = client.containers.get(f"scaleq-{worker_id}")
            except NotFound:
                return False
            labels = c.labels
            if labels.get("scaleq.grid") != self.grid or labels.get("scaleq.group") != group.name:
                return False  # a namesake that is not ours
            if c.status == "created":  # never started: nothing to drain
                _remove(c)
                return False
            try:
                c.kill(signal="SIGKILL" if force else "SIGTERM")
            except (NotFound, APIError) as exc:  # 409: not running any more; workers() removes it
                log.debug("signal to %s: %s", c.name, _explain(exc))
            return True

        self._stopping.add(worker_id)  # before the signal: a workers() call meanwhile must not call it running
        if not await self._call(f"stop worker {worker_id}", signal):
            self._stopping.discard(worker_id)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """The container's state (status, exit code, the engine's error) and the last line of its output."""

        def look(client: docker.DockerClient) -> dict[str, str]:
            found = {}
            for worker_id in worker_ids:
                try:
                    c = client.containers.get(f"scaleq-{worker_id}")
                except NotFound:
                    continue
                state = c.attrs.get("State") or {}
                what = f"container {c.name}: {state.get('Status', c.status)}"
                if state.get("Status") in ("exited", "dead"):
                    what += f", exit code {state.get('ExitCode')}"
                if state.get("Error"):
                    what += f", {state['Error']}"
                if state.get("OOMKilled"):
                    what += ", killed for lack of memory"
                try:
                    lines = c.logs(tail=1).decode(errors="replace").strip().splitlines()
                except DockerException:
                    lines = []
                found[worker_id] = what + (f"; its output ends: {lines[-1][-300:]}" if lines else "; no output")
            return found

        return await self._call(f"inspect the workers of group {group.name}", look)

    async def stop_after_grace(self, group: Group, worker_id: str) -> None:
        await self.stop(group, worker_id)  # the second SIGTERM: the worker hands its jobs back and exits

    async def clean_up(self, group: Group, drained: list[ProviderWorker]) -> None:
        """Remove every container of the group with force, and what the drained workers' jobs left behind."""

        def remove_all(client: docker.DockerClient) -> None:
            for c in client.containers.list(all=True, filters=self._filters(group), sparse=True):
                _remove(c)
            for w in drained:
                _sweep_jobs(client, w.id)

        await self._call(f"remove the containers of group {group.name}", remove_all)
        self._stopping.difference_update(w.id for w in drained)

    async def health(self) -> Health:
        try:
            version = await self._call("answer", lambda client: client.version())
        except ProviderError as exc:
            return Health(False, str(exc))
        return Health(
            True,
            f"Docker Engine {version.get('Version', '?')} (API {version.get('ApiVersion', '?')}) "
            f"at DOCKER_HOST={self.docker_host}",
        )


def _sweep_jobs(client: docker.DockerClient, worker_id: str) -> None:
    """Remove what a worker's container jobs left behind (labelled with its id by the docker runtime)."""
    labels: dict[str, str | list[str] | bool] = {"label": [f"{MANAGED}=true", f"scaleq.worker={worker_id}"]}
    for c in client.containers.list(all=True, filters=labels, sparse=True):
        _remove(c)
    for v in client.volumes.list(filters=labels):
        _remove(v)


def _remove(obj: Any) -> None:
    """Remove a container (killed if need be, with its anonymous volumes) or a volume; already gone is fine."""
    try:
        if isinstance(obj, Container):
            obj.remove(force=True, v=True)
        else:
            obj.remove(force=True)
    except NotFound:
        pass
    except APIError as exc:
        if exc.status_code == 409 and "already in progress" in _explain(exc):
            return
        log.warning("could not remove %s %s: %s", type(obj).__name__.lower(), obj.id[:12], _explain(exc))


def _explain(exc: BaseException) -> str:
    return str(getattr(exc, "explanation", None) or exc)
