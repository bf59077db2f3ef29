"""The gcp provider: workers are VMs of one regional managed instance group (MIG) per group, on Google Compute Engine.

Design:

- **One regional MIG per group**, ``scaleq-<grid>-<group>``, spread over the group's zones (``distributionPolicy``;
  the region's zones when none are given). Its **instance template** (regional, in the same region),
  ``scaleq-<grid>-<group>-<version>`` with ``version = Group.version()``, boots Container-Optimized OS and declares
  the worker as a container the way COS does (metadata ``gce-container-declaration``): ``group.image`` running
  ``scaleq worker …`` (:func:`~scaleq.providers.base.worker_args`) with ``SCALEQ_TOKEN`` and ``group.env`` in its
  environment, restart policy ``OnFailure`` (a crash restarts the worker; a drained worker exits 0 and stays down).
  Names longer than GCE's 63 characters are shortened with a hash, so they stay unique and stable.
- **Labels are the state**: the template labels every VM and boot disk ``scaleq-managed=true``, ``scaleq-grid``,
  ``scaleq-group`` and ``scaleq-version``. The MIG's name is derived from grid and group, so ``list`` (and a
  restarted controller adopting, and ``destroy``) find the workers from GCP itself; ``destroy`` finds every template
  of the group by its labels.
- **The worker id is the instance name**, chosen by scaleq: ``start`` calls ``createInstances`` with explicit names
  (``<grid>-<group>-<random>``), so the id is known before the VM exists. All instances share one template, so the
  container learns its id on the VM: its command is ``/bin/sh -c`` reading the hostname (COS names the host after the
  instance) and ``exec scaleq worker … --worker-id <hostname>``.
- **The MIG never acts on its own**: no autoscaler, ``updatePolicy.type=OPPORTUNISTIC`` (a new template does not
  make it replace VMs) and ``instanceRedistributionType=NONE`` (it does not delete VMs to even out zones). scaleq's
  controller sizes it: ``start`` = ``createInstances`` (``targetSize`` grows by those), and instances are removed
  only by ``deleteInstances`` naming them (``targetSize`` shrinks by those) — never ``resize``, which deletes VMs of
  the MIG's choosing, possibly mid-job.
- **Scale-in after draining**: the controller drains an idle worker through the server; the worker takes no new job,
  exits, and deregisters (the server marks it ``gone``). ``list`` asks the server (with the worker token, which may
  read workers) which of the MIG's workers are gone — or were seen registered by this provider and are no longer
  known — and deletes exactly those instances. A worker that dies without deregistering is marked gone by the server
  after its heartbeats stop, and is deleted the same way. ``stop`` deletes the named instance (``apply`` uses it for
  workers that never registered).
- **Rolling updates**: a changed group has a new version, so ``start`` makes the new template and points the MIG at
  it (``setInstanceTemplate``): new VMs get it, running ones keep theirs. ``list`` reports each VM's template version,
  so ``apply`` drains the out-of-date workers (they finish their jobs first) and the controller starts replacements
  as demand needs. Templates no instance uses any more are deleted when the MIG moves to a new one.
- **Credentials** come from application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
  application-default login``, or the metadata server of a GCE/GKE/Cloud Run host). The lookup is bounded: a
  metadata server that does not answer makes a clear error in seconds, not a hang. With ``api_endpoint`` set to an
  ``http://`` URL (a local stand-in or proxy) no credentials are sent (``AnonymousCredentials``); an ``https://``
  endpoint gets the default credentials.
- The official ``google-cloud-compute`` client (REST), synchronous: every call runs in a thread. Long-running
  calls use the ``*_unary`` methods and are awaited with a ``RegionOperationsClient`` built with the same endpoint
  and credentials (the client's own extended operations poll through a client that ignores ``api_endpoint``).
  API errors become :class:`ProviderError` saying what failed and how to fix it.

Caveat: the worker token is in the template's metadata, readable by anyone who may ``compute.instances.get`` or
``compute.instanceTemplates.get`` in the project (and by every process on the VM, through the metadata server).
Keeping it in Secret Manager, fetched by the VM's service account at boot, is future work.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import yaml
from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from scaleq.client import ApiError, Client, Unreachable
from scaleq.grid import GcpSettings, Group
from scaleq.jobs import RuntimeKind
from scaleq.providers.base import Health, ProviderError, ProviderWorker, Status, worker_args

log = logging.getLogger(__name__)
T = TypeVar("T")

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
COS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
CONTAINER_DECLARATION = "gce-container-declaration"
SOCKET = "/var/run/docker.sock"
#: How the container learns its worker id: the instance name, which COS makes the hostname.
WORKER_ID_SCRIPT = 'h=$(cat /proc/sys/kernel/hostname); exec scaleq "$@" --worker-id "${h%%.*}"'
MAX_NAME = 63
VERSION_LEN = 12  # Group.version() is 12 hex digits
FIX_CREDENTIALS = (
    "no Google Cloud credentials found (application default credentials): run 'gcloud auth application-default "
    "login', or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run on a GCE/GKE host with a "
    "service account attached — in the environment of the controller ('scaleq up' / 'scaleq autoscale'), of "
    "apply/plan/destroy and of doctor"
)
FIX_PERMISSION = (
    "the account needs roles/compute.instanceAdmin.v1 on project {project} (instance templates, managed instance "
    "groups, regions) and roles/iam.serviceAccountUser on the workers' service account"
)

_STOPPING_ACTIONS = {"DELETING", "ABANDONING", "STOPPING", "SUSPENDING"}
_STOPPING_STATUS = {"STOPPING", "PENDING_STOP", "SUSPENDING", "DEPROVISIONING"}
_NAME_OK = re.compile(r"[a-z](?:[-a-z0-9]{0,61}[a-z0-9])?")
_LABEL_BAD = re.compile(r"[^a-z0-9_-]")


# -- names and labels -------------------------------------------------------------------------------------------------


def gce_name(*parts: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """A valid GCE resource name from ``parts`` joined by '-', plus ``suffix``: it starts with a letter and fits in
    ``limit`` characters; a base too long is cut and given a hash of the whole, so it stays unique and stable."""
    base = "-".join(p for p in parts if p)
    if not base[:1].isalpha():
        base = f"sq-{base}"
    if len(base) + len(suffix) > limit:
        digest = hashlib.sha256(base.encode()).hexdigest()[:6]
        base = f"{base[: limit - len(suffix) - 7].rstrip('-')}-{digest}"
    return base + suffix


def label_value(value: str) -> str:
    """A GCP label value: lowercase letters, digits, '_' and '-', at most 63 characters."""
    return _LABEL_BAD.sub("-", value.lower())[:63]


def mig_name(grid: str, group: str) -> str:
    return gce_name("scaleq", grid, group)


def template_name(grid: str, group: str, version: str) -> str:
    return gce_name("scaleq", grid, group, suffix=f"-{version}")


def worker_name(grid: str, group: str) -> str:
    """A new worker id, which is also its instance name."""
    return gce_name(grid, group, suffix=f"-{secrets.token_hex(3)}")


def labels(grid: str, group: Group) -> dict[str, str]:
    return {
        "scaleq-managed": "true",
        "scaleq-grid": label_value(grid),
        "scaleq-group": label_value(group.name),
        "scaleq-version": label_value(group.version()),
    }


def container_declaration(group: Group, server: str, token: str, server_grace: float) -> str:
    """The ``gce-container-declaration`` metadata that makes Container-Optimized OS run the worker."""
    args = worker_args(group, server, "-", server_grace)
    at = args.index("--worker-id")
    del args[at : at + 2]  # the worker id is the instance name, known on the VM only (WORKER_ID_SCRIPT adds it)
    env = {"PYTHONUNBUFFERED": "1", **group.env, "SCALEQ_TOKEN": token}
    container: dict[str, Any] = {
        "name": "scaleq-worker",
        "image": group.image,
        "command": ["/bin/sh", "-c", WORKER_ID_SCRIPT, "scaleq-worker"],
        "args": args,
        "env": [],
        "securityContext": {"privileged": False},
        "stdin": False,
        "tty": False,
    }
    spec: dict[str, Any] = {"containers": [container], "restartPolicy": "OnFailure"}
    if RuntimeKind.docker in group.runtimes:  # container jobs run as siblings on the VM's Docker
        env["DOCKER_HOST"] = f"unix://{SOCKET}"
        container["volumeMounts"] = [{"name": "docker-socket", "mountPath": SOCKET, "readOnly": False}]
        spec["volumes"] = [{"name": "docker-socket", "hostPath": {"path": SOCKET}}]
    container["env"] = [{"name": k, "value": v} for k, v in env.items()]
    header = (
        "# scaleq worker: a Container-Optimized OS container declaration (made by scaleq's gcp provider; the\n"
        "# worker id is the instance name, read from the hostname)\n"
    )
    return header + yaml.safe_dump({"spec": spec}, sort_keys=False, default_flow_style=False, width=1000)


# -- credentials -------------------------------------------------------------------------------------------------------


def _only_metadata_left() -> bool:
    """True when application default credentials could only come from a metadata server: no key file is named and
    gcloud has stored no application default credentials."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return False
    try:
        from google.auth import _cloud_sdk

        return not os.path.isfile(_cloud_sdk.get_application_default_credentials_path())
    except Exception:  # a private helper: when in doubt, let google.auth look everywhere
        return False


