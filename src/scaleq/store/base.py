"""The store protocol: everything the server persists, behind one async interface.

Implementations (``sqlite``, ``postgres``) keep their SQL in ``queries/common.sql`` and ``queries/<dialect>.sql``
and must pass the one contract suite in ``tests/integration/test_store_contract.py``. The store owns the job state
machine — every transition is a single conditional statement, so two servers (or a late worker) can never both win
one: a finish or a renewal presents the attempt's lease token, and a stale token changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from scaleq.doctor.checks import Check
from scaleq.jobs import Capabilities, Claim, Job, JobDefinition, Worker


class StoreError(Exception):
    """Base of the store's own errors."""


class NotFound(StoreError):
    pass


class AmbiguousId(StoreError):
    pass


class StaleLease(StoreError):
    """The lease no longer owns its job (expired, cancelled, or the job moved on to another attempt)."""


class SchemaTooNew(StoreError):
    """The database was migrated by a newer scaleq than this one."""


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database stands against this code's migrations (``scaleq.store.migrations``)."""

    version: int  # the last migration applied to the database (0: none, an empty database)
    head: int  # the newest migration this code has
    pending: list[str]  # labels (NNNN_name) of the migrations still to apply, in order


@dataclass(frozen=True)
class FinishResult:
    reason: str
    exit_code: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class LogChunk:
    seq: int
    attempt: int
    stream: str
    data: bytes
    at: float


@dataclass(frozen=True)
class JobsPage:
    """A page of jobs, newest first, and where the next one starts (``list_jobs(before=...)``; None: the last)."""

    jobs: list[Job]
    next_before: int | None


#: Blobs are stored, and read back, in parts of this many bytes.
BLOB_PART = 1 << 20


@dataclass(frozen=True)
class LogsAppended:
    """What became of chunks sent to an attempt's log: its job, attempt, the bytes dropped past the cap so far, and
    whether the cap is reached (the worker then stops sending)."""

    job_id: str
    attempt: int
    dropped: int
    capped: bool


def log_cap_note(cap: int) -> str:
    """The line stored once where an attempt's log reaches the cap."""
    return (
        f"\n[scaleq: this attempt's log reached the cap of {cap} bytes; the rest of its output is dropped "
        "(`scaleq logs` says how much at the end)]\n"
    )


@dataclass(frozen=True)
class OutputFile:
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class Attempt:
    job_id: str
    attempt: int
    worker_id: str
    started_at: float
    ended_at: float | None
    outcome: str | None


@dataclass(frozen=True)
class Ahead:
    """What a queued job waits behind, for its start-time estimate (scaleq.server.estimates)."""

    queued: int  # jobs of its queue claimed before it (priority, then age)
    running: tuple[tuple[str | None, float], ...]  # (worker, started at) of its queue's running jobs
    recent_runs: tuple[float, ...]  # seconds of its queue's latest successful runs, newest first


@dataclass(frozen=True)
class QueueStats:
    queue: str
    queued: int
    running: int
    finished: int
    succeeded: int
    unsuccessful: int
    oldest_queued_at: float | None


@dataclass(frozen=True)
class WorkerTally:
    """The live workers of one queue in one state: how many, and their job slots busy (running a job) and idle (free
    on an active worker). What ``/metrics`` reports of a fleet, counted by the store: a fleet of 10,000 is a few rows,
    not 10,000 workers read and built at every scrape."""

    queue: str
    state: str
    workers: int
    busy: int
    idle: int


@dataclass(frozen=True)
class WorkerOffer:
    """The active workers of a queue alike in what they offer (group, slots, capabilities): who could take the queue's
    jobs, as a submit's warning and a job's estimate ask it — read as a few classes, not a fleet of workers."""

    group: str | None
    slots: int
    capabilities: Capabilities
    ids: tuple[str, ...]  # its workers, oldest first

    @property
    def name(self) -> str:
        """The class named for its oldest worker: ``w-1`` or ``w-1 (and 9 alike)``."""
        return self.ids[0] + (f" (and {len(self.ids) - 1} alike)" if len(self.ids) > 1 else "")


