"""What a group is on Compute Engine: names, labels, the worker's container declaration, the template and the MIG.

Pure functions, no client or credentials needed (see the package's docstring for why each is what it is). Names
longer than GCE's 63 characters are shortened with a hash, so they stay unique and stable.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from typing import Any

import yaml
from google.cloud import compute_v1

from scaleq.grid import GcpSettings, Group
from scaleq.jobs import RuntimeKind
from scaleq.providers.base import worker_args

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
COS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
CONTAINER_DECLARATION = "gce-container-declaration"
SOCKET = "/var/run/docker.sock"
#: How the container learns its worker id: the instance name, which COS makes the hostname.
WORKER_ID_SCRIPT = 'h=$(cat /proc/sys/kernel/hostname); exec scaleq "$@" --worker-id "${h%%.*}"'
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
    declaration = container_declaration(group, server, token, server_grace)
    return compute_v1.InstanceTemplate(
        name=template_name(grid, group.name, group.version()),
        description=f"scaleq workers of grid {grid}, group {group.name}, version {group.version()}",
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
