"""The gcp provider: reconciliation — a group's template and MIG made to match it — and the primitives on top.

``start`` makes sure the group's template and MIG exist with the MIG on the current version's template, then creates
named instances; ``stop`` deletes one named instance; ``reap`` deletes the instances of workers the controller says
left; ``destroy`` deletes the MIG and every template of the group. See the package's docstring for the design.

**Creation failures are per instance.** ``createInstances`` finishes DONE even when GCP cannot make the VMs (a quota,
a zone out of capacity, an org policy): each such instance stays ``CREATING`` while the MIG keeps retrying, with the
failure in its ``lastAttempt.errors`` and in the group's ``listErrors``. ``workers`` puts the failure in the
worker's detail (and logs it once), :meth:`GcpProvider.last_errors` says the last one per instance (and
``why_not_up``, for the controller's ``not_registered`` event), and ``health`` reports the failing instances of the
provider's group, so that "a machine never came up" comes with GCP's reason.

**Preemption is read where GCP records it**: taking a spot VM back is a zone operation of type
``compute.instances.preempted`` on the instance (Google's own "preemption history" uses the same filter).
``preempted`` lists those operations in the zones of the instances asked about (the region's zones for one no longer
listed) and answers for the instances preempted within :data:`PREEMPTED_WITHIN`: a MIG recreates a preempted VM
under its name, so an older preemption of the same name says nothing about the worker silent now.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection
from datetime import datetime
from typing import TypeVar

from google.api_core import exceptions as gexc
from google.auth.credentials import Credentials
from google.cloud import compute_v1

from scaleq.grid import GcpSettings, Group
from scaleq.providers.base import DESTROY_GRACE, Health, ProviderBase, ProviderError, ProviderWorker, Status
from scaleq.providers.gcp.api import Api, Apis
from scaleq.providers.gcp.credentials import describe
from scaleq.providers.gcp.resources import (
    label_value,
    mig_name,
    mig_resource,
    template_name,
    template_path,
    template_resource,
    version_of,
    worker_name,
)

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A preemption this recent (seconds) explains a silent worker; older ones were of an earlier VM of the same name.
PREEMPTED_WITHIN = 600.0
PREEMPTED_FILTER = 'operationType="compute.instances.preempted"'
_STOPPING_ACTIONS = {"DELETING", "ABANDONING", "STOPPING", "SUSPENDING"}
_STOPPING_STATUS = {"STOPPING", "PENDING_STOP", "SUSPENDING", "DEPROVISIONING"}


class GcpProvider(ProviderBase):
    name = "gcp"

    def __init__(
        self,
        *,
        grid: str,
        server: str,
        token: str,
        settings: GcpSettings | None = None,
        credentials: Credentials | None = None,
        api_timeout: float = 60.0,
        operation_timeout: float = 600.0,
        credentials_timeout: float = 10.0,
        metadata_probe_timeout: float = 1.0,
        server_grace: float = 300.0,
        poll_interval: float = 1.0,
        group_name: str | None = None,
    ) -> None:
        self.grid = grid
        self.server = server
        self.token = token
        self.settings = settings  # for health(); the other calls use their group's own settings
        self.group_name = group_name  # for health(): whose instances it checks for creation failures
        self.api_timeout = api_timeout
        self.operation_timeout = operation_timeout
        self.server_grace = server_grace
        self.poll_interval = poll_interval
        self.poll_every = poll_interval
        self._apis = Apis(
            credentials,
            api_timeout=api_timeout,
            operation_timeout=operation_timeout,
            credentials_timeout=credentials_timeout,
            metadata_probe_timeout=metadata_probe_timeout,
        )
        self._seen: dict[str, float] = {}  # instance name → when this provider started or first saw it
        self._listed: dict[str, compute_v1.ManagedInstance] = {}  # the instances of the latest workers(), by name
        self._deleting: set[str] = set()  # instances this provider asked the MIG to delete, until they are gone
        self._failing: dict[str, str] = {}  # instance name → the error of its last creation attempt, as last logged

    # -- the API ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _settings(group: Group) -> GcpSettings:
        if group.gcp is None:
            raise ProviderError(f"group {group.name}: a gcp group needs a [groups.gcp] table with project and region")
        return group.gcp

    async def _run(self, settings: GcpSettings, what: str, fn: Callable[[Api], T]) -> T:
        return await self._apis.run(settings, what, fn)

    def _wait(self, api: Api, s: GcpSettings, op: compute_v1.Operation, what: str) -> None:
        self._apis.wait(api, s, op, what)

    async def close(self) -> None:
        self._apis.close()

    # -- what a group is on GCP -------------------------------------------------------------------------------------

    def _mig(self, group: Group) -> str:
        return mig_name(self.grid, group.name)

    def _template(self, group: Group) -> str:
        return template_name(self.grid, group.name, group.version())

    # -- synchronous steps (in a thread) ----------------------------------------------------------------------------

    def _managed(self, api: Api, group: Group) -> list[compute_v1.ManagedInstance] | None:
        """The MIG's instances (every page), or None when there is no MIG."""
        s = self._settings(group)
        try:
            pager = api.migs.list_managed_instances(
                project=s.project, region=s.region, instance_group_manager=self._mig(group), timeout=self.api_timeout
            )
            return list(pager)
        except gexc.NotFound:
            return None

    def _ensure_template(self, api: Api, group: Group) -> None:
        s = self._settings(group)
        name = self._template(group)
        try:
            api.templates.get(project=s.project, region=s.region, instance_template=name, timeout=self.api_timeout)
            return
        except gexc.NotFound:
            pass
        try:
            op = api.templates.insert_unary(
                project=s.project,
                region=s.region,
                instance_template_resource=template_resource(
                    self.grid, group, s, self.server, self.token, self.server_grace
                ),
                timeout=self.api_timeout,
            )
        except gexc.Conflict:  # made meanwhile (another controller or apply)
            return
        self._wait(api, s, op, f"create instance template {name}")
        log.info("group %s: created instance template %s", group.name, name)

    def _ensure(self, api: Api, group: Group) -> None:
        """Make the group's template and MIG exist, with the MIG on the template of the group's current version."""
        s = self._settings(group)
        if group.resources.gpus:
            raise ProviderError(
                f"group {group.name}: the gcp provider cannot attach GPUs yet (it would need an accelerator type in "
                "[groups.gcp]); use a machine type with GPUs built in through another provider, or set gpus = 0"
            )
        wanted = self._template(group)
        try:
            mig = api.migs.get(
                project=s.project, region=s.region, instance_group_manager=self._mig(group), timeout=self.api_timeout
            )
        except gexc.NotFound:
            mig = None
        if mig is not None and mig.instance_template.rsplit("/", 1)[-1] == wanted:
            return
        self._ensure_template(api, group)
        if mig is None:
            try:
                op = api.migs.insert_unary(
                    project=s.project,
                    region=s.region,
                    instance_group_manager_resource=mig_resource(self.grid, group, s),
                    timeout=self.api_timeout,
                )
                self._wait(api, s, op, f"create managed instance group {self._mig(group)}")
                log.info("group %s: created managed instance group %s", group.name, self._mig(group))
                return
            except gexc.Conflict:
                pass  # made meanwhile: point it at our template below
        op = api.migs.set_instance_template_unary(
            project=s.project,
            region=s.region,
            instance_group_manager=self._mig(group),
            region_instance_group_managers_set_template_request_resource=(
                compute_v1.RegionInstanceGroupManagersSetTemplateRequest(instance_template=template_path(s, wanted))
            ),
            timeout=self.api_timeout,
        )
        self._wait(api, s, op, f"set instance template {wanted} on {self._mig(group)}")
        log.info("group %s: new workers get instance template %s", group.name, wanted)
        self._prune_templates(api, group)

    def _group_templates(self, api: Api, group: Group) -> list[str]:
        """Names of the templates labelled as this group's (every page)."""
        s = self._settings(group)
        found = []
        for t in api.templates.list(project=s.project, region=s.region, timeout=self.api_timeout):
            tags = t.properties.labels
            if (
                tags.get("scaleq-managed") == "true"
                and tags.get("scaleq-grid") == label_value(self.grid)
                and tags.get("scaleq-group") == label_value(group.name)
            ):
                found.append(t.name)
        return found

    def _delete_template(self, api: Api, group: Group, name: str) -> bool:
        s = self._settings(group)
        try:
            op = api.templates.delete_unary(
                project=s.project, region=s.region, instance_template=name, timeout=self.api_timeout
            )
        except gexc.NotFound:
            return False
        self._wait(api, s, op, f"delete instance template {name}")
        return True

    def _prune_templates(self, api: Api, group: Group) -> None:
        """Delete the group's templates that neither the MIG nor any of its instances uses."""
        used = {self._template(group)}
        for mi in self._managed(api, group) or []:
            if mi.version.instance_template:
                used.add(mi.version.instance_template.rsplit("/", 1)[-1])
        for name in self._group_templates(api, group):
            if name in used:
                continue
            try:
                if self._delete_template(api, group, name):
                    log.info("group %s: deleted unused instance template %s", group.name, name)
            except (gexc.BadRequest, ProviderError) as exc:  # in use after all: the next switch tries again
                log.debug("group %s: template %s kept: %s", group.name, name, exc)

    def _delete_instances(self, api: Api, group: Group, urls: list[str]) -> None:
        s = self._settings(group)
        op = api.migs.delete_instances_unary(
            project=s.project,
            region=s.region,
            instance_group_manager=self._mig(group),
            region_instance_group_managers_delete_instances_request_resource=(
                compute_v1.RegionInstanceGroupManagersDeleteInstancesRequest(
                    instances=urls, skip_instances_on_validation_error=True
                )
            ),
            timeout=self.api_timeout,
        )
        names = ", ".join(u.rsplit("/", 1)[-1] for u in urls)
        self._wait(api, s, op, f"delete instance(s) {names} of {self._mig(group)}")

    # -- the provider interface -------------------------------------------------------------------------------------

    async def workers(self, group: Group) -> list[ProviderWorker]:
        s = self._settings(group)
        managed = await self._run(s, f"list the instances of group {group.name}", lambda api: self._managed(api, group))
        if not managed:
            self._forget(set())
            return []
        now = time.time()
        found = []
        for mi in managed:
            started = self._seen.setdefault(mi.name, now)
            action, status = mi.current_action, mi.instance_status
            state: Status
            if mi.name in self._deleting or action in _STOPPING_ACTIONS or status in _STOPPING_STATUS:
                state = "stopping"
            elif action == "NONE" and status == "RUNNING":
                state = "running"
            else:
                state = "starting"
            template = mi.version.instance_template
            zone = _zone(mi.instance)
            detail = f"instance {mi.name} in {zone}: {action.lower() or 'none'}, {status or 'no status yet'}"
            if failing := attempt_error(mi):
                detail += f"; creating it failed, the MIG retries: {failing}"
                if self._failing.get(mi.name) != failing:
                    log.warning("group %s: GCP cannot create instance %s: %s", group.name, mi.name, failing)
                self._failing[mi.name] = failing
            else:
                self._failing.pop(mi.name, None)
            found.append(
                ProviderWorker(
                    mi.name,
                    group.name,
                    started,
                    state,
                    detail + (f", template {template.rsplit('/', 1)[-1]}" if template else ""),
                    version_of(self.grid, group.name, template) if template else "",
                )
            )
        self._forget({mi.name for mi in managed})
        self._listed = {mi.name: mi for mi in managed}
        return sorted(found, key=lambda w: (w.started_at, w.id))

    def _forget(self, present: set[str]) -> None:
        for name in set(self._seen) - present:
            del self._seen[name]
        for name in set(self._failing) - present:
            del self._failing[name]
        self._deleting &= present
        self._listed = {}

    async def last_errors(self, group: Group) -> dict[str, str]:
        """The last error GCP reported for each instance of the group (the worker id), newest first: a failed
        creation attempt of an instance still in the MIG (``lastAttempt``), else the latest of the group's
        ``listErrors`` (which also names instances gone since). Empty when nothing failed or there is no MIG."""
        s = self._settings(group)

        def read(api: Api) -> dict[str, str]:
            try:
                request = compute_v1.ListErrorsRegionInstanceGroupManagersRequest(
                    project=s.project, region=s.region, instance_group_manager=self._mig(group), max_results=500
                )
                pager = api.migs.list_errors(request=request, timeout=self.api_timeout)
                page = next(iter(pager.pages), None)  # the newest 500 are enough to say why
            except gexc.NotFound:
                return {}
            found: dict[str, tuple[str, str]] = {}
            for item in page.items if page is not None else []:
                name = item.instance_action_details.instance.rsplit("/", 1)[-1]
                if name and (name not in found or item.timestamp > found[name][0]):
                    found[name] = (item.timestamp, f"{item.error.code}: {item.error.message}")
            errors = {name: message for name, (_, message) in found.items()}
            for mi in self._managed(api, group) or []:
                if failing := attempt_error(mi):
                    errors[mi.name] = failing
            return errors

        return await self._run(s, f"read the instance errors of group {group.name}", read)

    async def why_not_up(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """GCP's last error for each of these instances (see :meth:`last_errors`): a VM that could not be created
        (a quota, a stock-out, an org policy) is why its worker never registered."""
        errors = await self.last_errors(group)
        return {i: f"GCP could not create instance {i}: {errors[i]}" for i in worker_ids if i in errors}

    async def preempted(self, group: Group, worker_ids: Collection[str]) -> dict[str, str]:
        """Of these instances, those GCP preempted lately (a ``compute.instances.preempted`` zone operation within
        :data:`PREEMPTED_WITHIN`), each with GCP's status message, zone and time."""
        s = self._settings(group)
        wanted = set(worker_ids)
        if not wanted:
            return {}
        zones = {name: _zone(mi.instance) for name in wanted if (mi := self._listed.get(name)) is not None}

        def read(api: Api) -> dict[str, str]:
            where = set(zones.values())
            if len(zones) < len(wanted):  # not listed (gone, or the MIG is recreating it): every zone of the region
                where |= set(s.zones) or {
                    z.rsplit("/", 1)[-1]
                    for z in api.regions.get(project=s.project, region=s.region, timeout=self.api_timeout).zones
                }
            since = time.time() - PREEMPTED_WITHIN
            found: dict[str, str] = {}
            for zone in sorted(where - {"?"}):
                request = compute_v1.ListZoneOperationsRequest(project=s.project, zone=zone, filter=PREEMPTED_FILTER)
                for op in api.zone_operations.list(request=request, timeout=self.api_timeout):
                    name = op.target_link.rsplit("/", 1)[-1]
                    if name in wanted and _when(op.insert_time) >= since:
                        said = op.status_message or "preempted"
                        found[name] = (
                            f"GCP: {said.rstrip('.')} (compute.instances.preempted in {zone} at {op.insert_time})"
                        )
            return found

        return await self._run(s, f"read the preemptions of group {group.name}", read)

    async def reap(self, group: Group, worker_ids: Collection[str]) -> set[str]:
        """Delete the instances of these workers, which left the server: a VM outlives its worker (a drained worker
        exits 0, and the container is not restarted). Only instances the latest ``workers`` saw settled (no action
        under way) and not being deleted already are asked for, each once."""
        reap = [
            mi
            for name in worker_ids
            if (mi := self._listed.get(name)) is not None and mi.current_action == "NONE" and name not in self._deleting
        ]
        if not reap:
            return set()
        s = self._settings(group)
        names = {mi.name for mi in reap}
        self._deleting |= names
        try:
            await self._run(
                s,
                f"delete the instances of group {group.name} whose workers left",
                lambda api: self._delete_instances(api, group, [mi.instance for mi in reap]),
            )
        except BaseException:
            self._deleting -= names
            raise
        log.info("group %s: deleted instance(s) %s, whose workers left", group.name, ", ".join(mi.name for mi in reap))
        return names

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        s = self._settings(group)
        names = [worker_name(self.grid, group.name) for _ in range(count)]

        def create(api: Api) -> None:
            self._ensure(api, group)
            op = api.migs.create_instances_unary(
                project=s.project,
                region=s.region,
                instance_group_manager=self._mig(group),
                region_instance_group_managers_create_instances_request_resource=(
                    compute_v1.RegionInstanceGroupManagersCreateInstancesRequest(
                        instances=[compute_v1.PerInstanceConfig(name=n) for n in names]
                    )
                ),
                timeout=self.api_timeout,
            )
            self._wait(api, s, op, f"create instance(s) {', '.join(names)} in {self._mig(group)}")

        await self._run(s, f"start {count} worker(s) of group {group.name}", create)
        now = time.time()
        for n in names:
            self._seen[n] = now
        return names

    async def stop(self, group: Group, worker_id: str, *, force: bool = False) -> None:
        """Delete the worker's instance — that one and no other. The VM shuts down: the worker gets SIGTERM."""
        s = self._settings(group)

        def delete(api: Api) -> None:
            for mi in self._managed(api, group) or []:
                if mi.name == worker_id:
                    if mi.current_action not in ("DELETING", "ABANDONING"):
                        self._delete_instances(api, group, [mi.instance])
                    return

        self._deleting.add(worker_id)  # before the call: a list() meanwhile must not delete it again
        try:
            await self._run(s, f"stop worker {worker_id} of group {group.name}", delete)
        except BaseException:
            self._deleting.discard(worker_id)
            raise

    async def destroy(self, group: Group, grace: float = DESTROY_GRACE) -> list[str]:
        """Delete the MIG (with its instances), wait until it is gone, then every template labelled as the group's.
        (No drain first: each VM's shutdown gives its worker a SIGTERM, whatever ``grace`` says.)"""
        s = self._settings(group)
        mig = self._mig(group)

        def remove(api: Api) -> list[str]:
            workers = [mi.name for mi in self._managed(api, group) or []]
            try:
                op = api.migs.delete_unary(
                    project=s.project, region=s.region, instance_group_manager=mig, timeout=self.api_timeout
                )
                self._wait(api, s, op, f"delete managed instance group {mig}")
                deadline = time.monotonic() + self.operation_timeout
                while True:  # its templates stay in use until the group is gone
                    api.migs.get(
                        project=s.project, region=s.region, instance_group_manager=mig, timeout=self.api_timeout
                    )
                    if time.monotonic() > deadline:
                        raise ProviderError(
                            f"managed instance group {mig} still there {self.operation_timeout:g} s after its deletion"
                        )
                    time.sleep(self.poll_interval)
            except gexc.NotFound:
                pass
            for name in self._group_templates(api, group):
                self._delete_template(api, group, name)
                log.info("group %s: deleted instance template %s", group.name, name)
            return workers

        removed = await self._run(s, f"destroy group {group.name}", remove)
        self._forget(set())
        return removed

    async def health(self) -> Health:
        s = self.settings
        if s is None:
            return Health(False, "no [groups.gcp] settings: give project and region")
        try:
            region = await self._run(
                s,
                f"read region {s.region} of project {s.project}",
                lambda api: api.regions.get(project=s.project, region=s.region, timeout=self.api_timeout),
            )
        except ProviderError as exc:
            return Health(False, str(exc))
        zones = [z.rsplit("/", 1)[-1] for z in region.zones]
        unknown = [z for z in s.zones if z not in zones]
        if unknown:
            return Health(
                False,
                f"zone(s) {', '.join(unknown)} are not in region {s.region} (its zones: {', '.join(zones)}): fix "
                "[groups.gcp] zones",
            )
        who = describe(self._apis.credentials, s)
        message = (
            f"Compute Engine API{f' at {s.api_endpoint}' if s.api_endpoint else ''}: project {s.project}, region "
            f"{s.region} ({region.status or 'status unknown'}), zones {', '.join(s.zones or zones)}; {who}"
        )
        if self.group_name is None:
            return Health(True, message)
        mig = mig_name(self.grid, self.group_name)

        def failing(api: Api) -> dict[str, str]:
            try:
                pager = api.migs.list_managed_instances(
                    project=s.project, region=s.region, instance_group_manager=mig, timeout=self.api_timeout
                )
                return {mi.name: e for mi in pager if (e := attempt_error(mi))}
            except gexc.NotFound:  # no MIG yet: nothing can have failed
                return {}

        try:
            errors = await self._run(s, f"list the instances of {mig}", failing)
        except ProviderError as exc:
            return Health(False, f"{message}; {exc}")
        if errors:
            listed = "; ".join(f"{name}: {error}" for name, error in sorted(errors.items()))
            return Health(
                False,
                f"{message}; GCP cannot create {len(errors)} instance(s) of {mig} and keeps retrying: {listed} — fix "
                "the cause (a quota: raise it in IAM & Admin > Quotas; a zone out of capacity: add zones or another "
                "machine type; an org policy: see its constraint)",
            )
        return Health(True, message)


def _zone(instance_url: str) -> str:
    return instance_url.split("/zones/", 1)[-1].split("/", 1)[0] if "/zones/" in instance_url else "?"


def _when(rfc3339: str) -> float:
    """An API timestamp in seconds since the epoch (0 when unreadable: too old to count)."""
    try:
        return datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


def attempt_error(mi: compute_v1.ManagedInstance) -> str:
    """The errors of the instance's last creation (or deletion) attempt, in words; empty when it did not fail."""
    errors = mi.last_attempt.errors.errors if mi.last_attempt and mi.last_attempt.errors else []
    return "; ".join(f"{e.code}: {e.message}" for e in errors)