def _metadata_answers(timeout: float) -> tuple[bool, str]:
    """One bounded probe of the GCE metadata server (google.auth tries three times with back-off: seconds when there
    is none). Returns whether it answered and where it was looked for."""
    address = os.environ.get("GCE_METADATA_IP", "169.254.169.254")
    try:
        r = httpx.get(f"http://{address}", headers={"Metadata-Flavor": "Google"}, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False, address
    return r.headers.get("metadata-flavor") == "Google", address


def _on_gce() -> bool:
    try:
        return "Google" in Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        return False


def _find_credentials(probe_timeout: float) -> Credentials:
    """Application default credentials, with every metadata-server request bounded to ``probe_timeout`` seconds."""
    import google.auth
    import google.auth.transport.requests

    if _only_metadata_left() and not _on_gce():
        answered, address = _metadata_answers(probe_timeout)
        if not answered:
            raise auth_exceptions.DefaultCredentialsError(
                f"no credentials file, and no GCE metadata server answered at {address} within {probe_timeout:g} s"
            )

    class Bounded(google.auth.transport.requests.Request):
        def __call__(
            self, url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: Any = None, **kw: Any
        ) -> Any:
            return super().__call__(
                url, method, body, headers, timeout=min(timeout or probe_timeout, probe_timeout), **kw
            )

    credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM], request=Bounded())
    return credentials


