"""The ``docker`` runtime: one container per attempt, through the Docker Engine API (which Podman also serves).

Design:

- The SDK is synchronous. Short calls run in ``asyncio.to_thread``; the two calls that block for the whole job
  (``wait`` and the log stream) get threads of their own, so a few long jobs cannot starve the shared pool.
- Everything created is labelled ``scaleq.managed=true`` plus job, attempt and worker, so
  :meth:`DockerRuntime.cleanup_orphans` finds leftovers after a crash from the engine itself.
- ``/outputs`` is an anonymous volume, removed with the container (``v=True``); after the job exits its content
  is copied out with ``get_archive`` and extracted into ``RunSpec.outputs_dir`` (regular files and directories
  only, never outside it).
- ``/inputs`` is a named volume filled through ``put_archive`` into a created-but-never-started helper container
  of the job's own image (no extra image needed), then mounted read-only. Jobs without inputs skip all of this.
- Cleanup (remove container and volumes) runs to its end even if the task is cancelled meanwhile: every step
  that creates something records it first, and cleanup waits for an in-flight step before removing.
- The engine refusing something (``APIError``: bad image, bad configuration) fails the attempt with its message;
  an unreachable engine raises, since that is the worker's trouble, not the job's.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import secrets
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, TypeVar

import docker
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.models.containers import Container
from docker.models.volumes import Volume
from docker.types import DeviceRequest, Mount

from scaleq.worker.runtime.base import (
    LogSink,
    RunResult,
    RunSpec,
    RuntimeUnavailable,
    result_for_exit,
    uncancellable,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

INPUTS, OUTPUTS = "/inputs", "/outputs"
MANAGED = "scaleq.managed"
#: After the container exits, how long its log stream may take to deliver what remains.
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
    ) -> None:
        self.base_url = base_url
        self.allow_host_network = allow_host_network
        self.pull = pull
        self.kill_grace = kill_grace
        self._client: docker.DockerClient | None = None
        self._client_lock = threading.Lock()

    @property
    def client(self) -> docker.DockerClient:
        """Created on first use (it contacts the engine), from a thread: a runtime can exist without an engine."""
        with self._client_lock:
            if self._client is None:
                kw: dict[str, Any] = {"max_pool_size": 64}  # two long-lived connections per running job
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
            labels = {"label": [f"{MANAGED}=true", f"scaleq.worker={worker_id}"]}
            n = 0
            for c in self.client.containers.list(all=True, filters=labels):
                _quietly(c.remove, force=True, v=True)
                n += 1
            for v in self.client.volumes.list(filters=labels):
                _quietly(v.remove, force=True)
                n += 1
            return n

        return await asyncio.to_thread(sweep)

    async def run(self, spec: RunSpec, on_log: LogSink) -> RunResult:
        d = spec.definition
        if not d.image:
            return RunResult(reason="failed", error="the docker runtime needs an image; this job has none")
        if d.network == "host" and not self.allow_host_network:
            return RunResult(reason="failed", error="the job asks for network 'host' but this worker does not allow it")
        att = _Attempt()
        try:
            if (missing := await asyncio.to_thread(self._ensure_image, d.image)) is not None:
                return RunResult(reason="failed", error=missing)
            try:
                volume = await self._step(att, lambda: self._fill_inputs(att, spec)) if d.inputs else None
                container = await self._step(att, lambda: self._create(att, spec, volume))
            except APIError as e:
                return RunResult(reason="failed", error=f"the Docker Engine refused the job: {_explain(e)}")
            return await self._execute(att, container, spec, on_log)
        finally:
            await uncancellable(self._cleanup(att))

    async def create_container(self, spec: RunSpec, inputs_volume: str | None = None) -> Container:
        """Create (not start) the attempt's container; the caller removes it. Exposed for inspection in tests."""
        return await asyncio.to_thread(self._create, _Attempt(), spec, inputs_volume)

    # -- steps -------------------------------------------------------------------------------------------------

    async def _step(self, att: _Attempt, fn: Callable[[], T]) -> T:
        """Run a creating step in a thread; if cancelled meanwhile, cleanup waits for it (see ``att.inflight``)."""
        att.inflight = asyncio.ensure_future(asyncio.to_thread(fn))
        return await asyncio.shield(att.inflight)

    def _ensure_image(self, image: str) -> str | None:
        try:
            self.client.images.get(image)
            return None
        except ImageNotFound:
            pass
        except APIError as e:  # e.g. an invalid reference
            return f"image {image} not usable: {_explain(e)}"
        if not self.pull:
            return f"image {image} not found: not present on this worker, and pulling is disabled"
        try:
            self.client.images.pull(image)
            return None
        except DockerException as e:
            return f"image {image} not found: {_explain(e)}"

    def _labels(self, spec: RunSpec) -> dict[str, str]:
        return {
            MANAGED: "true",
            "scaleq.job": spec.job_id,
            "scaleq.attempt": str(spec.attempt),
            "scaleq.worker": spec.worker_id,
        }

    def _fill_inputs(self, att: _Attempt, spec: RunSpec) -> str:
        name = f"scaleq-in-{spec.job_id[:12]}-{spec.attempt}-{secrets.token_hex(3)}"
        volume = self.client.volumes.create(name=name, labels=self._labels(spec))
        att.created.append(volume)
        helper = self.client.containers.create(
            spec.definition.image,
            ["true"],  # never started; the engine only needs *a* command to create it
            mounts=[Mount(INPUTS, name, type="volume")],
            labels=self._labels(spec),
            network_mode="none",
        )
        att.created.append(helper)
        modes = {i.path: i.mode for i in spec.definition.inputs}
        with tempfile.TemporaryFile() as tar:
            _tar_tree(spec.inputs_dir, modes, tar)
            tar.seek(0)
            if not helper.put_archive(INPUTS, tar):
                raise RuntimeError(f"could not copy the inputs into volume {name}")
        helper.remove(force=True)
        att.created.remove(helper)
        return name

    def _create(self, att: _Attempt, spec: RunSpec, inputs_volume: str | None) -> Container:
        d, req = spec.definition, spec.definition.requirements
        mounts = [Mount(OUTPUTS, None, type="volume")]  # anonymous: removed with the container (v=True)
        if inputs_volume:
            mounts.append(Mount(INPUTS, inputs_volume, type="volume", read_only=True))
        env = {
            **d.env,
            "SCALEQ_INPUTS": INPUTS,
            "SCALEQ_OUTPUTS": OUTPUTS,
            "SCALEQ_JOB_ID": spec.job_id,
            "SCALEQ_ATTEMPT": str(spec.attempt),
        }
        container = self.client.containers.create(
            d.image,
            d.command,
            entrypoint=d.entrypoint,
            environment=env,
            working_dir=d.workdir,
            labels=self._labels(spec),
            name=f"scaleq-{spec.job_id[:12]}-{spec.attempt}-{secrets.token_hex(3)}",
            network_mode="host" if d.network == "host" else "none",
            nano_cpus=int(req.cpus * 1e9),
            mem_limit=req.memory,
            memswap_limit=req.memory,  # equal to the limit: no swap beyond it
            device_requests=[DeviceRequest(count=req.gpus, capabilities=[["gpu"]])] if req.gpus else None,
            mounts=mounts,
        )
        att.created.append(container)
        return container

    async def _execute(self, att: _Attempt, container: Container, spec: RunSpec, on_log: LogSink) -> RunResult:
        d = spec.definition
        try:
            await self._step(att, container.start)
        except APIError as e:
            msg = _explain(e)
            not_found = "executable file not found" in msg or "no such file or directory" in msg
            code = 127 if not_found else 126 if "permission denied" in msg else None
            hint = " (this worker has no GPU runtime)" if d.requirements.gpus and "device driver" in msg else ""
            return RunResult(reason="failed", exit_code=code, error=f"container did not start: {msg}{hint}")

        def open_logs() -> Any:
            att.log_stream = container.logs(stream=True, follow=True, stdout=True, stderr=True, demux=True)
            return att.log_stream

        await self._step(att, open_logs)  # everything since start: nothing written before this is lost
        queue: asyncio.Queue[tuple[str, bytes] | None] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        _in_thread(lambda: _pump_logs(att.log_stream, loop, queue))
        delivery = asyncio.create_task(_deliver(queue, on_log))
        exited = _in_thread(container.wait)
        try:
            timed_out = False
            try:
                status = await asyncio.wait_for(asyncio.shield(exited), timeout=d.max_duration)
            except TimeoutError:
                timed_out = True
                await asyncio.to_thread(container.stop, timeout=math.ceil(self.kill_grace))
                status = await exited
            await asyncio.wait([delivery], timeout=_LOG_TAIL_TIMEOUT)
            await asyncio.to_thread(container.reload)
            code = int(status["StatusCode"])
            if not await self._collect_outputs(container, spec.outputs_dir, on_log):
                return RunResult(reason="failed", exit_code=code, error="could not collect /outputs")
            if timed_out:
                return RunResult(
                    reason="timed_out", exit_code=code, error=f"exceeded max_duration of {d.max_duration} s"
                )
            if container.attrs["State"].get("OOMKilled"):
                limit = _fmt_bytes(d.requirements.memory) if d.requirements.memory else "none set"
                return RunResult(reason="failed", exit_code=code, error=f"out of memory (OOMKilled; limit {limit})")
            return result_for_exit(code)
        finally:
            delivery.cancel()

    async def _collect_outputs(self, container: Container, dest: Path, on_log: LogSink) -> bool:
        def collect() -> list[str]:
            stream, _ = container.get_archive(OUTPUTS)
            return _extract_outputs(stream, dest)

        try:
            skipped = await asyncio.to_thread(collect)
        except (DockerException, OSError, tarfile.TarError):
            log.exception("collecting /outputs of %s failed", container.name)
            return False
        for name in skipped:  # tell the job's owner, not only the worker's log
            await on_log("stderr", f"[scaleq] output {name} skipped: not a regular file or directory\n".encode())
        return True

    async def _cleanup(self, att: _Attempt) -> None:
        if att.inflight is not None and not att.inflight.done():
            await asyncio.wait([att.inflight])  # it may be creating something right now
        if att.log_stream is not None:
            _quietly(att.log_stream.close)

        def remove_all() -> None:
            # containers first: a volume in use cannot be removed
            for obj in sorted(att.created, key=lambda o: isinstance(o, Volume)):
                _quietly(obj.remove, force=True, **({"v": True} if isinstance(obj, Container) else {}))

        await asyncio.to_thread(remove_all)


