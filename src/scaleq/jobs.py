"""The job vocabulary every other module speaks.

A job is one container run. Its *definition* is validated here, once, at the edge (the HTTP API and the CLI both
build a :class:`JobDefinition`), then canonicalised to JSON; the sha256 of ``queue`` + canonical definition is the
job's id, so submitting the same definition to the same queue twice is the same job.

Input files are part of the definition by content: the definition records each input's path and sha256, and the
bytes travel separately as blobs. Two submits of the same command over different input bytes are different jobs.

Every field is bounded here, so nothing a client sends can overflow a database column or a process table later:
numbers have ranges, sizes a ceiling (:data:`MAX_SIZE`), and a job's argv and environment the limits of an
``exec`` on Linux (:data:`MAX_ARG_BYTES` per string, :data:`MAX_EXEC_BYTES` in all). A definition past them is
refused at submit with a 422 naming the field, not stored and returned by every listing.

How a job is retried is not part of its definition (:class:`Retries`, given with the submit, like ``priority``): it
changes how the job runs, not what it computes, so it is not hashed into the id. Two budgets, by cause: attempts lost
to the infrastructure (``max_attempts``: a worker lost, a node gone; a preempted attempt is handed back and not
counted) and the program's own failures (``retries``: a non-zero exit or a timeout, optionally only some exit codes).
The store decides which result is retried, in the statement that writes the job (SQLite's ``finish``, PostgreSQL's
``finish_batch`` and ``worker_claim``), so that a result's job is read and written once.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
QUEUE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/=-]{0,62}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4}

#: Upper bound on max_duration (30 days): anything longer is a typo, not a job.
MAX_DURATION_LIMIT = 30 * 24 * 3600
DEFAULT_MAX_DURATION = 3600
#: Largest size (memory, a file) anything may name: 1 EiB, far past any machine, well inside a signed 64-bit column.
MAX_SIZE = 2**60
#: Longest single argument or env entry (``NAME=value``): Linux's MAX_ARG_STRLEN; exec refuses longer ones.
MAX_ARG_BYTES = 128 * 1024
#: Most bytes of command, entrypoint and env together (each string + 1): half of Linux's usual 2 MiB ARG_MAX.
MAX_EXEC_BYTES = 1024 * 1024
#: Longest input path (PATH_MAX) and path component (NAME_MAX), in bytes.
MAX_PATH_BYTES = 4096
MAX_NAME_BYTES = 255


class State(StrEnum):
    queued = "queued"
    running = "running"
    finished = "finished"


class Reason(StrEnum):
    success = "success"
    failed = "failed"
    timed_out = "timed_out"
    cancelled = "cancelled"
    worker_lost = "worker_lost"


#: Reasons of an attempt that are the program's own failure: retried while the job's ``retries`` last.
PROGRAM_FAILURES = (Reason.failed, Reason.timed_out)
#: Most retries (and attempts) a job may ask for.
MAX_RETRIES = 100


class RuntimeKind(StrEnum):
    docker = "docker"
    process = "process"


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*$")
_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(value: str) -> float:
    """Seconds from ``90``, ``90s``, ``15m``, ``12h``, ``7d`` or ``2w``."""
    m = _DURATION.match(value.lower())
    if not m:
        raise ValueError(f"{value!r} is not a duration (like 90s, 15m, 12h, 7d, 2w)")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_size(value: int | float | str) -> int:
    """Bytes from ``512m``, ``2GiB``, ``1.5g`` or a plain number of bytes (binary units, as Docker reads them)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError("expected a size such as 512m or 2GiB")
    if isinstance(value, int | float):
        number = float(value)
    else:
        m = _SIZE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size; use bytes or a number with k, m, g or t (e.g. 512m, 2GiB)")
        number = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not math.isfinite(number) or number > MAX_SIZE:
        raise ValueError(f"{value!r} is too large: at most {MAX_SIZE // _UNITS['t']}t (1 EiB)")
    size = int(value) if isinstance(value, int) else int(number)
    if size <= 0:
        raise ValueError("must be positive")
    return size


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def parse_env_pair(pair: str) -> tuple[str, str]:
    """``K=V`` → (K, V), refusing what a shell would not accept as a variable name."""
    key, sep, value = pair.partition("=")
    if not sep:
        raise ValueError(f"{pair!r} is not KEY=VALUE")
    if not ENV_NAME.match(key):
        raise ValueError(f"{key!r} is not a valid variable name")
    return key, value


