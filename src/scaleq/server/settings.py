"""Server settings: lease timing and long-poll limits."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerSettings:
    #: A running job belongs to its worker this long after the worker's last heartbeat.
    lease_seconds: float = 15.0
    #: Most heartbeats a second the grid asks its busy workers for: past it they beat less often, down to three
    #: beats a lease (:mod:`scaleq.server.cadence`).
    heartbeat_budget: float = 250.0
    #: Longest a claim, a log follow or a job wait is held open before it answers empty.
    long_poll_max: float = 20.0
    #: How often expired leases are swept back into their queues.
    sweep_interval: float = 1.0
    #: A worker silent this long is marked gone (its jobs come back through lease expiry anyway).
    worker_gone_after: float = 45.0
    #: Gone workers are forgotten after this long.
    worker_forget_after: float = 3600.0
    #: Largest submit body (inputs travel inside it), in bytes.
    max_submit_bytes: int = 64 * 1024 * 1024
    #: Largest outputs of one attempt, in bytes stored (an archive is counted as it is expanded, not as sent).
    max_output_bytes: int = 256 * 1024 * 1024
    #: Most entries (files, directories, links) in one attempt's outputs archive.
    max_output_files: int = 100_000
    #: Largest log of one attempt, in bytes: past it the head is kept, a note marks the cut, the rest is counted.
    max_log_bytes: int = 16 * 1024 * 1024
    #: Where uploads are spooled while they are checked (None: the system's temporary directory).
    spool_dir: str | None = None
    #: Answer workers' claims and heartbeats past the framework's middleware (:mod:`scaleq.server.fastlane`);
    #: off only to compare the two ways.
    fast_lane: bool = True

    @property
    def keep_alive_seconds(self) -> int:
        """How long an idle connection is kept open: past the clients' own keep-alive (:data:`scaleq.client.KEEP_ALIVE`,
        15 s), so that a client drops an idle connection before the server closes it and the server never closes one
        just as a client sends on it (uvicorn's default of 5 s met the 5 s beat of a large fleet in a race: resets)."""
        return int(max(20.0, self.lease_seconds + 5))

    @property
    def heartbeat_seconds(self) -> float:
        # often enough that a cancel reaches a quiet job within ~2 s, and a lease survives two missed beats
        return min(max(self.lease_seconds / 3, 0.2), 2.0)
