"""Bounded memory (issue 12): outputs checked as they are expanded and streamed to and from the store, the per-attempt
log cap, cursor paging of GET /jobs, and the worker's outputs archive built in a file.

The memory bounds are measured on real processes: a ``scaleq server`` subprocess (its peak RSS, ``VmHWM``, before
and after) for the gzip bomb and the downloads, on SQLite and on PostgreSQL; a Python subprocess packing a 1 GiB
sparse file for the worker. The bounds are generous (+150 MB) against what holding the bytes would cost (700 MiB,
three readers of 200 MiB, 1 GiB).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import io
import os
import subprocess
import sys
import tarfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from scaleq.client import ApiError, Client
from scaleq.jobs import JobDefinition, SubmitRequest
from scaleq.server.settings import ServerSettings
from scaleq.store.base import Store, log_cap_note
from scaleq.store.postgres import PostgresStore
from scaleq.store.sqlite import SQLiteStore
from scaleq.worker import transfer
from scaleq.worker.logship import LogShipper
from tests.helpers import LiveServer, eventually, free_port, make_tokens, serve

MiB = 1 << 20
#: How much a server's (or the packer's) peak RSS may grow over an operation that would hold hundreds of MiB.
BOUND = 150 * MiB


def req(*cmd: str, queue: str = "q") -> SubmitRequest:
    return SubmitRequest(queue=queue, definition=JobDefinition(command=list(cmd)))


async def claimed(url: str, tokens: dict[str, str], name: str) -> str:
    """A lease of a fresh job, held by worker w1."""
    async with Client(url, tokens["worker"]) as w, Client(url, tokens["submit"]) as s:
        await w.register({"id": "w1", "queue": "q", "slots": 4, "runtimes": ["process"], "cpus": 4})
        await s.submit(req("echo", name))
        (claim,), _, _ = await w.claim("w1", 1, wait=5)
        return claim.lease


# -- a real server process --------------------------------------------------------------------------------------------


class Zeros(io.RawIOBase):
    """``size`` zero bytes, read a piece at a time (nothing held)."""

    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        n = min(len(b), self.left)
        b[:n] = bytes(n)
        self.left -= n
        return n


@pytest.fixture(scope="session")
def gzip_bomb(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A gzip'd tar holding one 700 MiB file of zeros: well under 1 MB sent."""
    path = tmp_path_factory.mktemp("bomb") / "outputs.tar.gz"
    with gzip.open(path, "wb", compresslevel=9) as gz, tarfile.open(fileobj=gz, mode="w") as tar:
        info = tarfile.TarInfo("zeros.bin")
        info.size = 700 * MiB
        tar.addfile(info, io.BufferedReader(Zeros(info.size), 4 * MiB))
    assert path.stat().st_size < MiB
    return path


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("pg_url"))
    return str(tmp_path / "scaleq.db")


