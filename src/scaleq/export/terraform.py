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

Design: the generated ``main.tf``, ``locals.tf`` and ``outputs.tf`` are fixed text — everything that depends on the
grid lives in the *defaults* of ``variables.tf`` (written by :func:`hcl_value`, a small writer whose output
``terraform fmt`` leaves alone), so the module is ordinary Terraform that people can read, diff and override with
``-var``/``.tfvars``. The worker command line is built in HCL from the same fields as
:func:`scaleq.providers.base.worker_args`; the tests evaluate it with a real Terraform and compare.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from scaleq.grid import Grid, Group

#: Default OpenTelemetry Collector image (the contrib distribution: it has the Prometheus receiver, the
#: metricstransform processor and the googlecloud exporter). Pin it; review before upgrading.
COLLECTOR_IMAGE = "otel/opentelemetry-collector-contrib:0.111.0"
#: Container-Optimized OS: Docker and cloud-init on a minimal, auto-updating, read-only OS.
OS_IMAGE = "projects/cos-cloud/global/images/family/cos-stable"
#: The Cloud Monitoring metric the autoscalers read (written by the collector's googlecloud exporter).
DEMAND_METRIC = "workload.googleapis.com/scaleq_demand"
#: Where workers serve ``/metrics`` (health checks, the internal load balancer, optional scrapes).
METRICS_PORT = 9100
#: Seconds the MIG's shutdown leaves a worker to drain: GCE gives a deleted VM about 90 s (spot VMs: 30 s).
DRAIN_SECONDS = 80
#: ``--server-grace`` of exported workers (as the Docker provider's).
SERVER_GRACE = 300.0

_PREFIX_MAX = 20  # keeps "<prefix>-collector" within a service account id (30) and names within 63
_NAME_MAX = 50  # len(prefix) + len(group): base_instance_name (58) and template name_prefix (37, truncated)


class ExportError(ValueError):
    """The grid cannot be exported as asked; the message says why and what to change."""


# -- a small HCL writer -----------------------------------------------------------------------------------------

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def hcl_string(s: str) -> str:
    """A quoted HCL string literal: escapes, and no interpolation or directive (``${`` / ``%{``) survives."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out).replace("${", "$${").replace("%{", "%%{") + '"'


def _key(k: str) -> str:
    return k if _IDENT.match(k) else hcl_string(k)


def _aligned(attrs: list[tuple[str, str]]) -> list[str]:
    """``key = value`` lines as terraform fmt aligns them: the ``=`` of each run of single-line attributes lines up;
    an attribute whose value spans lines stands alone and ends the run."""
    lines: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        if run:
            width = max(len(k) for k, _ in run)
            lines.extend(f"{k.ljust(width)} = {val}" for k, val in run)
            run.clear()

    for k, val in attrs:
        if "\n" in val:
            flush()
            lines.append(f"{k} = {val}")
        else:
            run.append((k, val))
    flush()
    return lines


def hcl_value(v: Any, indent: int = 0) -> str:
    """An HCL expression for a JSON-like value, laid out as ``terraform fmt`` lays it out (objects one attribute a
    line with aligned ``=``; lists of scalars on one line). Key order is kept: the output is deterministic."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return hcl_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(hcl_value(x, indent) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        pad = " " * (indent + 2)
        keys = [_key(str(k)) for k in v]
        texts = [hcl_value(val, indent + 2) for val in v.values()]
        lines = [f"{pad}{line}" for line in _aligned(list(zip(keys, texts, strict=True)))]
        return "{\n" + "\n".join(lines) + "\n" + " " * indent + "}"
    raise TypeError(f"no HCL for {type(v).__name__}")


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


_GROUP_TYPE = """\
map(object({
    queue              = string
    min_workers        = optional(number, 0)
    max_workers        = number
    slots              = optional(number, 1)
    image              = string
    runtimes           = optional(list(string), ["docker"])
    tags               = optional(list(string), [])
    cpus               = optional(number)
    memory             = optional(number)
    gpus               = optional(number, 0)
    allow_host_network = optional(bool, false)
    env                = optional(map(string), {})
    server_grace       = optional(number, 300)
    startup_seconds    = optional(number, 300)
    machine_type       = optional(string, "e2-standard-2")
    zones              = optional(list(string), [])
    boot_disk_gb       = optional(number, 20)
    spot               = optional(bool, false)
    service_account    = optional(string)
  }))"""

_GROUP_DESCRIPTION = (
    "The worker groups, one regional managed instance group each, keyed by group name (mirrors the grid file's "
    "[[groups]]). queue: the queue its workers take jobs from; min_workers/max_workers: the autoscaler's bounds "
    "(min 0 scales from zero); slots: jobs per worker, and the demand one VM absorbs; image: the worker image "
    "(runs `scaleq worker`); runtimes, tags, cpus (null: all cores), memory (bytes, null: all), gpus, "
    "allow_host_network, env, server_grace: as `scaleq worker`; startup_seconds: autoscaler initialization period "
    "and autohealing delay; machine_type, zones (empty: the region's), boot_disk_gb, spot, service_account (null: "
    "one made by this module)."
)

