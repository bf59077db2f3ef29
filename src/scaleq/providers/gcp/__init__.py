"""The gcp provider: workers are VMs of one regional managed instance group (MIG) per group, on Google Compute Engine.

Design:

- **One regional MIG per group**, ``scaleq-<grid>-<group>``, spread over the group's zones (``distributionPolicy``;
  the region's zones when none are given). Its **instance template** (regional, in the same region),
  ``scaleq-<grid>-<group>-<version>`` with ``version = Group.version()``, boots Container-Optimized OS with the
  cloud-init user-data of :mod:`~scaleq.providers.gcp.boot` — the same bytes ``scaleq export terraform`` puts in its
  templates: a systemd unit runs ``group.image`` as ``scaleq worker …`` with ``docker run``, the worker token read
  from the metadata key ``scaleq-token``. A crash restarts the worker; a drained worker exits 0 and stays down.
  Names longer than GCE's 63 characters are shortened with a hash, so they stay unique and stable.
- **Labels are the state**: the template labels every VM and boot disk ``scaleq-managed=true``, ``scaleq-grid``,
  ``scaleq-group`` and ``scaleq-version``. The MIG's name is derived from grid and group, so ``workers`` (and a
  restarted controller adopting, and ``destroy``) find the workers from GCP itself; ``destroy`` finds every template
  of the group by its labels.
- **The worker id is the instance name**, chosen by scaleq: ``start`` calls ``createInstances`` with explicit names
  (``<grid>-<group>-<random>``), so the id is known before the VM exists. All instances share one template, so the
  worker learns its id on the VM: the start script reads the instance name from the metadata server.
- **The MIG never acts on its own**: no autoscaler, ``updatePolicy.type=OPPORTUNISTIC`` (a new template does not
  make it replace VMs) and ``instanceRedistributionType=NONE`` (it does not delete VMs to even out zones). scaleq's
  controller sizes it: ``start`` = ``createInstances`` (``targetSize`` grows by those), and instances are removed
  only by ``deleteInstances`` naming them (``targetSize`` shrinks by those) — never ``resize``, which deletes VMs of
  the MIG's choosing, possibly mid-job.
- **Scale-in after draining**: the controller drains an idle worker through the server; the worker takes no new job,
  exits, and deregisters (the server marks it ``gone``). Which workers left is the server's knowledge, and the
  controller's: it tells the provider (``reap``) which listed workers are gone — or were seen registered and are no
  longer known — and the provider deletes exactly those instances. A worker that dies without deregistering is
  marked gone by the server after its heartbeats stop, and is deleted the same way. ``stop`` deletes the named
  instance (``apply`` uses it for workers that never registered). The provider itself never asks the server.
- **Rolling updates**: a changed group has a new version, so ``start`` makes the new template and points the MIG at
  it (``setInstanceTemplate``): new VMs get it, running ones keep theirs. ``workers`` reports each VM's template
  version, so ``apply`` drains the out-of-date workers (they finish their jobs first) and the controller starts
  replacements as demand needs. Templates no instance uses any more are deleted when the MIG moves to a new one.
- **Credentials** come from application default credentials (``GOOGLE_APPLICATION_CREDENTIALS``, ``gcloud auth
  application-default login``, or the metadata server of a GCE/GKE/Cloud Run host). The lookup is bounded: a
  metadata server that does not answer makes a clear error in seconds, not a hang. With ``api_endpoint`` set to an
  ``http://`` URL (a local stand-in or proxy) no credentials are sent (``AnonymousCredentials``); an ``https://``
  endpoint gets the default credentials.
- The official ``google-cloud-compute`` client (REST), synchronous: every call runs in a thread. Long-running
  calls use the ``*_unary`` methods and are awaited with a ``RegionOperationsClient`` built with the same endpoint
  and credentials (the client's own extended operations poll through a client that ignores ``api_endpoint``).
  API errors become :class:`ProviderError` saying what failed and how to fix it.

The package, one idea a module: ``boot.py`` (how a worker VM boots, shared with the Terraform export; its template
files are in ``templates/``), ``resources.py`` (names, labels, the template and the MIG: pure), ``credentials.py``
(application default credentials, bounded), ``api.py`` (the clients, calls in a thread, operations, errors in
words), ``provider.py`` (reconciliation and the primitives, on the skeleton of :mod:`scaleq.providers.base`). The
names other code uses are exported here, imported on first use: ``boot`` needs no Google library, so the export can
use it without ``scaleq[gcp]`` installed.

Caveat: the worker token is in the template's metadata, readable by anyone who may ``compute.instances.get`` or
``compute.instanceTemplates.get`` in the project (and by every process on the VM, through the metadata server).
Keeping it in Secret Manager, fetched by the VM's service account at boot, is future work.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what type checkers see; at run time __getattr__ imports these on first use
    from scaleq.providers.gcp.api import FIX_PERMISSION
    from scaleq.providers.gcp.credentials import FIX_CREDENTIALS
    from scaleq.providers.gcp.provider import GcpProvider
    from scaleq.providers.gcp.resources import (
        COS_IMAGE,
        gce_name,
        label_value,
        labels,
        mig_name,
        template_name,
        worker_name,
    )

_WHERE = {
    "FIX_PERMISSION": "api",
    "FIX_CREDENTIALS": "credentials",
    "GcpProvider": "provider",
    "COS_IMAGE": "resources",
    "gce_name": "resources",
    "label_value": "resources",
    "labels": "resources",
    "mig_name": "resources",
    "template_name": "resources",
    "worker_name": "resources",
}

__all__ = [
    "COS_IMAGE",
    "FIX_CREDENTIALS",
    "FIX_PERMISSION",
    "GcpProvider",
    "gce_name",
    "label_value",
    "labels",
    "mig_name",
    "template_name",
    "worker_name",
]
assert set(__all__) == set(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
