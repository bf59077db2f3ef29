"""The ``docker`` runtime: one container per attempt, through the Docker Engine API (which Podman also serves).

Design:

- The SDK is synchronous. Short calls run in ``asyncio.to_thread``; the two that block for the whole job (``wait``
  and the attached output stream) get daemon threads of their own, so long jobs cannot starve the shared pool.
  Attach, start and the wait request go in one thread hop, so nothing waits for the event loop between them;
  after the exit, the OOM check, the outputs and the removal in another.
- Everything created is labelled ``scaleq.managed=true`` plus job, attempt and worker, so
  :meth:`DockerRuntime.cleanup_orphans` finds leftovers after a crash from the engine itself, and so that the
  containers of a worker that died (``kill -9``: nothing stops them) are found by the other workers on the same
  engine, which remove those whose attempt the server has ended (:meth:`DockerRuntime.others_attempts`,
  :meth:`DockerRuntime.reap_attempt`, called by the worker agent).
- ``/outputs`` comes to ``RunSpec.outputs_dir`` one of two ways (``outputs=``), with the same contract: only regular
  files and directories are collected, owned by the worker, never anything outside the directory; whatever else the
  job left there (symlinks, fifos, devices) is dropped and reported on the job's stderr.

  - **bind** (an engine on this host): ``outputs_dir`` itself is bind-mounted as ``/outputs``; after the container
    exits (so nothing writes any more) the tree is walked without following links: symlinks and special files are
    removed, files and directories made the worker's, with the archive path's modes. A bind mount cannot be left
    from inside, and hard links cannot cross it.
  - **archive** (a remote engine, or one that does not see this host's files): an anonymous volume, removed with the
    container (``v=True``), copied out with ``get_archive`` after the exit (40 to 60 ms per attempt on a small machine:
    the engine mounts the stopped container's filesystem to tar it).

  ``auto`` (the default) binds when the worker is root (it must be able to read, re-own and remove whatever uid the
  job wrote as) and the engine sees this host's files, proved once per runtime by a probe: a fresh directory with a
  random file, bind-mounted into a created-never-started container and read back through ``get_archive``. A worker
  in a container with the engine's socket, an engine in a VM, a snap-confined engine with its own ``/tmp``: all fail
  the probe and use the archive. ``bind`` skips both checks (the operator vouches for them, e.g. a rootless engine
  of the worker's own user); ``archive`` never binds. Either way ``/outputs`` starts empty and, as the volume did,
  writable by the container's root only: a job running as another uid cannot write it (unchanged).
- No network (every job not allowed the host's): ``network_mode="none"`` makes the engine build a network sandbox
  that runs a prestart hook (a re-exec of dockerd, ``libnetwork-setkey``): ~100 ms of every start on a 2-core
  machine. With ``network_disabled`` as well, the engine skips the sandbox and the runtime (runc) gives the container
  a new network namespace of its own, with only ``lo`` (up), as before: no interface to reach anything. Only the
  sandbox's ``/etc/hosts`` goes (the file is left empty), so in bind mode the runtime mounts its own (the same
  ``localhost`` lines, read-only); in archive mode it cannot, and keeps the sandbox.
- ``/inputs`` is a named volume filled through ``put_archive`` into a created-but-never-started helper container of
  the job's own image (no extra image needed), then mounted read-only. Jobs without inputs skip all of this.
- Output is read through an attach made before the start, as ``docker run`` does, so a fast job's output is never
  missed (what comes before the reader thread is up waits in the socket), and no log driver that can be read back
  is needed; the attach skips the SDK's inspect for a TTY (never given).
- Per attempt on the success path only the requests that matter: create (low-level, without the SDK's inspect
  after it), attach, start, wait, remove. Whether an image is present is checked once per image and runtime (an
  image removed since is noticed at create and checked again). ``OOMKilled`` is inspected only on a non-zero exit;
  when the engine took the kernel's OOM event after the exit it never sets it (Docker 20.10, a few times in a
  hundred), so a SIGKILL exit without it also looks for an ``oom`` event of the container.
- Cleanup runs to its end even if the task is cancelled meanwhile: each step that creates something records it as
  it goes, and cleanup waits for a step still in flight before removing (container with force, so also killed).
- The engine refusing the job (``APIError``: bad image, bad configuration) fails the attempt with its message; an
  unreachable engine raises, since that is the worker's trouble, not the job's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import secrets
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.models.volumes import Volume
from docker.types import CancellableStream, DeviceRequest, Mount

from scaleq.loop import spawn_daemon
from scaleq.worker.runtime.base import (
    LogSink,
    RunResult,
    RunSpec,
    RuntimeUnavailable,
    result_for_exit,
    scaleq_env,
    uncancellable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

INPUTS, OUTPUTS = "/inputs", "/outputs"
MANAGED = "scaleq.managed"
#: How ``/outputs`` reaches ``RunSpec.outputs_dir``: see the module's docstring.
OutputsMode = Literal["auto", "bind", "archive"]
#: What the engine's network sandbox writes for a container with network ``none``.
_HOSTS = (
    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\nfe00::0\tip6-localnet\n"
    "ff00::0\tip6-mcastprefix\nff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
)
_PROBE = "/scaleq-probe"
#: After the container exits, how long its output stream may take to deliver what remains.
_LOG_TAIL_TIMEOUT = 10.0


@dataclass
class _Attempt:
    """What one run created, so that cleanup finds it even when cancelled mid-step."""

    created: list[Container | Volume] = field(default_factory=list)
    inflight: asyncio.Future[Any] | None = None
    log_stream: Any = None


class DockerRuntime:
    name = "docker"

    def __init__(
        self,
        base_url: str | None = None,
        *,
        allow_host_network: bool = False,
        pull: bool = True,
        kill_grace: float = 5.0,
        api_timeout: float = 60.0,
        outputs: OutputsMode = "auto",
    ) -> None:
        self.base_url = base_url
        self.allow_host_network = allow_host_network
        self.pull = pull
        self.kill_grace = kill_grace  # whole seconds for the engine (rounded up)
        self.api_timeout = api_timeout
        self.outputs = outputs
        self._client: docker.DockerClient | None = None
        self._lock = threading.Lock()
        #: Bind mode: forced, refused (not root), or unknown until the first attempt's probe.
        self._local: bool | None = {"bind": True, "archive": False}.get(outputs)
        if outputs == "auto" and not _is_root():
            self._local = False
        self._probe_lock = threading.Lock()
        self._images: set[str] = set()  # known present on the engine
        self._files: Path | None = None  # the runtime's own files (the hosts file), made on first use

    @property
    def local(self) -> bool | None:
        """Whether attempts bind-mount ``/outputs`` (and skip the network sandbox); None until the first probe."""
        return self._local

    @property
    def client(self) -> docker.DockerClient:
        """Made on first use, in a thread (it contacts the engine): a runtime can exist without an engine."""
        with self._lock:
            if self._client is None:
                kw: dict[str, Any] = {"timeout": self.api_timeout, "max_pool_size": 64}  # 2 streams per job
                self._client = (
                    docker.DockerClient(base_url=self.base_url, **kw)
                    if self.base_url
                    else docker.DockerClient.from_env(**kw)
                )
            return self._client

    async def check(self) -> None:
        try:
            await asyncio.to_thread(lambda: self.client.ping())
        except Exception as e:
            where = self.base_url or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock (the default)"
            raise RuntimeUnavailable(
                f"cannot reach a Docker Engine at {where}: {e}. Start the engine (scripts/docker-engine.sh starts "
                "a private one) and point DOCKER_HOST at its socket, or run process jobs only."
            ) from e

    async def cleanup_orphans(self, worker_id: str) -> int:
        def sweep() -> int:
            labels: dict[str, Any] = {"label": [f"{MANAGED}=true", f"scaleq.worker={worker_id}"]}
            found: list[Container | Volume] = [
                *self.client.containers.list(all=True, filters=labels),
                *self.client.volumes.list(filters=labels),
            ]
            for obj in found:  # containers first: a volume in use cannot be removed
                _remove(obj)
            return len(found)

        return await asyncio.to_thread(sweep)

    async def others_attempts(self, worker_id: str) -> set[tuple[str, int]]:
        """(job, attempt) of the containers on this engine that other workers made (see :meth:`reap_attempt`)."""

        def listing() -> set[tuple[str, int]]:
            found = self.client.containers.list(all=True, filters={"label": [f"{MANAGED}=true"]})
            return {
                (c.labels["scaleq.job"], int(c.labels["scaleq.attempt"]))
                for c in found
                if c.labels.get("scaleq.worker") != worker_id and c.labels.get("scaleq.attempt", "").isdigit()
            }

        return await asyncio.to_thread(listing)

    async def reap_attempt(self, job_id: str, attempt: int) -> int:
        """Stop and remove what an attempt the server has ended left on this engine (its worker died: nobody
        else would); how many objects."""

        def sweep() -> int:
            labels: dict[str, Any] = {"label": [f"{MANAGED}=true", f"scaleq.job={job_id}", f"scaleq.attempt={attempt}"]}
            found: list[Container | Volume] = [
                *self.client.containers.list(all=True, filters=labels),
                *self.client.volumes.list(filters=labels),
            ]
            for obj in found:  # containers first: a volume in use cannot be removed
                _remove(obj)
            return len(found)

        return await asyncio.to_thread(sweep)

    async def run(self, spec: RunSpec, on_log: LogSink) -> RunResult:
        d = spec.definition
        if not d.image:
            return RunResult(reason="failed", error="the docker runtime needs an image; this job has none")
        if d.network == "host" and not self.allow_host_network:
            return RunResult(reason="failed", error="the job asks for network 'host' but this worker does not allow it")
        att = _Attempt()
        try:
            for checked in (d.image not in self._images, True):  # a cached image may have been removed since
                if checked:
                    if (missing := await asyncio.to_thread(self._ensure_image, d.image)) is not None:
                        return RunResult(reason="failed", error=missing)
                    self._images.add(d.image)
                local = await self._is_local(spec)
                try:
                    volume = await self._step(att, lambda: self._fill_inputs(att, spec)) if d.inputs else None
                    container = await self._step(att, functools.partial(self._create, att, spec, volume, local))
                    break
                except ImageNotFound as e:
                    self._images.discard(d.image)
                    if checked:
                        return RunResult(reason="failed", error=f"the Docker Engine refused the job: {_explain(e)}")
                    await asyncio.to_thread(_release, att)
                except APIError as e:
                    return RunResult(reason="failed", error=f"the Docker Engine refused the job: {_explain(e)}")
            return await self._execute(att, container, spec, on_log, local)
        finally:
            await uncancellable(self._cleanup(att))

    async def create_container(self, spec: RunSpec, inputs_volume: str | None = None) -> Container:
        """Create (not start) the attempt's container; the caller removes it. For inspection in tests."""
        local = await self._is_local(spec)
        return await asyncio.to_thread(self._create, _Attempt(), spec, inputs_volume, local)

    async def _is_local(self, spec: RunSpec) -> bool:
        if self._local is None:
            await asyncio.to_thread(self._probe, spec)
        return bool(self._local)

    def _probe(self, spec: RunSpec) -> None:
        """Decide ``self._local``: does the engine see this host's files where the outputs go? (Once per runtime.)

        A fresh directory holding a randomly named file is bind-mounted into a created, never started container of
        the job's image and read back through the engine. The engine refusing the mount (no such path on its side)
        or showing another directory means no; an engine that could not be asked leaves it undecided (the attempt
        uses the archive, the next one asks again).
        """
        with self._probe_lock:
            if self._local is not None:
                return
            spec.outputs_dir.parent.mkdir(parents=True, exist_ok=True)
            probe = Path(tempfile.mkdtemp(prefix=".scaleq-probe-", dir=spec.outputs_dir.parent)).resolve()
            token = secrets.token_hex(16)
            (probe / token).touch()
            helper: Container | None = None
            try:
                helper = self._create_raw(
                    _image(spec),
                    ["true"],
                    labels=_labels(spec),
                    host_config=self.client.api.create_host_config(
                        network_mode="none", mounts=[Mount(_PROBE, str(probe), type="bind", read_only=True)]
                    ),
                )
                chunks, _ = helper.get_archive(_PROBE)
                with tempfile.TemporaryFile() as spool:
                    for chunk in chunks:
                        spool.write(chunk)
                    spool.seek(0)
                    with tarfile.open(fileobj=spool) as tar:
                        seen = {PurePosixPath(name).name for name in tar.getnames()}
                self._local = token in seen
            except APIError as e:
                log.info("the Docker Engine does not see this host's files (%s): /outputs is copied out", _explain(e))
                self._local = False
            except (DockerException, OSError, tarfile.TarError):
                log.warning("could not probe whether the Docker Engine sees this host's files", exc_info=True)
            finally:
                if helper is not None:
                    _remove(helper)
                shutil.rmtree(probe, ignore_errors=True)
            if self._local:
                log.info("the Docker Engine sees this host's files: /outputs is bind-mounted")

    def _create_raw(self, image: str, command: list[str] | None, **kw: Any) -> Container:
        """``containers.create`` without the SDK's inspect after it (the model then only knows its id)."""
        created = self.client.api.create_container(image, command, **kw)
        return self.client.containers.prepare_model({"Id": created["Id"]})

    def _attach(self, container: Container) -> CancellableStream:
        """``container.attach(stdout, stderr, stream, demux)`` without the inspect the SDK makes first to learn
        whether the container has a TTY: this runtime never gives one."""
        api: Any = self.client.api  # the SDK's internal request methods (docker < 8, pinned), not in its stubs
        response = api._post(
            api._url("/containers/{0}/attach", container.id),
            headers={"Connection": "Upgrade", "Upgrade": "tcp"},
            params={"logs": 0, "stdout": 1, "stderr": 1, "stream": 1},
            stream=True,
        )
        return CancellableStream(api._read_from_socket(response, True, tty=False, demux=True), response)

    def _hosts_file(self) -> Path:
        """The ``/etc/hosts`` bind-mounted (read-only) into containers without a network sandbox."""
        with self._lock:
            if self._files is None or not (self._files / "hosts").is_file():  # a tmp cleaner may have removed it
                self._files = Path(tempfile.mkdtemp(prefix="scaleq-docker-"))
                weakref.finalize(self, shutil.rmtree, self._files, True)
                (self._files / "hosts").write_text(_HOSTS)
                (self._files / "hosts").chmod(0o644)
                self._files.chmod(0o755)
            return self._files / "hosts"

    async def _step(self, att: _Attempt, fn: Callable[[], T]) -> T:
        """Run a step in a thread; if the task is cancelled meanwhile, cleanup waits for it to finish."""
        att.inflight = asyncio.ensure_future(asyncio.to_thread(fn))
        return await asyncio.shield(att.inflight)

    def _ensure_image(self, image: str) -> str | None:
        """None if the image is here (pulled if need be), else why not."""
        try:
            self.client.images.get(image)
            return None
        except ImageNotFound:
            if not self.pull:
                return f"image {image} not found: not present on this worker, and pulling is disabled"
        except APIError as e:  # e.g. an invalid reference
            return f"image {image} not usable: {_explain(e)}"
        try:
            self.client.images.pull(image)
            return None
        except DockerException as e:
            return f"image {image} not found: {_explain(e)}"

    def _fill_inputs(self, att: _Attempt, spec: RunSpec) -> str:
        name = f"scaleq-in-{spec.job_id[:12]}-{spec.attempt}-{secrets.token_hex(3)}"
        att.created.append(self.client.volumes.create(name=name, labels=_labels(spec)))
        helper = self.client.containers.create(
            _image(spec),
            ["true"],  # never started; the engine only needs *a* command to create it
            mounts=[Mount(INPUTS, name, type="volume", no_copy=True)],  # no_copy: not the image's /inputs
            labels=_labels(spec),
            network_mode="none",
        )
        att.created.insert(0, helper)
        with tempfile.TemporaryFile() as tar:
            _tar_inputs(spec.inputs_dir, {i.path: i.mode for i in spec.definition.inputs}, tar)
            tar.seek(0)
            helper.put_archive(INPUTS, tar)
        _remove(helper)
        att.created.remove(helper)
        return name

    def _create(self, att: _Attempt, spec: RunSpec, inputs_volume: str | None, local: bool) -> Container:
        d, req = spec.definition, spec.definition.requirements
        host_network = d.network == "host"
        if local:  # the attempt's own directory, adopted after the exit (see _adopt_outputs)
            spec.outputs_dir.mkdir(parents=True, exist_ok=True)
            mounts = [Mount(OUTPUTS, str(spec.outputs_dir.resolve()), type="bind")]
            if not host_network:  # no sandbox, so no /etc/hosts from it (see the module's docstring)
                mounts.append(Mount("/etc/hosts", str(self._hosts_file()), type="bind", read_only=True))
        else:  # anonymous, removed with the container (v=True); no_copy: only what the job writes, not the image's
            mounts = [Mount(OUTPUTS, None, type="volume", no_copy=True)]
        if inputs_volume:
            mounts.append(Mount(INPUTS, inputs_volume, type="volume", read_only=True))
        env = {**d.env, "SCALEQ_INPUTS": INPUTS, "SCALEQ_OUTPUTS": OUTPUTS}
        env |= scaleq_env(spec)
        host_config = self.client.api.create_host_config(
            network_mode="host" if host_network else "none",
            nano_cpus=int(req.cpus * 1e9),
            mem_limit=req.memory,
            memswap_limit=req.memory,  # equal to the limit: no swap beyond it
            device_requests=[DeviceRequest(count=req.gpus, capabilities=[["gpu"]])] if req.gpus else None,
            mounts=mounts,
        )
        container = self._create_raw(
            _image(spec),
            d.command,
            entrypoint=d.entrypoint,
            environment=env,
            working_dir=d.workdir,
            labels=_labels(spec),
            name=f"scaleq-{spec.job_id[:12]}-{spec.attempt}-{secrets.token_hex(3)}",
            # With network "none" still: a namespace of its own with only lo, without the engine's sandbox.
            network_disabled=local and not host_network,
            host_config=host_config,
        )
        att.created.insert(0, container)
        return container

    async def _execute(
        self, att: _Attempt, container: Container, spec: RunSpec, on_log: LogSink, local: bool
    ) -> RunResult:
        d = spec.definition

        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        exited: asyncio.Future[dict[str, Any]] = loop.create_future()

        def launch() -> APIError | None:
            # In one thread hop, so that nothing waits for the event loop between the start and the wait request.
            # Attached before the start, as `docker run` does, so no output is missed (logs(stream=True) could not
            # tell stdout from stderr apart).
            att.log_stream = stream = self._attach(container)
            threading.Thread(target=_pump_logs, args=(stream, loop, queue), daemon=True, name="scaleq-logs").start()
            try:
                container.start()
            except APIError as e:
                return e
            # no timeout: the SDK waits as long as the job runs
            spawn_daemon(lambda: dict(container.wait()), loop, exited, "scaleq-docker")
            return None

        since = int(time.time()) - 1  # for the engine's events (see _oom_killed)
        refused = await self._step(att, launch)
        delivery = asyncio.create_task(_deliver(queue, on_log))
        try:
            if refused is not None:
                msg = _explain(refused)
                not_found = "executable file not found" in msg or "no such file or directory" in msg
                code = 127 if not_found else 126 if "permission denied" in msg else None
                hint = " (this worker has no GPU runtime)" if d.requirements.gpus and "device driver" in msg else ""
                return RunResult(reason="failed", exit_code=code, error=f"container did not start: {msg}{hint}")
            try:
                async with asyncio.timeout(d.max_duration):  # (not wait_for: scaleq.loop.wait_set says why)
                    status = await asyncio.shield(exited)
                timed_out = False
            except TimeoutError:
                await asyncio.to_thread(container.stop, timeout=math.ceil(self.kill_grace))
                status, timed_out = await exited, True
            await asyncio.wait([delivery], timeout=_LOG_TAIL_TIMEOUT)
            code = int(status["StatusCode"])

            def finish() -> tuple[bool, list[str] | None]:  # in one thread hop: OOM?, outputs, removal
                oom = code != 0 and not timed_out and self._oom_killed(container, code, since)
                skipped = self._collect_outputs(container, spec.outputs_dir, local)
                _release(att)
                return oom, skipped

            oom, skipped = await self._step(att, finish)
            for name in skipped or ():  # tell the job's owner, not only the worker's log
                await on_log("stderr", f"[scaleq] output {name} skipped: not a regular file or directory\n".encode())
            collected = skipped is not None
        finally:
            delivery.cancel()
        if timed_out:
            return RunResult(reason="timed_out", exit_code=code, error=f"exceeded max_duration of {d.max_duration} s")
        if oom:
            mem = d.requirements.memory
            limit = f"{mem / 2**20:g} MiB" if mem else "none set"
            return RunResult(reason="failed", exit_code=code, error=f"out of memory (OOMKilled; limit {limit})")
        if not collected and code == 0:
            return RunResult(reason="failed", exit_code=code, error="could not collect /outputs")
        return result_for_exit(code)

    def _oom_killed(self, container: Container, code: int, since: int) -> bool:
        container.reload()
        if container.attrs["State"].get("OOMKilled"):
            return True
        if code != 137:
            return False
        # The engine may take the kernel's OOM event after the exit, and then never sets OOMKilled (seen with Docker
        # 20.10, a few times in a hundred); its event log still says so.
        # the Engine takes fractional seconds as a string ("until"), which the SDK's stubs do not know
        events = self.client.api.events(  # type: ignore[call-overload]
            since=since, until=f"{time.time():.9f}", filters={"container": container.id, "event": "oom"}, decode=True
        )
        try:
            return any(True for _ in events)
        finally:
            events.close()

    def _collect_outputs(self, container: Container, dest: Path, local: bool) -> list[str] | None:
        """Outputs into ``dest``: what was skipped, or None if they could not be collected."""
        try:
            if local:
                return _adopt_outputs(dest)
            return _extract_outputs(container.get_archive(OUTPUTS)[0], dest)
        except (DockerException, OSError, tarfile.TarError):
            log.exception("collecting /outputs of %s failed", container.name or container.id)
            return None

    async def _cleanup(self, att: _Attempt) -> None:
        if att.inflight is not None and not att.inflight.done():
            await asyncio.wait([att.inflight])  # it may be creating something right now
        if att.created or att.log_stream is not None:  # the success path released them already
            await asyncio.to_thread(_release, att)


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _labels(spec: RunSpec) -> dict[str, str]:
    job, attempt, worker = spec.job_id, str(spec.attempt), spec.worker_id
    return {MANAGED: "true", "scaleq.job": job, "scaleq.attempt": attempt, "scaleq.worker": worker}