_GROUP_VALIDATIONS = [
    (
        'alltrue([for name, g in var.worker_groups : can(regex("^[a-z]([-a-z0-9]*[a-z0-9])?$", name)) '
        "&& length(name) + length(var.name_prefix) <= 50])",
        "Group names must be lowercase letters, digits and dashes, start with a letter, and be at most "
        "50 characters together with name_prefix.",
    ),
    (
        "alltrue([for g in values(var.worker_groups) : g.max_workers >= 1 && g.min_workers >= 0 "
        "&& g.max_workers >= g.min_workers])",
        "Each group needs 0 <= min_workers <= max_workers and max_workers >= 1.",
    ),
    (
        "alltrue([for g in values(var.worker_groups) : g.slots >= 1 && length(g.runtimes) > 0 "
        '&& alltrue([for r in g.runtimes : contains(["docker", "process"], r)])])',
        'Each group needs slots >= 1 and runtimes from ["docker", "process"].',
    ),
]


def _variable(
    name: str,
    type_: str,
    description: str,
    default: Any = ...,
    *,
    sensitive: bool = False,
    nullable: bool | None = None,
    validations: list[tuple[str, str]] = (),  # type: ignore[assignment]
) -> str:
    attrs: list[tuple[str, str]] = [("description", hcl_string(description)), ("type", type_)]
    if default is not ...:
        attrs.append(("default", hcl_value(default, 2)))
    if sensitive:
        attrs.append(("sensitive", "true"))
    if nullable is not None:
        attrs.append(("nullable", "true" if nullable else "false"))
    lines = [f"  {line}" for line in _aligned(attrs)]
    for condition, message in validations:
        lines += [
            "",
            "  validation {",
            f"    condition     = {condition}",
            f"    error_message = {hcl_string(message)}",
        ]
        lines.append("  }")
    return f'variable "{name}" {{\n' + "\n".join(lines) + "\n}\n"


def variables_tf(grid: Grid, groups: list[Group]) -> str:
    gcp = groups[0].gcp
    assert gcp is not None
    zone = next((z for g in groups for z in (g.gcp.zones if g.gcp else [])), f"{gcp.region}-b")
    blocks = [
        _variable("project", "string", "The GCP project of everything below.", gcp.project),
        _variable("region", "string", "The region of the groups, the load balancer and the collector.", gcp.region),
        _variable("network", "string", "The VPC network (name or self link).", gcp.network),
        _variable(
            "subnetwork",
            "string",
            "The subnetwork (name or self link); null: the network's subnetwork in the region (auto-mode networks).",
            gcp.subnetwork,
        ),
        _variable(
            "grid_name", "string", "The grid's name, the value of the scaleq-grid label on everything.", grid.name
        ),
        _variable(
            "name_prefix",
            "string",
            "Prefix of every resource name (at most 20 characters, starting with a letter).",
            name_prefix(grid.name),
            validations=[
                (
                    'can(regex("^[a-z]([-a-z0-9]{0,18}[a-z0-9])?$", var.name_prefix))',
                    "name_prefix: 1 to 20 lowercase letters, digits or dashes, starting with a letter.",
                )
            ],
        ),
        _variable(
            "server_url",
            "string",
            "The scaleq server as workers and the collector reach it (the grid's server.public_url), e.g. "
            "https://scaleq.internal.example:8765.",
            *([grid.server.public_url] if grid.server.public_url else []),
            validations=[
                (
                    'can(regex("^https?://[^/?#]+", var.server_url))',
                    "server_url must be an http:// or https:// URL.",
                )
            ],
        ),
        _variable(
            "worker_token",
            "string",
            "A scaleq token of role worker (scaleq tokens create --role worker), given to the workers through "
            "instance metadata.",
            sensitive=True,
        ),
        _variable(
            "metrics_token",
            "string",
            "A scaleq token of role read (scaleq tokens create --role read), with which the collector scrapes the "
            "server's /metrics.",
            sensitive=True,
        ),
        _variable("labels", "map(string)", "Extra labels for everything that takes labels.", {}),
        _variable(
            "external_ips",
            "bool",
            "Give VMs external IPs. Without them, VMs need Cloud NAT (or Private Google Access and images in "
            "Artifact Registry) to pull images and reach Cloud Monitoring.",
            False,
        ),
        _variable(
            "internal_lb",
            "bool",
            "Create the internal TCP load balancer in front of the groups' /metrics (the original module's).",
            True,
        ),
        _variable(
            "scrape_workers",
            "bool",
            "Also scrape the workers' /metrics through the internal load balancer (informational: one worker per "
            "scrape; autoscaling never uses it).",
            False,
        ),
        _variable("worker_metrics_port", "number", "Port of the workers' /metrics.", METRICS_PORT),
        _variable(
            "drain_seconds",
            "number",
            "Seconds a stopping worker has to drain before its container is killed (GCE allows about 90 s for a "
            "deleted VM, 30 s for a preempted spot VM).",
            DRAIN_SECONDS,
        ),
        _variable("scrape_interval", "string", "How often the collector scrapes the server.", "15s"),
        _variable("collector_zone", "string", "Zone of the collector VM.", zone),
        _variable("collector_machine_type", "string", "Machine type of the collector VM.", "e2-small"),
        _variable("collector_image", "string", "OpenTelemetry Collector (contrib) image.", COLLECTOR_IMAGE),
        _variable("os_image", "string", "Boot image of every VM (Container-Optimized OS).", OS_IMAGE),
        _variable(
            "worker_groups",
            _GROUP_TYPE,
            _GROUP_DESCRIPTION,
            {g.name: group_variable(g) for g in groups},
            nullable=False,
            validations=_GROUP_VALIDATIONS,
        ),
    ]
    header = (
        f"# Variables of the scaleq grid {grid.name!r}, generated by `scaleq export terraform`: the defaults are the\n"
        "# grid file's values. Override them with -var or a .tfvars file rather than editing the other files.\n\n"
    )
    return header + "\n".join(blocks)