class Requirements(BaseModel):
    """What a worker must offer to run the job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpus: float = Field(default=1.0, gt=0, le=1024, description="CPU cores (a limit in the docker runtime)")
    gpus: int = Field(default=0, ge=0, le=64, description="GPUs, passed to the engine as a device request")
    memory: int | None = Field(
        default=None, ge=1, le=MAX_SIZE, description="bytes; accepts 512m, 2GiB (a hard limit in docker)"
    )

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_size(v)


class InputFile(BaseModel):
    """One input file, by content: its path under ``/inputs`` and the sha256 of its bytes."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="relative path under /inputs")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=0, le=MAX_SIZE)
    mode: int = Field(default=0o444, ge=0, le=0o777)

    @field_validator("path")
    @classmethod
    def _relative(cls, v: str) -> str:
        parts = v.split("/")
        if not v or v.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise ValueError(f"{v!r} must be a relative path without '.', '..' or empty parts")
        if "\0" in v:
            raise ValueError("must not contain a NUL character")
        if _utf8_len(v) > MAX_PATH_BYTES or any(_utf8_len(p) > MAX_NAME_BYTES for p in parts):
            raise ValueError(
                f"is too long: at most {MAX_PATH_BYTES} bytes, and {MAX_NAME_BYTES} per directory or file name"
            )
        return v


