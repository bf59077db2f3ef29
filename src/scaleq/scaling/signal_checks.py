"""A group's external signal, judged: the same checks for ``scaleq doctor`` and for the controller.

For a ``prometheus_text`` or ``promql`` signal there are three hops between the jobs and the number the controller
reads, and each used to fail silently (the seed's third gotcha):

- ``signal``: the value is read at all. An endpoint that does not answer, or a result with no series, is an error
  (:mod:`scaleq.scaling.signals`); the controller then sizes the group on the server's own count, and says so here.
- ``scrape targets`` (promql only): Prometheus scrapes the targets the query depends on — the ``job`` / ``instance``
  its query names — and their ``up`` is 1. A worker's ``/metrics`` answering 500 or a scrape of a closed port shows
  here with Prometheus' own last error and the URL it scraped.
- ``signal agrees``: the value against the server's own count of the group's jobs (queued, plus running when the
  signal counts them). A signal that reads something else (another queue's series, a stale gauge) is named.

Doctor judges one reading on the spot; the controller records its checks with the group's status (so the server's
health checks and the dashboard show them) and only calls a disagreement once it has lasted ``DISAGREE_AFTER``
seconds, as scrapes lag the server by an interval or two.
"""

from __future__ import annotations

from scaleq.doctor.checks import Check, group_hop, secs
from scaleq.grid import Group, SignalSpec
from scaleq.scaling.policy import Demand
from scaleq.scaling.signals import SignalError, describe, scrape_targets, target_matchers

#: The controller names a disagreement between the signal and the server's count once it has lasted this long.
DISAGREE_AFTER = 30.0

FIX_TARGETS = (
    "make the target's /metrics answer (a worker needs --metrics-port; its log says why it fails) and check the "
    "scrape config's address and port; or scale on the server's own count (the default signal), which needs no scrape"
)
FIX_DISAGREE = (
    "the signal counts something other than this group's jobs: check the query's or labels' queue (another queue's "
    "series?), the signal's counts setting (queued, or queued_and_running) and whether the exporter is current; the "
    "server's own count (the default signal) is the source of truth"
)


def signal_fix(g: Group, index: int | None = None) -> str:
    spec = g.signal
    where = f"groups[{index}].signal" if index is not None else f"the signal of group {g.name}"
    fields = "metric, labels" if spec.kind == "prometheus_text" else "query"
    return (
        f"make {spec.url} answer from where the controller runs (is the exporter / Prometheus up, and scraping?) and "
        f'check {where} in the grid file (url, {fields}, bearer_token; empty = "zero" if no series means no demand)'
    )


def reading_check(g: Group, reading: Demand | None, error: str | None, fix: str, *, fallback: bool) -> Check:
    """The ``signal`` check: the reading, or the error — and with ``fallback``, that the server's count was used."""
    hop = group_hop(g.name)
    if error is not None:
        then = "; the controller sizes the group on the server's own count until it answers" if fallback else ""
        return Check(hop, "signal", False, error + then, fix)
    assert reading is not None
    return Check(hop, "signal", True, f"{describe(g.signal)} reads {reading.queued}")


async def targets_check(g: Group) -> Check:
    """The ``scrape targets`` check of a promql signal: ``up`` of the targets its query depends on."""
    hop, spec = group_hop(g.name), g.signal
    try:
        targets = await scrape_targets(spec)
    except SignalError as exc:
        return Check(hop, "scrape targets", False, str(exc), f"make Prometheus at {spec.url} answer (see 'prometheus')")
    scope = _scope(spec)
    if not targets and not target_matchers(spec.query or ""):
        return Check(hop, "scrape targets", True, f"the query names no job or instance, and {spec.url} scrapes none")
    if not targets:
        return Check(
            hop,
            "scrape targets",
            False,
            f"Prometheus at {spec.url} scrapes no target {scope}: the query's series can only be missing",
            "add the exporter (e.g. the workers' /metrics or the server's) to Prometheus' scrape_configs, under the "
            "job the query names",
        )
    down = [t for t in targets if t.health != "up"]
    if down:
        named = "; ".join(
            f"{t.job}/{t.instance} ({t.url}): {t.health}" + (f", {t.last_error}" if t.last_error else "")
            for t in down[:5]
        )
        return Check(
            hop,
            "scrape targets",
            False,
            f"{len(down)} of {len(targets)} target(s) {scope} down (up == 0): {named}",
            FIX_TARGETS,
        )
    return Check(hop, "scrape targets", True, f"{len(targets)} target(s) {scope} up")


def _scope(spec: SignalSpec) -> str:
    wanted = target_matchers(spec.query or "")
    if not wanted:
        return "(the query names no job or instance: all targets)"
    return "of " + ", ".join(f"{k}={'|'.join(sorted(v))}" for k, v in sorted(wanted.items()))


def expected(spec: SignalSpec, own: Demand) -> int:
    """What the signal should read if it counts this group's jobs, by the server's count."""
    return own.queued + (own.running if spec.counts == "queued_and_running" else 0)


def agrees(spec: SignalSpec, reading: Demand, own: Demand) -> bool:
    want = expected(spec, own)
    # the server's count stops at what the group can run at once (scaling.observe.demand_limit): more is as good
    return reading.queued == want or (own.capped and reading.queued >= want)


def agreement_check(
    g: Group, reading: Demand, own: Demand, *, since: float | None = None, now: float = 0.0, tolerate: float = 0.0
) -> Check:
    """The ``signal agrees`` check: the reading against the server's count. ``since``: they have disagreed since
    then; a disagreement younger than ``tolerate`` seconds passes (with the numbers shown)."""
    hop, spec = group_hop(g.name), g.signal
    want = expected(spec, own)
    what = "queued" if spec.counts == "queued" else "queued + running"
    server = f"the server counts {'≥' if own.capped else ''}{want} {what} job(s) of this group on queue {g.queue}"
    if agrees(spec, reading, own):
        return Check(hop, "signal agrees", True, f"{describe(spec)} reads {reading.queued}; {server}")
    lasted = f" for {secs(now - since)}" if since is not None else ""
    if since is not None and now - since < tolerate:
        detail = f"{describe(spec)} reads {reading.queued}; {server}: different{lasted}, named after {secs(tolerate)}"
        return Check(hop, "signal agrees", True, detail)
    return Check(
        hop,
        "signal agrees",
        False,
        f"{describe(spec)} reads {reading.queued}, but {server}{lasted} (a scrape or two behind is normal; "
        "longer is not)",
        FIX_DISAGREE,
    )
