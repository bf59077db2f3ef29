"""The agent's beat (:meth:`scaleq.worker.agent.WorkerAgent._beat_wait`): each sleep a random share of the interval
asked for, never longer than it, so a fleet that got its jobs at one moment does not beat in step; and a quicker beat
asked for mid-sleep cuts the sleep. Time is a fake here: the agent module's clock, dice, ``wait_set`` and ``sleep`` are
stand-ins (replaced in that module only) that record what they are asked for."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from scaleq.client import Unreachable
from scaleq.worker import agent as agent_module
from scaleq.worker.agent import BEAT_JITTER, WorkerAgent, WorkerConfig


def worker() -> WorkerAgent:
    return WorkerAgent(WorkerConfig(server="http://127.0.0.1:9", token=None, queue="q", runtimes={}, slots=1, cpus=1.0))


@pytest.mark.parametrize("share", [BEAT_JITTER, 0.9, 1.0])
async def test_a_beat_sleeps_a_random_share_of_the_interval(monkeypatch: pytest.MonkeyPatch, share: float) -> None:
    asked: list[float] = []
    slept: list[float] = []
    now = [100.0]

    async def wait_set(ev: asyncio.Event, timeout: float) -> bool:
        asked.append(timeout)
        now[0] += timeout  # nothing quickens here
        return False

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    a = worker()
    dice: list[tuple[float, float]] = []
    monkeypatch.setattr(
        agent_module, "random", SimpleNamespace(uniform=lambda low, high: dice.append((low, high)) or share)
    )
    monkeypatch.setattr(agent_module, "wait_set", wait_set)
    monkeypatch.setattr(agent_module, "asyncio", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(agent_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    a.heartbeat_seconds = 8.0
    await a._beat_wait()
    assert dice == [(BEAT_JITTER, 1.0)]  # never past the interval asked for
    assert asked == [pytest.approx(share * 8.0)]
    assert slept == []  # the whole of it was the wait


async def test_a_quicker_beat_cuts_the_sleep_to_what_is_left_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    slept: list[float] = []

    async def wait_set(ev: asyncio.Event, timeout: float) -> bool:
        now[0] += 3.0  # three seconds into a 15 s beat, an answer asks for 4 s
        a.client.cadence = 4.0
        a._follow_cadence()
        assert ev.is_set()  # the event is set: the wait ends at once
        return True

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    a = worker()
    monkeypatch.setattr(agent_module, "random", SimpleNamespace(uniform=lambda low, high: 1.0))
    monkeypatch.setattr(agent_module, "wait_set", wait_set)
    monkeypatch.setattr(agent_module, "asyncio", SimpleNamespace(sleep=sleep))
    monkeypatch.setattr(agent_module, "time", SimpleNamespace(monotonic=lambda: now[0]))
    a.heartbeat_seconds = 15.0
    await a._beat_wait()
    assert a.heartbeat_seconds == 4.0
    assert slept == [pytest.approx(1.0)]  # 4 s from the start of the sleep, 3 of them gone


async def test_a_beat_that_timed_out_keeps_the_beat_and_a_refused_one_quickens_the_next(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A timeout is a busy server (a fleet reporting at once): beating more often would only add to its line. A
    # refused connection is a server restarting: the next beat comes at the settings' beat, within its grace.
    a = worker()
    a.heartbeat_seconds, a._settings_beat, a.lease_seconds = 15.0, 2.0, 45.0
    failures = iter([Unreachable("timed out", timed_out=True), Unreachable("connection refused")])

    async def heartbeat(worker_id: str, **kw: object) -> tuple[str, set[str]]:
        raise next(failures)

    failed_before: list[bool] = []

    async def beat_wait() -> None:
        failed_before.append(a._beat_failed)  # what the sleep about to start goes by
        if len(failed_before) == 3:
            raise asyncio.CancelledError

    monkeypatch.setattr(a.client, "heartbeat", heartbeat)
    monkeypatch.setattr(a, "_beat_wait", beat_wait)
    with pytest.raises(asyncio.CancelledError):
        await a._heartbeat_loop()
    assert failed_before == [False, False, True]
