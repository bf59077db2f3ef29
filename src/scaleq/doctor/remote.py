"""What ``scaleq doctor`` runs from anywhere: :func:`run_checks`.

The server answers (``/healthz``) and runs the same version, the token is accepted (``/api/v1/whoami``), the clocks
agree, the server's own checks (:mod:`scaleq.server.checks`, read from ``/api/v1/health``), and — given a grid file —
each group's signal, its Prometheus and its provider, read from where the controller reads them. An external signal
also gets its scrape targets' ``up`` and a comparison with the server's own count
(:mod:`scaleq.scaling.signal_checks`, the same judges the controller uses).

It never raises (see :mod:`scaleq.doctor.checks`). When the server does not answer, the checks that need it are
reported as *not checked* with the reason, and the ones that do not (external signals, Prometheus, providers) still
run. Side effects: none anyone can see. Providers are only asked for their health — never ``list``, which keeps
house; no token is made.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx

from scaleq import __version__
from scaleq.client import ApiError, Unreachable, format_detail
from scaleq.doctor.checks import FIX_STORE_DOWN, Check, error_text, group_hop, not_checked, secs

if TYPE_CHECKING:
    from scaleq.client import Client
    from scaleq.grid import Grid, Group
    from scaleq.providers.registry import ProviderContext

#: Clocks further apart than this are out of step.
CLOCK_SKEW_MAX = 2.0

FIX_SERVER = (
    "start the server ('scaleq up'), or point --server / SCALEQ_SERVER (or --data-dir) at the running one; "
    "check the URL's host and port and any firewall between here and there"
)
FIX_TOKEN = (
    "pass a valid token with --token or SCALEQ_TOKEN (the data dir of 'scaleq up' holds admin.token); an admin "
    "makes others with 'scaleq tokens create ROLE'"
)
FIX_CLOCK = (
    "run time sync (chrony, systemd-timesyncd or ntpd) on both machines: leases, heartbeats and group status are "
    "timed on the server's clock, and controllers and workers elsewhere compare theirs with it"
)
FIX_VERSION = "run the same scaleq version here and on the server (pip install 'scaleq=={version}')"
PROVIDER_FIX = {
    "docker": (
        "start the Docker Engine, or set DOCKER_HOST to a running one in the environment of the controller "
        "('scaleq up' / 'scaleq autoscale') and of doctor"
    ),
    "local": "the local provider runs 'scaleq worker' with this Python: reinstall scaleq in it",
    "kubernetes": (
        "set the group's kubeconfig/context, or $KUBECONFIG, or run in-cluster with the Role in docs/providers.md"
    ),
    "gcp": "set up application default credentials (gcloud auth application-default login, or a service account)",
    "fly": "set FLY_API_TOKEN (fly tokens create deploy) and create the app (fly apps create)",
}
PROVIDER_FIX_DEFAULT = "check the provider's API endpoint and credentials in the environment of the controller"


def _err(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        return f"{format_detail(exc.detail)} (HTTP {exc.status})"
    return error_text(exc)


async def _guard(hop: str, name: str, fix: str, fn: Callable[[], Awaitable[Check]]) -> Check:
    try:
        return await fn()
    except Exception as exc:
        return Check(hop, name, False, f"the check itself failed: {_err(exc)}", fix)


@dataclass
class _Server:
    checks: list[Check]
    blocked: str | None  # why the checks that need the server cannot run, or None


SERVER_CHECKS = ("reachable", "version", "token", "clock")


async def _server_checks(client: Client | None, clock: Callable[[], float], unconfigured: str) -> _Server:
    """reachable, version, token, clock; those that cannot run once one fails are reported as not checked."""
    server = await _server_hops(client, clock, unconfigured)
    if server.blocked:
        done = {c.name for c in server.checks}
        server.checks += [not_checked("server", n, server.blocked) for n in SERVER_CHECKS if n not in done]
    return server


async def _server_hops(client: Client | None, clock: Callable[[], float], unconfigured: str) -> _Server:
    if client is None:
        detail = unconfigured or "no server given"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "no server to ask")
    checks: list[Check] = []
    started = time.perf_counter()
    try:
        r = await client.request("GET", f"{client.server}/healthz", timeout=10)
        body = r.json()
        version = body["version"]
    except Unreachable as exc:
        if isinstance(exc.__cause__, httpx.TransportError):
            return _Server([Check("server", "reachable", False, str(exc), FIX_SERVER)], "server unreachable")
        detail = f"{exc}; the store behind it may be down"
        return _Server(
            [Check("server", "reachable", False, detail, FIX_STORE_DOWN + "; else see the server log")],
            "server unavailable",
        )
    except ApiError as exc:
        if exc.status >= 500:
            detail = f"the server at {client.server} fails its health check: {_err(exc)}"
            return _Server([Check("server", "reachable", False, detail, FIX_STORE_DOWN)], "server unavailable")
        detail = f"something answers at {client.server}, but not a scaleq server: /healthz gave {_err(exc)}"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "not a scaleq server")
    except (ValueError, KeyError, TypeError):
        detail = f"something answers at {client.server}, but not a scaleq server: /healthz is not scaleq's"
        return _Server([Check("server", "reachable", False, detail, FIX_SERVER)], "not a scaleq server")
    took = (time.perf_counter() - started) * 1000
    checks.append(Check("server", "reachable", True, f"scaleq {version} at {client.server} ({took:.0f} ms)"))
    if version == __version__:
        checks.append(Check("server", "version", True, f"server and this client run scaleq {version}"))
    else:
        checks.append(
            Check(
                "server",
                "version",
                False,
                f"the server runs scaleq {version}, this client {__version__}",
                FIX_VERSION.format(version=version),
            )
        )

    t0 = clock()
    try:
        who = await client.request("GET", "/whoami", timeout=10)
        t1 = clock()
        body = who.json()
        role, server_time = str(body["role"]), float(body["server_time"])
    except ApiError as exc:
        if exc.status in (401, 403):
            checks.append(Check("server", "token", False, f"the server refused the token: {_err(exc)}", FIX_TOKEN))
            return _Server(checks, "token refused")
        checks.append(
            Check("server", "token", False, f"/api/v1/whoami failed: {_err(exc)}", FIX_VERSION.format(version=version))
        )
        return _Server(checks, "token not checked")
    except Unreachable as exc:
        checks.append(Check("server", "token", False, str(exc), FIX_SERVER))
        return _Server(checks, "server unreachable")
    checks.append(Check("server", "token", True, f"accepted: role {role}"))
    checks.append(_clock(server_time, t0, t1))
    return _Server(checks, None)


def _clock(server_time: float, t0: float, t1: float) -> Check:
    """The server's clock against ours, allowing for the round trip: it read its clock somewhere in [t0, t1]."""
    rtt = max(0.0, t1 - t0)
    trip = f"round trip {rtt * 1000:.0f} ms"
    if t0 <= server_time <= t1:
        return Check("server", "clock", True, f"in step: the server's time fell within the {trip}")
    skew, way = (server_time - t1, "ahead of") if server_time > t1 else (t0 - server_time, "behind")
    detail = f"the server's clock is {secs(skew)} {way} this machine's ({trip})"
    if skew > CLOCK_SKEW_MAX:
        return Check("server", "clock", False, f"{detail}: more than {secs(CLOCK_SKEW_MAX)} apart", FIX_CLOCK)
    return Check("server", "clock", True, f"{detail}: within {secs(CLOCK_SKEW_MAX)}")