async def _in_daemon_thread(fn: Callable[[], T], timeout: float) -> T:
    """Run ``fn`` in a daemon thread and wait at most ``timeout`` s; a thread that hangs is left behind and does not
    hold up the event loop's shutdown (the default executor's threads would)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(ok: bool, value: Any) -> None:
        if not future.done():
            future.set_result(value) if ok else future.set_exception(value)

    def run() -> None:
        try:
            result: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            result = (False, exc)
        try:
            loop.call_soon_threadsafe(settle, *result)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    threading.Thread(target=run, name="scaleq-gcp-credentials", daemon=True).start()
    return await asyncio.wait_for(future, timeout)


# -- the provider ------------------------------------------------------------------------------------------------------


@dataclass
class _Api:
    templates: compute_v1.RegionInstanceTemplatesClient
    migs: compute_v1.RegionInstanceGroupManagersClient
    operations: compute_v1.RegionOperationsClient
    regions: compute_v1.RegionsClient

    def close(self) -> None:
        for client in (self.templates, self.migs, self.operations, self.regions):
            try:
                client.transport.close()
            except Exception:  # closing must never fail a caller
                pass


class GcpProvider:
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
        registry_timeout: float = 10.0,
        poll_interval: float = 1.0,
    ) -> None:
        self.grid = grid
        self.server = server
        self.token = token
        self.settings = settings  # for health(); the other calls use their group's own settings
        self.api_timeout = api_timeout
        self.operation_timeout = operation_timeout
        self.credentials_timeout = credentials_timeout
        self.metadata_probe_timeout = metadata_probe_timeout
        self.server_grace = server_grace
        self.registry_timeout = registry_timeout
        self.poll_interval = poll_interval
        self._credentials = credentials
        self._apis: dict[str | None, _Api] = {}
        self._lock = threading.Lock()
        self._seen: dict[str, float] = {}  # instance name → when this provider started or first saw it
        self._registered: set[str] = set()  # workers this provider has seen registered with the server
        self._deleting: set[str] = set()  # instances this provider asked the MIG to delete, until they are gone
        self._registry_failing = False

    # -- the API ----------------------------------------------------------------------------------------------------

    @staticmethod
    def _settings(group: Group) -> GcpSettings:
        if group.gcp is None:
            raise ProviderError(f"group {group.name}: a gcp group needs a [groups.gcp] table with project and region")
        return group.gcp

    async def _credentials_for(self, settings: GcpSettings) -> Credentials:
        endpoint = settings.api_endpoint or ""
        if endpoint.startswith("http://"):
            return AnonymousCredentials()  # a local stand-in or proxy: never send tokens over plain HTTP
        if self._credentials is None:
            try:
                self._credentials = await _in_daemon_thread(
                    lambda: _find_credentials(self.metadata_probe_timeout), self.credentials_timeout
                )
            except auth_exceptions.DefaultCredentialsError as exc:
                raise ProviderError(f"{FIX_CREDENTIALS} ({_first_line(exc)})") from exc
            except TimeoutError as exc:
                raise ProviderError(
                    f"looking for Google Cloud credentials took more than {self.credentials_timeout:g} s (no "
                    f"credentials file, and the GCE metadata server did not answer): {FIX_CREDENTIALS}"
                ) from exc
            except auth_exceptions.GoogleAuthError as exc:
                raise ProviderError(f"the Google Cloud credentials cannot be used: {exc}. {FIX_CREDENTIALS}") from exc
        return self._credentials

    async def _api(self, settings: GcpSettings) -> _Api:
        key = settings.api_endpoint
        if key in self._apis:
            return self._apis[key]
        credentials = await self._credentials_for(settings)

        def build() -> _Api:
            options = ClientOptions(api_endpoint=settings.api_endpoint) if settings.api_endpoint else None
            kw: dict[str, Any] = {"transport": "rest", "client_options": options, "credentials": credentials}
            return _Api(
                compute_v1.RegionInstanceTemplatesClient(**kw),
                compute_v1.RegionInstanceGroupManagersClient(**kw),
                compute_v1.RegionOperationsClient(**kw),
                compute_v1.RegionsClient(**kw),
            )

        api = await asyncio.to_thread(build)
        with self._lock:
            if key in self._apis:
                api.close()
            else:
                self._apis[key] = api
            return self._apis[key]

    async def _run(self, settings: GcpSettings, what: str, fn: Callable[[_Api], T]) -> T:
        """Run ``fn(api)`` in a thread; API errors become ProviderError saying ``what`` failed and how to fix it."""
        api = await self._api(settings)
        try:
            return await asyncio.to_thread(fn, api)
        except ProviderError:
            raise
        except gexc.GoogleAPICallError as exc:
            raise ProviderError(_explain(exc, what, settings)) from exc
        except gexc.RetryError as exc:
            raise ProviderError(f"the Compute Engine API did not answer in time to {what}: {exc}") from exc
        except auth_exceptions.RefreshError as exc:
            raise ProviderError(
                f"cannot {what}: the Google Cloud credentials were refused ({exc}); renew them: {FIX_CREDENTIALS}"
            ) from exc
        except (auth_exceptions.TransportError, OSError) as exc:  # requests' errors are OSErrors
            endpoint = settings.api_endpoint or "compute.googleapis.com"
            raise ProviderError(f"cannot reach the Compute Engine API at {endpoint} to {what}: {exc}") from exc

    def _wait(self, api: _Api, s: GcpSettings, op: compute_v1.Operation, what: str) -> None:
        """Wait for a region operation to be DONE (with our own operations client); its error becomes ProviderError."""
        deadline = time.monotonic() + self.operation_timeout
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise ProviderError(f"{what}: operation {op.name} not done after {self.operation_timeout:g} s")
            # wait answers when the operation is done or after about two minutes, whichever comes first
            op = api.operations.wait(
                project=s.project, region=s.region, operation=op.name, timeout=self.api_timeout + 120
            )
        if op.error and op.error.errors:
            problems = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
            raise ProviderError(f"the Compute Engine API could not {what}: {problems}")

    def close(self) -> None:
        with self._lock:
            apis, self._apis = list(self._apis.values()), {}
        for api in apis:
            api.close()

    # -- what a group is on GCP -------------------------------------------------------------------------------------

    def _mig(self, group: Group) -> str:
        return mig_name(self.grid, group.name)

    def _template(self, group: Group, version: str | None = None) -> str:
        return template_name(self.grid, group.name, version or group.version())

    def _version_of(self, group: Group, template_url: str) -> str:
        """The group version an instance runs, from its template's name (a foreign template: its whole name)."""
        name = template_url.rsplit("/", 1)[-1]
        prefix = self._template(group, "0" * VERSION_LEN)[: -VERSION_LEN - 1]
        rest = name[len(prefix) + 1 :]
        if name.startswith(prefix + "-") and len(rest) == VERSION_LEN:
            return rest
        return name

    def template_resource(self, group: Group) -> compute_v1.InstanceTemplate:
        """The instance template of the group's current version."""
        s = self._settings(group)
        tags = labels(self.grid, group)
        network = s.network if "/" in s.network else f"projects/{s.project}/global/networks/{s.network}"
        interface = compute_v1.NetworkInterface(
            network=network,
            access_configs=[compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")],
        )
        if s.subnetwork:
            interface.subnetwork = (
                s.subnetwork
                if "/" in s.subnetwork
                else f"projects/{s.project}/regions/{s.region}/subnetworks/{s.subnetwork}"
            )
        if s.spot:
            scheduling = compute_v1.Scheduling(
                provisioning_model="SPOT",
                instance_termination_action="DELETE",
                automatic_restart=False,
                on_host_maintenance="TERMINATE",
            )
        else:
            scheduling = compute_v1.Scheduling(automatic_restart=True, on_host_maintenance="MIGRATE")
        declaration = container_declaration(group, self.server, self.token, self.server_grace)
        return compute_v1.InstanceTemplate(
            name=self._template(group),
            description=f"scaleq workers of grid {self.grid}, group {group.name}, version {group.version()}",
            properties=compute_v1.InstanceProperties(
                machine_type=s.machine_type,
                labels=tags,
                tags=compute_v1.Tags(items=["scaleq-worker"]),
                metadata=compute_v1.Metadata(
                    items=[
                        compute_v1.Items(key=CONTAINER_DECLARATION, value=declaration),
                        compute_v1.Items(key="google-logging-enabled", value="true"),
                    ]
                ),
                disks=[
                    compute_v1.AttachedDisk(
                        boot=True,
                        auto_delete=True,
                        type_="PERSISTENT",
                        initialize_params=compute_v1.AttachedDiskInitializeParams(
                            source_image=COS_IMAGE, disk_size_gb=s.boot_disk_gb, labels=tags
                        ),
                    )
                ],
                network_interfaces=[interface],
                service_accounts=[
                    compute_v1.ServiceAccount(email=s.service_account or "default", scopes=[CLOUD_PLATFORM])
                ],
                scheduling=scheduling,
            ),
        )

    def mig_resource(self, group: Group) -> compute_v1.InstanceGroupManager:
        s = self._settings(group)
        policy = compute_v1.DistributionPolicy(
            target_shape="EVEN",
            zones=[
                compute_v1.DistributionPolicyZoneConfiguration(zone=f"projects/{s.project}/zones/{z}") for z in s.zones
            ],
        )
        return compute_v1.InstanceGroupManager(
            name=self._mig(group),
            description=f"scaleq workers of grid {self.grid}, group {group.name}; sized by scaleq's controller",
            base_instance_name=gce_name(self.grid, group.name, limit=58),
            instance_template=self._template_path(s, self._template(group)),
            target_size=0,
            distribution_policy=policy,
            update_policy=compute_v1.InstanceGroupManagerUpdatePolicy(
                type_="OPPORTUNISTIC", instance_redistribution_type="NONE"
            ),
        )

    @staticmethod
    def _template_path(s: GcpSettings, name: str) -> str:
        return f"projects/{s.project}/regions/{s.region}/instanceTemplates/{name}"

    # -- synchronous steps (in a thread) ----------------------------------------------------------------------------

    def _managed(self, api: _Api, group: Group) -> list[compute_v1.ManagedInstance] | None:
        """The MIG's instances (every page), or None when there is no MIG."""
        s = self._settings(group)
        try:
            pager = api.migs.list_managed_instances(
                project=s.project, region=s.region, instance_group_manager=self._mig(group), timeout=self.api_timeout
            )
            return list(pager)
        except gexc.NotFound:
            return None

    def _ensure_template(self, api: _Api, group: Group) -> None:
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
                instance_template_resource=self.template_resource(group),
                timeout=self.api_timeout,
            )
        except gexc.Conflict:  # made meanwhile (another controller or apply)
            return
        self._wait(api, s, op, f"create instance template {name}")
        log.info("group %s: created instance template %s", group.name, name)

    def _ensure(self, api: _Api, group: Group) -> None:
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
                    instance_group_manager_resource=self.mig_resource(group),
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
                compute_v1.RegionInstanceGroupManagersSetTemplateRequest(
                    instance_template=self._template_path(s, wanted)
                )
            ),
            timeout=self.api_timeout,
        )
        self._wait(api, s, op, f"set instance template {wanted} on {self._mig(group)}")
        log.info("group %s: new workers get instance template %s", group.name, wanted)
        self._prune_templates(api, group)

    def _group_templates(self, api: _Api, group: Group) -> list[str]:
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

    def _delete_template(self, api: _Api, group: Group, name: str) -> bool:
        s = self._settings(group)
        try:
            op = api.templates.delete_unary(
                project=s.project, region=s.region, instance_template=name, timeout=self.api_timeout
            )
        except gexc.NotFound:
            return False
        self._wait(api, s, op, f"delete instance template {name}")
        return True

    def _prune_templates(self, api: _Api, group: Group) -> None:
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

    def _delete_instances(self, api: _Api, group: Group, urls: list[str]) -> None:
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

    async def list(self, group: Group) -> list[ProviderWorker]:
        s = self._settings(group)
        managed = await self._run(s, f"list the instances of group {group.name}", lambda api: self._managed(api, group))
        if not managed:
            self._forget(set())
            return []
        leaving = await self._leaving(group, [mi.name for mi in managed if mi.current_action == "NONE"])
        # (a concurrent list may be deleting some already: each instance is asked for once)
        reap = [mi for mi in managed if mi.name in leaving - self._deleting and mi.current_action == "NONE"]
        if reap:
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
            log.info(
                "group %s: deleted instance(s) %s, whose workers left", group.name, ", ".join(mi.name for mi in reap)
            )
        now = time.time()
        found = []
        for mi in managed:
            started = self._seen.setdefault(mi.name, now)
            action, status = mi.current_action, mi.instance_status
            state: Status
            if mi.name in leaving | self._deleting or action in _STOPPING_ACTIONS or status in _STOPPING_STATUS:
                state = "stopping"
            elif action == "NONE" and status == "RUNNING":
                state = "running"
            else:
                state = "starting"
            template = mi.version.instance_template
            zone = mi.instance.split("/zones/", 1)[-1].split("/", 1)[0] if "/zones/" in mi.instance else "?"
            detail = f"instance {mi.name} in {zone}: {action.lower() or 'none'}, {status or 'no status yet'}"
            found.append(
                ProviderWorker(
                    mi.name,
                    group.name,
                    started,
                    state,
                    detail + (f", template {template.rsplit('/', 1)[-1]}" if template else ""),
                    self._version_of(group, template) if template else "",
                )
            )
        self._forget({mi.name for mi in managed})
        return sorted(found, key=lambda w: (w.started_at, w.id))

    def _forget(self, present: set[str]) -> None:
        for name in set(self._seen) - present:
            del self._seen[name]
        self._registered &= present
        self._deleting &= present

    async def _leaving(self, group: Group, candidates: Iterable[str]) -> set[str]:
        """Which of these instances' workers have left: gone by the server, or known registered and now forgotten.
        An unanswering server is no reason to delete anything: then none."""
        candidates = set(candidates)
        if not candidates:
            return set()
        try:
            async with Client(self.server, self.token, timeout=self.registry_timeout) as client:
                workers = await client.workers(include_gone=True)
        except (ApiError, Unreachable) as exc:
            (log.warning if not self._registry_failing else log.debug)(
                "group %s: cannot ask the server at %s which workers left (%s); deleting none until it answers",
                group.name,
                self.server,
                exc,
            )
            self._registry_failing = True
            return set()
        if self._registry_failing:
            log.info("group %s: the server answers again: instances whose workers left are deleted", group.name)
            self._registry_failing = False
        states = {w.id: w.state for w in workers if w.id in candidates}
        self._registered |= {i for i, state in states.items() if state != "gone"}
        return {i for i in candidates if states.get(i) == "gone" or (i in self._registered and i not in states)}

    async def start(self, group: Group, count: int) -> list[str]:
        if count <= 0:
            return []
        s = self._settings(group)
        names = [worker_name(self.grid, group.name) for _ in range(count)]

        def create(api: _Api) -> None:
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

        def delete(api: _Api) -> None:
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

    async def destroy(self, group: Group) -> list[str]:
        """Delete the MIG (with its instances), wait until it is gone, then every template labelled as the group's."""
        s = self._settings(group)
        mig = self._mig(group)

        def remove(api: _Api) -> list[str]:
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
        who = _describe(self._credentials, s)
        return Health(
            True,
            f"Compute Engine API{f' at {s.api_endpoint}' if s.api_endpoint else ''}: project {s.project}, region "
            f"{s.region} ({region.status or 'status unknown'}), zones {', '.join(s.zones or zones)}; {who}",
        )