# -- fixed files --------------------------------------------------------------------------------------------------

VERSIONS_TF = """\
terraform {
  # optional() object attributes need 1.3; terraform_data needs 1.4. OpenTofu 1.6+ works too.
  required_version = ">= 1.4"

  required_providers {
    google = {
      source  = "hashicorp/google"
      version = "~> 6.0"
    }
  }
}
"""

LOCALS_TF = r"""# Values derived from the variables without any provider: names, labels, the demand metric, the worker
# command line and each group's cloud-init. Generated by `scaleq export terraform`.

locals {
  prefix = var.name_prefix

  labels = merge(var.labels, {
    "scaleq-grid" = var.grid_name
    "managed-by"  = "terraform"
  })
  group_labels = { for name, g in var.worker_groups : name => merge(local.labels, { "scaleq-group" = name }) }

  worker_tag    = "${local.prefix}-worker"
  collector_tag = "${local.prefix}-collector"

  # The server as the collector scrapes it: scheme, host:port and the path of /metrics.
  server_parts        = regex("^(https?)://([^/?#]+)([^?#]*)", var.server_url)
  server_scheme       = local.server_parts[0]
  server_has_port     = length(regexall(":[0-9]+$", local.server_parts[1])) > 0
  server_port         = local.server_scheme == "https" ? 443 : 80
  server_target       = local.server_has_port ? local.server_parts[1] : "${local.server_parts[1]}:${local.server_port}"
  server_metrics_path = "${trimsuffix(local.server_parts[2], "/")}/metrics"

  # What every autoscaler reads: the demand of its queue (queued + running jobs), one time series per queue that
  # the collector derives from the server's scaleq_jobs{queue,state}. A per-group metric (resource generic_task,
  # not gce_instance), so it exists at zero workers.
  demand_metric = "workload.googleapis.com/scaleq_demand"
  demand_filter = {
    for name, g in var.worker_groups : name => join(" AND ", [
      "metric.type = \"${local.demand_metric}\"",
      "resource.type = \"generic_task\"",
      "resource.labels.job = \"scaleq-server\"",
      "metric.labels.queue = \"${g.queue}\"",
      "metric.labels.state = \"demand\"",
    ])
  }

  # `scaleq worker` arguments, in the order of scaleq.providers.base.worker_args (the worker id, the VM's
  # hostname, is added on the VM), plus the /metrics port for health checks.
  worker_argv = {
    for name, g in var.worker_groups : name => concat(
      ["worker", "--server", var.server_url, "--queue", g.queue, "--slots", tostring(g.slots), "--group", name],
      g.cpus == null ? [] : ["--cpus", tostring(g.cpus)],
      ["--gpus", tostring(g.gpus), "--server-grace", tostring(g.server_grace)],
      flatten([for r in g.runtimes : ["--runtime", r]]),
      flatten([for t in g.tags : ["--tag", t]]),
      g.memory == null ? [] : ["--memory", tostring(g.memory)],
      g.allow_host_network ? ["--allow-host-network"] : [],
      ["--metrics-port", tostring(var.worker_metrics_port)],
    )
  }
  worker_env = { for name, g in var.worker_groups : name => join("", [for k, v in g.env : "${k}=${v}\n"]) }
  docker_opts = {
    for name, g in var.worker_groups : name => concat(
      ["--stop-timeout", tostring(var.drain_seconds)],
      contains(g.runtimes, "docker") ? ["--volume", "/var/run/docker.sock:/var/run/docker.sock"] : [],
    )
  }

  # Runs one worker container; read by scaleq-worker.service. The token comes from instance metadata; job
  # containers are kept away from the metadata server (the VM's credentials, this token).
  worker_script = <<-EOT
    #!/bin/bash
    set -euo pipefail
    conf=/etc/scaleq
    md() {
      curl -sf -H 'Metadata-Flavor: Google' \
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
    }
    image=$(cat "$conf/image")
    port=$(cat "$conf/metrics-port")
    mapfile -t args < "$conf/worker.args"
    mapfile -t opts < "$conf/docker.opts"
    # Container-Optimized OS drops inbound traffic: let health checks and scrapes reach /metrics
    allow=(INPUT -p tcp --dport "$port" -j ACCEPT)
    iptables -w -C "$${allow[@]}" 2>/dev/null || iptables -w -A "$${allow[@]}"
    # jobs in containers may not reach the metadata server
    block=(DOCKER-USER -d 169.254.169.254/32 -j DROP)
    iptables -w -C "$${block[@]}" 2>/dev/null || iptables -w -I "$${block[@]}"
    registry="$${image%%/*}"
    case "$registry" in *.pkg.dev|*gcr.io) docker-credential-gcr configure-docker --registries="$registry" ;; esac
    install -d -m 0700 /run/scaleq
    (umask 077; printf 'SCALEQ_TOKEN=%s\n' "$(md scaleq-token)" > /run/scaleq/token.env)
    docker rm -f scaleq-worker >/dev/null 2>&1 || true
    exec docker run --rm --name scaleq-worker --network host "$${opts[@]}" \
      --env-file "$conf/worker.env" --env-file /run/scaleq/token.env \
      "$image" scaleq "$${args[@]}" --worker-id "$(hostname)"
  EOT

  # systemd stops the worker on shutdown (a MIG deleting the VM, scale-in, a rolling update) with a drain:
  # `docker stop` sends SIGTERM, the worker finishes its running jobs, and is killed after drain_seconds.
  worker_unit = <<-EOT
    [Unit]
    Description=scaleq worker
    Wants=network-online.target
    After=network-online.target docker.service
    Requires=docker.service

    [Service]
    Environment=HOME=/var/lib/scaleq
    ExecStartPre=/bin/mkdir -p /var/lib/scaleq
    ExecStart=/bin/bash /etc/scaleq/run-worker.sh
    ExecStop=/usr/bin/docker stop --time ${var.drain_seconds} scaleq-worker
    TimeoutStopSec=${var.drain_seconds + 15}
    Restart=always
    RestartSec=5
  EOT

  worker_user_data = {
    for name, g in var.worker_groups : name => join("\n", ["#cloud-config", yamlencode({
      write_files = [
        { path = "/etc/scaleq/image", permissions = "0644", content = g.image },
        { path = "/etc/scaleq/metrics-port", permissions = "0644", content = tostring(var.worker_metrics_port) },
        { path = "/etc/scaleq/worker.args", permissions = "0644", content = join("\n", local.worker_argv[name]) },
        { path = "/etc/scaleq/docker.opts", permissions = "0644", content = join("\n", local.docker_opts[name]) },
        { path = "/etc/scaleq/worker.env", permissions = "0600", content = local.worker_env[name] },
        { path = "/etc/scaleq/run-worker.sh", permissions = "0755", content = local.worker_script },
        { path = "/etc/systemd/system/scaleq-worker.service", permissions = "0644", content = local.worker_unit },
      ]
      runcmd = ["systemctl daemon-reload", "systemctl start scaleq-worker.service"]
    })])
  }

  # The collector VM: the OpenTelemetry Collector in a container, its configuration (collector.yaml, rendered in
  # main.tf) and the read token from instance metadata.
  collector_script = <<-EOT
    #!/bin/bash
    set -euo pipefail
    md() {
      curl -sf -H 'Metadata-Flavor: Google' \
        "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
    }
    install -d -m 0755 /run/otelcol
    md collector-config > /run/otelcol/config.yaml
    (umask 077; md scaleq-metrics-token > /run/otelcol/scaleq-token)
    chown 10001:10001 /run/otelcol/scaleq-token  # the collector image runs as uid 10001
    image=$(md collector-image)
    docker rm -f otelcol >/dev/null 2>&1 || true
    exec docker run --rm --name otelcol --network host --volume /run/otelcol:/etc/otelcol:ro \
      "$image" --config=/etc/otelcol/config.yaml
  EOT

  collector_unit = <<-EOT
    [Unit]
    Description=OpenTelemetry Collector (scaleq)
    Wants=network-online.target
    After=network-online.target docker.service
    Requires=docker.service

    [Service]
    ExecStart=/bin/bash /etc/otelcol/run-collector.sh
    ExecStop=/usr/bin/docker stop --time 10 otelcol
    Restart=always
    RestartSec=5
  EOT

  # collector.yaml, rendered; workers_target (the internal load balancer's address) is defined in main.tf
  collector_config = templatefile("${path.module}/collector.yaml", {
    grid            = var.grid_name
    project         = var.project
    scheme          = local.server_scheme
    target          = local.server_target
    metrics_path    = local.server_metrics_path
    scrape_interval = var.scrape_interval
    scrape_workers  = var.internal_lb && var.scrape_workers
    workers_target  = local.workers_target
  })

  collector_user_data = join("\n", ["#cloud-config", yamlencode({
    write_files = [
      { path = "/etc/otelcol/run-collector.sh", permissions = "0755", content = local.collector_script },
      { path = "/etc/systemd/system/otelcol.service", permissions = "0644", content = local.collector_unit },
    ]
    runcmd = ["systemctl daemon-reload", "systemctl start otelcol.service"]
  })])
}
"""

