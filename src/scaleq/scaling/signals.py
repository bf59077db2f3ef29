"""Signals: what the controller reads as a group's demand.

- ``server`` (default): the queue server's own counts of the jobs the group can run — queued and running, matched
  on runtime, resources and tags. One source of truth, available at zero workers.
- ``prometheus_text``: a metric (e.g. the original ``queue_length`` gauge) read from any Prometheus text endpoint,
  summed over the series whose labels match.
- ``promql``: an instant query against a Prometheus server, summed over the returned series.

**No silent signal.** An external signal that returns no series (the metric is absent, the query's vector is empty)
or NaN raises :class:`SignalError`, like one that does not answer: a worker whose ``/metrics`` fails, or a scrape of a
closed port, makes the series vanish, and summing nothing to 0 would size a group to zero with jobs queued. The
controller then sizes the group on the server's own count and says so. ``empty = "zero"`` in the signal's section
says explicitly that no series means no demand.

**What the value counts** (``counts``): by default the queued jobs, as ``queue_length`` does (it is "jobs waiting,
not running"); the controller adds the server's count of running jobs, so a busy group is not sized as if it were
idle. ``counts = "queued_and_running"`` reads the value as the whole demand. :func:`combine` does that arithmetic.

:func:`scrape_targets` asks Prometheus which scrape targets a PromQL signal depends on (the ``job``/``instance``
matchers of its query) and how they are doing, for doctor and the controller's signal checks
(:mod:`scaleq.scaling.signal_checks`).
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from scaleq.grid import SignalSpec
from scaleq.scaling.policy import Demand


class SignalError(Exception):
    """The signal could not be read; the message names the endpoint and the problem."""


def describe(spec: SignalSpec) -> str:
    """The signal in words, for event reasons."""
    if spec.kind == "prometheus_text":
        return f"{spec.metric}{_fmt(spec.labels)} at {spec.url}"
    if spec.kind == "promql":
        return f"PromQL {spec.query!r} at {spec.url}"
    return "the server's queue counts"


async def read_external(spec: SignalSpec, client: httpx.AsyncClient | None = None) -> Demand:
    """Read a prometheus_text or promql signal as Demand(queued=value, running=0)."""
    own = client is None
    client = client or httpx.AsyncClient()
    headers = {"Authorization": f"Bearer {spec.bearer_token}"} if spec.bearer_token else {}
    try:
        if spec.kind == "prometheus_text":
            value = await _text(client, spec, headers)
        elif spec.kind == "promql":
            value = await _promql(client, spec, headers)
        else:
            raise SignalError("the server signal is read from the queue server, not here")
    except httpx.HTTPError as exc:
        raise SignalError(f"{spec.kind} signal at {spec.url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            await client.aclose()
    what = spec.query if spec.kind == "promql" else f"{spec.metric}{_fmt(spec.labels)}"
    if value is None or math.isnan(value):
        if spec.empty != "zero":
            found = "no series" if value is None else "NaN"
            raise SignalError(
                f"{spec.kind} signal at {spec.url}: {what} returned {found}, not a number of jobs (is the exporter "
                f'down or not scraped?); if no series means no demand, say so with empty = "zero"'
            )
        value = 0.0
    if math.isinf(value) and value > 0:  # e.g. a division by zero in the query: not a number of jobs
        raise SignalError(f"{spec.kind} signal at {spec.url}: {what} is +Inf, not a number of jobs")
    return Demand(time.time(), math.ceil(max(value, 0.0)), 0)


def combine(spec: SignalSpec, reading: Demand, own: Demand) -> Demand:
    """The group's demand from an external ``reading`` and the server's ``own`` count (see ``counts``).

    ``queued``: the reading is the queued jobs and the server's running jobs are added. ``queued_and_running``: the
    reading is the whole demand; the server's running count (up to the reading) is shown as running, the rest as
    queued, so the policy sizes by the reading alone.
    """
    if spec.counts == "queued":
        return Demand(reading.at, reading.queued, own.running)
    running = min(own.running, reading.queued)
    return Demand(reading.at, reading.queued - running, running)


async def _text(client: httpx.AsyncClient, spec: SignalSpec, headers: dict[str, str]) -> float | None:
    r = await client.get(spec.url or "", headers=headers, timeout=spec.timeout)
    r.raise_for_status()
    total, seen = 0.0, False
    try:
        for family in text_string_to_metric_families(r.text):
            for sample in family.samples:
                if sample.name == spec.metric and all(sample.labels.get(k) == v for k, v in spec.labels.items()):
                    total += sample.value
                    seen = True
    except ValueError as exc:  # the parser's only complaint: e.g. an HTML page or JSON where metrics were expected
        raise SignalError(f"{spec.url} does not serve the Prometheus text format: {exc}") from exc
    if not seen:
        if spec.empty == "zero":
            return None
        raise SignalError(f"{spec.url} has no series {spec.metric}{_fmt(spec.labels)}")
    return total


async def _promql(client: httpx.AsyncClient, spec: SignalSpec, headers: dict[str, str]) -> float | None:
    r = await client.get(
        (spec.url or "").rstrip("/") + "/api/v1/query",
        params={"query": spec.query},
        headers=headers,
        timeout=spec.timeout,
    )
    try:
        body = r.json() if r.headers.get("content-type", "").startswith("application/json") else {}
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    if r.status_code != 200 or body.get("status") != "success":
        raise SignalError(f"Prometheus at {spec.url} refused {spec.query!r}: {body.get('error', r.text[:200])}")
    data = body["data"]
    if data["resultType"] == "scalar":
        return float(data["result"][1])
    if data["resultType"] != "vector":
        raise SignalError(f"{spec.query!r} returns a {data['resultType']}; use an instant vector or scalar")
    if not data["result"]:
        return None  # an empty vector: the series are missing, which is not the same as 0
    return sum(float(s["value"][1]) for s in data["result"])


def _fmt(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""


@dataclass(frozen=True, slots=True)
class Target:
    """One of Prometheus' active scrape targets."""

    job: str
    instance: str
    url: str
    health: str  # up | down | unknown
    last_error: str