async def _remote_health(client: Client, groups: Sequence[str]) -> list[Check]:
    params = [("group", g) for g in groups]
    try:
        r = await client.request("GET", "/health", params=params, timeout=30)
        return [Check.from_dict(c) for c in r.json()["checks"]]
    except Exception as exc:
        return [Check("server", "health", False, f"GET /api/v1/health failed: {_err(exc)}", FIX_STORE_DOWN)]


def _blocked_remote(reason: str, groups: Sequence[str]) -> list[Check]:
    checks = [not_checked("store", "writable", reason), not_checked("server", "lease sweeper", reason)]
    if not groups:
        checks += [
            not_checked("all queues", "workers heartbeating", reason),
            not_checked("all queues", "leases renewing", reason),
        ]
    for g in groups:
        hop = group_hop(g)
        checks += [
            not_checked(hop, "workers heartbeating", reason),
            not_checked(hop, "leases renewing", reason),
            not_checked(hop, "controller", reason),
        ]
    return checks


async def _signal(client: Client | None, g: Group, index: int, blocked: str | None) -> list[Check]:
    """signal; for an external one also signal agrees (with the server's count) and, for promql, scrape targets."""
    from scaleq.scaling.policy import Demand
    from scaleq.scaling.signal_checks import agreement_check, reading_check, signal_fix, targets_check
    from scaleq.scaling.signals import SignalError, read_external

    hop, spec = group_hop(g.name), g.signal
    own: Demand | None = None
    own_error = blocked or ("no server to ask" if client is None else None)
    if client is not None and not blocked:
        try:
            d = await client.demand(g.queue, g.capabilities().model_dump(mode="json"))
            own = Demand(d["at"], d["queued"], d["running"])
        except (ApiError, Unreachable) as exc:
            own_error = f"the server's demand for queue {g.queue} failed: {_err(exc)}"
    if spec.kind == "server":
        if own is None:
            if blocked or client is None:
                return [not_checked(hop, "signal", own_error or "no server")]
            return [Check(hop, "signal", False, own_error or "", FIX_SERVER)]
        return [
            Check(
                hop,
                "signal",
                True,
                f"the server counts {own.queued} queued and {own.running} running job(s) this group can run "
                f"on queue {g.queue}",
            )
        ]
    checks = []
    reading = None
    try:
        reading = await read_external(spec)
        checks.append(reading_check(g, reading, None, "", fallback=False))
    except SignalError as exc:
        checks.append(reading_check(g, None, str(exc), signal_fix(g, index), fallback=False))
    if spec.kind == "promql":
        checks.append(await targets_check(g))
    if reading is None:
        pass  # nothing to compare: the signal check says why
    elif own is None:
        checks.append(not_checked(hop, "signal agrees", own_error or "no server"))
    else:
        checks.append(agreement_check(g, reading, own))
    return checks


