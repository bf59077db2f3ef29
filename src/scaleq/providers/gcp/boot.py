"""How a GCP worker VM boots: the one definition the gcp provider and ``scaleq export terraform`` share.

A worker VM runs Container-Optimized OS (COS). Its instance metadata carries cloud-init user-data (:func:`user_data`)
that writes the worker's settings to ``/etc/scaleq``, a start script (``templates/run-worker.sh``) and a systemd unit
(``templates/scaleq-worker.service.tftpl``), then starts the unit. The script runs the group's image with ``docker
run`` as ``scaleq worker …``, with the worker token read from the metadata key ``scaleq-token`` and the worker id
read from the metadata server (the instance name, which the provider chooses). This is Google's documented
replacement for the container startup agent (``gce-container-declaration`` metadata), which is deprecated.

**One definition, two renderers.** The user-data and the unit are Terraform template files
(``templates/*.tftpl``), using a small subset of Terraform's template syntax: ``${name}``, ``${jsonencode(name)}``
and the escapes ``$${`` and ``%%{``. The provider renders them here, in Python (:func:`render`); the export copies
the same files into the module and Terraform renders them with ``templatefile()`` from the module's variables, so
an operator's ``-var`` still changes what VMs run. Every value goes into the YAML as a JSON string (valid YAML),
encoded exactly as Terraform's ``jsonencode`` does (:func:`jsonencode`), so the same group gives the same bytes
from both paths — which the tests check with a real Terraform.

What the worker gets, from either path: :func:`worker_argv` (:func:`~scaleq.providers.base.worker_args` without the
worker id, which the VM adds; without ``--cpus`` when the grid does not set resources, so the worker offers its
VM's cores rather than those of the machine that read the grid; with ``--metrics-port`` for health checks),
``PYTHONUNBUFFERED=1`` and the group's env, the Docker socket when the group runs container jobs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from importlib import resources

from scaleq.grid import Group
from scaleq.jobs import RuntimeKind
from scaleq.providers.base import worker_args

#: The template files of the boot definition (``templates/`` of this package), as the export names them too.
USER_DATA_TEMPLATE = "worker-user-data.yaml.tftpl"
UNIT_TEMPLATE = "scaleq-worker.service.tftpl"
SCRIPT = "run-worker.sh"
FILES = (USER_DATA_TEMPLATE, UNIT_TEMPLATE, SCRIPT)

#: Instance metadata keys: the cloud-init user-data, and the worker token the start script reads.
USER_DATA_KEY = "user-data"
TOKEN_KEY = "scaleq-token"
#: The other metadata every worker VM carries: logs to Cloud Logging, OS Login, no project-wide SSH keys.
METADATA = {
    "google-logging-enabled": "true",
    "enable-oslogin": "TRUE",
    "block-project-ssh-keys": "TRUE",
}
#: Where workers serve ``/metrics`` (health checks, the export's internal load balancer).
METRICS_PORT = 9100
#: Seconds a stopping VM leaves its worker to drain: GCE gives a deleted VM about 90 s (spot VMs: 30 s).
DRAIN_SECONDS = 80
SOCKET = "/var/run/docker.sock"

_SYNTAX = re.compile(r"\$\$\{|%%\{|\$\{(?:jsonencode\((?P<json>\w+)\)|(?P<plain>\w+))\}|\$\{|%\{")
# Characters JSON leaves as they are and YAML refuses (outside YAML's printable set): they cannot be in user-data.
_NOT_YAML = re.compile("[\x7f-\x84\x86-\x9f\ud800-\udfff\ufffe\uffff]")
# What Go's encoding/json (and so Terraform's jsonencode) escapes that Python's json.dumps leaves as it is.
_GO_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


class BootError(ValueError):
    """A group cannot boot as asked; the message names the field."""


def template(name: str) -> str:
    """The text of ``templates/<name>`` of this package, as it is."""
    return resources.files(__package__).joinpath("templates", name).read_text(encoding="utf-8")


def jsonencode(value: str) -> str:
    """``value`` as Terraform's ``jsonencode`` writes a string (Go's JSON encoder: HTML characters escaped)."""
    return json.dumps(value, ensure_ascii=False).translate(_GO_ESCAPES)


def render(text: str, values: Mapping[str, str]) -> str:
    """A template in the subset of Terraform's syntax these files use, rendered as ``templatefile()`` would.

    Anything else that Terraform would read as template syntax is an error here, as is a value missing or left
    unused: the file and its callers are out of step."""
    used: set[str] = set()

    def sub(m: re.Match[str]) -> str:
        whole = m.group(0)
        if whole in ("$${", "%%{"):
            return whole[1:]
        name = m.group("json") or m.group("plain")
        if name is None:
            raise ValueError(f"template syntax {whole!r} at offset {m.start()} is not supported here")
        if name not in values:
            raise ValueError(f"template value {name!r} is not given")
        used.add(name)
        return jsonencode(values[name]) if m.group("json") else values[name]

    out = _SYNTAX.sub(sub, text)
    if unused := set(values) - used:
        raise ValueError(f"template values {sorted(unused)} are not used")
    return out


def worker_argv(group: Group, server: str, server_grace: float, metrics_port: int = METRICS_PORT) -> list[str]:
    """``scaleq worker …`` arguments without the worker id (the VM adds its instance name)."""
    argv = worker_args(group, server, "-", server_grace)
    at = argv.index("--worker-id")
    del argv[at : at + 2]
    if "resources" not in group.model_fields_set:  # the grid's default is the cores of the machine that read it
        at = argv.index("--cpus")
        del argv[at : at + 2]
    return [*argv, "--metrics-port", str(metrics_port)]


def docker_opts(group: Group, drain_seconds: int = DRAIN_SECONDS) -> list[str]:
    """``docker run`` options for the worker container beyond the fixed ones of the start script."""
    opts = ["--stop-timeout", str(drain_seconds)]
    if RuntimeKind.docker in group.runtimes:  # container jobs run as siblings on the VM's Docker
        opts += ["--volume", f"{SOCKET}:{SOCKET}"]
    return opts


def worker_env(group: Group) -> str:
    """The worker's environment as a Docker env file, keys in order (as Terraform iterates a map)."""
    env = {"PYTHONUNBUFFERED": "1", **group.env}
    return "".join(f"{k}={env[k]}\n" for k in sorted(env))