def _describe(credentials: Credentials | None, s: GcpSettings) -> str:
    if (s.api_endpoint or "").startswith("http://"):
        return "no credentials sent (plain http endpoint)"
    account = getattr(credentials, "service_account_email", None) or getattr(credentials, "signer_email", None)
    return f"credentials: {type(credentials).__name__}{f' ({account})' if account else ''}"


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _explain(exc: gexc.GoogleAPICallError, what: str, s: GcpSettings) -> str:
    code = exc.code if isinstance(exc.code, int) else getattr(exc.code, "value", exc.code)
    message = exc.message or str(exc)
    base = f"the Compute Engine API refused to {what} ({code} {type(exc).__name__}: {message})"
    if isinstance(exc, gexc.Unauthorized):
        return f"{base}: the credentials are not accepted; {FIX_CREDENTIALS}"
    if isinstance(exc, gexc.Forbidden):
        if "has not been used" in message or "is disabled" in message or "accessNotConfigured" in str(exc):
            return f"{base}: enable it with 'gcloud services enable compute.googleapis.com --project {s.project}'"
        return f"{base}: {FIX_PERMISSION.format(project=s.project)}"
    if isinstance(exc, gexc.NotFound):
        return (
            f"{base}: check [groups.gcp] project ({s.project}) and region ({s.region}), and that the Compute Engine "
            "API is enabled in that project"
        )
    if isinstance(exc, gexc.BadRequest):
        return f"{base}: check the group's [groups.gcp] settings"
    if isinstance(exc, gexc.TooManyRequests):
        return f"{base}: a quota or rate limit was hit; the controller retries with backoff"
    return f"the Compute Engine API failed to {what} ({code} {type(exc).__name__}: {message}); it is retried"
