"""``scaleq export``: a grid as files for your own deployment tools (Terraform for GCP, Kubernetes manifests)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from scaleq.cli.common import bad_input, err, fail, out

export_app = typer.Typer(help="Export a grid for your own deployment tools.", no_args_is_help=True)


@export_app.command("terraform")
def export_terraform_command(
    directory: Annotated[Path, typer.Argument(help="Directory to write the module into (created if missing).")],
    grid_file: Annotated[Path, typer.Option("--grid", "-g", help="Grid file (TOML).")],
) -> None:
    """A Terraform module (Google Cloud) for the grid's gcp groups.

    Per group an instance template, a regional managed instance group and an autoscaler on the server's queue
    demand (it scales from zero); an internal load balancer, an OpenTelemetry collector VM, the APIs, service
    accounts and firewall rules. Read DIRECTORY/README.md next."""
    from scaleq import grid as gridmod
    from scaleq.export.terraform import ExportError, export_terraform

    try:
        grid = gridmod.load(grid_file)
    except gridmod.GridFileError as exc:
        bad_input(str(exc))
    try:
        files = export_terraform(grid, directory)
    except ExportError as exc:
        bad_input(f"{grid_file}: {exc}")
    except OSError as exc:
        fail(f"cannot write {directory}: {exc.strerror or exc}")
    for path in files:
        out.print(str(path), markup=False, highlight=False)
    err.print(f"next: read {directory / 'README.md'}, then: terraform -chdir={directory} init", markup=False)


@export_app.command("k8s")
def export_k8s_command(
    directory: Annotated[Path, typer.Argument(help="Directory to write the manifests into (created if missing).")],
    grid_file: Annotated[Path, typer.Option("--grid", "-g", help="Grid file (TOML).")],
    image: Annotated[str | None, typer.Option(help="Image of the server \\[default: the first group's image].")] = None,
) -> None:
    """Kubernetes manifests, scaled by KEDA, for the grid's kubernetes groups.

    The server (Deployment + Service, on PostgreSQL), per group a worker Deployment and a KEDA ScaledObject on the
    server's own queue counts, the Secrets to fill in. For deploying with your own tools; scaleq's own controller
    (the kubernetes provider) scales in more gently. Read DIRECTORY/README.md next."""
    from scaleq import grid as gridmod
    from scaleq.export.k8s import ExportError, export_k8s

    try:
        grid = gridmod.load(grid_file)
    except gridmod.GridFileError as exc:
        bad_input(str(exc))
    try:
        files = export_k8s(grid, directory, image=image)
    except ExportError as exc:
        bad_input(f"{grid_file}: {exc}")
    except OSError as exc:
        fail(f"cannot write {directory}: {exc.strerror or exc}")
    for path in files:
        out.print(str(path), markup=False, highlight=False)
    err.print(f"next: read {directory / 'README.md'}, fill in {directory / '10-secrets.yaml'}", markup=False)