MAIN_TF = r"""# The scaleq grid's GCP worker groups: per group a regional instance template, a regional managed instance
# group and an autoscaler on the server's demand metric; an internal load balancer in front of the groups'
# /metrics; an OpenTelemetry collector VM that scrapes the scaleq server and writes to Cloud Monitoring; the APIs,
# service accounts and firewall rules these need. Generated by `scaleq export terraform`; see README.md.

provider "google" {
  project = var.project
  region  = var.region
}

resource "google_project_service" "apis" {
  for_each = toset([
    "cloudresourcemanager.googleapis.com",
    "compute.googleapis.com",
    "iam.googleapis.com",
    "logging.googleapis.com",
    "monitoring.googleapis.com",
  ])
  project = var.project
  service = each.key
  # destroy leaves APIs enabled: other things in the project may use them
  disable_on_destroy = false
}

# -- service accounts ----------------------------------------------------------------------------------------------

resource "google_service_account" "collector" {
  project      = var.project
  account_id   = "${local.prefix}-collector"
  display_name = "scaleq ${var.grid_name}: OpenTelemetry collector"
  description  = "Writes the scaleq grid's metrics to Cloud Monitoring (scaleq export terraform)."
  depends_on   = [google_project_service.apis]
}

resource "google_project_iam_member" "collector" {
  for_each = toset(["roles/logging.logWriter", "roles/monitoring.metricWriter"])
  project  = var.project
  role     = each.key
  member   = google_service_account.collector.member
}

# One account for the groups that name none: logs, image pulls from Artifact Registry, nothing else.
resource "google_service_account" "worker" {
  count        = local.worker_sa_needed ? 1 : 0
  project      = var.project
  account_id   = "${local.prefix}-worker"
  display_name = "scaleq ${var.grid_name}: workers"
  description  = "Runs the scaleq grid's workers (scaleq export terraform)."
  depends_on   = [google_project_service.apis]
}

resource "google_project_iam_member" "worker" {
  for_each = local.worker_sa_needed ? toset(["roles/artifactregistry.reader", "roles/logging.logWriter"]) : toset([])
  project  = var.project
  role     = each.key
  member   = google_service_account.worker[0].member
}

locals {
  worker_sa_needed = anytrue([for g in values(var.worker_groups) : g.service_account == null])
  made_worker_sa   = one(google_service_account.worker[*].email)
  worker_sa = {
    for name, g in var.worker_groups : name => g.service_account != null ? g.service_account : local.made_worker_sa
  }
}

# -- worker groups ---------------------------------------------------------------------------------------------

resource "google_compute_region_instance_template" "workers" {
  for_each     = var.worker_groups
  project      = var.project
  region       = var.region
  name_prefix  = "${substr("${local.prefix}-${each.key}", 0, 36)}-"
  description  = "scaleq worker group ${each.key} of grid ${var.grid_name}"
  machine_type = each.value.machine_type
  labels       = local.group_labels[each.key]
  tags         = [local.worker_tag]

  metadata = {
    "user-data"              = local.worker_user_data[each.key]
    "scaleq-token"           = var.worker_token
    "google-logging-enabled" = "true"
    "enable-oslogin"         = "TRUE"
    "block-project-ssh-keys" = "TRUE"
  }

  disk {
    source_image = var.os_image
    disk_size_gb = each.value.boot_disk_gb
    disk_type    = "pd-balanced"
    boot         = true
    auto_delete  = true
    labels       = local.group_labels[each.key]
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork
    dynamic "access_config" {
      for_each = var.external_ips ? [1] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  scheduling {
    provisioning_model          = each.value.spot ? "SPOT" : "STANDARD"
    preemptible                 = each.value.spot
    automatic_restart           = !each.value.spot
    on_host_maintenance         = each.value.spot ? "TERMINATE" : "MIGRATE"
    instance_termination_action = each.value.spot ? "DELETE" : null
  }

  service_account {
    email  = local.worker_sa[each.key]
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  # a changed template is a new template: the group rolls over to it (update_policy), then the old one goes
  lifecycle {
    create_before_destroy = true
  }

  depends_on = [google_project_service.apis]
}

resource "google_compute_region_instance_group_manager" "workers" {
  for_each           = var.worker_groups
  project            = var.project
  region             = var.region
  name               = "${local.prefix}-${each.key}"
  base_instance_name = "${local.prefix}-${each.key}"
  description        = "scaleq worker group ${each.key} of grid ${var.grid_name}"
  # spread over these zones (empty: the region's); no target_size: the autoscaler owns the size
  distribution_policy_zones = length(each.value.zones) > 0 ? each.value.zones : null
  wait_for_instances        = false

  version {
    name              = "primary"
    instance_template = google_compute_region_instance_template.workers[each.key].self_link
  }

  named_port {
    name = "metrics"
    port = var.worker_metrics_port
  }

  auto_healing_policies {
    health_check      = google_compute_health_check.workers.id
    initial_delay_sec = each.value.startup_seconds
  }

  # new templates roll out by surge: a new VM first, then the old one drains and goes; zones are never
  # rebalanced by deleting (possibly busy) VMs
  update_policy {
    type                           = "PROACTIVE"
    minimal_action                 = "REPLACE"
    most_disruptive_allowed_action = "REPLACE"
    replacement_method             = "SUBSTITUTE"
    instance_redistribution_type   = "NONE"
    max_surge_fixed                = length(each.value.zones) > 0 ? length(each.value.zones) : 4
    max_unavailable_fixed          = 0
  }
}

resource "google_compute_region_autoscaler" "workers" {
  for_each    = var.worker_groups
  project     = var.project
  region      = var.region
  name        = "${local.prefix}-${each.key}"
  description = "scaleq worker group ${each.key}: ceil(demand / slots) VMs of grid ${var.grid_name}"
  target      = google_compute_region_instance_group_manager.workers[each.key].id

  autoscaling_policy {
    min_replicas    = each.value.min_workers
    max_replicas    = each.value.max_workers
    cooldown_period = each.value.startup_seconds
    mode            = "ON"

    # a per-group metric: the queue's demand from the server, one VM per `slots` jobs
    metric {
      name                       = local.demand_metric
      filter                     = local.demand_filter[each.key]
      single_instance_assignment = each.value.slots
    }
  }
}

# -- health checks and the internal load balancer -----------------------------------------------------------------

resource "google_compute_health_check" "workers" {
  project             = var.project
  name                = "${local.prefix}-workers"
  description         = "scaleq workers of grid ${var.grid_name}: /metrics answers while the worker runs"
  check_interval_sec  = 10
  timeout_sec         = 5
  healthy_threshold   = 2
  unhealthy_threshold = 3

  http_health_check {
    port         = var.worker_metrics_port
    request_path = "/metrics"
  }

  depends_on = [google_project_service.apis]
}

resource "google_compute_region_backend_service" "workers" {
  count                           = var.internal_lb ? 1 : 0
  project                         = var.project
  region                          = var.region
  name                            = "${local.prefix}-workers"
  description                     = "scaleq workers of grid ${var.grid_name}: their /metrics"
  load_balancing_scheme           = "INTERNAL"
  protocol                        = "TCP"
  health_checks                   = [google_compute_health_check.workers.id]
  connection_draining_timeout_sec = 10

  dynamic "backend" {
    for_each = google_compute_region_instance_group_manager.workers
    content {
      group          = backend.value.instance_group
      balancing_mode = "CONNECTION"
      description    = "worker group ${backend.key}"
    }
  }
}

resource "google_compute_forwarding_rule" "workers" {
  count                 = var.internal_lb ? 1 : 0
  project               = var.project
  region                = var.region
  name                  = "${local.prefix}-workers"
  description           = "scaleq workers of grid ${var.grid_name}: their /metrics"
  load_balancing_scheme = "INTERNAL"
  ip_protocol           = "TCP"
  ports                 = [tostring(var.worker_metrics_port)]
  network               = var.network
  subnetwork            = var.subnetwork
  backend_service       = google_compute_region_backend_service.workers[0].id
  labels                = local.labels
}

resource "google_compute_firewall" "health_checks" {
  project       = var.project
  name          = "${local.prefix}-allow-health-checks"
  description   = "Google's health checkers to scaleq workers' /metrics (grid ${var.grid_name})"
  network       = var.network
  direction     = "INGRESS"
  source_ranges = ["35.191.0.0/16", "130.211.0.0/22"]
  target_tags   = [local.worker_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.worker_metrics_port)]
  }

  depends_on = [google_project_service.apis]
}

resource "google_compute_firewall" "collector_scrape" {
  project     = var.project
  name        = "${local.prefix}-allow-collector-scrape"
  description = "The OpenTelemetry collector to scaleq workers' /metrics (grid ${var.grid_name})"
  network     = var.network
  direction   = "INGRESS"
  source_tags = [local.collector_tag]
  target_tags = [local.worker_tag]

  allow {
    protocol = "tcp"
    ports    = [tostring(var.worker_metrics_port)]
  }

  depends_on = [google_project_service.apis]
}

# -- the OpenTelemetry collector ---------------------------------------------------------------------------------

locals {
  # where the collector finds the workers' /metrics (locals.tf renders collector.yaml with it)
  lb_address     = one(google_compute_forwarding_rule.workers[*].ip_address)
  workers_target = var.internal_lb ? "${local.lb_address}:${var.worker_metrics_port}" : ""
}

# A new configuration, image or token replaces the collector VM (it keeps no state).
resource "terraform_data" "collector_revision" {
  input = sha256(join("\n", [local.collector_config, var.collector_image, sha256(var.metrics_token)]))
}

resource "google_compute_instance" "collector" {
  project                   = var.project
  zone                      = var.collector_zone
  name                      = "${local.prefix}-otel-collector"
  description               = "OpenTelemetry collector of scaleq grid ${var.grid_name} (scrapes the server)"
  machine_type              = var.collector_machine_type
  labels                    = merge(local.labels, { "scaleq-role" = "otel-collector" })
  tags                      = [local.collector_tag]
  allow_stopping_for_update = true

  metadata = {
    "user-data"              = local.collector_user_data
    "collector-config"       = local.collector_config
    "collector-image"        = var.collector_image
    "scaleq-metrics-token"   = var.metrics_token
    "google-logging-enabled" = "true"
    "enable-oslogin"         = "TRUE"
    "block-project-ssh-keys" = "TRUE"
  }

  boot_disk {
    auto_delete = true
    initialize_params {
      image  = var.os_image
      size   = 10
      type   = "pd-balanced"
      labels = local.labels
    }
  }

  network_interface {
    network    = var.network
    subnetwork = var.subnetwork
    dynamic "access_config" {
      for_each = var.external_ips ? [1] : []
      content {
        network_tier = "PREMIUM"
      }
    }
  }

  scheduling {
    automatic_restart   = true
    on_host_maintenance = "MIGRATE"
  }

  service_account {
    email  = google_service_account.collector.email
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = true
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  lifecycle {
    replace_triggered_by = [terraform_data.collector_revision]
  }

  depends_on = [google_project_iam_member.collector]
}
"""

