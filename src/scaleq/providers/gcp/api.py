"""The Compute Engine API: the clients, calls in a thread, operations awaited, and errors in words.

The official ``google-cloud-compute`` client (REST) is synchronous: every call runs in a thread. Long-running calls
use the ``*_unary`` methods and are awaited with a ``RegionOperationsClient`` built with the same endpoint and
credentials (the client's own extended operations poll through a client that ignores ``api_endpoint``). API errors
become :class:`~scaleq.providers.base.ProviderError` saying what failed and how to fix it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from google.api_core import exceptions as gexc
from google.api_core.client_options import ClientOptions
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import compute_v1

from scaleq.grid import GcpSettings
from scaleq.providers.base import CapacityRefused, ProviderError, Refusal
from scaleq.providers.gcp.credentials import FIX_CREDENTIALS, default_credentials, plain_http

T = TypeVar("T")

FIX_PERMISSION = (
    "the account needs roles/compute.instanceAdmin.v1 on project {project} (instance templates, managed instance "
    "groups, regions) and roles/iam.serviceAccountUser on the workers' service account"
)


@dataclass
class Api:
    templates: compute_v1.RegionInstanceTemplatesClient
    migs: compute_v1.RegionInstanceGroupManagersClient
    operations: compute_v1.RegionOperationsClient
    regions: compute_v1.RegionsClient
    zone_operations: compute_v1.ZoneOperationsClient  # where GCP records preemptions (compute.instances.preempted)

    def close(self) -> None:
        for client in (self.templates, self.migs, self.operations, self.regions, self.zone_operations):
            try:
                client.transport.close()
            except Exception:  # closing must never fail a caller
                pass


class Apis:
    """The provider's clients, one set per API endpoint, made on first use with credentials looked up once."""

    def __init__(
        self,
        credentials: Credentials | None,
        *,
        api_timeout: float,
        operation_timeout: float,
        credentials_timeout: float,
        metadata_probe_timeout: float,
    ) -> None:
        self.credentials = credentials  # given, or found on first use (health() describes them)
        self.api_timeout = api_timeout
        self.operation_timeout = operation_timeout
        self.credentials_timeout = credentials_timeout
        self.metadata_probe_timeout = metadata_probe_timeout
        self._apis: dict[str | None, Api] = {}
        self._lock = threading.Lock()

    async def _credentials_for(self, settings: GcpSettings) -> Credentials:
        if plain_http(settings):
            return AnonymousCredentials()
        if self.credentials is None:
            self.credentials = await default_credentials(self.metadata_probe_timeout, self.credentials_timeout)
        return self.credentials

    async def get(self, settings: GcpSettings) -> Api:
        key = settings.api_endpoint
        if key in self._apis:
            return self._apis[key]
        credentials = await self._credentials_for(settings)

        def build() -> Api:
            options = ClientOptions(api_endpoint=settings.api_endpoint) if settings.api_endpoint else None
            kw: dict[str, Any] = {"transport": "rest", "client_options": options, "credentials": credentials}
            return Api(
                compute_v1.RegionInstanceTemplatesClient(**kw),
                compute_v1.RegionInstanceGroupManagersClient(**kw),
                compute_v1.RegionOperationsClient(**kw),
                compute_v1.RegionsClient(**kw),
                compute_v1.ZoneOperationsClient(**kw),
            )

        api = await asyncio.to_thread(build)
        with self._lock:
            if key in self._apis:
                api.close()
            else:
                self._apis[key] = api
            return self._apis[key]

    async def run(self, settings: GcpSettings, what: str, fn: Callable[[Api], T]) -> T:
        """Run ``fn(api)`` in a thread; API errors become ProviderError saying ``what`` failed and how to fix it."""
        api = await self.get(settings)
        try:
            return await asyncio.to_thread(fn, api)
        except ProviderError:
            raise
        except gexc.GoogleAPICallError as exc:
            refusal = refusal_of(exc)
            message = explain(exc, what, settings)
            raise (CapacityRefused(message, refusal) if refusal else ProviderError(message)) from exc
        except gexc.RetryError as exc:
            raise ProviderError(f"the Compute Engine API did not answer in time to {what}: {exc}") from exc
        except auth_exceptions.RefreshError as exc:
            raise ProviderError(
                f"cannot {what}: the Google Cloud credentials were refused ({exc}); renew them: {FIX_CREDENTIALS}"
            ) from exc
        except (auth_exceptions.TransportError, OSError) as exc:  # requests' errors are OSErrors
            endpoint = settings.api_endpoint or "compute.googleapis.com"
            raise ProviderError(f"cannot reach the Compute Engine API at {endpoint} to {what}: {exc}") from exc

    def wait(self, api: Api, s: GcpSettings, op: compute_v1.Operation, what: str) -> None:
        """Wait for a region operation to be DONE (with our own operations client); its error becomes ProviderError."""
        deadline = time.monotonic() + self.operation_timeout
        while op.status != compute_v1.Operation.Status.DONE:
            if time.monotonic() > deadline:
                raise ProviderError(f"{what}: operation {op.name} not done after {self.operation_timeout:g} s")
            # wait answers when the operation is done or after about two minutes, whichever comes first
            op = api.operations.wait(
                project=s.project, region=s.region, operation=op.name, timeout=self.api_timeout + 120
            )
        if op.error and op.error.errors:
            problems = "; ".join(f"{e.code}: {e.message}" for e in op.error.errors)
            message = f"the Compute Engine API could not {what}: {problems}"
            codes = {e.code for e in op.error.errors}
            if "QUOTA_EXCEEDED" in codes:
                fix = "raise the quota (IAM & Admin > Quotas) or lower max_workers"
                raise CapacityRefused(f"{message}: {fix}", "quota")
            if codes & {"RATE_LIMIT_EXCEEDED", "RESOURCE_EXHAUSTED"}:
                raise CapacityRefused(message, "rate_limited")
            raise ProviderError(message)

    def close(self) -> None:
        with self._lock:
            apis, self._apis = list(self._apis.values()), {}
        for api in apis:
            api.close()


