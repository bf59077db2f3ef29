"""The grid file (TOML): the server, the store and the worker groups, validated with clear errors.

```toml
[server]
host = "127.0.0.1"
port = 8765

[store]
url = "sqlite:///.scaleq/scaleq.db"

[[groups]]
name = "cpu"
queue = "default"
provider = "local"
min_workers = 0
max_workers = 3
slots = 1
runtimes = ["process"]
idle_timeout = 30
```
Errors name the file, the field (``groups[0].max_workers``) and the problem, with the line where TOML gives one.

The file's schema lives here whole, the policy settings and the signal section included, and none of the code that
acts on them: the scaling code imports this module, never the other way round, so reading a grid file loads no
HTTP or metrics library.
"""

from __future__ import annotations

import hashlib
import math
import os
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from scaleq.jobs import Capabilities, Requirements, RuntimeKind, validate_queue_name

ProviderName = Literal["local", "docker", "kubernetes", "gcp", "fly"]


@dataclass(frozen=True, slots=True)
class PolicySettings:
    """A group's scaling policy settings (see :mod:`scaleq.scaling.policy`): :meth:`Group.policy` builds them from
    the grid file, and the simulator and tests build them directly. Their defaults are the grid file's."""

    min_workers: int = 0
    max_workers: int = 1
    slots: int = 1  # jobs per worker
    idle_timeout: float = 20.0  # seconds a worker must have been idle before it may be drained
    scale_down_window: float = 20.0  # desired never drops below the highest need seen in this window
    max_step_up: int | None = None  # at most this many new workers per step_period; None = up to max at once
    step_period: float = 10.0
    startup_grace: float = 300.0  # a started, unregistered worker counts as capacity for this long
    headroom: float = 1.2  # spare jobs provisioned for, in standard deviations of the demand's move; 0 = no spare
    lookahead: float = 30.0  # seconds the spare covers: about a new worker's start-up time (boot + register)
    demand_halflife: float = 180.0  # half-life of the demand-activity estimate the spare is sized from

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the field for settings that make no sense."""
        for name in ("min_workers", "max_workers", "slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
        if self.min_workers < 0:
            raise ValueError(f"min_workers must be >= 0, got {self.min_workers}")
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")
        if self.slots < 1:
            raise ValueError(f"slots must be >= 1, got {self.slots}")
        for name in ("headroom", "lookahead"):  # finite: they multiply into a number of workers
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < math.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("idle_timeout", "scale_down_window", "step_period", "startup_grace", "lookahead"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
                raise ValueError(f"{name} must be a number of seconds, got {value!r}")
            if value < 0:
                raise ValueError(f"{name} must be >= 0 seconds, got {value}")
        for name in ("step_period", "demand_halflife"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {value!r}")
        if self.max_step_up is not None and (
            isinstance(self.max_step_up, bool) or not isinstance(self.max_step_up, int) or self.max_step_up < 1
        ):
            raise ValueError(f"max_step_up must be None or a whole number >= 1, got {self.max_step_up!r}")


_POLICY = PolicySettings()

#: What a running worker carries -- its image, command line and flags (``providers.base.worker_args``: queue, slots,
#: group, resources, runtimes, tags, host network), environment, and the provider's machine settings. A change to any
#: of these makes a new :meth:`Group.version`, and ``apply`` replaces the group's workers.
WORKER_FIELDS = frozenset(
    {"name", "queue", "provider", "slots", "runtimes", "tags", "resources", "image", "allow_host_network", "env"}
    | {"gcp", "kubernetes", "fly"}
)
#: What only the controller reads (bounds, policy settings that put no flag on the worker, the signal): changing
#: these never replaces a worker. Every field of :class:`Group` is in exactly one of the two sets (a test says so).
SCALING_FIELDS = frozenset(
    {"min_workers", "max_workers", "idle_timeout", "scale_down_window", "max_step_up", "step_period"}
    | {"startup_grace", "headroom", "lookahead", "demand_halflife", "signal", "price_per_hour"}
)


class GridFileError(ValueError):
    """A grid file problem; the message names the file, the field and the problem."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ServerSection(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8765, ge=0, le=65535)
    lease_seconds: float = Field(default=15.0, gt=0)
    heartbeat_budget: float = Field(
        default=250.0,
        gt=0,
        description="most heartbeats a second the grid asks its busy workers for; past it they beat less often",
    )
    max_output_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, le=1 << 40, description="largest outputs of one attempt, in bytes stored"
    )
    max_log_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1, le=1 << 40, description="largest log of one attempt; past it, the head is kept"
    )
    public_url: str | None = Field(
        default=None, description="the URL workers on other machines use to reach the server (cloud providers)"
    )


