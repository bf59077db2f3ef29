"""Rows ↔ models: the conversions every store dialect shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from scaleq.doctor.checks import Check
from scaleq.jobs import Capabilities, Job, JobDefinition, Worker, job_id
from scaleq.store.base import (
    ArrayRecord,
    Attempt,
    Event,
    GroupStatus,
    QueueStats,
    TokenRecord,
    WorkerOffer,
    WorkerTally,
)

Row = Mapping[str, Any]


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"))


def _loads(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str | bytes) else value


def job_params(
    queue: str,
    definition: JobDefinition,
    priority: int,
    max_attempts: int,
    retries: int = 0,
    retry_on_exit_codes: list[int] | None = None,
    array_id: str | None = None,
    array_index: int | None = None,
) -> dict[str, Any]:
    req = definition.requirements
    return {
        "id": job_id(queue, definition, array_id, array_index),
        "array_id": array_id,
        "array_index": array_index,
        "queue": queue,
        "definition": definition.canonical(),
        "runtime": definition.runtime.value,
        "cpus": req.cpus,
        "memory": req.memory,
        "gpus": req.gpus,
        "tags": _json(definition.tags),
        "host_network": int(definition.network == "host"),
        "priority": priority,
        "max_attempts": max_attempts,
        "retries": retries,
        "retry_on_exit_codes": None if retry_on_exit_codes is None else _json(retry_on_exit_codes),
    }


def job(row: Row | None) -> Job:
    assert row is not None
    return Job(
        id=row["id"],
        queue=row["queue"],
        state=row["state"],
        reason=row["reason"],
        exit_code=row["exit_code"],
        error=row["error"],
        priority=row["priority"],
        attempts=row["attempts"],
        attempt=row["attempt_seq"],
        max_attempts=row["max_attempts"],
        failures=row["failures"],
        retries=row["retries"],
        retry_on_exit_codes=_loads(row["retry_on_exit_codes"]),
        worker_id=row["worker_id"],
        submitted_at=row["submitted_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        array_id=row["array_id"],
        array_index=row["array_index"],
        definition=JobDefinition.model_validate(_loads(row["definition"])),
    )


def attempt(row: Row) -> Attempt:
    return Attempt(row["job_id"], row["attempt"], row["worker_id"], row["started_at"], row["ended_at"], row["outcome"])


def caps_params(caps: Capabilities) -> dict[str, Any]:
    return {
        "runtimes": _json([r.value for r in caps.runtimes]),
        "cpus": caps.cpus,
        "memory": caps.memory,
        "gpus": caps.gpus,
        "tags": _json(caps.tags),
        "host_network": int(caps.host_network),
    }


def worker_params(w: Worker, now: float) -> dict[str, Any]:
    return {
        "id": w.id,
        "queue": w.queue,
        "grp": w.group,
        "slots": w.slots,
        "hostname": w.hostname,
        "now": now,
        **caps_params(w.capabilities()),
    }


def worker_capabilities(row: Row) -> Capabilities:
    return Capabilities(
        runtimes=_loads(row["runtimes"]),
        cpus=row["cpus"],
        memory=row["memory"],
        gpus=row["gpus"],
        tags=_loads(row["tags"]),
        host_network=bool(row["host_network"]),
    )


def worker(row: Row) -> Worker:
    busy = row["busy"]
    return Worker(
        id=row["id"],
        queue=row["queue"],
        group=row["grp"],
        slots=row["slots"],
        busy=busy,
        state=row["state"],
        runtimes=_loads(row["runtimes"]),
        cpus=row["cpus"],
        memory=row["memory"],
        gpus=row["gpus"],
        tags=_loads(row["tags"]),
        host_network=bool(row["host_network"]),
        hostname=row["hostname"],
        started_at=row["started_at"],
        last_heartbeat=row["last_heartbeat"],
        idle_since=row["last_active"] if busy == 0 else None,
    )


def queue_stats(row: Row) -> QueueStats:
    return QueueStats(
        queue=row["queue"],
        queued=row["queued"] or 0,
        running=row["running"] or 0,
        finished=row["finished"] or 0,
        succeeded=row["succeeded"] or 0,
        unsuccessful=row["unsuccessful"] or 0,
        oldest_queued_at=row["oldest_queued_at"],
    )


def worker_offer(row: Row) -> WorkerOffer:
    return WorkerOffer(
        group=row["grp"], slots=int(row["slots"]), capabilities=worker_capabilities(row), ids=tuple(_loads(row["ids"]))
    )


def worker_tally(row: Row) -> WorkerTally:
    return WorkerTally(
        queue=row["queue"],
        state=row["state"],
        workers=int(row["workers"]),
        busy=int(row["busy"] or 0),
        idle=int(row["idle"] or 0),
    )


def token(row: Row) -> TokenRecord:
    return TokenRecord(row["id"], row["name"], row["role"], row["created_at"], row["revoked_at"])


def event(row: Row) -> Event:
    return Event(row["id"], row["at"], row["grp"], row["kind"], row["from_count"], row["to_count"], row["reason"])


def group_params(status: GroupStatus) -> dict[str, Any]:
    data = asdict(status)
    data["now"] = data.pop("updated_at")
    data["checks"] = _json([c.as_dict() for c in status.checks])
    data["starting"] = _json(list(status.starting))
    return data


def group(row: Row) -> GroupStatus:
    return GroupStatus(
        row["name"],
        row["queue"],
        row["provider"],
        row["min_workers"],
        row["max_workers"],
        row["current"],
        row["desired"],
        row["updated_at"],
        row["note"],
        tuple(Check.from_dict(c) for c in _loads(row["checks"]) or []),
        row["reporter"],
        price_per_hour=row["price_per_hour"],
        state=row["state"],
        message=row["message"],
        state_since=row["state_since"],
        slots=row["slots"],
        boot_seconds=row["boot_seconds"],
        starting=tuple(float(t) for t in _loads(row["starting"]) or []),
    )


def array(row: Row) -> ArrayRecord:
    return ArrayRecord(row["id"], row["queue"], row["name"], row["size"], row["created_at"])