def refusal_of(exc: gexc.GoogleAPICallError) -> Refusal | None:
    """A quota (403 ``quotaExceeded``) or a rate limit (429, 403 ``rateLimitExceeded``), from Google's error reasons."""
    reasons = {str(e.get("reason", "")) for e in exc.errors or [] if isinstance(e, dict)} | {exc.reason or ""}
    if "quotaExceeded" in reasons or "QUOTA_EXCEEDED" in reasons:
        return "quota"
    if isinstance(exc, gexc.TooManyRequests) or reasons & {"rateLimitExceeded", "userRateLimitExceeded"}:
        return "rate_limited"
    return None


def explain(exc: gexc.GoogleAPICallError, what: str, s: GcpSettings) -> str:
    code = exc.code if isinstance(exc.code, int) else getattr(exc.code, "value", exc.code)
    message = exc.message or str(exc)
    base = f"the Compute Engine API refused to {what} ({code} {type(exc).__name__}: {message})"
    if isinstance(exc, gexc.Unauthorized):
        return f"{base}: the credentials are not accepted; {FIX_CREDENTIALS}"
    if isinstance(exc, gexc.Forbidden):
        if "has not been used" in message or "is disabled" in message or "accessNotConfigured" in str(exc):
            return f"{base}: enable it with 'gcloud services enable compute.googleapis.com --project {s.project}'"
        return f"{base}: {FIX_PERMISSION.format(project=s.project)}"
    if isinstance(exc, gexc.NotFound):
        return (
            f"{base}: check [groups.gcp] project ({s.project}) and region ({s.region}), and that the Compute Engine "
            "API is enabled in that project"
        )
    if isinstance(exc, gexc.BadRequest):
        return f"{base}: check the group's [groups.gcp] settings"
    if isinstance(exc, gexc.TooManyRequests):
        return f"{base}: a quota or rate limit was hit; the controller retries with backoff"
    return f"the Compute Engine API failed to {what} ({code} {type(exc).__name__}: {message}); it is retried"
