"""Job outputs and blobs in bounded memory: uploads checked as they are expanded, downloads streamed by parts.

An upload (``POST /leases/outputs``) is a tar archive, possibly compressed; the limit is on what it *expands* to,
the bytes stored, not on what was sent (a 0.7 MB gzip can hold 700 MiB of zeros). So:

1. the request body is spooled to a temporary file as it arrives, counted against the limit (what is sent is never
   more than what is stored, less the tar headers; so this refuses nothing honest); past it the rest is read and
   dropped, and the answer is 413;
2. the archive is read as a stream (``tarfile`` ``r|*``), each regular file copied in ``CHUNK``-sized pieces to its
   own temporary file while it is hashed, and the running total of expanded bytes checked at every piece: past the
   limit the upload stops there with 413 and a message saying so (at most ``limit`` bytes were ever written, to
   disk, never to memory); so do more than ``max_files`` entries (tarfile keeps a record of each one);
3. only then are the files stored (:meth:`~scaleq.store.base.Store.put_blob_file`, part by part) and recorded for
   the attempt in one transaction (:meth:`~scaleq.store.base.Store.record_outputs`), so a refused upload leaves no
   outputs and an accepted one replaces the last attempt's whole.

Hard links in the archive (the worker writes a second name of a file as a link to the first) keep both names, with
the same bytes. Other entries (directories, symlinks, devices) are not outputs and are skipped, as are names that
climb out (``..``) of ``/outputs``.

A download answers with the blob's parts one at a time (:func:`stream_blob`), each read from the store when the
client is ready for it, so a slow reader holds one part of memory, not a file.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse

from scaleq.store.base import OutputFile, Store

#: Bytes copied at a time, while spooling the body and while expanding a member.
CHUNK = 1 << 20


class OutputsRefused(Exception):
    """The upload cannot be taken; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class _Expanded:
    files: list[OutputFile]
    paths: dict[str, str]  # sha256 -> the temporary file holding those bytes


async def receive_outputs(
    request: Request, store: Store, lease: str, *, limit: int, max_files: int, spool_dir: str | None = None
) -> list[OutputFile]:
    """Take the attempt's outputs archive from the request body, in bounded memory; OutputsRefused when it is too
    big (sent or expanded), has too many entries, or is not a tar archive."""
    with tempfile.TemporaryDirectory(prefix="scaleq-outputs-", dir=spool_dir) as tmp:
        archive = Path(tmp) / "archive"
        sent = 0
        with archive.open("wb") as f:
            async for piece in request.stream():
                sent += len(piece)
                if sent <= limit:
                    await anyio.to_thread.run_sync(f.write, piece)
        if sent > limit:
            # (the rest was read and dropped, not left unread: a client cut off mid-send sees a broken connection,
            # which a worker takes for an unreachable server and retries, instead of this answer)
            raise OutputsRefused(413, f"outputs over the limit of {limit} bytes (the archive sent is {sent} bytes)")
        expanded = await anyio.to_thread.run_sync(_expand, archive, Path(tmp), limit, max_files)
        archive.unlink()
        for sha, path in expanded.paths.items():
            await store.put_blob_file(sha, os.path.getsize(path), path)
        await store.record_outputs(lease, expanded.files)
        return expanded.files


def _expand(archive: Path, tmp: Path, limit: int, max_files: int) -> _Expanded:
    files: dict[str, OutputFile] = {}
    paths: dict[str, str] = {}
    total = entries = 0
    try:
        with archive.open("rb") as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar:
                entries += 1
                if entries > max_files:
                    raise OutputsRefused(413, f"outputs have more than {max_files} entries (files, directories, links)")
                tar.members.clear()  # type: ignore[attr-defined]  # a stream needs no record of what went by
                name = _name(member.name)
                if name is None:
                    continue
                if member.islnk():
                    target = files.get(_name(member.linkname) or "")
                    if target is not None:
                        files[name] = OutputFile(name, target.sha256, target.size)
                    continue
                if not member.isfile():
                    continue
                source = tar.extractfile(member)
                digest = hashlib.sha256()
                size = 0
                fd, path = tempfile.mkstemp(dir=tmp)
                with os.fdopen(fd, "wb") as out:
                    while source is not None and (piece := source.read(CHUNK)):
                        size += len(piece)
                        total += len(piece)
                        if total > limit:
                            raise OutputsRefused(
                                413,
                                f"outputs over the limit of {limit} bytes once expanded (stopped at {name!r}; the "
                                "limit counts the bytes stored, not the compressed archive sent)",
                            )
                        digest.update(piece)
                        out.write(piece)
                sha = digest.hexdigest()
                if sha in paths:
                    os.unlink(path)
                else:
                    paths[sha] = path
                files[name] = OutputFile(name, sha, size)
    except tarfile.TarError as exc:
        raise OutputsRefused(400, f"outputs are not a tar archive: {exc}") from exc
    return _Expanded(sorted(files.values(), key=lambda f: f.path), paths)


def _name(raw: str) -> str | None:
    """The output's path relative to /outputs, or None for the root itself or a name climbing out of it."""
    name = raw.lstrip("/")
    while name.startswith("./"):
        name = name[2:]
    if not name or name == "." or ".." in name.split("/"):
        return None
    return name


async def stream_blob(store: Store, sha256: str) -> StreamingResponse:
    """A blob as the response body, one stored part at a time (NotFound, before any byte, when there is none)."""
    size, parts = await store.blob_info(sha256)

    async def body() -> AsyncIterator[bytes]:
        for part in range(parts):
            yield await store.read_blob_part(sha256, part)

    return StreamingResponse(body(), media_type="application/octet-stream", headers={"Content-Length": str(size)})