class GcpSettings(_Strict):
    """Where a ``gcp`` group's regional managed instance group lives and what its VMs are."""

    project: str
    region: str
    zones: list[str] = Field(default_factory=list, description="zones to spread over; default: the region's")
    machine_type: str = "e2-standard-2"
    network: str = "default"
    subnetwork: str | None = None
    service_account: str | None = None
    boot_disk_gb: int = Field(default=20, ge=10)
    spot: bool = False
    external_ip: bool | None = Field(
        default=None,
        description="give each VM an external IP; without one the network needs Cloud NAT (or Private Google "
        "Access and images in Artifact Registry) to pull images and reach the server. Default: the gcp provider "
        "gives one (it makes no NAT); scaleq export terraform gives none and creates Cloud NAT",
    )
    api_endpoint: str | None = Field(default=None, description="Compute API endpoint override (tests, proxies)")


class KubernetesSettings(_Strict):
    """Where a ``kubernetes`` group's worker pods run."""

    namespace: str = "scaleq"
    context: str | None = Field(default=None, description="kubeconfig context; default: current or in-cluster")
    kubeconfig: str | None = None
    service_account: str | None = None
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    spot: bool = Field(
        default=False,
        description="the pods run on nodes that may be taken back at short notice (spot or preemptible nodes): "
        "SIGTERM is a preemption notice, and workers hand their jobs back at once (--on-notice handback)",
    )
    node_selector: dict[str, str] = Field(
        default_factory=dict,
        description='the pod\'s nodeSelector, e.g. {"cloud.google.com/gke-spot" = "true"} for GKE spot nodes',
    )


class FlySettings(_Strict):
    """The Fly.io app and machine size of a ``fly`` group."""

    app: str
    region: str = "iad"
    cpu_kind: Literal["shared", "performance"] = "shared"
    cpus: int = Field(default=1, ge=1)
    memory_mb: int = Field(default=1024, ge=256)
    api_url: str = "https://api.machines.dev"


class StoreSection(_Strict):
    url: str | None = Field(default=None, description="sqlite path/URL or postgresql:// URL; default in the data dir")
    durability: Literal["normal", "strict"] = "normal"


