"""``scaleq export terraform``: a Terraform module for a grid's ``gcp`` groups, the successor of the module scaleq
descends from.

The original deployed each worker group as a GCP managed instance group bound to a queue, autoscaled on a custom
``queue_length`` metric that an OpenTelemetry collector VM scraped from the *workers* through an internal load
balancer. This module keeps that shape and fixes what was wrong with it:

- The autoscaler's metric comes from the **server** (the single source of truth, there at zero workers): the
  collector scrapes the scaleq server's ``/metrics`` with a ``read`` token and derives, per queue, the *demand*
  (queued + running jobs); each group's regional autoscaler keeps ``ceil(demand / slots)`` VMs through a per-group
  metric with ``single_instance_assignment = slots``, so ``min_workers = 0`` works and running jobs keep their VMs.
- Regional MIGs spread over zones, roll out new templates by surge (``update_policy``), heal on a health check, do
  not rebalance zones by killing VMs, and drain workers on shutdown (systemd stops the container with a grace).
- Labels on everything that takes labels; descriptions on the rest; variables that mirror the grid's groups.

Design: the module is files of the package (``templates/terraform/``, see :mod:`scaleq.export.render`).
``main.tf``, ``locals.tf``, ``outputs.tf``, ``versions.tf`` and ``collector.yaml`` are fixed text, copied as they
are — everything that depends on the grid lives in the *defaults* of ``variables.tf``, filled into its template as
HCL by :func:`scaleq.export.hcl.hcl_value` (whose output ``terraform fmt`` leaves alone), so the module is ordinary
Terraform that people can read, diff and override with ``-var``/``.tfvars``. This module says what the grid gives:
the checks that it fits one module, the variables' defaults and the README's tables. The worker VM boots as the gcp
provider's do: the module holds the template files of :mod:`scaleq.providers.gcp.boot` (cloud-init user-data, the
systemd unit, the start script), which ``locals.tf`` renders with ``templatefile()`` from the variables — the worker
command line built in HCL from the same fields as :func:`~scaleq.providers.gcp.boot.worker_argv`. The tests render
them with a real Terraform and compare the bytes with the provider's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from scaleq.export import render
from scaleq.export.hcl import hcl_value
from scaleq.grid import Grid, Group
from scaleq.providers.gcp import boot

#: Default OpenTelemetry Collector image (the contrib distribution: it has the Prometheus receiver, the
#: metricstransform processor and the googlecloud exporter). Pin it; review before upgrading.
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.111.0"
#: Container-Optimized OS: Docker and cloud-init on a minimal, auto-updating, read-only OS.
OS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
#: The Cloud Monitoring metric the autoscalers read (written by the collector's googlecloud exporter).
DEMAND_METRIC = "workload.googleapis.com/scaleq_demand"
#: Where workers serve ``/metrics`` (health checks, the internal load balancer, optional scrapes).
METRICS_PORT = boot.METRICS_PORT
#: Seconds the MIG's shutdown leaves a worker to drain: GCE gives a deleted VM about 90 s (spot VMs: 30 s).
DRAIN_SECONDS = boot.DRAIN_SECONDS
#: ``--server-grace`` of exported workers (as the Docker provider's).
SERVER_GRACE = 300.0

_PREFIX_MAX = 20  # keeps "<prefix>-collector" within a service account id (30) and names within 63
_NAME_MAX = 50  # len(prefix) + len(group): base_instance_name (58) and template name_prefix (37, truncated)


class ExportError(ValueError):
    """The grid cannot be exported as asked; the message says why and what to change."""


# -- the grid → variables ---------------------------------------------------------------------------------------


def name_prefix(grid_name: str) -> str:
    """A prefix for resource names: starts with a letter, at most 20 characters, no trailing dash."""
    p = grid_name if grid_name[:1].isalpha() else f"g{grid_name}"
    return p[:_PREFIX_MAX].rstrip("-")


def group_variable(group: Group) -> dict[str, Any]:
    """One entry of ``var.worker_groups``: the group's fields, in the order the variable declares them."""
    gcp = group.gcp
    assert gcp is not None
    explicit_resources = "resources" in group.model_fields_set
    return {
        "queue": group.queue,
        "min_workers": group.min_workers,
        "max_workers": group.max_workers,
        "slots": group.slots,
        "image": group.image,
        "runtimes": [r.value for r in group.runtimes],
        "tags": list(group.tags),
        # null: the worker offers all of its VM's cores / memory (the grid's default is the exporting machine's)
        "cpus": group.resources.cpus if explicit_resources else None,
        "memory": group.resources.memory,
        "gpus": group.resources.gpus,
        "allow_host_network": group.allow_host_network,
        "env": dict(sorted(group.env.items())),
        "server_grace": SERVER_GRACE,
        "startup_seconds": min(3600, max(60, round(group.startup_grace))),
        "machine_type": gcp.machine_type,
        "zones": list(gcp.zones),
        "boot_disk_gb": gcp.boot_disk_gb,
        "spot": gcp.spot,
        "service_account": gcp.service_account,
    }


def external_ips(groups: list[Group]) -> bool:
    """The module's ``external_ips`` default: the groups' ``external_ip`` where they set it (``_check`` makes sure
    they agree), else none -- and Cloud NAT, which the module then creates, gives the VMs their way out."""
    chosen = {g.gcp.external_ip for g in groups if g.gcp is not None and g.gcp.external_ip is not None}
    return chosen == {True}


