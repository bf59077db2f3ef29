"""Spare capacity for the demand's noise: how many jobs more than now a group may see before a new worker is up.

Pure and clock-injected, like :mod:`scaleq.scaling.policy`, which calls it. The only memory is an
:class:`Activity`, kept in the policy's state:

* **Activity** counts how much the signal ``queued + running`` has moved: every observation adds
  ``|jobs - previous jobs|`` (an arrival is +1, a finished job -1), and the count decays with ``demand_halflife``.
  ``rate = count · ln 2 / demand_halflife`` is then the recent number of changes per second -- arrivals and
  completions together, without needing either separately.
* **Spare.** Arrivals and completions are close to independent events, so over the next ``lookahead`` seconds (about
  a new worker's start-up time) the number of jobs moves by about ``±√(rate · lookahead)`` (a Poisson count's
  standard deviation). The spare is ``headroom`` of those standard deviations, rounded to whole jobs: a group whose
  demand hardly moves keeps none (a job every 15 min: rate · 30 s ≈ 0.07, √ ≈ 0.26 → 0); a busy one keeps a few
  (12 jobs running a minute each: ≈ 0.4 changes/s, √(0.4 · 30) ≈ 3.5 → 4 with the default headroom 1.2).
  The policy adds no spare while nothing is queued or running, so a group still scales to zero on its idle timeout.

The spare is a trade measured in ``docs/benchmarks.md``: a worker started before the job that needs it exists costs
idle time; a job that waits for a boot costs latency. Sized from the noise, the spare is large only where that noise
makes waits likely, and fades with the activity when the demand calms down (it halves every ``demand_halflife``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Activity", "observe", "rate", "spare_jobs"]


@dataclass(frozen=True, slots=True)
class Activity:
    at: float  # when last observed
    jobs: int  # queued + running then
    count: float  # decayed number of changes of ``jobs`` seen so far


def observe(previous: Activity | None, jobs: int, now: float, halflife: float) -> Activity:
    """Fold one observation of ``queued + running`` into the activity count (the first one only sets the level)."""
    if previous is None or halflife <= 0:
        return Activity(now, jobs, 0.0)
    decay = 0.5 ** (max(0.0, now - previous.at) / halflife)
    return Activity(now, jobs, previous.count * decay + abs(jobs - previous.jobs))


def rate(activity: Activity | None, halflife: float) -> float:
    """Recent changes of the demand per second."""
    if activity is None or halflife <= 0:
        return 0.0
    return activity.count * math.log(2) / halflife


def spare_jobs(activity: Activity | None, headroom: float, lookahead: float, halflife: float) -> int:
    """Jobs to provision for beyond ``queued + running``: ``headroom`` std. deviations of the move in ``lookahead``."""
    if headroom <= 0 or lookahead <= 0:
        return 0
    # capped: a group is clamped at max_workers anyway, and a huge product must not overflow floor()
    return math.floor(min(headroom * math.sqrt(rate(activity, halflife) * lookahead), 1e9) + 0.5)
