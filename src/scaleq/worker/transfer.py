"""Moving bytes for a job: input files down from the server's blobs, outputs up as one tar archive."""

from __future__ import annotations

import asyncio
import io
import os
import tarfile
from pathlib import Path

from scaleq.client import Client
from scaleq.jobs import JobDefinition


async def fetch_inputs(client: Client, definition: JobDefinition, inputs_dir: Path) -> None:
    inputs_dir.mkdir(parents=True, exist_ok=True)
    for item in definition.inputs:
        data = await client.blob(item.sha256)
        target = inputs_dir / item.path
        await asyncio.to_thread(_write, target, data, item.mode)


def _write(target: Path, data: bytes, mode: int) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    os.chmod(target, mode)


def pack_outputs(outputs_dir: Path) -> bytes | None:
    """A tar of the regular files under ``outputs_dir`` (paths relative to it), or None when there are none."""
    if not outputs_dir.is_dir():
        return None
    files = sorted(p for p in outputs_dir.rglob("*") if p.is_file() and not p.is_symlink())
    if not files:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in files:
            tar.add(p, arcname=p.relative_to(outputs_dir).as_posix(), recursive=False)
    return buf.getvalue()
