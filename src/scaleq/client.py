"""The HTTP client of the scaleq API, used by the CLI, the worker and the autoscaler.

Errors come back as :class:`ApiError` carrying the status and the server's detail; connection failures as
:class:`Unreachable`, so callers can tell "the server said no" from "no server answered".
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from scaleq.jobs import ArraySpec, Claim, Job, SubmitRequest, Worker

#: Seconds an idle connection to the server is kept for reuse: longer than the beat of a small fleet (so a worker's
#: beats reuse one connection) and shorter than the server's keep-alive (ServerSettings.keep_alive_seconds).
KEEP_ALIVE = 15.0


class ApiError(Exception):
    def __init__(self, status: int, detail: Any) -> None:
        self.status = status
        self.detail = detail
        super().__init__(f"HTTP {status}: {format_detail(detail)}")

    @property
    def stale(self) -> bool:
        return self.status == 409


class Unreachable(Exception):
    """No answer from the server. ``timed_out``: the server took the request and did not answer it in time (a read or
    write timeout, or a gateway's 504) — a server that is busy, and may still act on it; not one that could not be
    connected to, refused or broke the connection, or was said by a gateway to be unavailable, as a server
    restarting is."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


def format_detail(detail: Any) -> str:
    """FastAPI's validation details as ``field.path: problem`` lines."""
    if isinstance(detail, list):
        lines = []
        for d in detail:
            if isinstance(d, dict):
                loc = ".".join(str(p) for p in d.get("loc", []) if p not in ("body", "query", "path"))
                lines.append(f"{loc}: {d.get('msg', d)}" if loc else str(d.get("msg", d)))
            else:
                lines.append(str(d))
        return "; ".join(lines)
    return str(detail)


class Client:
    def __init__(self, server: str, token: str | None, *, timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.server = server.rstrip("/")
        #: How often the server last asked its workers to beat, from a claim's or a heartbeat's answer (None until
        #: one said it: servers before the cadence do not; see scaleq.server.cadence).
        self.cadence: float | None = None
        self._http = httpx.AsyncClient(
            base_url=self.server + "/api/v1",
            headers=headers,
            timeout=httpx.Timeout(timeout, connect=5.0),
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20, keepalive_expiry=KEEP_ALIVE),
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def request(self, method: str, path: str, *, timeout: float | None = None, **kw: Any) -> httpx.Response:
        if timeout is not None:
            kw["timeout"] = httpx.Timeout(timeout, connect=5.0)
        try:
            r = await self._http.request(method, path, **kw)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        self._check(r)
        return r

    def _unreachable(self, exc: httpx.TransportError) -> Unreachable:
        return Unreachable(
            f"cannot reach the scaleq server at {self.server}: {exc or type(exc).__name__}",
            timed_out=isinstance(exc, (httpx.ReadTimeout, httpx.WriteTimeout)),
        )

    def _check(self, r: httpx.Response) -> None:
        """Unreachable for a gateway's 502-504, ApiError with the server's detail for another error."""
        if r.status_code in (502, 503, 504):
            raise Unreachable(
                f"the scaleq server at {self.server} is unavailable ({r.status_code}): {r.text[:200]}",
                timed_out=r.status_code == 504,
            )
        if r.status_code >= 400:
            try:
                detail = r.json().get("detail", r.text)
            except ValueError:
                detail = r.text
            raise ApiError(r.status_code, detail)

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        r = await self.request(method, path, **kw)
        return r.json() if r.content else None

    # -- jobs -------------------------------------------------------------------------------------------------

    async def submit(self, req: SubmitRequest) -> tuple[Job, bool]:
        job, created, _ = await self.submit_checked(req)
        return job, created

    async def submit_checked(self, req: SubmitRequest) -> tuple[Job, bool, str | None]:
        """:meth:`submit`, with the server's warning when nothing it knows of can run the job."""
        data = await self._json("POST", "/jobs", json=req.model_dump(mode="json"), timeout=120)
        return Job.model_validate(data["job"]), data["created"], data.get("warning")

    async def purge(self, older_than: float, queue: str | None = None) -> dict[str, Any]:
        """Remove finished jobs older than ``older_than`` seconds (admin); what was removed."""
        return await self._json("POST", "/admin/purge", json={"older_than": older_than, "queue": queue}, timeout=600)

    async def submit_many(self, reqs: list[SubmitRequest]) -> list[tuple[Job, bool]]:
        """Up to 1,000 jobs in one request and one transaction (all or none)."""
        return [(job, created) for job, created, _ in await self.submit_many_checked(reqs)]

    async def submit_many_checked(
        self, reqs: list[SubmitRequest], array: ArraySpec | None = None
    ) -> list[tuple[Job, bool, str | None]]:
        """:meth:`submit_many`, with the server's warning per job when nothing it knows of can run it; with
        ``array``, the jobs are members of that array (see ``POST /jobs/batch``)."""
        body: dict[str, Any] = {"jobs": [r.model_dump(mode="json") for r in reqs]}
        if array is not None:
            body["array"] = array.model_dump(mode="json", exclude_none=True)
        data = await self._json("POST", "/jobs/batch", json=body, timeout=300)
        return [(Job.model_validate(s["job"]), s["created"], s.get("warning")) for s in data["submitted"]]

    # -- arrays and cost ----------------------------------------------------------------------------------------

    async def arrays(self, *, queue: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params = {k: v for k, v in {"queue": queue, "limit": limit}.items() if v is not None}
        return await self._json("GET", "/arrays", params=params)

    async def array(self, array_id: str, *, wait: float = 0, seen: str | None = None) -> dict[str, Any]:
        params: dict[str, Any] = {"wait": wait, "seen": seen} if wait and seen else {}
        return await self._json("GET", f"/arrays/{array_id}", params=params, timeout=wait + 30)

    async def cancel_array(self, array_id: str) -> dict[str, Any]:
        return await self._json("POST", f"/arrays/{array_id}/cancel", timeout=300)

    async def rerun_array(self, array_id: str, *, failed: bool = False) -> dict[str, Any]:
        return await self._json("POST", f"/arrays/{array_id}/rerun", params={"failed": failed}, timeout=300)

    async def cost(self, *, by: str = "group", since: float = 0.0) -> list[dict[str, Any]]:
        return await self._json("GET", "/cost", params={"by": by, "since": since})

    async def get_job(self, job_id: str, *, wait: float = 0, state: str | None = None) -> Job:
        params: dict[str, Any] = {"wait": wait} if wait else {}
        if state:
            params["state"] = state
        return Job.model_validate(await self._json("GET", f"/jobs/{job_id}", params=params, timeout=wait + 30))

    async def get_job_estimate(self, job_id: str) -> tuple[Job, float | None, str | None]:
        """A job with its estimated start (epoch seconds, None: not queued or unknown) and what that rests on."""
        data = await self._json("GET", f"/jobs/{job_id}")
        return Job.model_validate(data), data.get("estimated_start"), data.get("estimate_basis")

    async def list_jobs(
        self, *, queue: str | None = None, state: str | None = None, limit: int = 100, reason: str | None = None
    ) -> list[Job]:
        return (await self.list_jobs_page(queue=queue, state=state, limit=limit, reason=reason))[0]

    async def list_jobs_page(
        self,
        *,
        queue: str | None = None,
        state: str | None = None,
        limit: int = 100,
        reason: str | None = None,
        cursor: str | None = None,
    ) -> tuple[list[Job], str | None]:
        """A page of jobs, newest first, and the cursor of the next page (None after the last)."""
        wanted = {"queue": queue, "state": state, "limit": limit, "reason": reason, "cursor": cursor}
        params = {k: v for k, v in wanted.items() if v is not None}
        r = await self.request("GET", "/jobs", params=params)
        return [Job.model_validate(j) for j in r.json()], r.headers.get("X-Scaleq-Next-Cursor")

    async def attempts(self, job_id: str) -> list[dict[str, Any]]:
        return await self._json("GET", f"/jobs/{job_id}/attempts")

    async def why(self, job_id: str) -> dict[str, Any]:
        """The chain of reasons for the job (see scaleq.server.why)."""
        return await self._json("GET", f"/jobs/{job_id}/why")

    async def cancel(self, job_id: str) -> Job:
        return Job.model_validate(await self._json("POST", f"/jobs/{job_id}/cancel"))

    async def logs(self, job_id: str, *, attempt: int | None = None, after: int = 0, wait: float = 0) -> dict:
        params: dict[str, Any] = {"after": after, "wait": wait}
        if attempt:
            params["attempt"] = attempt
        return await self._json("GET", f"/jobs/{job_id}/logs", params=params, timeout=wait + 30)

    async def outputs(self, job_id: str) -> list[dict[str, Any]]:
        return await self._json("GET", f"/jobs/{job_id}/outputs")

    async def output_bytes(self, job_id: str, path: str) -> bytes:
        return (await self.request("GET", f"/jobs/{job_id}/outputs/{path}", timeout=300)).content

    async def queues(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/queues")

    async def workers(self, *, include_gone: bool = False) -> list[Worker]:
        return [Worker.model_validate(w) for w in await self._json("GET", "/workers", params={"all": include_gone})]

    # -- tokens -----------------------------------------------------------------------------------------------

    async def create_token(self, role: str, name: str = "") -> dict[str, Any]:
        return await self._json("POST", "/tokens", json={"role": role, "name": name})

    async def list_tokens(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/tokens")

    async def revoke_token(self, token_id: str) -> None:
        await self.request("DELETE", f"/tokens/{token_id}")

    # -- scaling --------------------------------------------------------------------------------------------

    async def groups(self) -> list[dict[str, Any]]:
        return await self._json("GET", "/groups")

    async def put_group(self, status: dict[str, Any]) -> None:
        await self.request("PUT", f"/groups/{status['name']}", json=status)

    async def delete_group(self, name: str) -> None:
        await self.request("DELETE", f"/groups/{name}")

    async def events(self, *, group: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if group:
            params["group"] = group
        return await self._json("GET", "/events", params=params)

    async def record_event(self, event: dict[str, Any]) -> None:
        await self.request("POST", "/events", json=event)

    async def demand(
        self, queue: str, capabilities: dict[str, Any], *, wait: float = 0, limit: int | None = None
    ) -> dict[str, Any]:
        body = {"queue": queue, "capabilities": capabilities, "wait": wait, "limit": limit}
        return await self._json("POST", "/demand", json=body, timeout=wait + 30)

    # -- the worker protocol ----------------------------------------------------------------------------------

    async def register(self, registration: dict[str, Any]) -> dict[str, Any]:
        return await self._json("POST", "/workers", json=registration)

    async def claim(
        self, worker_id: str, n: int, *, wait: float, finishes: list[dict[str, Any]] | None = None
    ) -> tuple[list[Claim], list[dict[str, Any]], str]:
        data = await self._json(
            "POST",
            f"/workers/{worker_id}/claim",
            json={"max": n, "wait": wait, "finishes": finishes or []},
            timeout=wait + 30,
        )
        self._heard_cadence(data)
        return [Claim.model_validate(c) for c in data["claims"]], data["finished"], data["state"]

    async def heartbeat(
        self, worker_id: str, *, draining: bool = False, leases: list[str] | None = None
    ) -> tuple[str, set[str]]:
        """The worker's state and the leases still live (and :attr:`cadence` as the answer says it)."""
        body = {"draining": draining, "leases": leases}
        data = await self._json("POST", f"/workers/{worker_id}/heartbeat", json=body, timeout=10)
        self._heard_cadence(data)
        return data["state"], set(data["leases"])

    def _heard_cadence(self, data: dict[str, Any]) -> None:
        self.cadence = data.get("heartbeat_seconds") or self.cadence

    async def drain_worker(self, worker_id: str) -> Worker:
        return Worker.model_validate(await self._json("POST", f"/workers/{worker_id}/drain"))

    async def ended_attempts(self, worker_id: str, attempts: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Of these (job id, attempt) pairs, those the server knows and has ended."""
        body = {"attempts": [{"job_id": j, "attempt": a} for j, a in attempts]}
        data = await self._json("POST", f"/workers/{worker_id}/ended-attempts", json=body)
        return {(e["job_id"], e["attempt"]) for e in data["ended"]}

    async def deregister(self, worker_id: str) -> None:
        await self.request("DELETE", f"/workers/{worker_id}")

    async def finish(self, finish: dict[str, Any]) -> Job:
        return Job.model_validate(await self._json("POST", "/leases/finish", json=finish))

    async def release(self, lease: str, reason: str = "released") -> None:
        """Hand the lease's job back unspent; ``reason`` (released, preempted) becomes the attempt's outcome."""
        await self.request("POST", "/leases/release", json={"lease": lease, "reason": reason})

    async def release_worker(self, worker_id: str, reason: str = "preempted") -> list[str]:
        """Hand back every running job of a worker its provider reports preempted (admin); the jobs' ids."""
        data = await self._json("POST", f"/workers/{worker_id}/release", json={"reason": reason})
        return data["jobs"]

    async def append_logs(self, lease: str, chunks: list[tuple[str, bytes]], *, dropped: int = 0) -> bool:
        """Send log chunks (and how many bytes were dropped unsent); True once the attempt's log is at its cap."""
        body: dict[str, Any] = {
            "lease": lease,
            "chunks": [{"stream": s, "data": base64.b64encode(d).decode()} for s, d in chunks],
        }
        if dropped:
            body["dropped"] = dropped
        r = await self.request("POST", "/leases/logs", json=body)
        return r.headers.get("X-Scaleq-Log-Capped") == "1"

    async def put_outputs(self, lease: str, archive: bytes | Path) -> None:
        """Upload the outputs archive: bytes, or a file sent as a stream (never read whole)."""
        content: bytes | AsyncIterator[bytes] = archive if isinstance(archive, bytes) else _file_pieces(archive)
        await self.request("POST", "/leases/outputs", content=content, headers={"X-Scaleq-Lease": lease}, timeout=600)

    async def blob(self, sha256: str) -> bytes:
        return (await self.request("GET", f"/blobs/{sha256}", timeout=300)).content

    async def blob_to_file(self, sha256: str, target: Path) -> None:
        """Write a blob's bytes to ``target`` as they arrive (never held whole)."""
        try:
            async with self._http.stream("GET", f"/blobs/{sha256}", timeout=httpx.Timeout(300, connect=5.0)) as r:
                if r.status_code >= 400:
                    await r.aread()
                    self._check(r)
                with target.open("wb") as f:
                    async for piece in r.aiter_bytes(1 << 20):
                        await asyncio.to_thread(f.write, piece)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


async def _file_pieces(path: Path, size: int = 1 << 20) -> AsyncIterator[bytes]:
    with path.open("rb") as f:
        while piece := await asyncio.to_thread(f.read, size):
            yield piece
