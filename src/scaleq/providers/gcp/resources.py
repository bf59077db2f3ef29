"""What a group is on Compute Engine: names, labels, the instance template (which boots the worker as
:mod:`scaleq.providers.gcp.boot` says) and the MIG.

Pure functions, no client or credentials needed (see the package's docstring for why each is what it is). Names
longer than GCE's 63 characters are shortened with a hash, so they stay unique and stable.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from google.cloud import compute_v1

from scaleq.grid import GcpSettings, Group
from scaleq.providers.base import ProviderError
from scaleq.providers.gcp import boot

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
COS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
MAX_NAME = 63
VERSION_LEN = 12  # Group.version() is 12 hex digits
_LABEL_BAD = re.compile(r"[^a-z0-9_-]")


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


def template_path(s: GcpSettings, name: str) -> str:
    return f"projects/{s.project}/regions/{s.region}/instanceTemplates/{name}"


def version_of(grid: str, group: str, template_url: str) -> str:
    """The group version an instance runs, from its template's name (a foreign template: its whole name)."""
    name = template_url.rsplit("/", 1)[-1]
    prefix = template_name(grid, group, "0" * VERSION_LEN)[: -VERSION_LEN - 1]
    rest = name[len(prefix) + 1 :]
    if name.startswith(prefix + "-") and len(rest) == VERSION_LEN:
        return rest
    return name


def template_resource(
    grid: str, group: Group, s: GcpSettings, server: str, token: str, server_grace: float
) -> compute_v1.InstanceTemplate:
    """The instance template of the group's current version."""
    tags = labels(grid, group)
    network = s.network if "/" in s.network else f"projects/{s.project}/global/networks/{s.network}"
    interface = compute_v1.NetworkInterface(network=network)
    if s.external_ip is not False:  # the default: the provider makes no Cloud NAT, so without it no image pull
        interface.access_configs = [compute_v1.AccessConfig(name="External NAT", type_="ONE_TO_ONE_NAT")]
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
    try:
        items = boot.metadata(boot.user_data(group, server, server_grace=server_grace), token)
    except boot.BootError as exc:
        raise ProviderError(str(exc)) from exc
    return compute_v1.InstanceTemplate(
        name=template_name(grid, group.name, group.version()),
        description=f"scaleq workers of grid {grid}, group {group.name}, version {group.version()}",
        properties=compute_v1.InstanceProperties(
            machine_type=s.machine_type,
            labels=tags,
            tags=compute_v1.Tags(items=["scaleq-worker"]),
            metadata=compute_v1.Metadata(items=[compute_v1.Items(key=k, value=v) for k, v in items.items()]),
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
            service_accounts=[compute_v1.ServiceAccount(email=s.service_account or "default", scopes=[CLOUD_PLATFORM])],
            scheduling=scheduling,
        ),
    )


def mig_resource(grid: str, group: Group, s: GcpSettings) -> compute_v1.InstanceGroupManager:
    policy = compute_v1.DistributionPolicy(
        target_shape="EVEN",
        zones=[compute_v1.DistributionPolicyZoneConfiguration(zone=f"projects/{s.project}/zones/{z}") for z in s.zones],
    )
    return compute_v1.InstanceGroupManager(
        name=mig_name(grid, group.name),
        description=f"scaleq workers of grid {grid}, group {group.name}; sized by scaleq's controller",
        base_instance_name=gce_name(grid, group.name, limit=58),
        instance_template=template_path(s, template_name(grid, group.name, group.version())),
        target_size=0,
        distribution_policy=policy,
        update_policy=compute_v1.InstanceGroupManagerUpdatePolicy(
            type_="OPPORTUNISTIC", instance_redistribution_type="NONE"
        ),
    )
