"""Build the provider a group names. Providers for clouds import their client libraries only when used."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from scaleq.grid import Group
from scaleq.providers.base import Provider, ProviderError


@dataclass(frozen=True)
class ProviderContext:
    grid: str
    server: str
    worker_token: str
    data_dir: Path
    public_url: str | None = None  # how workers on other machines reach the server (grid [server] public_url)
    job_user: str | None = None  # local workers' --job-user (scaleq up --job-user); None: theirs to decide

    @property
    def public_server(self) -> str:
        return self.public_url or self.server


def make_provider(group: Group, ctx: ProviderContext) -> Provider:
    if group.provider == "local":
        from scaleq.providers.local import LocalProvider

        return LocalProvider(
            grid=ctx.grid,
            server=ctx.server,
            token=ctx.worker_token,
            state_dir=ctx.data_dir / "workers",
            log_dir=ctx.data_dir / "logs",
            job_user=ctx.job_user,
        )
    if group.provider == "docker":
        from scaleq.providers.docker import DockerProvider

        return DockerProvider(grid=ctx.grid, server=ctx.server, token=ctx.worker_token)
    if group.provider == "gcp":
        from scaleq.providers.gcp import GcpProvider

        return GcpProvider(
            grid=ctx.grid, server=ctx.public_server, token=ctx.worker_token, settings=group.gcp, group_name=group.name
        )
    if group.provider == "kubernetes":
        from scaleq.providers.kubernetes import KubernetesProvider

        return KubernetesProvider(
            grid=ctx.grid, server=ctx.public_server, token=ctx.worker_token, settings=group.kubernetes
        )
    if group.provider == "fly":
        from scaleq.providers.fly import FlyProvider

        return FlyProvider(grid=ctx.grid, server=ctx.public_server, token=ctx.worker_token, settings=group.fly)
    raise ProviderError(f"group {group.name}: provider {group.provider!r} is not available in this version of scaleq")
