"""Google Cloud credentials: application default credentials, found within a bounded time.

They come from ``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth application-default login``, or the metadata server
of a GCE/GKE/Cloud Run host. The lookup is bounded: a metadata server that does not answer makes a clear error in
seconds, not a hang (the lookup runs on a daemon thread, so one that hangs anyway is left behind). With
``api_endpoint`` set to an ``http://`` URL (a local stand-in or proxy) no credentials are sent
(``AnonymousCredentials``); an ``https://`` endpoint gets the default credentials.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
from google.auth import exceptions as auth_exceptions
from google.auth.credentials import Credentials

from scaleq.grid import GcpSettings
from scaleq.loop import in_daemon_thread
from scaleq.providers.base import ProviderError
from scaleq.providers.gcp.resources import CLOUD_PLATFORM

FIX_CREDENTIALS = (
    "no Google Cloud credentials found (application default credentials): run 'gcloud auth application-default "
    "login', or set GOOGLE_APPLICATION_CREDENTIALS to a service account key file, or run on a GCE/GKE host with a "
    "service account attached — in the environment of the controller ('scaleq up' / 'scaleq autoscale'), of "
    "apply/plan/destroy and of doctor"
)


def _only_metadata_left() -> bool:
    """True when application default credentials could only come from a metadata server: no key file is named and
    gcloud has stored no application default credentials."""
    if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
        return False
    try:
        from google.auth import _cloud_sdk

        return not os.path.isfile(_cloud_sdk.get_application_default_credentials_path())
    except Exception:  # a private helper: when in doubt, let google.auth look everywhere
        return False


def _metadata_answers(timeout: float) -> tuple[bool, str]:
    """One bounded probe of the GCE metadata server (google.auth tries three times with back-off: seconds when there
    is none). Returns whether it answered and where it was looked for."""
    address = os.environ.get("GCE_METADATA_IP", "169.254.169.254")
    try:
        r = httpx.get(f"http://{address}", headers={"Metadata-Flavor": "Google"}, timeout=timeout, trust_env=False)
    except httpx.HTTPError:
        return False, address
    return r.headers.get("metadata-flavor") == "Google", address


def _on_gce() -> bool:
    try:
        return "Google" in Path("/sys/class/dmi/id/product_name").read_text()
    except OSError:
        return False


def _find_credentials(probe_timeout: float) -> Credentials:
    """Application default credentials, with every metadata-server request bounded to ``probe_timeout`` seconds."""
    import google.auth
    import google.auth.transport.requests

    if _only_metadata_left() and not _on_gce():
        answered, address = _metadata_answers(probe_timeout)
        if not answered:
            raise auth_exceptions.DefaultCredentialsError(
                f"no credentials file, and no GCE metadata server answered at {address} within {probe_timeout:g} s"
            )

    class Bounded(google.auth.transport.requests.Request):
        def __call__(
            self, url: str, method: str = "GET", body: Any = None, headers: Any = None, timeout: Any = None, **kw: Any
        ) -> Any:
            return super().__call__(
                url, method, body, headers, timeout=min(timeout or probe_timeout, probe_timeout), **kw
            )

    credentials, _ = google.auth.default(scopes=[CLOUD_PLATFORM], request=Bounded())
    return credentials


def plain_http(settings: GcpSettings) -> bool:
    """An ``http://`` endpoint (a local stand-in or proxy): never send tokens over plain HTTP."""
    return (settings.api_endpoint or "").startswith("http://")


async def default_credentials(probe_timeout: float, timeout: float) -> Credentials:
    """Application default credentials; looking for them takes at most ``timeout`` seconds."""
    try:
        return await in_daemon_thread(lambda: _find_credentials(probe_timeout), timeout, "scaleq-gcp-credentials")
    except auth_exceptions.DefaultCredentialsError as exc:
        raise ProviderError(f"{FIX_CREDENTIALS} ({first_line(exc)})") from exc
    except TimeoutError as exc:
        raise ProviderError(
            f"looking for Google Cloud credentials took more than {timeout:g} s (no credentials file, and the GCE "
            f"metadata server did not answer): {FIX_CREDENTIALS}"
        ) from exc
    except auth_exceptions.GoogleAuthError as exc:
        raise ProviderError(f"the Google Cloud credentials cannot be used: {exc}. {FIX_CREDENTIALS}") from exc


def describe(credentials: Credentials | None, s: GcpSettings) -> str:
    if plain_http(s):
        return "no credentials sent (plain http endpoint)"
    account = getattr(credentials, "service_account_email", None) or getattr(credentials, "signer_email", None)
    return f"credentials: {type(credentials).__name__}{f' ({account})' if account else ''}"


def first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
