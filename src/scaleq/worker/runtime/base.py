"""What a worker needs of a runtime: run one attempt of a job, stream its logs, collect its outputs.

The worker materialises the job's input files into ``RunSpec.inputs_dir`` before calling :meth:`Runtime.run`, and
uploads whatever the runtime leaves in ``RunSpec.outputs_dir`` afterwards. A runtime owns the job's time limit
(``max_duration`` → reason ``timed_out``) and must clean up (container removed, process group killed) both when the
run ends and when the awaiting task is cancelled — cancellation is how the worker stops a job that was cancelled,
whose lease was lost, or that it hands back on a forced drain.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol, TypeVar

from scaleq.jobs import JobDefinition

T = TypeVar("T")

#: Called with ("stdout" | "stderr", bytes) as output arrives; the worker batches and uploads it.
LogSink = Callable[[str, bytes], Awaitable[None]]


@dataclass(frozen=True)
class RunSpec:
    job_id: str
    attempt: int
    worker_id: str
    definition: JobDefinition
    inputs_dir: Path
    outputs_dir: Path


@dataclass(frozen=True)
class RunResult:
    reason: Literal["success", "failed", "timed_out"]
    exit_code: int | None = None
    error: str | None = None


class RuntimeUnavailable(RuntimeError):
    """The runtime cannot run jobs here (no engine reachable, …); the message says what to fix."""


class Runtime(Protocol):
    name: str

    async def check(self) -> None:
        """Raise :class:`RuntimeUnavailable` when this runtime cannot work on this host."""

    async def run(self, spec: RunSpec, on_log: LogSink) -> RunResult:
        """Run one attempt to its end; on task cancellation stop and clean up, then re-raise."""

    async def cleanup_orphans(self, worker_id: str) -> int:
        """Remove leftovers of earlier attempts by this worker id (after a crash); return how many."""

    async def others_attempts(self, worker_id: str) -> set[tuple[str, int]]:
        """(job id, attempt) of the runs other workers left where this runtime runs them (containers on a shared
        engine): those whose attempt the server has ended are passed to :meth:`reap_attempt`."""

    async def reap_attempt(self, job_id: str, attempt: int) -> int:
        """Stop and remove what that attempt left here; return how many objects."""


def result_for_exit(exit_code: int) -> RunResult:
    return RunResult(reason="success" if exit_code == 0 else "failed", exit_code=exit_code)


async def uncancellable(aw: Awaitable[T]) -> T:
    """Await ``aw`` to its end even if the caller is cancelled meanwhile, then re-raise the cancellation.

    For cleanup (killing a process group, removing a container) that a second cancellation must not cut short.
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while True:
        try:
            result = await asyncio.shield(task)
            break
        except asyncio.CancelledError:
            cancelled = True
            if task.done() and not task.cancelled():
                result = task.result()
                break
    if cancelled:
        raise asyncio.CancelledError
    return result