def variables_tf(grid: Grid, groups: list[Group]) -> str:
    """``variables.tf``: its template with the grid's values as the defaults."""
    gcp = groups[0].gcp
    assert gcp is not None
    zone = next((z for g in groups for z in (g.gcp.zones if g.gcp else [])), f"{gcp.region}-b")
    url = grid.server.public_url
    return render.render(
        "terraform/variables.tf.tmpl",
        grid_name_repr=repr(grid.name),
        project=hcl_value(gcp.project),
        region=hcl_value(gcp.region),
        network=hcl_value(gcp.network),
        subnetwork=hcl_value(gcp.subnetwork),
        grid_name=hcl_value(grid.name),
        name_prefix=hcl_value(name_prefix(grid.name)),
        # without a public_url the variable has no default: terraform asks for it
        server_url_default=f"  default     = {hcl_value(url)}\n" if url else "",
        external_ips=hcl_value(external_ips(groups)),
        worker_metrics_port=hcl_value(METRICS_PORT),
        drain_seconds=hcl_value(DRAIN_SECONDS),
        collector_zone=hcl_value(zone),
        collector_image=hcl_value(COLLECTOR_IMAGE),
        os_image=hcl_value(OS_IMAGE),
        worker_groups=hcl_value({g.name: group_variable(g) for g in groups}, 2),
    )


# -- README -----------------------------------------------------------------------------------------------------


def readme(grid: Grid, groups: list[Group], skipped: list[Group]) -> str:
    rows = []
    for g in groups:
        assert g.gcp is not None
        zones = ", ".join(g.gcp.zones) if g.gcp.zones else "the region's"
        spot = "yes" if g.gcp.spot else "no"
        rows.append(
            f"| `{g.name}` | {g.min_workers}..{g.max_workers} | {g.slots} | `{g.gcp.machine_type}` | {zones} | {spot} |"
        )
    skipped_text = ""
    if skipped:
        names = ", ".join(f"`{g.name}` ({g.provider})" for g in skipped)
        skipped_text = f"\nGroups of other providers are not part of this module: {names}.\n"
    server_note = (
        f"`server_url` defaults to the grid's `server.public_url` (`{grid.server.public_url}`)."
        if grid.server.public_url
        else "The grid has no `server.public_url`: pass `-var server_url=https://…`, the server's URL for workers."
    )
    return render.render(
        "terraform/README.md.tmpl",
        grid_name=grid.name,
        table="\n".join(rows),
        skipped_text=skipped_text,
        server_note=server_note,
    )


# -- the export ---------------------------------------------------------------------------------------------------


def _check(grid: Grid) -> tuple[list[Group], list[Group]]:
    groups = [g for g in grid.groups if g.provider == "gcp" and g.gcp is not None]
    skipped = [g for g in grid.groups if g not in groups]
    if not groups:
        raise ExportError(
            'the grid has no gcp groups: Terraform exports groups with provider = "gcp" and a [groups.gcp] table'
        )
    first = groups[0].gcp
    assert first is not None
    for field in ("project", "region", "network", "subnetwork"):
        values = {getattr(g.gcp, field) for g in groups}
        if len(values) > 1:
            names = ", ".join(f"{g.name}: {getattr(g.gcp, field)}" for g in groups)
            raise ExportError(
                f"gcp groups differ in {field} ({names}); one module serves one {field} — split the grid file"
            )
    if len({g.gcp.external_ip for g in groups if g.gcp is not None} - {None}) > 1:
        names = ", ".join(f"{g.name}: {g.gcp.external_ip}" for g in groups if g.gcp is not None)
        raise ExportError(
            f"gcp groups differ in external_ip ({names}); one module gives all its VMs external IPs or none — "
            "split the grid file"
        )
    prefix = name_prefix(grid.name)
    for g in groups:
        if not g.name[:1].isalpha():
            raise ExportError(f"group {g.name!r}: GCP resource names need a group name that starts with a letter")
        if len(prefix) + len(g.name) > _NAME_MAX:
            raise ExportError(
                f"group {g.name!r}: too long for GCP resource names with the prefix {prefix!r} "
                f"(at most {_NAME_MAX - len(prefix)} characters)"
            )
        if g.max_workers < 1:
            raise ExportError(f"group {g.name!r}: a GCP autoscaler needs max_workers >= 1")
        try:
            boot.check(g)
        except boot.BootError as exc:
            raise ExportError(str(exc)) from exc
    return groups, skipped


def export_terraform(grid: Grid, out: Path) -> list[Path]:
    """Write the module for the grid's gcp groups into ``out``; return the files written (in a fixed order)."""
    groups, skipped = _check(grid)
    files = {
        "versions.tf": render.text("terraform/versions.tf"),
        "variables.tf": variables_tf(grid, groups),
        "locals.tf": render.text("terraform/locals.tf"),
        "main.tf": render.text("terraform/main.tf"),
        "outputs.tf": render.text("terraform/outputs.tf"),
        "collector.yaml": render.text("terraform/collector.yaml"),
        # the worker VM's boot, as the gcp provider's (scaleq.providers.gcp.boot): locals.tf renders it
        **{name: boot.template(name) for name in boot.FILES},
        "README.md": readme(grid, groups, skipped),
    }
    return render.write(out, files)
