"""The policies the simulator drives: scaleq's own, and models of the autoscalers it is compared with.

Every policy is a :class:`SimPolicy`: the engine wakes it (on every arrival if ``event_driven``, and every
``period`` seconds), gives it the same :class:`~scaleq.scaling.policy.Demand` and
:class:`~scaleq.scaling.policy.WorkerView` list scaleq's controller would see, and applies the :class:`Action`:
start workers (each boots in the simulation's shared ``boot_time``) and stop the named ones. A stopped busy worker
stops claiming, gets ``kill_grace`` seconds to finish its jobs, and what is still running then is killed and
requeued; that work is counted as lost. scaleq's policy only ever stops idle workers (``kill_grace`` is infinite:
its drain lets jobs finish).

Modelling choices common to the peers, chosen to be *favourable* to them, so that the comparison is fair:

* They see the same signal as scaleq: ``queued + running`` jobs (as KEDA's RabbitMQ scaler does by default, unacked
  messages included). A queued-only metric -- what a Redis list length or the original ``queue_length`` gauge gives --
  would make them shrink under running jobs and kill far more work.
* They size with the same formula, ``ceil(jobs / slots)``, clamped to the same min and max.
* They differ in what their documentation says differs: when they look, how they scale up, how long they hold
  capacity, and which instances they remove.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scaleq.grid import PolicySettings
from scaleq.scaling.policy import Demand, PolicyState, WorkerView, decide

__all__ = ["POLICIES", "Action", "KedaLike", "MigLike", "ScaleqPolicy", "SimPolicy", "make_policy"]


@dataclass(frozen=True, slots=True)
class Action:
    desired: int
    start: int  # workers to start now
    stop: tuple[str, ...]  # workers to stop now (scaleq: idle ones, drained; peers: any, killed after kill_grace)
    reason: str


class SimPolicy(Protocol):
    name: str
    event_driven: bool  # woken on every job arrival (scaleq's controller is; the peers poll)
    period: float  # and every `period` seconds
    kill_grace: float  # seconds a stopped busy worker has to finish before its jobs are killed
    floor: int  # workers it keeps when there is no work at all

    def step(self, demand: Demand, workers: Sequence[WorkerView], now: float) -> Action: ...


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


class ScaleqPolicy:
    """scaleq's own policy: :func:`scaleq.scaling.policy.decide`, unchanged, woken on arrivals and on a tick."""

    event_driven = True
    kill_grace = math.inf

    def __init__(self, settings: PolicySettings, tick: float = 1.0, name: str = "scaleq") -> None:
        self.name, self.settings, self.period = name, settings, tick
        self.floor = settings.min_workers
        self.state = PolicyState()

    def step(self, demand: Demand, workers: Sequence[WorkerView], now: float) -> Action:
        d = decide(demand, workers, self.settings, self.state, now)
        self.state = d.state
        return Action(d.desired, d.start, d.drain + d.lapsed, d.reason)  # lapsed: never registered, stopped as live


def _victims(workers: Sequence[WorkerView], count: int, rng: random.Random | None) -> tuple[str, ...]:
    """Instances a ReplicaSet / MIG removes: not-yet-running ones first, then newest (K8s) or any (MIG)."""
    alive = [w for w in workers if w.state != "draining"]
    pending = sorted((w for w in alive if w.state == "starting"), key=lambda w: -w.started_at)
    running = [w for w in alive if w.state != "starting"]
    if rng is None:
        running.sort(key=lambda w: (-w.started_at, w.id))
    else:
        running.sort(key=lambda w: w.id)
        rng.shuffle(running)
    return tuple(w.id for w in (pending + running)[:count])