@dataclass(frozen=True)
class QueuePosition:
    """Where a queued job stands in its queue, in the claim's order (priority, then submit order)."""

    ahead: int  # jobs claimed before it
    higher: int  # of those, the ones at a higher priority
    queued: int  # all jobs queued on its queue (itself included)


@dataclass(frozen=True)
class TokenRecord:
    id: str
    name: str
    role: str
    created_at: float
    revoked_at: float | None


@dataclass(frozen=True)
class Event:
    id: int
    at: float
    group: str
    kind: str
    from_count: int | None
    to_count: int | None
    reason: str


@dataclass(frozen=True)
class GroupStatus:
    name: str
    queue: str
    provider: str
    min_workers: int
    max_workers: int
    current: int
    desired: int
    updated_at: float
    #: What the controller wants said of the group now, in words ("capped at max_workers 4 (7 wanted)", a signal
    #: it fell back from); empty: nothing to say.
    note: str = ""
    #: The controller's checks of the group's signal (readable, scrape targets up, agrees with the server's count),
    #: served with the server's health checks.
    checks: tuple[Check, ...] = ()
    #: Who wrote this status: ``controller`` (a running controller refreshes it), ``apply``, or ``stopped`` (a
    #: controller that shut down).
    reporter: str = "controller"
    #: "ok", or why the controller cannot act: "quota" / "rate_limited" (the provider refused more machines or
    #: calls: it backs off and retries), "error" (another provider or signal failure); ``message`` says it in the
    #: provider's words, ``state_since`` since when (None for ok)
    state: str = "ok"
    message: str = ""
    state_since: float | None = None
    price_per_hour: float | None = None  # the grid file's, for money beside worker-seconds
    #: For the start-time estimate of a queued job (scaleq.eta): slots per worker, the typical boot of the group's
    #: workers as the controller saw them (None: none seen yet), and when each worker still starting was asked for.
    slots: int = 1
    boot_seconds: float | None = None
    starting: tuple[float, ...] = ()


@dataclass(frozen=True)
class Purged:
    """What :meth:`Store.purge` removed."""

    jobs: int
    log_chunks: int
    outputs: int
    blobs: int
    events: int


@dataclass(frozen=True)
class Submission:
    """One job of a batch submit: what :meth:`Store.submit` takes for one."""

    queue: str
    definition: JobDefinition
    priority: int = 0
    max_attempts: int = 3
    rerun: bool = False
    retries: int = 0
    retry_on_exit_codes: list[int] | None = None
    array_id: str | None = None  # a member of this array (created with the batch: see Store.submit_many)
    array_index: int | None = None


@dataclass(frozen=True)
class ArrayRecord:
    """An array: the jobs of one ``submit-many``, as one thing (see :func:`scaleq.jobs.array_id`)."""

    id: str
    queue: str
    name: str | None
    size: int
    created_at: float


@dataclass(frozen=True)
class ArrayStatus:
    """An array with its progress: jobs queued, running, and finished by reason (``success``, ``failed``, …)."""

    array: ArrayRecord
    queued: int
    running: int
    finished: dict[str, int]

    @property
    def done(self) -> int:
        return sum(self.finished.values())


@dataclass(frozen=True)
class Usage:
    """Worker-seconds of one key (a group, a queue, an array or a job) on one group's workers."""

    key: str | None
    group: str | None
    worker_seconds: float


@dataclass(frozen=True)
class WorkerClaim:
    """What a worker's claim found: its queue and state, the jobs it got (none unless it is ``active``), and per
    finish that rode along, the job as :meth:`Store.finish` answers it, or None where that would be StaleLease."""

    queue: str
    state: str
    claims: list[Claim]
    finished: list[Job | None] = field(default_factory=list)


@dataclass(frozen=True)
class Expired:
    job_id: str
    queue: str
    state: str


