"""The submit-time warning when nothing the server knows of can run a job (scaleq.server.runnable)."""

from __future__ import annotations

import time

from scaleq.grid import Group
from scaleq.jobs import JobDefinition, RuntimeKind, SubmitRequest, Worker
from scaleq.server.runnable import RunnableCheck
from scaleq.store.base import Store
from tests.helpers import LiveServer

GPU = JobDefinition(command=["nvidia-smi"], requirements={"gpus": 1})
PLAIN = JobDefinition(command=["true"])


def cpu_group(queue: str = "q") -> Group:
    return Group(name="cpu", queue=queue, provider="local", runtimes=[RuntimeKind.process], max_workers=2)


async def register(store: Store, wid: str, queue: str = "q", gpus: int = 0) -> None:
    now = time.time()
    worker = Worker(
        id=wid, queue=queue, slots=1, runtimes=[RuntimeKind.process], cpus=2.0, gpus=gpus, started_at=now,
        last_heartbeat=now,
    )  # fmt: skip
    await store.register_worker(worker, now)


async def test_with_the_grid_known_a_job_no_group_fits_is_named(any_store: Store) -> None:
    check = RunnableCheck(any_store, [cpu_group()])
    assert await check.warning("q", PLAIN) is None
    said = await check.warning("q", GPU)
    assert said is not None and "group cpu offers gpus 0, the job needs 1" in said
    typo = await check.warning("defualt", PLAIN)
    assert typo is not None and "nothing here runs queue 'defualt'" in typo
    await register(any_store, "gpu-box", gpus=1)  # a worker started by hand that fits
    check._cache.clear()
    assert await check.warning("q", GPU) is None


async def test_without_the_grid_only_workers_tell(any_store: Store) -> None:
    check = RunnableCheck(any_store, None)  # `scaleq server`: an autoscaler elsewhere may have groups
    assert await check.warning("q", GPU) is None
    await register(any_store, "w1")
    check._cache.clear()  # (answers are cached for a few seconds)
    said = await check.warning("q", GPU)
    assert said is not None and "worker w1 offers gpus 0" in said


async def test_submit_answers_carry_the_warning(live: LiveServer) -> None:
    await register(live.store, "w1")
    async with live.client("submit") as c:
        _, created, warning = await c.submit_checked(SubmitRequest(queue="q", definition=GPU))
        assert created and warning is not None and "gpus" in warning
        _, _, fine = await c.submit_checked(SubmitRequest(queue="q", definition=PLAIN))
        assert fine is None
        batch = await c.submit_many_checked([SubmitRequest(queue="q", definition=d) for d in (PLAIN, GPU)])
        assert [w is not None for _, _, w in batch] == [False, True]