class JobDefinition(BaseModel):
    """What runs: validated once at the edge, canonicalised, hashed into the job id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    image: str | None = Field(
        default=None, max_length=1024, description="container image; none means the process runtime"
    )
    command: list[str] = Field(min_length=1, description="argv of the job")
    entrypoint: list[str] | None = None
    env: dict[str, str] = Field(default_factory=dict)
    workdir: str | None = Field(default=None, max_length=MAX_PATH_BYTES)
    inputs: list[InputFile] = Field(default_factory=list, max_length=100_000)
    max_duration: int = Field(default=DEFAULT_MAX_DURATION, gt=0, le=MAX_DURATION_LIMIT, description="seconds")
    tags: list[str] = Field(
        default_factory=list, max_length=64, description="a worker must carry all of them to run the job"
    )
    requirements: Requirements = Field(default_factory=Requirements)
    network: Literal["none", "host"] = Field(
        default="none", description="'host' runs only on workers started with --allow-host-network"
    )

    @field_validator("command", "entrypoint")
    @classmethod
    def _argv(cls, v: list[str] | None) -> list[str] | None:
        if v is not None and (not v or any(not isinstance(a, str) for a in v) or v[0] == ""):
            raise ValueError("must be a non-empty list of strings whose first item is not empty")
        for n, arg in enumerate(v or ()):
            if "\0" in arg:
                raise ValueError(f"item {n} contains a NUL character, which no argv can carry")
            if _utf8_len(arg) > MAX_ARG_BYTES:
                raise ValueError(f"item {n} is {_utf8_len(arg)} bytes; an argument may be at most {MAX_ARG_BYTES}")
        return v

    @field_validator("image")
    @classmethod
    def _image(cls, v: str | None) -> str | None:
        if v is not None and (not v.strip() or any(c.isspace() for c in v)):
            raise ValueError(f"{v!r} is not an image reference")
        return v

    @field_validator("env")
    @classmethod
    def _env(cls, v: dict[str, str]) -> dict[str, str]:
        for key, value in v.items():
            if not ENV_NAME.match(key):
                raise ValueError(f"{key!r} is not a valid variable name")
            if "\0" in value:
                raise ValueError(f"{key}: the value contains a NUL character, which no environment can carry")
            if _utf8_len(key) + 1 + _utf8_len(value) > MAX_ARG_BYTES:
                raise ValueError(f"{key}: NAME=value is over {MAX_ARG_BYTES} bytes, more than exec accepts")
        return v

    @field_validator("workdir")
    @classmethod
    def _workdir(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith("/"):
            raise ValueError("must be an absolute path")
        return v

    @field_validator("tags")
    @classmethod
    def _tags(cls, v: list[str]) -> list[str]:
        for tag in v:
            if not TAG.match(tag):
                raise ValueError(f"{tag!r} is not a tag (letters, digits and ._:/=- up to 63 characters)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _unique_inputs(self) -> JobDefinition:
        paths = [i.path for i in self.inputs]
        if len(paths) != len(set(paths)):
            raise ValueError("inputs: two input files have the same path")
        return self

    @model_validator(mode="after")
    def _exec_size(self) -> JobDefinition:
        strings = [*self.command, *(self.entrypoint or ()), *(f"{k}={v}" for k, v in self.env.items())]
        total = sum(_utf8_len(s) + 1 for s in strings)
        if total > MAX_EXEC_BYTES:
            raise ValueError(
                f"command, entrypoint and env: {total} bytes together, over the limit of {MAX_EXEC_BYTES} "
                "(pass large data as an input file instead)"
            )
        return self

    @property
    def runtime(self) -> RuntimeKind:
        return RuntimeKind.docker if self.image else RuntimeKind.process

    def canonical(self) -> str:
        """Canonical JSON: defaults included, keys sorted, inputs ordered by path, no whitespace."""
        data = self.model_dump(mode="json")
        data["inputs"] = sorted(data["inputs"], key=lambda i: i["path"])
        return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def job_id(queue: str, definition: JobDefinition, array_id: str | None = None, array_index: int | None = None) -> str:
    """The job's id: sha256 over the queue and the canonical definition — and, for a member of an array, the
    array's id and the job's index in it (the job sees both in its environment, so they are part of what runs:
    the same definition twice in one array, or in two arrays, is two jobs)."""
    text = f"{queue}\n{definition.canonical()}"
    if array_id is not None:
        text += f"\n{array_id}\n{array_index}"
    return hashlib.sha256(text.encode()).hexdigest()


def array_id(queue: str, definitions: list[JobDefinition]) -> str:
    """An array's id: sha256 over the queue and its definitions, in order. Submitting the same lines again is the
    same array, and so the same jobs (idempotent submit, as for one job); the array's name is a label, not part
    of it."""
    digest = hashlib.sha256(f"array\n{queue}".encode())
    for d in definitions:
        digest.update(b"\n" + job_id(queue, d).encode())
    return digest.hexdigest()


def validate_queue_name(name: str) -> str:
    if not QUEUE_NAME.match(name):
        raise ValueError(f"{name!r} is not a queue name (letters, digits, '.', '_', '-'; up to 128 characters)")
    return name


class Retries(BaseModel):
    """How a job is retried, by cause (see the module's docstring). Not part of the definition: the same definition
    with other retries is the same job, as with ``priority``; ``--rerun`` takes the new settings."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(
        default=3,
        ge=1,
        le=MAX_RETRIES,
        description="infrastructure budget: attempts before a job lost with its worker (lease expired, node gone) "
        "finishes worker_lost; a preempted or handed-back attempt is not counted",
    )
    retries: int = Field(
        default=0,
        ge=0,
        le=MAX_RETRIES,
        description="program budget: times a failed (non-zero exit) or timed_out attempt is queued again",
    )
    retry_on_exit_codes: list[int] | None = Field(
        default=None,
        max_length=256,
        description="retry only a failure with one of these exit codes (a timeout is then not retried); "
        "default: every failure and timeout",
    )

    @field_validator("retry_on_exit_codes")
    @classmethod
    def _exit_codes(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return None
        if not v:
            raise ValueError("give at least one exit code, or leave it out to retry every failure")
        for code in v:
            if code == 0 or not -(2**31) <= code <= 2**32 - 1:
                raise ValueError(f"{code} is not a failing exit code (non-zero, as a process's exit status)")
        return sorted(set(v))

    @model_validator(mode="after")
    def _codes_need_retries(self) -> Retries:
        if self.retry_on_exit_codes is not None and self.retries == 0:
            raise ValueError("retry_on_exit_codes: needs retries of at least 1 (retries is 0: nothing is retried)")
        return self


class SubmitRequest(Retries):
    """The body of ``POST /api/v1/jobs``: a definition, where to queue it, how to retry it, and the input bytes it
    names."""

    model_config = ConfigDict(extra="forbid")

    queue: str
    definition: JobDefinition
    priority: int = Field(default=0, ge=-1000, le=1000, description="higher runs first; FIFO within a priority")
    rerun: bool = Field(default=False, description="run a finished job again instead of returning its result")
    blobs: dict[str, str] = Field(
        default_factory=dict, description="base64 bytes of the inputs the server lacks, by sha256"
    )

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        return validate_queue_name(v)


#: Most jobs one array may hold.
MAX_ARRAY_SIZE = 10_000_000


class ArraySpec(BaseModel):
    """What makes a batch submit (``POST /jobs/batch``) part of an array: its jobs are members, numbered from
    ``start`` in the batch's order. A batch that is a whole array may leave ``id`` and ``size`` out (the server
    computes them); an array sent in several batches (``scaleq submit-many``) gives them in each, ``id`` as
    :func:`array_id` computes it over all of its definitions."""

    model_config = ConfigDict(extra="forbid")

    id: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$", description="default: computed from this batch")
    name: str | None = Field(default=None, min_length=1, max_length=200, description="a label, shown beside the id")
    size: int | None = Field(default=None, ge=1, le=MAX_ARRAY_SIZE, description="jobs in the whole array")
    start: int = Field(default=0, ge=0, lt=MAX_ARRAY_SIZE, description="index of this batch's first job")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        if v is not None and any(ord(c) < 32 or ord(c) == 127 for c in v):
            raise ValueError("must not contain control characters")
        return v


class Job(BaseModel):
    """A job as the API returns it."""

    id: str
    queue: str
    state: State
    reason: Reason | None = None
    exit_code: int | None = None
    error: str | None = None
    priority: int = 0
    attempts: int = Field(
        default=0, description="attempts of the current run counted toward max_attempts (lost, or running)"
    )
    attempt: int = Field(default=0, description="number of the latest attempt (logs are kept per attempt)")
    max_attempts: int = 3
    failures: int = Field(default=0, description="program failures of the current run retried so far")
    retries: int = 0
    retry_on_exit_codes: list[int] | None = None
    worker_id: str | None = None
    submitted_at: float
    started_at: float | None = None
    finished_at: float | None = None
    array_id: str | None = Field(default=None, description="the array the job belongs to (submit-many)")
    array_index: int | None = Field(default=None, description="its index in the array, from 0")
    definition: JobDefinition


class Claim(BaseModel):
    """One job handed to a worker: the attempt number and the lease token that fences it."""

    job: Job
    attempt: int
    lease: str


class Capabilities(BaseModel):
    """What a worker (or every worker of a group) offers; a job runs only where its needs fit."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    runtimes: list[RuntimeKind] = Field(default_factory=lambda: [RuntimeKind.docker])
    cpus: float = Field(default=1.0, gt=0, le=1_000_000)
    memory: int | None = Field(default=None, ge=0, le=MAX_SIZE)
    gpus: int = Field(default=0, ge=0, le=1_000_000)
    tags: list[str] = Field(default_factory=list)
    host_network: bool = False

    def fits(self, definition: JobDefinition) -> bool:
        return self.misfit(definition) is None

    def misfit(self, definition: JobDefinition) -> str | None:
        """Why a job does not fit here (the first reason), or None when it does."""
        req = definition.requirements
        if definition.runtime not in self.runtimes:
            return f"runs {'/'.join(r.value for r in self.runtimes) or 'no'} jobs, not {definition.runtime.value}"
        if req.cpus > self.cpus:
            return f"offers cpus {self.cpus:g}, the job needs {req.cpus:g}"
        if req.gpus > self.gpus:
            return f"offers gpus {self.gpus}, the job needs {req.gpus}"
        if req.memory is not None and self.memory is not None and req.memory > self.memory:
            return f"offers memory {self.memory / 2**20:g} MiB, the job needs {req.memory / 2**20:g} MiB"
        if definition.network == "host" and not self.host_network:
            return "does not allow the host network, which the job asks for"
        missing = sorted(set(definition.tags) - set(self.tags))
        if missing:
            return f"lacks the tag{'s' if len(missing) > 1 else ''} {', '.join(missing)}"
        return None


class Worker(BaseModel):
    """A worker as the server knows it from its registration and heartbeats."""

    id: str
    queue: str
    group: str | None = None
    slots: int
    busy: int = 0
    state: Literal["active", "draining", "gone"] = "active"
    runtimes: list[RuntimeKind] = Field(default_factory=list)
    cpus: float
    memory: int | None = None
    gpus: int = 0
    tags: list[str] = Field(default_factory=list)
    host_network: bool = False
    hostname: str = ""
    started_at: float
    last_heartbeat: float
    idle_since: float | None = None

    def capabilities(self) -> Capabilities:
        return Capabilities(
            runtimes=self.runtimes,
            cpus=self.cpus,
            memory=self.memory,
            gpus=self.gpus,
            tags=self.tags,
            host_network=self.host_network,
        )