# -- helpers ---------------------------------------------------------------------------------------------------


def _in_thread(fn: Callable[[], T]) -> asyncio.Future[T]:
    """Run a call that blocks for the job's whole duration on a daemon thread of its own."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not fut.done():
            fut.set_result(value) if ok else fut.set_exception(value)

    def target() -> None:
        try:
            ok, value = True, fn()
        except BaseException as e:
            ok, value = False, e
        try:
            loop.call_soon_threadsafe(settle, ok, value)
        except RuntimeError:  # the loop is gone: nobody is waiting any more
            pass

    threading.Thread(target=target, daemon=True, name="scaleq-docker").start()
    return fut


def _pump_logs(stream: Any, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
    try:
        for out, err in stream:
            for label, chunk in (("stdout", out), ("stderr", err)):
                if chunk:
                    loop.call_soon_threadsafe(queue.put_nowait, (label, chunk))
    except Exception:
        log.debug("log stream ended with an error", exc_info=True)
    finally:
        loop.call_soon_threadsafe(queue.put_nowait, None)


async def _deliver(queue: asyncio.Queue[tuple[str, bytes] | None], on_log: LogSink) -> None:
    while (item := await queue.get()) is not None:
        try:
            await on_log(*item)
        except Exception:
            log.exception("log sink failed; output dropped")


def _tar_tree(root: Path, modes: dict[str, int], out: IO[bytes]) -> None:
    """Tar ``root`` (files and directories only) owned by root, with the modes the definition declares."""
    with tarfile.open(fileobj=out, mode="w") as tar:
        for dirpath, dirnames, filenames in os.walk(root):
            rel_dir = Path(dirpath).relative_to(root)
            for name in sorted(dirnames):
                info = tarfile.TarInfo((rel_dir / name).as_posix())
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            for name in sorted(filenames):
                path, rel = Path(dirpath) / name, (rel_dir / name).as_posix()
                if path.is_symlink() or not path.is_file():
                    continue
                info = tarfile.TarInfo(rel)
                info.size = path.stat().st_size
                info.mode = modes.get(rel, path.stat().st_mode & 0o777)
                with path.open("rb") as f:
                    tar.addfile(info, f)


class _IterReader(io.RawIOBase):
    """A file over an iterator of byte chunks, so tarfile can read the archive as it streams in."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buf = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            self._buf = next(self._chunks, b"")
            if not self._buf:
                return 0
        n = min(len(b), len(self._buf))
        b[:n], self._buf = self._buf[:n], self._buf[n:]
        return n