#: ``job="…"`` / ``instance="…"`` equality matchers in a query: the targets whose series it reads.
_MATCHER = re.compile(r'\b(job|instance)\s*=\s*"((?:[^"\\]|\\.)*)"')


def target_matchers(query: str) -> dict[str, set[str]]:
    """The ``job`` and ``instance`` values a PromQL query names (empty: it names none, so any target may feed it)."""
    found: dict[str, set[str]] = {}
    for label, value in _MATCHER.findall(query):
        found.setdefault(label, set()).add(value)
    return found


async def scrape_targets(spec: SignalSpec, client: httpx.AsyncClient | None = None) -> list[Target]:
    """The active scrape targets a PromQL signal depends on, from Prometheus' targets API: those of the ``job`` and
    ``instance`` its query names, or all of them when it names none. Raises :class:`SignalError`."""
    own = client is None
    client = client or httpx.AsyncClient()
    headers = {"Authorization": f"Bearer {spec.bearer_token}"} if spec.bearer_token else {}
    url = (spec.url or "").rstrip("/") + "/api/v1/targets"
    try:
        r = await client.get(url, params={"state": "active"}, headers=headers, timeout=spec.timeout)
        r.raise_for_status()
        active = r.json()["data"]["activeTargets"]
    except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
        raise SignalError(f"Prometheus targets at {url}: {type(exc).__name__}: {exc}") from exc
    finally:
        if own:
            await client.aclose()
    wanted = target_matchers(spec.query or "")
    targets = []
    for t in active:
        labels = t.get("labels") or {}
        job, instance = str(labels.get("job", "")), str(labels.get("instance", ""))
        if ("job" in wanted and job not in wanted["job"]) or (
            "instance" in wanted and instance not in wanted["instance"]
        ):
            continue
        targets.append(
            Target(
                job, instance, str(t.get("scrapeUrl", "")), str(t.get("health", "unknown")), str(t.get("lastError", ""))
            )
        )
    return targets