class SignalSpec(BaseModel):
    """A group's ``signal`` section: what the controller reads as demand (:mod:`scaleq.scaling.signals` reads it)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["server", "prometheus_text", "promql"] = "server"
    url: str | None = Field(default=None, description="metrics endpoint (prometheus_text) or Prometheus base URL")
    metric: str | None = Field(default=None, description="metric name, for prometheus_text")
    labels: dict[str, str] = Field(default_factory=dict, description="only series with these labels")
    query: str | None = Field(default=None, description="PromQL, for promql")
    bearer_token: str | None = Field(default=None, description="sent as Authorization: Bearer …")
    timeout: float = Field(default=5.0, gt=0)
    empty: Literal["error", "zero"] = Field(
        default="error",
        description="an empty result (no series): an error (the controller falls back to the server's count), or 0",
    )
    counts: Literal["queued", "queued_and_running"] = Field(
        default="queued",
        description="what the value counts: queued jobs (the controller adds the server's running count, as for "
        "queue_length) or queued and running jobs together",
    )

    def model_post_init(self, _: object) -> None:
        need = {"prometheus_text": ("url", "metric"), "promql": ("url", "query")}.get(self.kind, ())
        missing = [f for f in need if not getattr(self, f)]
        if missing:
            raise ValueError(f"a {self.kind} signal needs {' and '.join(missing)}")


class Group(_Strict):
    """A declared set of identical workers on one provider, bound to one queue."""

    name: str = Field(pattern=r"^[a-z0-9]([a-z0-9-]{0,38}[a-z0-9])?$")
    queue: str = "default"
    provider: ProviderName = "local"
    min_workers: int = Field(default=0, ge=0)
    max_workers: int = Field(default=1, ge=0)
    slots: int = Field(default=1, ge=1, le=1024)
    runtimes: list[RuntimeKind] = Field(default_factory=lambda: [RuntimeKind.process])
    # policy settings: the defaults are the policy's own
    idle_timeout: float = Field(default=_POLICY.idle_timeout, ge=0)
    scale_down_window: float = Field(default=_POLICY.scale_down_window, ge=0)
    max_step_up: int | None = Field(default=_POLICY.max_step_up, ge=1)
    step_period: float = Field(default=_POLICY.step_period, gt=0)
    startup_grace: float = Field(default=_POLICY.startup_grace, ge=0)
    headroom: float = Field(
        default=_POLICY.headroom,
        ge=0,
        le=10,
        allow_inf_nan=False,
        description="spare jobs provisioned for, in standard deviations of the demand's move over lookahead",
    )
    lookahead: float = Field(
        default=_POLICY.lookahead,
        ge=0,
        le=3600,
        allow_inf_nan=False,
        description="seconds the spare covers: about a new worker's start-up time",
    )
    demand_halflife: float = Field(default=_POLICY.demand_halflife, gt=0, allow_inf_nan=False)
    tags: list[str] = Field(default_factory=list)
    resources: Requirements = Field(
        default_factory=lambda: Requirements(cpus=float(os.cpu_count() or 1)),
        description="what each worker offers (cpus, memory, gpus)",
    )
    image: str | None = Field(default=None, description="worker image, for container providers")
    allow_host_network: bool = False
    env: dict[str, str] = Field(default_factory=dict, description="extra environment of the worker processes")
    price_per_hour: float | None = Field(
        default=None,
        ge=0,
        le=1e9,
        strict=True,  # a number in the file, not a string that looks like one
        allow_inf_nan=False,
        description="what one worker costs per hour, in your currency: cost shows money beside worker-seconds",
    )
    signal: SignalSpec = Field(default_factory=SignalSpec, description="what the controller reads as demand")
    gcp: GcpSettings | None = None
    kubernetes: KubernetesSettings | None = None
    fly: FlySettings | None = None

    @field_validator("queue")
    @classmethod
    def _queue(cls, v: str) -> str:
        return validate_queue_name(v)

    @model_validator(mode="after")
    def _bounds(self) -> Group:
        if self.max_workers < self.min_workers:
            raise ValueError(f"max_workers ({self.max_workers}) must be >= min_workers ({self.min_workers})")
        if self.provider == "gcp" and self.gcp is None:
            raise ValueError("a gcp group needs a [groups.gcp] table with at least project and region")
        if self.provider == "fly" and self.fly is None:
            raise ValueError("a fly group needs a [groups.fly] table with at least app")
        if self.provider in ("gcp", "kubernetes", "fly") and not self.image:
            raise ValueError(f"a {self.provider} group needs image (the worker image its machines run)")
        return self

    def policy(self) -> PolicySettings:
        return PolicySettings(
            min_workers=self.min_workers,
            max_workers=self.max_workers,
            slots=self.slots,
            idle_timeout=self.idle_timeout,
            scale_down_window=self.scale_down_window,
            max_step_up=self.max_step_up,
            step_period=self.step_period,
            startup_grace=self.startup_grace,
            headroom=self.headroom,
            lookahead=self.lookahead,
            demand_halflife=self.demand_halflife,
        )

    def version(self) -> str:
        """A short hash of what a running worker carries (:data:`WORKER_FIELDS`): workers started with another
        version are out of date. Bounds, policy settings and the signal are read by the controller alone, so
        changing them replaces no worker."""
        return hashlib.sha256(self.model_dump_json(include=set(WORKER_FIELDS)).encode()).hexdigest()[:12]

    def capabilities(self) -> Capabilities:
        return Capabilities(
            runtimes=self.runtimes,
            cpus=self.resources.cpus,
            memory=self.resources.memory,
            gpus=self.resources.gpus,
            tags=self.tags,
            host_network=self.allow_host_network,
        )


class Grid(_Strict):
    name: str = Field(default="scaleq", pattern=r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$")
    server: ServerSection = Field(default_factory=ServerSection)
    store: StoreSection = Field(default_factory=StoreSection)
    groups: list[Group] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Grid:
        names = [g.name for g in self.groups]
        for n in names:
            if names.count(n) > 1:
                raise ValueError(f"groups: two groups are named {n!r}")
        return self


def embedded_default(cores: int | None = None) -> Grid:
    """``scaleq up`` without a grid file: one local group on queue ``default``, 0..cores workers of one slot."""
    n = cores or os.cpu_count() or 1
    runtimes = [RuntimeKind.process]
    return Grid(
        groups=[
            Group(
                name="local",
                queue="default",
                provider="local",
                min_workers=0,
                max_workers=n,
                slots=1,
                runtimes=runtimes,
                idle_timeout=30.0,
                lookahead=1.0,  # a local worker process registers in about half a second
                resources=Requirements(cpus=float(n)),
            )
        ]
    )


def load(path: Path) -> Grid:
    try:
        text = path.read_text()
    except OSError as exc:
        raise GridFileError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise GridFileError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return Grid.model_validate(data)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
            problems.append(f"{path}: {loc or '(root)'}: {e['msg']}")
        raise GridFileError("\n".join(problems)) from exc
