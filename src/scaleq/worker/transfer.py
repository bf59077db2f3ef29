"""Moving bytes for a job: input files down from the server's blobs, outputs up as one tar archive."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import shutil
import tarfile
from collections.abc import Iterator
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
    files = sorted(_regular_files(outputs_dir))
    if not files:
        return None
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in files:
            tar.add(p, arcname=p.relative_to(outputs_dir).as_posix(), recursive=False)
    return buf.getvalue()


def _regular_files(root: Path) -> Iterator[Path]:
    """Regular files below ``root``, links not followed; with a stack, not recursion (``Path.rglob`` recurses, and a
    job may nest its outputs deeper than Python does)."""
    stack = [root]
    while stack:
        with os.scandir(stack.pop()) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)


def remove_tree(root: Path) -> None:
    """``shutil.rmtree(root, ignore_errors=True)`` that also copes with a tree deeper than Python recurses (rmtree
    recurses, and ``ignore_errors`` does not cover RecursionError). Never raises; what cannot be removed stays."""
    try:
        shutil.rmtree(root, ignore_errors=True)
        return
    except RecursionError:
        pass
    stack, tried = [str(root)], set()
    while stack:
        directory = stack[-1]
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except OSError:
            stack.pop()
            continue
        subdirs = [e.path for e in entries if e.is_dir(follow_symlinks=False) and e.path not in tried]
        for e in entries:
            if not e.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(e.path)
        if subdirs:  # come back to this one once they are gone
            tried.update(subdirs)
            stack.extend(subdirs)
        else:
            with contextlib.suppress(OSError):
                os.rmdir(directory)
            stack.pop()