def _extract_outputs(chunks: Iterator[bytes], dest: Path) -> list[str]:
    """Extract the ``/outputs`` archive into ``dest``; return the members skipped as unsafe or special."""
    dest.mkdir(parents=True, exist_ok=True)
    root, skipped = dest.resolve(), []
    with tarfile.open(fileobj=io.BufferedReader(_IterReader(chunks)), mode="r|") as tar:
        for m in tar:
            parts = PurePosixPath(m.name).parts[1:]  # drop the leading "outputs/"
            if not parts:
                continue
            rel = "/".join(parts)
            target = root.joinpath(*parts)
            if ".." in parts or m.name.startswith("/") or not (m.isdir() or m.isfile()):
                skipped.append(rel)
            elif not target.parent.resolve().is_relative_to(root) or target.is_symlink():
                skipped.append(rel)
            elif m.isdir():
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with target.open("wb") as f:
                    shutil.copyfileobj(src, f)
                target.chmod((m.mode & 0o755) | 0o600)
    return skipped


def _quietly(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
    """Cleanup that must go on: already gone is fine, anything else is logged (cleanup_orphans retries)."""
    try:
        fn(*args, **kwargs)
    except NotFound:
        pass
    except Exception:
        log.warning("docker cleanup step failed", exc_info=True)


def _explain(e: DockerException) -> str:
    return str(getattr(e, "explanation", None) or e)


def _fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:g} {unit}"
    return f"{n} B"
