"""Signals: what the controller reads as a group's demand.

- ``server`` (default): the queue server's own counts of the jobs the group can run — queued and running, matched
  on runtime, resources and tags. One source of truth, available at zero workers.
- ``prometheus_text``: a metric (e.g. the original ``queue_length`` gauge) read from any Prometheus text endpoint,
  summed over the series whose labels match.
- ``promql``: an instant query against a Prometheus server, summed over the returned series.

An external value is read as the group's whole demand in jobs (queued + running): the policy sizes the group by it
and still never drains a busy worker.
"""

from __future__ import annotations

import math
import time

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
    if math.isinf(value) and value > 0:  # e.g. a division by zero in the query: not a number of jobs
        what = spec.query if spec.kind == "promql" else f"{spec.metric}{_fmt(spec.labels)}"
        raise SignalError(f"{spec.kind} signal at {spec.url}: {what} is +Inf, not a number of jobs")
    if math.isnan(value) or value < 0:
        value = 0.0
    return Demand(time.time(), math.ceil(value), 0)


async def _text(client: httpx.AsyncClient, spec: SignalSpec, headers: dict[str, str]) -> float:
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
        raise SignalError(f"{spec.url} has no series {spec.metric}{_fmt(spec.labels)}")
    return total


async def _promql(client: httpx.AsyncClient, spec: SignalSpec, headers: dict[str, str]) -> float:
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
    return sum(float(s["value"][1]) for s in data["result"])


def _fmt(labels: dict[str, str]) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