class KedaLike:
    """KEDA ``ScaledObject`` + Kubernetes HPA, with their documented defaults.

    * KEDA polls the scaler every ``pollingInterval`` = 30 s. At zero replicas the HPA is inactive; KEDA activates
      the workload (0 → 1) on a poll that sees the metric above ``activationThreshold`` = 0, and scales it back to 0
      once the trigger has been inactive for ``cooldownPeriod`` = 300 s.
      -- "ScaledObject specification", https://keda.sh/docs/2.14/reference/scaledobject-spec/ ;
      "Scaling Deployments, StatefulSets & Custom Resources", https://keda.sh/docs/2.14/concepts/scaling-deployments/
    * Between 1 and max the HPA decides, every ``--horizontal-pod-autoscaler-sync-period`` = 15 s, with a fresh
      metric: ``desired = ceil(metric / target)`` for an ``AverageValue`` target (target = slots per worker,
      KEDA's ``queueLength``/``listLength`` per replica), skipped within the 10 % tolerance. Default ``behavior``:
      scale-up without stabilisation, at most max(4 pods, 100 %) per 15 s; scale-down to the highest recommendation
      of the last 300 s (``stabilizationWindowSeconds``), up to 100 % per 15 s.
      -- "Horizontal Pod Autoscaling", https://kubernetes.io/docs/tasks/run-application/horizontal-pod-autoscale/
    * Scale-in removes pods the ReplicaSet picks: pending / not-ready first, then the most recently created -- it
      does not know which pods are busy. A deleted pod gets SIGTERM and ``terminationGracePeriodSeconds`` = 30 s;
      we assume the worker drains on SIGTERM, so a job that ends within 30 s survives, a longer one is killed and
      requeued. -- "ReplicaSet" (scaling a ReplicaSet), https://kubernetes.io/docs/concepts/workloads/controllers/
      replicaset/ ; "Pod Lifecycle" (termination of pods), https://kubernetes.io/docs/concepts/workloads/pods/
      pod-lifecycle/
    """

    event_driven = False

    def __init__(
        self,
        settings: PolicySettings,
        polling_interval: float = 30.0,
        cooldown_period: float = 300.0,
        sync_period: float = 15.0,
        stabilization_window: float = 300.0,
        tolerance: float = 0.1,
        kill_grace: float = 30.0,
        name: str = "keda",
    ) -> None:
        self.name, self.s = name, settings
        self.polling_interval, self.cooldown = polling_interval, cooldown_period
        self.period, self.window, self.tolerance = sync_period, stabilization_window, tolerance
        self.kill_grace, self.floor = kill_grace, settings.min_workers
        self.next_poll = 0.0
        self.last_active = -math.inf
        self.recs: list[tuple[float, int]] = []

    def step(self, demand: Demand, workers: Sequence[WorkerView], now: float) -> Action:
        s = self.s
        alive = [w for w in workers if w.state != "draining"]
        current = len(alive)
        metric = demand.queued + demand.running
        if now >= self.next_poll:  # the KEDA operator's poll: activation and scale to zero
            self.next_poll = now + self.polling_interval
            if metric > 0:
                self.last_active = now
            if current == 0 and metric > 0:
                return Action(1, 1, (), f"KEDA poll: {metric} jobs, activating 0 → 1")
            if s.min_workers == 0 and current > 0 and metric == 0 and now - self.last_active >= self.cooldown:
                self.recs.clear()
                ids = _victims(workers, current, None)
                return Action(0, 0, ids, f"KEDA poll: inactive for {self.cooldown:.0f} s, scaling to 0")
        if current == 0:
            return Action(0, 0, (), "HPA inactive at 0 replicas")
        hpa_min = max(1, s.min_workers)
        raw = _ceil_div(metric, s.slots)
        if abs(metric / (current * s.slots) - 1) <= self.tolerance:
            raw = current
        raw = min(max(raw, hpa_min), s.max_workers)
        self.recs = [(t, r) for t, r in self.recs if t > now - self.window]
        self.recs.append((now, raw))
        if raw > current:
            desired = min(raw, max(current + 4, 2 * current))
        else:
            desired = min(current, max(r for _, r in self.recs))
        if desired > current:
            return Action(desired, desired - current, (), f"HPA: {metric} jobs → {raw}, scaling up to {desired}")
        if desired < current:
            ids = _victims(workers, current - desired, None)
            return Action(desired, 0, ids, f"HPA: peak of last {self.window:.0f} s is {desired}, scaling down")
        return Action(current, 0, (), "HPA: no change")


