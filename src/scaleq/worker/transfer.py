"""Moving bytes for a job: input files down from the server's blobs, outputs up as one tar archive (built in a
temporary file, sent as a stream), and the attempt's work dir removed after it."""

from __future__ import annotations

import contextlib
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path

from scaleq.client import Client
from scaleq.jobs import JobDefinition


async def fetch_inputs(client: Client, definition: JobDefinition, inputs_dir: Path) -> None:
    inputs_dir.mkdir(parents=True, exist_ok=True)
    for item in definition.inputs:
        target = inputs_dir / item.path
        target.parent.mkdir(parents=True, exist_ok=True)
        await client.blob_to_file(item.sha256, target)  # streamed to the file, not held
        os.chmod(target, item.mode)


def pack_outputs(outputs_dir: Path, archive: Path) -> bool:
    """Write a tar of the regular files under ``outputs_dir`` (paths relative to it) to the file ``archive``,
    copied a piece at a time (a 1 GiB file costs disk, not memory); False, and no archive, when there are none.

    Links are not followed; a second name of a file (a hard link) goes in as a link to the first, so both names
    arrive with the same bytes. The tree is walked holding one directory open at a time (see :func:`_walk`), so
    any depth is packed, however long its paths."""
    if not outputs_dir.is_dir():
        return False
    count = 0
    seen: dict[tuple[int, int], str] = {}
    with archive.open("wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fd, rel, entry in _walk(outputs_dir):
            if entry is None or not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            info = tarfile.TarInfo(rel)
            info.mode, info.mtime, info.uid, info.gid = stat.S_IMODE(st.st_mode), int(st.st_mtime), 0, 0
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen:
                info.type, info.linkname = tarfile.LNKTYPE, seen[key]
                tar.addfile(info)
                count += 1
                continue
            try:
                f = os.fdopen(os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb")
            except OSError:
                continue  # unreadable: not an output
            with f:
                info.size = os.fstat(f.fileno()).st_size
                tar.addfile(info, f)
            seen[key] = rel
            count += 1
    if not count:
        archive.unlink()
    return count > 0


_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW


def _walk(root: Path) -> Iterator[tuple[int, str, os.DirEntry[str] | None]]:
    """Depth first, in name order: ``(fd, path relative to root, entry)`` for every entry below ``root`` (``fd``
    its directory's, valid until the next step); after a directory's entries, ``(parent fd, its path, None)``.

    One directory is open at a time: a step down opens the child by name under its parent (``dir_fd``), a step up
    opens ``..``; so neither the depth (Python's recursion limit) nor the path's length (``PATH_MAX``, 4096 on
    Linux: a 2,100-deep tree passes it) nor the number of open files limits it. Directories that cannot be opened
    are passed over (reported as entries, never entered)."""
    fd = os.open(root, _DIR)
    names: list[str] = []  # from root down to the directory fd is open on
    todo: list[list[str]] = []  # per level: its subdirectories still to visit, last first
    try:
        while True:
            with os.scandir(fd) as it:
                entries = sorted(it, key=lambda e: e.name)
            prefix = "/".join(names)
            subdirs = []
            for e in entries:
                yield fd, f"{prefix}/{e.name}" if prefix else e.name, e
                if e.is_dir(follow_symlinks=False):
                    subdirs.append(e.name)
            todo.append(subdirs[::-1])
            while True:
                pending = todo[-1]
                if pending:
                    name = pending.pop()
                    try:
                        child = os.open(name, _DIR, dir_fd=fd)
                    except OSError:
                        continue
                    os.close(fd)
                    fd = child
                    names.append(name)
                    break
                todo.pop()
                if not names:
                    return
                parent = os.open("..", _DIR, dir_fd=fd)
                os.close(fd)
                fd = parent
                name = names.pop()
                yield fd, "/".join([*names, name]), None
    finally:
        os.close(fd)


def remove_tree(root: Path) -> None:
    """Remove ``root`` and everything below it, at any depth and path length (see :func:`_walk`); never raises,
    and what cannot be removed stays."""
    try:
        st = os.lstat(root)
    except OSError:
        return
    if not stat.S_ISDIR(st.st_mode):
        with contextlib.suppress(OSError):
            os.unlink(root)
        return
    with contextlib.suppress(OSError):
        for fd, rel, entry in _walk(root):
            if entry is None:  # a directory whose entries are gone: remove it from its parent
                with contextlib.suppress(OSError):
                    os.rmdir(rel.rsplit("/", 1)[-1], dir_fd=fd)
            elif not entry.is_dir(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.name, dir_fd=fd)
    with contextlib.suppress(OSError):
        os.rmdir(root)
