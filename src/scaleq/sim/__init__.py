"""A discrete-event simulator that drives scaleq's real scaling policy (and models of its peers) on job traces.

>>> from scaleq.grid import PolicySettings
>>> from scaleq.sim import default_traces, run_simulation, render_table
>>> results = run_simulation(default_traces(), ["scaleq", "keda", "mig"], PolicySettings(max_workers=20), 30.0)

``plot(results, outdir)`` writes one PNG per trace (needs matplotlib).
"""

from scaleq.sim.engine import Result, percentile, run_simulation, simulate
from scaleq.sim.peers import POLICIES, Action, SimPolicy, make_policy
from scaleq.sim.report import TargetCheck, check_targets, plot, render_table, render_targets
from scaleq.sim.traces import DEFAULT_TRACES, Trace, TraceError, default_traces, load_csv

__all__ = [
    "DEFAULT_TRACES",
    "POLICIES",
    "Action",
    "Result",
    "SimPolicy",
    "TargetCheck",
    "Trace",
    "TraceError",
    "check_targets",
    "default_traces",
    "load_csv",
    "make_policy",
    "percentile",
    "plot",
    "render_table",
    "render_targets",
    "run_simulation",
    "simulate",
]