class MigLike:
    """A GCP managed instance group autoscaled on a Cloud Monitoring metric (the system scaleq descends from).

    * The metric is ``queue_length`` and each VM is assigned ``slots`` jobs (``singleInstanceAssignment``):
      ``desired = ceil(queue_length / slots)``. The autoscaler acts on Cloud Monitoring data, which custom metrics
      write at most once a minute per series and which the autoscaler sees with a delay; we model a decision every
      ``period`` = 60 s on the sample taken one period earlier (``metric_delay``).
      -- "Scaling based on Cloud Monitoring metrics",
      https://cloud.google.com/compute/docs/autoscaler/scaling-cloud-monitoring-metrics
    * Scale-out is immediate; for scale-in the recommended size is the peak over the last 10 minutes, the
      *stabilisation period*. -- "Understanding autoscaler decisions",
      https://cloud.google.com/compute/docs/autoscaler/understanding-autoscaler-decisions
    * A new VM's metric is ignored during the *initialization period* (default 60 s, counted from its creation,
      on top of which it needs ``boot_time`` to report at all). -- "Autoscaling groups of instances",
      https://cloud.google.com/compute/docs/autoscaler
    * Scale-in deletes instances the MIG picks, not knowing which are busy: booting ones first, then any (here a
      seeded random choice). The original workers did not drain, so a deleted VM's job is lost (``kill_grace`` 0;
      GCE's shutdown scripts are best-effort).

    Two variants of where ``queue_length`` comes from:

    * ``per_group=True`` ("mig"): a per-group metric exported by something other than the workers (as Pub/Sub's
      ``num_undelivered_messages`` is); the group can scale to and from zero.
    * ``per_group=False`` ("mig-worker"): the original set-up, each worker exporting the gauge. The docs say a MIG
      scaled on per-instance metrics cannot go below 1 VM, "because the autoscaler requires metrics about at least
      one running VM" -- the weakness scaleq removes. We keep one VM at all times, and there is no data until a VM
      is past its initialization period. (We read the replicas' values as one group total; per-instance
      utilisation targets would multiply it by the group size and overshoot.)
    """

    event_driven = False

    def __init__(
        self,
        settings: PolicySettings,
        per_group: bool = True,
        period: float = 60.0,
        metric_delay: int = 1,
        stabilization: float = 600.0,
        initialization_period: float = 60.0,
        kill_grace: float = 0.0,
        seed: int = 0,
        name: str | None = None,
    ) -> None:
        self.s, self.per_group, self.period, self.delay = settings, per_group, period, metric_delay
        self.stabilization = max(stabilization, initialization_period)
        self.init_period, self.kill_grace = initialization_period, kill_grace
        self.name = name or ("mig" if per_group else "mig-worker")
        self.floor = settings.min_workers if per_group else max(1, settings.min_workers)
        self.rng = random.Random(seed)
        self.samples: list[int | None] = []
        self.recs: list[tuple[float, int]] = []

    def step(self, demand: Demand, workers: Sequence[WorkerView], now: float) -> Action:
        s = self.s
        alive = [w for w in workers if w.state != "draining"]
        current = len(alive)
        reporting = self.per_group or any(
            w.state != "starting" and now - w.started_at >= self.init_period for w in alive
        )
        self.samples.append(demand.queued + demand.running if reporting else None)
        sample = self.samples[-1 - self.delay] if len(self.samples) > self.delay else None
        del self.samples[: -1 - self.delay]
        if sample is None:
            if current < self.floor:
                return Action(self.floor, self.floor - current, (), f"no metric yet; minimum size {self.floor}")
            return Action(current, 0, (), "no metric data (no VM past its initialization period); no change")
        raw = min(max(_ceil_div(sample, s.slots), self.floor), s.max_workers)
        self.recs = [(t, r) for t, r in self.recs if t > now - self.stabilization]
        self.recs.append((now, raw))
        desired = raw if raw > current else min(current, max(r for _, r in self.recs))
        if desired > current:
            return Action(desired, desired - current, (), f"queue_length {sample} → {raw}, scaling out")
        if desired < current:
            ids = _victims(workers, current - desired, self.rng)
            return Action(desired, 0, ids, f"peak of last {self.stabilization:.0f} s is {desired}, scaling in")
        return Action(current, 0, (), f"queue_length {sample}; no change")


POLICIES = ("scaleq", "keda", "mig", "mig-worker")


def make_policy(name: str, settings: PolicySettings, tick: float = 1.0, seed: int = 0) -> SimPolicy:
    """A fresh (stateful) policy by name: one of :data:`POLICIES`."""
    if name == "scaleq":
        return ScaleqPolicy(settings, tick)
    if name == "keda":
        return KedaLike(settings)
    if name == "mig":
        return MigLike(settings, per_group=True, seed=seed)
    if name == "mig-worker":
        return MigLike(settings, per_group=False, seed=seed)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")