def peak_rss(pid: int) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@contextlib.asynccontextmanager
async def server_process(
    store_url: str, tmp_path: Path, *options: str
) -> AsyncIterator[tuple[str, dict[str, str], int]]:
    """``scaleq server`` on its own port over ``store_url``: its URL, tokens of each role, and its pid."""
    store: Store = PostgresStore(store_url) if store_url.startswith("postgresql") else SQLiteStore(store_url)
    await store.open()
    try:
        tokens = await make_tokens(store)
    finally:
        await store.close()
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    argv = [sys.executable, "-m", "scaleq", "server", "--port", str(port), "--store", store_url, *options]
    proc = await asyncio.create_subprocess_exec(
        *argv, "--data-dir", str(tmp_path / "data"), stdout=log, stderr=asyncio.subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with Client(url, tokens["admin"]) as c:

            async def up() -> bool:
                assert proc.returncode is None, (tmp_path / "server.log").read_text()
                with contextlib.suppress(Exception):
                    await c.queues()
                    return True
                return False

            await eventually(up, timeout=60, what="the server answers")
        yield url, tokens, proc.pid
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        log.close()


async def test_a_gzip_bomb_is_refused_as_it_expands_without_the_server_growing(
    store_url: str, tmp_path: Path, gzip_bomb: Path
) -> None:
    async with server_process(store_url, tmp_path) as (url, tokens, pid):
        lease = await claimed(url, tokens, "bomb")
        before = peak_rss(pid)
        async with httpx.AsyncClient(base_url=url, timeout=300) as raw:
            r = await raw.post(
                "/api/v1/leases/outputs",
                content=gzip_bomb.read_bytes(),
                headers={"Authorization": f"Bearer {tokens['worker']}", "X-Scaleq-Lease": lease},
            )
        assert r.status_code == 413, r.text
        detail = r.json()["detail"]
        assert "once expanded" in detail and str(256 * MiB) in detail and "zeros.bin" in detail
        assert peak_rss(pid) - before < BOUND
        async with Client(url, tokens["admin"]) as c:
            (job,) = await c.list_jobs()
            assert await c.outputs(job.id) == []  # nothing of it was kept
            assert [q["name"] for q in await c.queues()] == ["q"]  # and the server answers as before


def random_file(size: int) -> Iterator[bytes]:
    block = hashlib.sha256(b"seed").digest() * (MiB // 32)  # 1 MiB, not all zeros
    for n in range(size // MiB):
        yield bytes([n % 256]) + block[1:]


async def test_a_large_output_is_uploaded_and_downloaded_as_streams(store_url: str, tmp_path: Path) -> None:
    size = 200 * MiB
    digest = hashlib.sha256()
    for piece in random_file(size):
        digest.update(piece)
    archive = tmp_path / "outputs.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("big.bin")
        info.size = size
        tar.addfile(info, io.BufferedReader(_Pieces(random_file(size)), MiB))
    # nothing heartbeats the lease while 200 MiB go up: a long one, or a slow upload met a swept lease (409)
    async with server_process(store_url, tmp_path, "--lease-seconds", "600") as (url, tokens, pid):
        lease = await claimed(url, tokens, "big")
        before = peak_rss(pid)
        async with Client(url, tokens["worker"]) as w:
            await w.put_outputs(lease, archive)  # a file: sent as a stream
        archive.unlink()
        async with Client(url, tokens["admin"]) as c:
            (job,) = await c.list_jobs()
            (out,) = await c.outputs(job.id)
            assert (out["path"], out["size"], out["sha256"]) == ("big.bin", size, digest.hexdigest())

        async def download() -> str:
            got = hashlib.sha256()
            headers = {"Authorization": f"Bearer {tokens['admin']}"}
            async with (
                httpx.AsyncClient(base_url=url, timeout=300, headers=headers) as raw,
                raw.stream("GET", f"/api/v1/jobs/{job.id}/outputs/big.bin") as r,
            ):
                assert r.status_code == 200 and r.headers["content-length"] == str(size)
                async for piece in r.aiter_bytes(64 * 1024):
                    got.update(piece)
                    await asyncio.sleep(0)  # three readers interleaved
            return got.hexdigest()

        assert await asyncio.gather(download(), download(), download()) == [digest.hexdigest()] * 3
        assert peak_rss(pid) - before < BOUND


class _Pieces(io.RawIOBase):
    def __init__(self, pieces: Iterator[bytes]) -> None:
        self.pieces, self.rest = pieces, b""

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.rest:
            self.rest = next(self.pieces, b"")
        n = min(len(b), len(self.rest))
        b[:n], self.rest = self.rest[:n], self.rest[n:]
        return n


# -- in-process server, both stores -----------------------------------------------------------------------------------


@pytest.fixture
async def capped(any_store: Store) -> AsyncIterator[LiveServer]:
    settings = ServerSettings(max_log_bytes=1000, max_output_files=50, max_output_bytes=MiB)
    async with serve(any_store, settings) as server:
        yield server


async def test_the_log_cap_keeps_the_head_notes_the_cut_and_counts_what_was_dropped(
    capped: LiveServer, tmp_path: Path
) -> None:
    lease = await claimed(capped.url, capped.tokens, "chatty")
    async with capped.client("worker") as w, capped.client("admin") as c:
        assert not await w.append_logs(lease, [("stdout", b"a" * 600)])
        assert await w.append_logs(lease, [("stdout", b"b" * 600), ("stderr", b"c" * 300)])  # capped now
        assert await w.append_logs(lease, [], dropped=4000)  # what the worker did not send
        (job,) = await c.list_jobs()
        page = await c.logs(job.id)
        text = "".join(ch["data"] for ch in page["chunks"])
        assert text == "a" * 600 + "b" * 400 + log_cap_note(1000)
        assert page["dropped"] == 200 + 300 + 4000
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scaleq", "logs", job.id, "--server", capped.url, "--token", capped.tokens["admin"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert cli.returncode == 0, err
        assert out.decode() == "a" * 600 + "b" * 400
        assert "4500 bytes of this attempt's output were dropped past the server's log cap" in err.decode()


async def test_scaleq_server_takes_the_limits_a_grid_file_sets(tmp_path: Path) -> None:
    """``scaleq server`` (no grid file) sets the log and outputs limits by option, as ``[server]`` does for ``up``."""
    store_url = str(tmp_path / "scaleq.db")
    options = ("--max-log-bytes", "1000", "--max-output-bytes", "2048")
    async with server_process(store_url, tmp_path, *options) as (url, tokens, _):
        lease = await claimed(url, tokens, "chatty")
        async with Client(url, tokens["worker"]) as w:
            assert not await w.append_logs(lease, [("stdout", b"a" * 900)])
            assert await w.append_logs(lease, [("stdout", b"b" * 200)])  # past 1000: capped
            with pytest.raises(ApiError) as e:
                await w.put_outputs(lease, tar_of([("big.bin", b"x" * 4096)]))
            assert e.value.status == 413


async def test_the_worker_stops_shipping_past_the_cap_and_sends_the_count(capped: LiveServer) -> None:
    lease = await claimed(capped.url, capped.tokens, "chatty")
    async with capped.client("worker") as w, capped.client("admin") as c:
        async with LogShipper(w, lease, on_stale=lambda: None) as ship:
            for _ in range(200):
                await ship.write("stdout", b"x" * 100)
                await asyncio.sleep(0)

            async def told() -> bool:
                return ship.capped

            await eventually(told, timeout=10, what="the shipper hears of the cap")
            await ship.write("stdout", b"y" * 5000)  # not sent: counted
        (job,) = await c.list_jobs()
        kept, dropped = await capped.store.log_counts(job.id, 1)
        assert (kept, kept + dropped) == (1000, 200 * 100 + 5000)


async def test_a_worker_job_with_hard_links_and_too_big_outputs_end_to_end(capped: LiveServer) -> None:
    """Through a real worker: a hard link's both names arrive; outputs over the limit fail the job saying why (and
    the worker carries on), and a chatty job's log is capped."""
    from tests.helpers.workers import agent, running

    script = {
        "links": 'echo same > "$SCALEQ_OUTPUTS/a"; ln "$SCALEQ_OUTPUTS/a" "$SCALEQ_OUTPUTS/b"',
        "big": 'head -c 3000000 /dev/urandom > "$SCALEQ_OUTPUTS/big.bin"',
        "chatty": "for i in $(seq 2000); do echo line-$i; done",
    }
    async with running(agent(capped)), capped.client("submit") as s, capped.client("admin") as c:
        jobs = {name: (await s.submit(req("sh", "-c", body)))[0] for name, body in script.items()}

        async def finished() -> bool:
            states = [(await c.get_job(j.id)).state for j in jobs.values()]
            return states == ["finished"] * len(jobs)

        await eventually(finished, timeout=60, what="the three jobs finish")
        assert sorted(o["path"] for o in await c.outputs(jobs["links"].id)) == ["a", "b"]
        assert await c.output_bytes(jobs["links"].id, "b") == b"same\n"
        big = await c.get_job(jobs["big"].id)
        assert big.reason == "failed" and (big.error or "").startswith("outputs refused by the server: outputs over")
        chatty = await c.get_job(jobs["chatty"].id)
        assert chatty.reason == "success"
        kept, dropped = await capped.store.log_counts(chatty.id, 1)
        total = sum(len(f"line-{i}\n") for i in range(1, 2001))
        assert (kept, kept + dropped) == (1000, total)


def tar_of(members: list[tuple[str, bytes | str]]) -> bytes:
    """A tar: (name, bytes) a file, (name, "link:target") a hard link."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if isinstance(data, str):
                info.type, info.linkname = tarfile.LNKTYPE, data.removeprefix("link:")
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


async def test_hard_links_keep_both_names_and_too_many_entries_are_refused(capped: LiveServer, tmp_path: Path) -> None:
    lease = await claimed(capped.url, capped.tokens, "links")
    outputs = tmp_path / "outputs"
    (outputs / "sub").mkdir(parents=True)
    (outputs / "a.txt").write_bytes(b"same bytes")
    os.link(outputs / "a.txt", outputs / "sub" / "b.txt")
    assert transfer.pack_outputs(outputs, tmp_path / "out.tar")  # as the worker packs it
    async with capped.client("worker") as w, capped.client("admin") as c:
        await w.put_outputs(lease, tmp_path / "out.tar")
        (job,) = await c.list_jobs()
        found = {o["path"]: o for o in await c.outputs(job.id)}
        assert sorted(found) == ["a.txt", "sub/b.txt"]
        assert found["a.txt"]["sha256"] == found["sub/b.txt"]["sha256"]
        assert await c.output_bytes(job.id, "sub/b.txt") == b"same bytes"
        with pytest.raises(ApiError) as e:
            await w.put_outputs(lease, tar_of([(f"f{n}", b"x") for n in range(51)]))
        assert e.value.status == 413 and "more than 50 entries" in str(e.value.detail)
        # an archive bigger than the limit as sent: read to its end and answered 413 (not a broken connection)
        (tmp_path / "too-big").mkdir()
        (tmp_path / "too-big" / "big.bin").write_bytes(os.urandom(3 * MiB))
        assert transfer.pack_outputs(tmp_path / "too-big", tmp_path / "big.tar")
        with pytest.raises(ApiError) as e:
            await w.put_outputs(lease, tmp_path / "big.tar")
        assert e.value.status == 413 and f"over the limit of {MiB} bytes" in str(e.value.detail)
        assert sorted(o["path"] for o in await c.outputs(job.id)) == ["a.txt", "sub/b.txt"]  # the last upload stands


async def test_jobs_are_paged_by_cursor_with_no_duplicates_or_gaps_while_jobs_are_submitted(
    live: LiveServer,
) -> None:
    async with live.client("submit") as s, live.client("admin") as c:
        first = [j.id for j, _ in await s.submit_many([req("echo", str(n)) for n in range(230)])]
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page, cursor = await c.list_jobs_page(limit=40, cursor=cursor)
            seen += [j.id for j in page]
            pages += 1
            await s.submit(req("echo", "meanwhile", str(pages)))  # newer than every page still to come
            if cursor is None:
                break
        assert pages == 6
        assert len(seen) == len(set(seen)) == 230 and set(seen) == set(first)
        # a filter pages the same way; a cursor the server did not give is refused naming the field
        page, cursor = await c.list_jobs_page(limit=3, state="queued")
        assert len(page) == 3 and cursor is not None
        with pytest.raises(ApiError) as e:
            await c.list_jobs_page(cursor="not-a-cursor")
        assert e.value.status == 422 and e.value.detail[0]["loc"] == ["query", "cursor"]
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scaleq", "jobs", "--all", "--limit", "100", "--output", "json",
            "--server", live.url, "--token", live.tokens["admin"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await cli.communicate()
        assert cli.returncode == 0, err
        assert out.decode().count('"id"') == 230 + pages
        cli = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "scaleq", "jobs", "--limit", "100", "--state", "queued",
            "--server", live.url, "--token", live.tokens["admin"],
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        _, err = await cli.communicate()
        # the hint is the next page's command: the same filters, from the cursor
        assert "more: scaleq jobs --state queued --limit 100 --cursor " in err.decode()


@pytest.mark.parametrize(
    ("query", "filters", "index"),
    [
        ("list_jobs", {}, "jobs_seq"),
        ("list_jobs_of_queue", {"queue": "q"}, "jobs_queue_seq"),
        ("list_jobs_in_state", {"state": "finished", "reason": "failed"}, "jobs_state_seq"),
    ],
)
def test_a_page_of_jobs_is_a_seek_in_an_index_not_a_scan_or_a_sort(
    query: str, filters: dict[str, str], index: str, store_url: str, tmp_path: Path
) -> None:
    """What makes listing a million jobs flat: each page seeks its index below the cursor and walks it in order,
    sorting nothing (the plan, not a timing, is what is asserted: the planner's own account)."""
    params = {"queue": None, "state": None, "reason": None, "limit": 101, "before": 12345, **filters}
    asyncio.run(_opened(store_url))
    if store_url.startswith("postgresql"):
        import psycopg

        with psycopg.connect(store_url) as conn:
            # as on a big table: no sequential scan, and a sort only where no index gives the order
            conn.execute("SET enable_seqscan = off")
            conn.execute("SET enable_sort = off")
            plan = "\n".join(r[0] for r in conn.execute("EXPLAIN " + PostgresStore.Q[query], params))
        assert f"Index Scan Backward using {index}" in plan and "Sort" not in plan, plan
    else:
        import sqlite3

        with contextlib.closing(sqlite3.connect(store_url)) as conn:
            plan = "\n".join(r[3] for r in conn.execute("EXPLAIN QUERY PLAN " + SQLiteStore.Q[query], params))
        assert f"SEARCH jobs USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, plan


async def _opened(store_url: str) -> None:
    store: Store = PostgresStore(store_url) if store_url.startswith("postgresql") else SQLiteStore(store_url)
    await store.open()  # migrated to the head
    await store.close()


# -- the worker's archive ---------------------------------------------------------------------------------------------

PACK = """
import resource, sys
from pathlib import Path
from scaleq.worker.transfer import pack_outputs
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert pack_outputs(Path(sys.argv[1]), Path(sys.argv[2]))
print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_the_worker_packs_a_1_gib_sparse_file_in_bounded_memory(tmp_path: Path) -> None:
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    with (outputs / "sparse.bin").open("wb") as f:
        f.truncate(1 << 30)
    archive = tmp_path / "outputs.tar"
    done = subprocess.run(
        [sys.executable, "-c", PACK, str(outputs), str(archive)], capture_output=True, text=True, check=True
    )
    before, after = (int(v) * 1024 for v in done.stdout.split())  # ru_maxrss is in KiB on Linux
    assert after - before < BOUND
    with tarfile.open(archive) as tar:
        (member,) = tar.getmembers()
        assert (member.name, member.size) == ("sparse.bin", 1 << 30)