async def _prometheus(g: Group) -> Check:
    hop, spec = group_hop(g.name), g.signal
    url = (spec.url or "").rstrip("/") + "/-/ready"
    headers = {"Authorization": f"Bearer {spec.bearer_token}"} if spec.bearer_token else {}
    try:
        async with httpx.AsyncClient(timeout=spec.timeout) as http:
            r = await http.get(url, headers=headers)
    except httpx.HTTPError as exc:
        return Check(
            hop,
            "prometheus",
            False,
            f"Prometheus at {spec.url} does not answer: {_err(exc)}",
            f"start Prometheus or fix the signal's url ({spec.url}); it must be reachable from the controller",
        )
    if r.status_code == 404:
        return Check(
            hop,
            "prometheus",
            False,
            f"{spec.url} is not a Prometheus server: {url} answered 404",
            "a promql signal's url is the Prometheus base URL (e.g. http://prometheus:9090), not an API path",
        )
    if r.status_code != 200:
        return Check(
            hop,
            "prometheus",
            False,
            f"Prometheus at {spec.url} is not ready: {url} answered {r.status_code} {r.text[:200].strip()}",
            "wait for Prometheus to finish starting (replaying its WAL) or look at its log",
        )
    return Check(hop, "prometheus", True, f"Prometheus at {spec.url} is ready")