def _release(att: _Attempt) -> None:
    """Close the output stream, remove what the attempt created (containers first)."""
    if att.log_stream is not None:
        with contextlib.suppress(Exception):
            att.log_stream.close()
        att.log_stream = None
    for obj in att.created:
        _remove(obj)
    att.created.clear()


def _image(spec: RunSpec) -> str:
    """The job's image: ``run`` refuses a job without one before anything that needs it is called."""
    if spec.definition.image is None:
        raise ValueError("the docker runtime needs an image")
    return spec.definition.image


def _remove(obj: Container | Volume) -> None:
    """Cleanup that must go on: already gone is fine, anything else is logged (cleanup_orphans retries)."""
    try:
        obj.remove(force=True, **({"v": True} if isinstance(obj, Container) else {}))
    except NotFound:
        pass
    except Exception:
        log.warning("could not remove %s %s", type(obj).__name__.lower(), obj.id, exc_info=True)


def _explain(e: DockerException) -> str:
    return str(getattr(e, "explanation", None) or e)


def _pump_logs(stream: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    try:
        for out, err in stream:
            for label, chunk in (("stdout", out), ("stderr", err)):
                if chunk:
                    loop.call_soon_threadsafe(queue.put_nowait, (label, chunk))
    except Exception:
        log.debug("output stream ended with an error", exc_info=True)
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(queue.put_nowait, None)


async def _deliver(queue: asyncio.Queue[tuple[str, bytes] | None], on_log: LogSink) -> None:
    while (item := await queue.get()) is not None:
        try:
            await on_log(*item)
        except Exception:
            log.exception("log sink failed; output dropped")


def _tar_inputs(root: Path, modes: dict[str, int], out: IO[bytes]) -> None:
    """Tar the materialised inputs (files and directories only) owned by root, with their declared modes."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            for name in sorted(dirnames):
                info = tarfile.TarInfo((rel_dir / name).as_posix())
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for name in sorted(filenames):
                path, rel = Path(dirpath) / name, (rel_dir / name).as_posix()
                if path.is_file() and not path.is_symlink():
                    info = tarfile.TarInfo(rel)
                    st = path.stat()
                    info.size, info.mode = st.st_size, modes.get(rel, st.st_mode & 0o777)
                    with path.open("rb") as f:
                        tar.addfile(info, f)


def _extract_outputs(chunks: Iterator[bytes], dest: Path) -> list[str]:
    """Extract the ``/outputs`` archive into ``dest``; return the members skipped as unsafe or special."""
    dest.mkdir(parents=True, exist_ok=True)
    root, skipped = dest.resolve(), []
    with tempfile.TemporaryFile() as spool:
        for chunk in chunks:
            spool.write(chunk)
        spool.seek(0)
        with tarfile.open(fileobj=spool) as tar:
            for m in tar:
                parts = PurePosixPath(m.name).parts[1:]  # drop the leading "outputs/"
                target = root.joinpath(*parts)
                if not parts:
                    continue
                if ".." in parts or m.name.startswith("/") or not (m.isdir() or m.isfile()):
                    skipped.append(m.name.removeprefix("outputs/"))  # links, devices, fifos; or a crafted path
                elif not target.parent.resolve().is_relative_to(root) or target.is_symlink():
                    skipped.append(m.name.removeprefix("outputs/"))
                elif m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                else:
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with tar.extractfile(m) as src, target.open("wb") as f:  # type: ignore[union-attr]
                        shutil.copyfileobj(src, f)
                    target.chmod((m.mode & 0o755) | 0o600)
    return skipped


def _adopt_outputs(root: Path) -> list[str]:
    """Make a bind-mounted ``/outputs`` the worker's once the container has exited; return what was dropped.

    Walked without following symbolic links (nothing writes any more: the container has exited). Directories and
    regular files stay, owned by the worker (when it is root) with the modes the archive path gives them; symlinks,
    fifos, sockets and devices are removed, so nothing read later can lead outside ``root``.
    """
    uid, gid, root_user = os.geteuid(), os.getegid(), _is_root()
    skipped: list[str] = []

    def adopt(path: str, st: os.stat_result, mode: int) -> None:
        if root_user and (st.st_uid, st.st_gid) != (uid, gid):
            os.lchown(path, uid, gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.chmod(path, mode)  # not a symlink: checked with lstat just before

    top = os.lstat(root)
    if not stat.S_ISDIR(top.st_mode):
        raise OSError(f"{root} is not a directory")
    adopt(str(root), top, 0o755)
    pending = [(str(root), "")]  # a stack, not recursion: a job may nest directories deeper than Python recurses
    while pending:
        directory, rel = pending.pop()
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISDIR(st.st_mode):
                adopt(entry.path, st, 0o755)
                pending.append((entry.path, f"{rel}{entry.name}/"))
            elif stat.S_ISREG(st.st_mode):
                adopt(entry.path, st, (st.st_mode & 0o755) | 0o600)
            else:
                os.unlink(entry.path)
                skipped.append(f"{rel}{entry.name}")
    return skipped
