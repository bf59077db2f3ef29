"""plan / apply / destroy: make the providers match the grid file, from recorded state.

``apply`` records what it created in ``<data dir>/state/<grid>.json`` (each group's settings and version);
``destroy`` removes everything recorded — and everything the providers' labels say belongs to those groups — then
the record. ``plan`` compares the grid file with the record and the providers, and shows the decision the policy
would take now for each group, with its reason.

A group that a live controller runs (``scaleq up --grid`` or ``scaleq autoscale``: its status is refreshed by a
controller within the last ``LIVE_AFTER`` seconds) is the controller's: ``plan`` shows it as ``running`` (not
``create``), ``apply`` leaves it alone, and ``destroy`` refuses, saying which controller to stop first — destroying
beside it would only see the controller start the workers again.

A changed group is updated by draining: its out-of-date workers (started with another ``Group.version()``, which
covers only what a running worker carries) take no new jobs, finish what they run and exit, and new workers start
with the new settings (at least ``min_workers`` now, more as the controller sees demand). A change to the bounds,
the policy settings or the signal alone is an update that replaces no worker.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from scaleq.client import ApiError, Client, Unreachable
from scaleq.grid import Grid, Group
from scaleq.providers.base import ProviderWorker
from scaleq.providers.registry import ProviderContext, make_provider
from scaleq.scaling.policy import Demand, PolicyState, decide, worker_views

#: A group status a controller refreshed this recently means a controller runs the group (it refreshes every 5 s).
LIVE_AFTER = 30.0


class Refused(Exception):
    """The operation would fight a running controller; the message says which and what to do."""


@dataclass
class GroupPlan:
    name: str
    provider: str
    action: str  # create | update | remove | none | running (a live controller runs it)
    changes: list[str] = field(default_factory=list)
    workers: int = 0
    out_of_date: int = 0
    desired: int | None = None
    reason: str = ""
    done: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def state_path(data_dir: Path, grid: str) -> Path:
    return data_dir / "state" / f"{grid}.json"


def read_state(data_dir: Path, grid: str) -> dict:
    path = state_path(data_dir, grid)
    return json.loads(path.read_text()) if path.exists() else {"grid": grid, "groups": {}}


def write_state(data_dir: Path, grid: str, state: dict) -> None:
    path = state_path(data_dir, grid)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(path)


def _changes(old: dict, new: dict) -> list[str]:
    return [f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


class Deployer:
    def __init__(self, grid: Grid, data_dir: Path, client: Client, ctx: ProviderContext) -> None:
        self.grid = grid
        self.data_dir = data_dir
        self.client = client
        self.ctx = ctx

    def _groups(self, state: dict) -> list[tuple[Group, str]]:
        declared = {g.name: g for g in self.grid.groups}
        out = [(g, "declared") for g in self.grid.groups]
        for name, rec in state["groups"].items():
            if name not in declared:
                out.append((Group.model_validate(rec["spec"]), "recorded"))
        return out

    async def controlled(self) -> dict[str, str]:
        """Groups a live controller runs, each with how it is known (empty if the server does not answer)."""
        try:
            statuses = await self.client.groups()
        except (ApiError, Unreachable):
            return {}
        now = time.time()
        return {
            g["name"]: f"a controller reported it {now - g['updated_at']:.0f} s ago ('scaleq up --grid' or "
            "'scaleq autoscale')"
            for g in statuses
            if g.get("reporter", "controller") == "controller" and now - g["updated_at"] <= LIVE_AFTER
        }

    async def plan(self) -> list[GroupPlan]:
        state = read_state(self.data_dir, self.grid.name)
        controlled = await self.controlled()
        plans = []
        for group, origin in self._groups(state):
            rec = state["groups"].get(group.name)
            provider = make_provider(group, self.ctx)
            workers = await provider.workers(group)
            p = GroupPlan(group.name, group.provider, "none", workers=len(workers))
            p.out_of_date = sum(1 for w in workers if w.version and w.version != group.version())
            if origin == "recorded":
                p.action, p.reason = "remove", "no longer in the grid file: destroy its workers"
            else:
                if rec is None:
                    p.action = "create"
                elif rec["spec"] != (spec := group.model_dump(mode="json")):
                    # only a new version (what a running worker carries) replaces workers: see out_of_date
                    p.action, p.changes = "update", _changes(rec["spec"], spec)
                p.desired, p.reason = await self._decision(group, workers)
                if group.name in controlled:
                    p.action = "running"
                    p.reason = f"run by a live controller: {controlled[group.name]}; apply leaves it to it. {p.reason}"
            plans.append(p)
        return plans

    async def _decision(self, group: Group, workers: list[ProviderWorker]) -> tuple[int | None, str]:
        try:
            d = await self.client.demand(group.queue, group.capabilities().model_dump(mode="json"))
            registered = [w for w in await self.client.workers() if w.group == group.name]
        except (ApiError, Unreachable) as exc:
            return None, f"server not reachable, no decision: {exc}"
        now = time.time()
        decision = decide(
            Demand(now, d["queued"], d["running"]),
            worker_views(workers, registered),
            group.policy(),
            PolicyState(),
            now,
        )
        return decision.desired, decision.reason

    async def apply(self) -> list[GroupPlan]:
        plans = await self.plan()
        state = read_state(self.data_dir, self.grid.name)
        by_name = {g.name: g for g, _ in self._groups(state)}
        for p in plans:
            group = by_name[p.name]
            provider = make_provider(group, self.ctx)
            if p.action == "running":
                p.done = ["left to the controller that runs it (stop it to apply a change)"]
                continue
            if p.action == "remove":
                p.done = [f"removed worker {w}" for w in await provider.destroy(group)]
                await self._forget_group(group.name)
                state["groups"].pop(group.name, None)
                write_state(self.data_dir, self.grid.name, state)
                continue
            workers = await provider.workers(group)
            stale = [w for w in workers if w.status != "stopping" and w.version and w.version != group.version()]
            for w in stale:
                await self._drain(group, provider, w)
                p.done.append(f"draining out-of-date worker {w.id}")
            current = len(workers) - len(stale)
            if current < group.min_workers:
                started = await provider.start(group, group.min_workers - current)
                p.done += [f"started worker {w}" for w in started]
            state["groups"][group.name] = {
                "provider": group.provider,
                "version": group.version(),
                "spec": group.model_dump(mode="json"),
                "applied_at": time.time(),
            }
            write_state(self.data_dir, self.grid.name, state)
            await self._record_group(group, current, max(current, group.min_workers))
        return plans

    async def destroy(self) -> list[GroupPlan]:
        state = read_state(self.data_dir, self.grid.name)
        controlled = await self.controlled()
        running = [(g.name, controlled[g.name]) for g, _ in self._groups(state) if g.name in controlled]
        if running:
            named = "; ".join(f"group {name}: {how}" for name, how in running)
            raise Refused(
                f"not destroying: a live controller runs this grid ({named}) and would start the workers again. "
                "Stop it first (Ctrl-C on 'scaleq up --grid' / 'scaleq autoscale'; 'scaleq up' removes its "
                "workers as it stops), then run destroy"
            )
        plans = []
        for group, _ in self._groups(state):
            if group.name not in state["groups"] and not await make_provider(group, self.ctx).workers(group):
                continue
            provider = make_provider(group, self.ctx)
            removed = await provider.destroy(group)
            await self._forget_group(group.name)
            plans.append(
                GroupPlan(
                    group.name,
                    group.provider,
                    "remove",
                    workers=len(removed),
                    done=[f"removed worker {w}" for w in removed] or ["nothing was running"],
                )
            )
            state["groups"].pop(group.name, None)
        state_path(self.data_dir, self.grid.name).unlink(missing_ok=True)
        return plans

    async def _drain(self, group: Group, provider: object, w: ProviderWorker) -> None:
        try:
            await self.client.drain_worker(w.id)
        except ApiError as exc:
            if exc.status != 404:
                raise
            await provider.stop(group, w.id)  # type: ignore[attr-defined]  # never registered: stop it directly

    async def _record_group(self, group: Group, current: int, desired: int) -> None:
        try:
            await self.client.put_group(
                {
                    "name": group.name,
                    "queue": group.queue,
                    "provider": group.provider,
                    "min": group.min_workers,
                    "max": group.max_workers,
                    "current": current,
                    "desired": desired,
                    "reporter": "apply",  # not a controller: doctor and destroy must not take it for one
                    "price_per_hour": group.price_per_hour,
                }
            )
        except Unreachable:
            pass

    async def _forget_group(self, name: str) -> None:
        try:
            await self.client.delete_group(name)
        except (ApiError, Unreachable):
            pass