async def _provider(g: Group, ctx: ProviderContext | None) -> Check:
    from scaleq.providers.registry import make_provider

    hop = group_hop(g.name)
    fix = PROVIDER_FIX.get(g.provider, PROVIDER_FIX_DEFAULT)
    if ctx is None:
        return not_checked(hop, "provider", "no provider context (doctor needs --grid)")
    provider = None
    try:
        provider = make_provider(g, ctx)
        health = await provider.health()
    except Exception as exc:
        return Check(hop, "provider", False, f"{g.provider}: {_err(exc)}", fix)
    finally:
        if provider is not None:
            try:
                await provider.close()
            except Exception:  # closing a client must not turn a verdict into an error
                pass
    if not health.ok:
        return Check(hop, "provider", False, f"{g.provider}: {health.message}", fix)
    return Check(hop, "provider", True, f"{g.provider}: {health.message}")


async def _group_checks(
    client: Client | None, g: Group, index: int, ctx: ProviderContext | None, blocked: str | None
) -> list[Check]:
    hop = group_hop(g.name)

    async def signal() -> list[Check]:
        try:
            return await _signal(client, g, index, blocked)
        except Exception as exc:
            return [Check(hop, "signal", False, f"the check itself failed: {_err(exc)}", "see the signal section")]

    jobs = [signal()]
    if g.signal.kind == "promql":
        jobs.append(_listed(_guard(hop, "prometheus", "check the signal's url", lambda: _prometheus(g))))
    jobs.append(_listed(_guard(hop, "provider", PROVIDER_FIX_DEFAULT, lambda: _provider(g, ctx))))
    found = await asyncio.gather(*jobs)
    # signal, prometheus, scrape targets, signal agrees, provider: the order of the chain
    ordered = [*found[0][:1], *(c for part in found[1:-1] for c in part), *found[0][1:], *found[-1]]
    return ordered


async def _listed(check: Awaitable[Check]) -> list[Check]:
    return [await check]


def _theirs(own: list[Check], remote: list[Check]) -> list[Check]:
    """The server's checks of a group beside doctor's own: the controller's signal checks repeat doctor's (same
    names) and are left out when they agree; when they differ (the controller reads from elsewhere) both are shown."""
    mine = {c.name: c for c in own}
    out = []
    for c in remote:
        twin = mine.get(c.name)
        if twin is None:
            out.append(c)
        elif (twin.ok, twin.checked) != (c.ok, c.checked):
            out.append(dataclasses.replace(c, name=f"{c.name}, as the controller reads it"))
    return out


async def run_checks(
    client: Client | None,
    grid: Grid | None = None,
    provider_ctx: ProviderContext | None = None,
    clock: Callable[[], float] = time.time,
    *,
    unconfigured: str = "",
) -> list[Check]:
    """Every hop, from this machine: server, token, clock, the server-side checks and, with a grid, each group's
    signal, Prometheus and provider. ``client`` is None when no server is configured (``unconfigured`` says why).
    ``clock`` is this machine's clock (injectable to test the skew check). Never raises."""
    try:
        return await _run_checks(client, grid, provider_ctx, clock, unconfigured)
    except Exception as exc:  # a bug in a check must still leave the user a verdict
        return [Check("doctor", "run", False, f"doctor failed: {_err(exc)}", "report this as a scaleq bug")]


async def _run_checks(
    client: Client | None,
    grid: Grid | None,
    provider_ctx: ProviderContext | None,
    clock: Callable[[], float],
    unconfigured: str,
) -> list[Check]:
    server = await _server_checks(client, clock, unconfigured)
    names = [g.name for g in grid.groups] if grid else []
    groups_task = asyncio.gather(
        *(_group_checks(client, g, i, provider_ctx, server.blocked) for i, g in enumerate(grid.groups if grid else []))
    )
    if server.blocked is None and client is not None:
        remote = await _remote_health(client, names)
    else:
        remote = _blocked_remote(server.blocked or "no server", names)
    per_group = await groups_task

    ordered = [*server.checks, *(c for c in remote if not c.hop.startswith(("group ", "queue ", "all ")))]
    for name, own in zip(names, per_group, strict=True):
        hop = group_hop(name)
        ordered += own
        ordered += _theirs(own, [c for c in remote if c.hop == hop])
    ordered += [
        c
        for c in remote
        if c.hop.startswith(("group ", "queue ", "all ")) and c.hop not in {group_hop(n) for n in names}
    ]
    return ordered