def unit(drain_seconds: int = DRAIN_SECONDS) -> str:
    """The worker's systemd unit."""
    values = {"drain_seconds": str(drain_seconds), "stop_timeout": str(drain_seconds + 15)}
    return render(template(UNIT_TEMPLATE), values)


def check(group: Group) -> None:
    """Refuse what the user-data cannot carry, naming the field: no image, or a character YAML does not allow."""
    if not group.image:
        raise BootError(f"group {group.name}: a gcp group needs image (the worker image its VMs run)")
    fields = {"image": group.image, **{f"env.{k}": f"{k}={v}" for k, v in group.env.items()}}
    fields |= {f"tags[{i}]": t for i, t in enumerate(group.tags)}
    for where, value in fields.items():
        if bad := _NOT_YAML.search(value):
            raise BootError(
                f"group {group.name}: {where} holds U+{ord(bad.group()):04X}, a control character cloud-init's YAML "
                "cannot carry"
            )


def user_data(
    group: Group,
    server: str,
    *,
    server_grace: float,
    metrics_port: int = METRICS_PORT,
    drain_seconds: int = DRAIN_SECONDS,
) -> str:
    """The cloud-init user-data of a worker VM of ``group`` reaching the server at ``server``."""
    check(group)
    assert group.image
    return render(
        template(USER_DATA_TEMPLATE),
        {
            "image": group.image,
            "metrics_port": str(metrics_port),
            "args": "\n".join(worker_argv(group, server, server_grace, metrics_port)),
            "docker_opts": "\n".join(docker_opts(group, drain_seconds)),
            "env": worker_env(group),
            "script": template(SCRIPT),
            "unit": unit(drain_seconds),
        },
    )


def metadata(user_data_text: str, token: str) -> dict[str, str]:
    """A worker VM's instance metadata: the user-data, the token and :data:`METADATA`."""
    return {USER_DATA_KEY: user_data_text, TOKEN_KEY: token, **METADATA}