class Store(Protocol):
    async def open(self) -> None: ...
    async def close(self) -> None: ...
    async def schema_status(self) -> SchemaStatus: ...
    async def migrate(self, to: int | None = None) -> list[str]: ...
    async def ping(self) -> None: ...
    def publish(self, keys: tuple[str, ...]) -> None: ...
    async def listen(self, deliver: Callable[[tuple[str, ...]], None]) -> None: ...

    # jobs
    async def submit(
        self,
        queue: str,
        definition: JobDefinition,
        *,
        priority: int,
        max_attempts: int,
        rerun: bool,
        now: float,
        retries: int = 0,
        retry_on_exit_codes: list[int] | None = None,
    ) -> tuple[Job, bool]:
        """Store the job if new (or requeue a finished one on ``rerun``, with these retry settings); return it and
        whether it is now queued."""
        ...

    async def submit_many(
        self, submissions: list[Submission], now: float, array: ArrayRecord | None = None
    ) -> list[tuple[Job, bool]]:
        """:meth:`submit` for each, in order, in one transaction (all or none); with ``array``, the array is
        recorded too (found if it exists), and the submissions name it and their indexes."""
        ...

    # arrays
    async def get_array(self, array_id: str) -> ArrayStatus:
        """By full id or a unique prefix of at least 6 characters, with its progress (one grouped count)."""
        ...

    async def list_arrays(self, *, queue: str | None, limit: int) -> list[ArrayStatus]:
        """Newest first, each with its progress."""
        ...

    async def cancel_array(self, array_id: str, now: float) -> tuple[ArrayStatus, list[tuple[str, str]]]:
        """Cancel the array's unfinished jobs; the array after, and the (job id, queue) of those cancelled."""
        ...

    async def rerun_array(
        self, array_id: str, failed_only: bool, now: float
    ) -> tuple[ArrayStatus, list[tuple[str, str]]]:
        """Queue the array's finished jobs again (only the unsuccessful ones with ``failed_only``), in its order;
        the array after, and the (job id, queue) of those queued."""
        ...

    # cost
    async def account_usage(self) -> None:
        """Extend the ledger of worker lives to each worker's last heartbeat."""
        ...

    async def usage(self, by: str, since: float, now: float, key: str | None = None) -> list[Usage]:
        """Worker-seconds since ``since`` per ``by`` (``group``, ``queue``: worker lives from the ledger;
        ``array``, ``job``: the attempts' run time times their share of the worker) and per group; ``key``
        restricts ``array`` and ``job`` to one (a full id)."""
        ...

    async def purge(self, before: float, queue: str | None = None) -> Purged:
        """Remove the finished jobs (of ``queue``, or all) that ended before ``before`` — with their attempts, logs,
        outputs and the bytes no other job refers to — and scaling events older than ``before``."""
        ...

    async def get_job(self, job_id: str) -> Job:
        """By full id or a unique prefix of at least 6 characters; NotFound / AmbiguousId otherwise."""
        ...

    async def list_jobs(
        self,
        *,
        queue: str | None,
        state: str | None,
        limit: int,
        reason: str | None = None,
        before: int | None = None,
    ) -> list[Job]:
        """Newest first (by ``seq``); ``before``: only jobs of a smaller seq (the page after one ending there)."""
        ...

    async def list_jobs_page(
        self, *, queue: str | None, state: str | None, limit: int, reason: str | None = None, before: int | None = None
    ) -> JobsPage:
        """As list_jobs, with where the next page starts: pages walk an index on seq, so each costs the same however
        many jobs there are, and jobs submitted meanwhile (a higher seq) never shift the pages still to come."""
        ...

    async def list_attempts(self, job_id: str) -> list[Attempt]: ...
    async def queue_position(self, job_id: str) -> QueuePosition:
        """Where the job (a full id) stands in its queue; meaningful while it is queued."""
        ...

    async def cancel(self, job_id: str, now: float) -> Job: ...

    # the worker protocol
    async def register_worker(self, worker: Worker, now: float) -> None: ...
    async def claim(self, worker_id: str, n: int, now: float, lease_seconds: float) -> list[Claim]: ...
    async def heartbeat(
        self, worker_id: str, now: float, lease_seconds: float, held: list[str] | None = None
    ) -> tuple[str, set[str]]:
        """Renew the worker's leases that it says it ``held`` (None: all of them); return its state and, of those,
        the leases still valid."""
        ...

    async def has_queued(self, queue: str) -> bool:
        """Whether ``queue`` has a job waiting to be claimed."""
        ...

    async def touch_workers(self, worker_ids: list[str], now: float) -> list[str]:
        """Mark these workers heard from at ``now`` (those not gone), in one store call for all: the workers whose
        claims are parked on a server (:mod:`scaleq.server.liveness`). Their leases are not renewed. Returns those
        of them the store does not hold active (draining, gone, forgotten): their claims are to be answered. (One
        statement on PostgreSQL; SQLite, which cannot write in a ``WITH``, reads them in a second.)"""
        ...

    async def worker_claim(
        self,
        worker_id: str,
        n: int,
        now: float,
        lease_seconds: float,
        finishes: list[tuple[str, FinishResult]] | None = None,
    ) -> WorkerClaim:
        """The claim as the worker protocol makes it: record the finishes that ride along, read the worker and, if
        it is active, claim up to ``n`` jobs it can run — one transaction (one statement on PostgreSQL). NotFound
        for an unknown worker (its finishes may or may not have been recorded: the worker sends them again)."""
        ...

    async def finish(self, lease: str, result: FinishResult, now: float) -> Job:
        """End the lease's attempt with ``result``: the job finishes, or — a program failure the job retries, with
        retries left — goes back to its queue (``state`` queued, ``failures`` one more). StaleLease when the lease
        no longer owns its job (a repeated finish of the attempt that ended it answers with the job)."""
        ...

    async def finish_many(self, finishes: list[tuple[str, FinishResult]], now: float) -> list[Job | None]:
        """Several finishes in one transaction: per item, the job as :meth:`finish` answers it, or None where
        :meth:`finish` would raise StaleLease."""
        ...

    async def release(self, lease: str, now: float, outcome: str = "released") -> Job | None:
        """Hand the lease's job back to its queue without spending an attempt; the attempt ends with ``outcome``
        (``released``, or ``preempted`` on the provider's notice). None when the lease no longer owns its job."""
        ...

    async def release_worker(self, worker_id: str, now: float, outcome: str = "preempted") -> list[Expired]:
        """:meth:`release` for every running job of the worker (its provider reports it preempted): the jobs
        requeued, as :meth:`expire_leases` reports them."""
        ...

    async def check_lease(self, lease: str) -> tuple[str, int]:
        """(job_id, attempt) of a live lease; StaleLease otherwise."""
        ...

    async def append_logs(self, lease: str, chunks: list[tuple[str, bytes]], now: float) -> str:
        """Append to the lease's attempt; return the job id."""
        ...

    async def append_capped_logs(
        self, lease: str, chunks: list[tuple[str, bytes]], now: float, cap: int | None, dropped: int = 0
    ) -> LogsAppended:
        """Append while the attempt's log is under ``cap`` bytes (the head is kept, a note marks the cut, and the
        bytes past it are counted as dropped, with ``dropped`` more the worker did not send)."""
        ...

    async def log_counts(self, job_id: str, attempt: int) -> tuple[int, int]:
        """(bytes kept, bytes dropped past the cap) of an attempt's log."""
        ...

    async def read_logs(self, job_id: str, attempt: int, after: int, limit: int) -> list[LogChunk]: ...
    async def put_outputs(self, lease: str, files: list[tuple[str, bytes]]) -> None: ...
    async def record_outputs(self, lease: str, files: list[OutputFile]) -> None: ...
    async def list_outputs(self, job_id: str) -> list[OutputFile]: ...

    # blobs (input and output bytes, content-addressed)
    async def put_blob(self, sha256: str, data: bytes) -> None: ...
    async def get_blob(self, sha256: str) -> bytes: ...
    async def put_blob_file(self, sha256: str, size: int, path: str) -> None: ...
    async def blob_info(self, sha256: str) -> tuple[int, int]: ...
    async def read_blob_part(self, sha256: str, part: int) -> bytes: ...
    async def missing_blobs(self, shas: list[str]) -> list[str]: ...

    # housekeeping
    async def expire_leases(self, now: float) -> list[Expired]: ...
    # the start-up grace: running leases of workers not gone get now + lease_seconds, once until the worker speaks
    async def extend_leases(self, now: float, lease_seconds: float) -> None: ...
    async def mark_gone_workers(self, cutoff: float, forget_before: float) -> list[str]: ...
    # the queue counts' pending changes folded in (PostgreSQL keeps them apart so no writer waits; SQLite: nothing)
    async def fold_queue_counts(self) -> None: ...

    # views
    async def queue_stats(self) -> list[QueueStats]: ...
    async def worker_offers(self, queue: str) -> list[WorkerOffer]:
        """The active workers registered on ``queue``, in classes of workers alike (oldest worker's class first)."""
        ...

    async def worker_tallies(self) -> list[WorkerTally]:
        """The live (not gone) workers counted by queue and state, ordered so."""
        ...

    async def busy_workers(self) -> int:
        """How many workers run a job now (each beats once per beat, however many slots it fills)."""
        ...

    async def ahead_of(self, job_id: str, running: int, runs: int) -> Ahead:
        """What the (queued) job waits behind: up to ``running`` running jobs, the last ``runs`` run times."""
        ...

    async def demand(self, queue: str, capabilities: Capabilities, limit: int | None = None) -> tuple[int, int]:
        """(queued, running) jobs of ``queue`` that ``capabilities`` can run; queued counted up to ``limit``."""
        ...

    async def list_workers(self, *, queue: str | None = None, include_gone: bool = False) -> list[Worker]: ...
    async def get_worker(self, worker_id: str) -> Worker: ...
    async def set_worker_state(self, worker_id: str, state: str) -> None: ...

    # tokens
    async def create_token(self, token_id: str, name: str, role: str, token_hash: str, now: float) -> None: ...
    async def find_token(self, token_hash: str) -> TokenRecord | None: ...
    async def list_tokens(self) -> list[TokenRecord]: ...
    async def revoke_token(self, token_id: str, now: float) -> bool:
        """False when no live token has that id, or it is the last live admin token (never revoked)."""
        ...

    # what a worker token owns: the workers registered with it, their leases, their running jobs' inputs
    async def bind_worker(self, worker_id: str, token_id: str) -> bool:
        """Bind a worker id to the token registering it; False when the id is a live worker of another token."""
        ...

    async def worker_token(self, worker_id: str) -> str | None: ...
    async def lease_tokens(self, leases: list[str]) -> dict[str, str | None]:
        """For each known lease, the token its worker is bound to (None: unbound); unknown leases are left out."""
        ...

    async def holds_input(self, token_id: str, sha256: str) -> bool:
        """Whether a running job of a worker bound to the token has this blob among its inputs."""
        ...

    # scaling records
    async def record_event(
        self, group: str, kind: str, from_count: int | None, to_count: int | None, reason: str, now: float
    ) -> None: ...
    async def list_events(self, group: str | None, after: int, limit: int) -> list[Event]: ...
    async def put_group(self, status: GroupStatus) -> None: ...
    async def list_groups(self) -> list[GroupStatus]: ...
    async def delete_group(self, name: str) -> None: ...


def unavailable_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the database is not there right now" (answer 503 and retry), not a bad request."""
    try:
        import psycopg
        from psycopg_pool import PoolClosed, PoolTimeout
    except ImportError:
        return ()
    return (psycopg.OperationalError, PoolTimeout, PoolClosed)


def invalid_value_errors() -> tuple[type[Exception], ...]:
    """Exceptions that mean "the database cannot hold a value the request carried" (a NUL in a text, a number out
    of range): a bad request, answered 422. The API bounds what it can at the edge; this is the net under it."""
    errors: list[type[Exception]] = [OverflowError]  # sqlite3: an integer past 64 bits
    try:
        import psycopg
    except ImportError:
        return tuple(errors)
    return (*errors, psycopg.DataError)