OUTPUTS_TF = r"""output "worker_groups" {
  description = "Per group: its managed instance group, instance template and autoscaler, and the filter of its metric."
  value = {
    for name, g in var.worker_groups : name => {
      instance_group_manager = google_compute_region_instance_group_manager.workers[name].name
      instance_group         = google_compute_region_instance_group_manager.workers[name].instance_group
      instance_template      = google_compute_region_instance_template.workers[name].name
      autoscaler             = google_compute_region_autoscaler.workers[name].name
      min_workers            = g.min_workers
      max_workers            = g.max_workers
      service_account        = local.worker_sa[name]
    }
  }
}

output "demand_metric" {
  description = "The Cloud Monitoring metric the autoscalers read (queued + running jobs per queue)."
  value       = local.demand_metric
}

output "internal_lb_address" {
  description = "Internal address of the workers' /metrics (null without the internal load balancer)."
  value       = var.internal_lb ? local.workers_target : null
}

output "collector_instance" {
  description = "The OpenTelemetry collector VM (its zone and name)."
  value       = "${google_compute_instance.collector.zone}/${google_compute_instance.collector.name}"
}

output "collector_service_account" {
  description = "The collector's service account."
  value       = google_service_account.collector.email
}
"""

COLLECTOR_YAML = r"""# OpenTelemetry Collector configuration of the scaleq grid "${grid}".
# A Terraform template: locals.tf renders it with templatefile() into the collector VM's metadata (key
# collector-config); the VM reads it at every start.
#
# The collector scrapes the scaleq *server* (not the workers): the server knows every queue's length even when a
# group has no worker, so groups scale from zero, and every reader sees the same number.

receivers:
  prometheus:
    config:
      scrape_configs:
        - job_name: scaleq-server
          scrape_interval: ${scrape_interval}
          scrape_timeout: ${scrape_interval}
          scheme: ${scheme}
          metrics_path: "${metrics_path}"
          authorization:
            type: Bearer
            # a scaleq token of role read, from the VM's metadata (scaleq-metrics-token)
            credentials_file: /etc/otelcol/scaleq-token
          static_configs:
            - targets: ["${target}"]
          metric_relabel_configs:
            # queue_length{queue} is the original module's gauge; scaleq_* the server's own series
            - source_labels: [__name__]
              regex: "queue_length|scaleq_.*"
              action: keep
%{ if scrape_workers ~}
        # informational only (autoscaling never uses it): the internal load balancer answers with one worker per
        # scrape, as in the original module
        - job_name: scaleq-workers
          scrape_interval: ${scrape_interval}
          scrape_timeout: ${scrape_interval}
          static_configs:
            - targets: ["${workers_target}"]
%{ endif ~}

processors:
  memory_limiter:
    check_interval: 1s
    limit_percentage: 80
    spike_limit_percentage: 20
  # demand = queued + running jobs of a queue, the series each group's autoscaler divides by its slots:
  # scaleq_demand{queue, state="demand"} (and state="finished", which nothing reads)
  metricstransform/demand:
    transforms:
      - include: scaleq_jobs
        match_type: strict
        action: insert
        new_name: scaleq_demand
        operations:
          - action: aggregate_label_values
            label: state
            aggregated_values: [queued, running]
            new_value: demand
            aggregation_type: sum
  batch:
    timeout: 5s

exporters:
  # Metrics become workload.googleapis.com/<name> on the monitored resource generic_task (job = the scrape job).
  # No resourcedetection processor on purpose: it would make them gce_instance metrics of the collector VM, which
  # the autoscaler would read as per-instance metrics.
  googlecloud:
    project: ${project}
    metric:
      prefix: workload.googleapis.com

extensions:
  health_check:
    endpoint: localhost:13133

service:
  extensions: [health_check]
  pipelines:
    metrics:
      receivers: [prometheus]
      processors: [memory_limiter, metricstransform/demand, batch]
      exporters: [googlecloud]
"""


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
    table = "\n".join(rows)
    skipped_text = ""
    if skipped:
        names = ", ".join(f"`{g.name}` ({g.provider})" for g in skipped)
        skipped_text = f"\nGroups of other providers are not part of this module: {names}.\n"
    server_note = (
        f"`server_url` defaults to the grid's `server.public_url` (`{grid.server.public_url}`)."
        if grid.server.public_url
        else "The grid has no `server.public_url`: pass `-var server_url=https://…`, the server's URL for workers."
    )
    return f"""# scaleq grid `{grid.name}` on Google Cloud (Terraform)

Generated by `scaleq export terraform` from the grid file. Every value that came from the grid is a default in
`variables.tf`; override it with `-var` or a `.tfvars` file and regenerate only when the grid changes.

| group | workers | slots | machine type | zones | spot |
|---|---|---|---|---|---|
{table}
{skipped_text}
## Use

```bash
scaleq tokens create --role worker --name "gcp workers"      # -> WORKER_TOKEN
scaleq tokens create --role read --name "gcp collector"      # -> METRICS_TOKEN
terraform init
terraform apply -var worker_token=$WORKER_TOKEN -var metrics_token=$METRICS_TOKEN
```

{server_note}
Workers and the collector must reach it from the VPC. VMs have no external IP unless `external_ips = true`, so the
network needs Cloud NAT (or Private Google Access with images in Artifact Registry) for image pulls and for Cloud
Monitoring. Do not also run `scaleq apply` for these groups: here GCP's autoscaler
owns their size.

## What it creates

- APIs: Compute Engine, IAM, Cloud Resource Manager, Cloud Logging, Cloud Monitoring.
- Per group: a regional instance template (Container-Optimized OS; cloud-init starts `scaleq worker` in the group's
  image under systemd), a regional managed instance group spread over the group's zones (rolling updates by
  surge, autohealing on the workers' `/metrics`, no zone rebalancing that would kill busy VMs) and a regional
  autoscaler between `min_workers` and `max_workers`.
- The autoscaler's metric is `workload.googleapis.com/scaleq_demand{{queue, state="demand"}}`: queued + running jobs
  of the group's queue, a per-group metric with `single_instance_assignment = slots` (one VM per `slots` jobs). It
  comes from the **server**, so a group scales from zero and every group sees the same number.
- An OpenTelemetry collector VM (`collector.yaml`): the Prometheus receiver scrapes the server's `/metrics` with the
  read token, a metricstransform processor derives the demand, the googlecloud exporter writes to Cloud Monitoring.
  A scrape failure shows as `workload.googleapis.com/up` = 0 (alert on it); the collector's own health is on
  `localhost:13133` on its VM.
- An internal TCP load balancer in front of the groups' `/metrics` (port `worker_metrics_port`), as in the original
  module (`internal_lb = false` leaves it out), one HTTP health check (load balancer and autohealing), firewall
  rules for Google's health checkers and for the collector.
- Service accounts: one for the collector (metric and log writer), one for the groups that name none (log writer,
  Artifact Registry reader).
- Labels `scaleq-grid`, `managed-by = terraform` (and `scaleq-group` per group) on everything that takes labels
  (templates, their VMs and disks, the collector VM and disk, the forwarding rule); the rest carry descriptions.

Workers drain on shutdown: a VM that the group deletes (scale-in, a rolling update, autohealing) stops its worker
with `docker stop --time drain_seconds`; the worker finishes its running jobs in that time. GCE allows a deleted VM
about 90 s (a preempted spot VM 30 s); longer jobs are handed back when their lease expires and run again
elsewhere. GCP's autoscaler picks which VM to delete: it can choose a busy one, and it scales in only after its
10-minute stabilization period.

## What `terraform destroy` removes, and what it keeps

It removes everything above that `apply` created: VMs, groups, templates, autoscalers, the load balancer, the
health check, firewall rules, the collector, the service accounts and their role bindings. Jobs still running on
workers are cut short; the server puts them back in the queue.

It keeps:
- the scaleq server and its store — the jobs, their logs and outputs in SQLite or the PostgreSQL database — and the
  tokens (revoke them with `scaleq tokens`);
- the Cloud Monitoring metric descriptors (`workload.googleapis.com/scaleq_demand`, `queue_length`, `scaleq_*`, `up`)
  and the data already written; delete descriptors with the Monitoring API if you want them gone;
- logs already in Cloud Logging;
- the container images (worker and collector) and any Artifact Registry repository;
- the APIs (`disable_on_destroy = false`), the network, subnetwork and any Cloud NAT;
- the Terraform state, which holds both tokens: keep it somewhere private.

## Security notes

- The tokens reach the VMs through instance metadata: anyone who can read instances in the project can read them.
  Job containers cannot reach the metadata server (a firewall rule on each worker VM); jobs of the `process` runtime
  or with the host network can.
- Queue names (capabilities) appear in the variables, the autoscalers' filters and the metric's labels.
"""


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
    return groups, skipped


def export_terraform(grid: Grid, out: Path) -> list[Path]:
    """Write the module for the grid's gcp groups into ``out``; return the files written (in a fixed order)."""
    groups, skipped = _check(grid)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "versions.tf": VERSIONS_TF,
        "variables.tf": variables_tf(grid, groups),
        "locals.tf": LOCALS_TF,
        "main.tf": MAIN_TF,
        "outputs.tf": OUTPUTS_TF,
        "collector.yaml": COLLECTOR_YAML,
        "README.md": readme(grid, groups, skipped),
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text)
        written.append(path)
    return written
