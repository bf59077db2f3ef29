"""The gcp provider through the official ``google-cloud-compute`` client, against a local stand-in of the Compute
Engine v1 API built from its discovery document (tests/standins/gcp_compute.py): what it creates and labels, scale-out
by named instances, scale-in that deletes exactly the named instance, rolling updates by template version, destroy,
credentials and API errors — and the real controller and deployer driving a gcp group."""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
import yaml

from scaleq.client import Client
from scaleq.deploy import Deployer
from scaleq.grid import GcpSettings, Grid, Group
from scaleq.jobs import JobDefinition, RuntimeKind, SubmitRequest
from scaleq.providers.base import ProviderError
from scaleq.providers.gcp import GcpProvider, boot, gce_name, mig_name, template_name
from scaleq.providers.gcp.provider import PREEMPTED_WITHIN
from scaleq.providers.registry import ProviderContext, make_provider
from scaleq.scaling.controller import Controller
from scaleq.scaling.observe import RemoteObserver
from scaleq.server.settings import ServerSettings
from scaleq.store.sqlite import SQLiteStore
from tests.helpers import LiveServer, controlling, eventually, free_port, serve
from tests.helpers.drivers import never_registering, refused_then_retried, taken_back
from tests.helpers.groups import fast_group
from tests.standins.gcp_compute import ComputeStandIn
from tests.standins.gcp_compute import serve as serve_compute

PROJECT, REGION, ZONES = "scaleq-test", "us-central1", ["us-central1-a", "us-central1-b"]
IMAGE = "us-docker.pkg.dev/scaleq-test/workers/scaleq-worker:1"


@pytest.fixture
def compute() -> Iterator[ComputeStandIn]:
    with serve_compute(create_delay=0.2, delete_delay=0.2, page_size=2) as standin:
        yield standin


def gcp_group(compute: ComputeStandIn, name: str = "cpu", image: str = IMAGE, **kw: object) -> Group:
    settings = GcpSettings(project=PROJECT, region=REGION, zones=ZONES, api_endpoint=compute.url)
    fields = {"provider": "gcp", "max_workers": 4, "resources": {"cpus": 2}, "image": image, "gcp": settings}
    return fast_group(name, **{**fields, **kw})


def gcp(server: str = "http://127.0.0.1:9", token: str = "worker-token", **kw: object) -> GcpProvider:
    return GcpProvider(grid="t", server=server, token=token, poll_interval=0.02, **kw)  # type: ignore[arg-type]


def mig_of(compute: ComputeStandIn, group: str = "cpu") -> dict:
    return compute.migs[(PROJECT, REGION, mig_name("t", group))].resource


def template_names(compute: ComputeStandIn) -> set[str]:
    return {name for (_, _, name) in compute.templates}


async def ids(provider: GcpProvider, g: Group, status: str | None = None) -> list[str]:
    return sorted(w.id for w in await provider.workers(g) if status is None or w.status == status)


# -- what start creates ------------------------------------------------------------------------------------------------


async def test_start_creates_a_labelled_template_and_a_regional_mig_of_named_instances(
    compute: ComputeStandIn,
) -> None:
    g, provider = gcp_group(compute, runtimes=[RuntimeKind.docker, RuntimeKind.process]), gcp()
    started = await provider.start(g, 3)

    assert len(set(started)) == 3 and all(i.startswith("t-cpu-") for i in started)
    (template_key,) = compute.templates
    template = compute.templates[template_key]
    assert template["name"] == f"scaleq-t-cpu-{g.version()}" == template_name("t", "cpu", g.version())
    props = template["properties"]
    expected_labels = {
        "scaleq-managed": "true",
        "scaleq-grid": "t",
        "scaleq-group": "cpu",
        "scaleq-version": g.version(),
    }
    assert props["labels"] == expected_labels
    assert props["disks"][0]["initializeParams"]["labels"] == expected_labels
    assert props["disks"][0]["initializeParams"]["sourceImage"] == "projects/cos-cloud/global/images/family/cos-stable"
    assert props["machineType"] == "e2-standard-2"

    mig = mig_of(compute)
    assert mig["name"] == "scaleq-t-cpu"
    assert mig["instanceTemplate"].endswith(f"/regions/{REGION}/instanceTemplates/{template['name']}")
    assert [z["zone"].rsplit("/", 1)[-1] for z in mig["distributionPolicy"]["zones"]] == ZONES
    # the MIG never acts on its own: no proactive updates, no redistribution across zones
    assert mig["updatePolicy"] == {"type": "OPPORTUNISTIC", "instanceRedistributionType": "NONE"}

    (create,) = compute.called("createInstances")
    assert [i["name"] for i in create.body["instances"]] == started
    assert not compute.called("resize")
    vms = compute.instances(PROJECT, REGION, "scaleq-t-cpu")
    assert sorted(vms) == sorted(started)
    assert {vm.zone for vm in vms.values()} == set(ZONES)  # spread over the zones

    # the worker VM boots with the cloud-init of scaleq.providers.gcp.boot (the export's, byte for byte); the token
    # is a metadata key of its own, which the start script reads
    items = {i["key"]: i["value"] for i in props["metadata"]["items"]}
    assert "gce-container-declaration" not in items
    assert items == boot.metadata(boot.user_data(g, "http://127.0.0.1:9", server_grace=300), "worker-token")
    files = {f["path"]: f["content"] for f in yaml.safe_load(items["user-data"])["write_files"]}
    assert files["/etc/scaleq/image"] == IMAGE
    args = files["/etc/scaleq/worker.args"].split("\n")
    assert args[:7] == ["worker", "--server", "http://127.0.0.1:9", "--queue", "q", "--slots", "1"]
    assert "--worker-id" not in args and ["--runtime", "docker"] == args[args.index("--runtime") :][:2]
    assert "/var/run/docker.sock:/var/run/docker.sock" in files["/etc/scaleq/docker.opts"].split("\n")
    assert "Restart=on-failure" in files["/etc/systemd/system/scaleq-worker.service"]  # a drained worker stays down
    await provider.close()


def test_names_fit_gce_rules_however_long_the_grid_and_group() -> None:
    grid, group = "g" * 32, "w" * 40
    for name in (mig_name(grid, group), template_name(grid, group, "0123456789ab"), gce_name(grid, group, suffix="-x")):
        assert len(name) <= 63 and name[0].isalpha() and name[-1].isalnum()
    assert template_name(grid, group, "0123456789ab").endswith("-0123456789ab")
    assert mig_name(grid, group) != mig_name(grid, "w" * 39 + "x")  # shortened with a hash: still distinct
    assert gce_name("1grid", "cpu").startswith("sq-")


async def test_list_pages_through_instances_and_reports_creating_then_running(compute: ComputeStandIn) -> None:
    # the VMs stay "creating" until the test ends their creation below: a 0.2 s create delay raced the listing
    compute.create_delay = 60
    g, provider = gcp_group(compute), gcp()
    assert await provider.workers(g) == []  # no MIG yet: no workers, no error
    started = await provider.start(g, 3)
    before = len(compute.called("listManagedInstances"))
    workers = await provider.workers(g)
    assert len(compute.called("listManagedInstances")) - before == 2  # 3 instances, 2 per page
    assert sorted(w.id for w in workers) == sorted(started)
    assert {w.status for w in workers} == {"starting"} and {w.version for w in workers} == {g.version()}
    assert all("creating" in w.detail for w in workers)
    for vm in compute.instances(PROJECT, REGION, "scaleq-t-cpu").values():  # their creation ends now
        vm.until = time.monotonic()
    compute.settle()
    assert await ids(provider, g, "running") == sorted(started)
    await provider.close()


# -- scale-in ----------------------------------------------------------------------------------------------------------


async def test_stop_deletes_exactly_the_named_instance_and_nothing_else(compute: ComputeStandIn) -> None:
    g, provider = gcp_group(compute), gcp()
    started = await provider.start(g, 3)
    compute.settle()
    vms = compute.instances(PROJECT, REGION, "scaleq-t-cpu")
    # the one alone in its zone: removing it leaves the zones uneven, which a MIG left to redistribute would "fix"
    lonely = next(n for n, vm in vms.items() if sum(v.zone == vm.zone for v in vms.values()) == 1)
    await provider.stop(g, lonely)

    (delete,) = compute.called("deleteInstances")
    assert [u.rsplit("/", 1)[-1] for u in delete.body["instances"]] == [lonely]
    assert delete.body["instances"][0].startswith("https://www.googleapis.com/compute/v1/projects/scaleq-test/zones/")
    assert {w.id: w.status for w in await provider.workers(g)}[lonely] == "stopping"
    compute.settle()
    rest = sorted(set(started) - {lonely})
    assert await ids(provider, g) == rest  # the others untouched: none replaced, none added
    assert sorted(compute.instances(PROJECT, REGION, "scaleq-t-cpu")) == rest
    assert not compute.called("resize")
    await provider.stop(g, lonely)  # gone already: nothing to do
    assert len(compute.called("deleteInstances")) == 1
    await provider.close()


# -- rolling updates ---------------------------------------------------------------------------------------------------


async def test_a_changed_image_makes_a_new_template_and_old_instances_are_out_of_date(compute: ComputeStandIn) -> None:
    old, provider = gcp_group(compute), gcp()
    old_ids = await provider.start(old, 2)
    new = gcp_group(compute, image=IMAGE.replace(":1", ":2"))
    assert new.version() != old.version()
    new_ids = await provider.start(new, 1)
    compute.settle()

    assert template_names(compute) == {template_name("t", "cpu", v) for v in (old.version(), new.version())}
    assert mig_of(compute)["instanceTemplate"].endswith(template_name("t", "cpu", new.version()))
    (switch,) = compute.called("setInstanceTemplate")
    assert switch.body["instanceTemplate"].endswith(template_name("t", "cpu", new.version()))
    versions = {w.id: w.version for w in await provider.workers(new)}
    assert versions == {**dict.fromkeys(old_ids, old.version()), **dict.fromkeys(new_ids, new.version())}
    assert {w.status for w in await provider.workers(new)} == {"running"}  # the MIG replaced nothing by itself
    spec = compute.templates[(PROJECT, REGION, template_name("t", "cpu", new.version()))]["properties"]
    user_data = next(i["value"] for i in spec["metadata"]["items"] if i["key"] == "user-data")
    files = {f["path"]: f["content"] for f in yaml.safe_load(user_data)["write_files"]}
    assert files["/etc/scaleq/image"] == IMAGE.replace(":1", ":2")

    # once the old workers are gone, the next switch deletes their template (the one still in use stays)
    for worker_id in old_ids:
        await provider.stop(new, worker_id)
    compute.settle()
    newest = gcp_group(compute, image=IMAGE.replace(":1", ":3"))
    await provider.start(newest, 1)
    assert template_names(compute) == {template_name("t", "cpu", v) for v in (new.version(), newest.version())}
    await provider.close()


# -- destroy -----------------------------------------------------------------------------------------------------------


async def test_destroy_removes_the_mig_its_instances_and_every_template_of_the_group(compute: ComputeStandIn) -> None:
    g, other, provider = gcp_group(compute), gcp_group(compute, name="gpu"), gcp()
    first = await provider.start(g, 2)
    second = await provider.start(gcp_group(compute, image=IMAGE.replace(":1", ":2")), 1)
    await provider.start(other, 1)
    removed = await provider.destroy(g)

    assert sorted(removed) == sorted(first + second)
    assert (PROJECT, REGION, "scaleq-t-cpu") not in compute.migs
    assert template_names(compute) == {template_name("t", "gpu", other.version())}  # another group's stays
    assert await provider.workers(g) == [] and len(await provider.workers(other)) == 1
    assert await provider.destroy(g) == []  # nothing left: nothing to do, no error
    await provider.close()


# -- health, credentials and errors ------------------------------------------------------------------------------------


async def test_health_reads_the_region_and_checks_the_zones(compute: ComputeStandIn) -> None:
    g = gcp_group(compute)
    health = await gcp(settings=g.gcp).health()
    assert health.ok and "project scaleq-test, region us-central1 (UP)" in health.message
    assert compute.called("compute.regions.get")
    wrong = g.gcp.model_copy(update={"zones": ["europe-west1-b"]})
    bad = await gcp(settings=wrong).health()
    assert not bad.ok and "europe-west1-b" in bad.message and "us-central1-a" in bad.message
    missing = await gcp(settings=g.gcp.model_copy(update={"project": "nope"})).health()
    assert not missing.ok and "'projects/nope' was not found" in missing.message and "project (nope)" in missing.message


QUOTA = "Quota 'CPUS' exceeded.  Limit: 8.0 in region us-central1."


async def test_instances_gcp_cannot_create_are_reported_with_gcps_reason(compute: ComputeStandIn) -> None:
    """As the API does: createInstances ends DONE, the instances stay CREATING while the MIG retries, and the reason
    is per instance (lastAttempt, listErrors) — in the workers' detail, last_errors and health."""
    compute.refuse_creation("QUOTA_EXCEEDED", QUOTA)
    g = gcp_group(compute)
    provider = gcp(settings=g.gcp, group_name="cpu")
    started = await provider.start(g, 2)  # no error: the operation succeeded, the instances did not

    async def failing() -> list:
        found = await provider.workers(g)
        return found if found and all("QUOTA_EXCEEDED" in w.detail for w in found) else []

    workers = await eventually(failing, what="creation attempts failed")
    assert sorted(w.id for w in workers) == sorted(started)
    assert {w.status for w in workers} == {"starting"}
    assert all(f"creating it failed, the MIG retries: QUOTA_EXCEEDED: {QUOTA}" in w.detail for w in workers)
    assert await provider.last_errors(g) == dict.fromkeys(started, f"QUOTA_EXCEEDED: {QUOTA}")
    assert compute.called("listErrors")
    health = await provider.health()
    assert not health.ok and f"GCP cannot create 2 instance(s) of {mig_name('t', 'cpu')}" in health.message
    assert f"{started[0]}: QUOTA_EXCEEDED: {QUOTA}" in health.message

    # the MIG keeps retrying: more errors in its log; capacity back, the same instances come up
    mig = compute.migs[(PROJECT, REGION, mig_name("t", "cpu"))]

    async def retried() -> bool:
        compute.instances(PROJECT, REGION, mig_name("t", "cpu"))  # time passes for the stand-in's MIG
        return len(mig.errors) > 2

    await eventually(retried, what="retries")
    compute.allow_creation()
    compute.settle()
    assert {(w.id, w.status) for w in await provider.workers(g)} == {(i, "running") for i in started}
    assert all("failed" not in w.detail for w in await provider.workers(g))
    assert (await provider.health()).ok
    # the log keeps the past: the last error each instance had
    assert await provider.last_errors(g) == dict.fromkeys(started, f"QUOTA_EXCEEDED: {QUOTA}")
    assert await gcp().last_errors(gcp_group(compute, name="other")) == {}  # no MIG: nothing failed
    await provider.close()


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No key file, no gcloud configuration: application default credentials can only come from a metadata server."""
    for name in ("GOOGLE_APPLICATION_CREDENTIALS", "CLOUDSDK_CONFIG", "GOOGLE_CLOUD_PROJECT", "NO_GCE_CHECK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))


def real_settings() -> GcpSettings:
    return GcpSettings(project=PROJECT, region=REGION)  # no endpoint override: the real API and real ADC lookup


@pytest.mark.timeout(30)
async def test_no_credentials_is_a_clear_not_ok_health_and_a_clear_error(
    no_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as refused:  # a metadata server address where nothing listens
        refused.bind(("127.0.0.1", 0))
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{refused.getsockname()[1]}")
    provider = gcp(settings=real_settings())
    health = await provider.health()  # refused at once (the test's timeout bounds it)
    assert not health.ok
    assert "no Google Cloud credentials found" in health.message
    assert (
        "gcloud auth application-default login" in health.message and "GOOGLE_APPLICATION_CREDENTIALS" in health.message
    )
    group = Group(name="cpu", provider="gcp", image=IMAGE, gcp=real_settings())
    with pytest.raises(ProviderError, match="no Google Cloud credentials found"):
        await provider.workers(group)  # what plan and apply call: a clear error, not a traceback


@pytest.mark.timeout(30)
async def test_a_metadata_server_that_never_answers_does_not_hang_the_lookup(
    no_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{silent.getsockname()[1]}")
        provider = gcp(settings=real_settings(), credentials_timeout=1.5, metadata_probe_timeout=0.3)
        health = await provider.health()  # not a hang (the test's timeout); the message names the 0.3 s probe
    assert not health.ok
    assert "no GCE metadata server answered" in health.message
    assert "gcloud auth application-default login" in health.message


async def test_api_refusals_and_failures_become_provider_errors_with_the_message(compute: ComputeStandIn) -> None:
    g, provider = gcp_group(compute), gcp()
    compute.inject(500, "Internal error. Please try again.", method="listManagedInstances")
    with pytest.raises(ProviderError, match=r"failed to list the instances of group cpu \(500 .*Internal error"):
        await provider.workers(g)
    compute.inject(403, "Required 'compute.instanceGroupManagers.get' permission for 'projects/scaleq-test'")
    with pytest.raises(ProviderError) as refused:
        await provider.start(g, 1)
    assert "compute.instanceGroupManagers.get' permission" in str(refused.value)
    assert "roles/compute.instanceAdmin.v1" in str(refused.value)
    compute.inject(403, "Compute Engine API has not been used in project scaleq-test before or it is disabled.")
    health = await gcp(settings=g.gcp).health()
    assert not health.ok and "gcloud services enable compute.googleapis.com --project scaleq-test" in health.message
    assert not compute.called("createInstances")  # nothing was created behind the errors
    await provider.start(g, 1)  # and it works once the API answers again
    await provider.close()


async def test_an_operation_that_fails_is_a_provider_error_with_its_errors(compute: ComputeStandIn) -> None:
    g, provider = gcp_group(compute), gcp()
    compute.fail_operation(
        "createInstances", "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded. Limit: 24.0 in region us-central1."
    )
    with pytest.raises(ProviderError, match=r"could not create instance.*QUOTA_EXCEEDED: Quota 'CPUS' exceeded"):
        await provider.start(g, 2)
    assert await provider.workers(g) == []  # nothing was created
    assert len(await provider.start(g, 1)) == 1
    await provider.close()


async def test_an_unreachable_endpoint_is_a_provider_error() -> None:
    port = free_port()
    settings = GcpSettings(project=PROJECT, region=REGION, api_endpoint=f"http://127.0.0.1:{port}")
    group = Group(name="cpu", provider="gcp", image=IMAGE, gcp=settings)
    with pytest.raises(ProviderError, match=f"cannot reach the Compute Engine API at http://127.0.0.1:{port}"):
        await gcp().workers(group)
    health = await gcp(settings=settings).health()
    assert not health.ok and "cannot reach" in health.message


def test_the_registry_gives_gcp_groups_their_settings(compute: ComputeStandIn, tmp_path: Path) -> None:
    g = gcp_group(compute)
    provider = make_provider(g, ProviderContext("t", "http://127.0.0.1:1", "tok", tmp_path, "https://grid.example"))
    assert isinstance(provider, GcpProvider)
    assert provider.settings == g.gcp and provider.server == "https://grid.example"


# -- the stand-in holds the client to the published schema ---------------------------------------------------------


def test_the_standin_validates_requests_against_the_discovery_schema(compute: ComputeStandIn) -> None:
    base = f"{compute.url}/compute/v1/projects/{PROJECT}/regions/{REGION}"
    template = {
        "name": "t1",
        "properties": {
            "machineType": "e2-small",
            "disks": [{"boot": True, "initializeParams": {"diskSizeGb": "10"}}],
            "networkInterfaces": [{"network": "global/networks/default"}],
        },
    }

    def post(path: str, body: object) -> httpx.Response:
        return httpx.post(base + path, json=body)

    def error(r: httpx.Response) -> dict:
        data = r.json()
        assert set(data) == {"error"} and {"code", "message", "errors"} <= set(data["error"]), data
        assert data["error"]["code"] == r.status_code
        return data["error"]

    unknown = post("/instanceTemplates", {**template, "colour": "blue"})
    assert unknown.status_code == 400 and 'Unknown name "colour"' in error(unknown)["message"]
    nested = post("/instanceTemplates", {**template, "properties": {**template["properties"], "machine_type": "x"}})
    assert nested.status_code == 400 and 'Unknown name "machine_type"' in error(nested)["message"]
    typed = post("/instanceTemplates", {**template, "properties": {**template["properties"], "canIpForward": "yes"}})
    assert typed.status_code == 400 and "TYPE_BOOL" in error(typed)["message"]
    no_name = post("/instanceTemplates", {"properties": template["properties"]})
    assert no_name.status_code == 400 and error(no_name)["errors"][0]["reason"] == "required"
    bad_name = post("/instanceTemplates", {**template, "name": "Not_A_Name"})
    assert bad_name.status_code == 400 and "Must match" in error(bad_name)["message"]
    bad_label = post("/instanceTemplates", {**template, "properties": {**template["properties"], "labels": {"A": "b"}}})
    assert bad_label.status_code == 400 and "Label keys" in error(bad_label)["message"]
    mig = {"name": "m1", "targetSize": 0, "instanceTemplate": f"regions/{REGION}/instanceTemplates/t1"}
    bad_enum = post("/instanceGroupManagers", {**mig, "updatePolicy": {"type": "SOMETIMES"}})
    assert bad_enum.status_code == 400 and "TYPE_ENUM" in error(bad_enum)["message"]
    no_size = post("/instanceGroupManagers", {"name": "m1", "instanceTemplate": mig["instanceTemplate"]})
    assert no_size.status_code == 400 and "targetSize" in error(no_size)["message"]
    bad_query = httpx.get(f"{base}/instanceTemplates", params={"colour": "blue"})
    assert bad_query.status_code == 400 and "Cannot bind query parameter" in error(bad_query)["message"]
    wrong_method = httpx.put(f"{base}/instanceTemplates")
    assert wrong_method.status_code == 405

    ok = post("/instanceTemplates", template)
    assert ok.status_code == 200 and ok.json()["kind"] == "compute#operation" and ok.json()["status"] == "RUNNING"
    compute.settle()
    again = post("/instanceTemplates", template)
    assert again.status_code == 409 and error(again)["errors"][0]["reason"] == "alreadyExists"
    assert post("/instanceGroupManagers", mig).status_code == 200
    compute.settle()
    in_use = httpx.delete(f"{base}/instanceTemplates/t1")
    assert in_use.status_code == 400 and error(in_use)["errors"][0]["reason"] == "resourceInUseByAnotherResource"
    missing = httpx.get(f"{base}/instanceGroupManagers/nope")
    assert missing.status_code == 404 and error(missing)["errors"][0]["reason"] == "notFound"
    assert (
        error(missing)["message"]
        == f"The resource 'projects/{PROJECT}/regions/{REGION}/instanceGroupManagers/nope' was not found"
    )


def test_the_standin_behaves_like_a_mig_left_to_itself(compute: ComputeStandIn) -> None:
    """What a MIG does on its own when not told otherwise — which the provider switches off (tested above)."""
    base = f"{compute.url}/compute/v1/projects/{PROJECT}/regions/{REGION}"
    template = {
        "properties": {
            "machineType": "e2-small",
            "disks": [{"boot": True}],
            "networkInterfaces": [{"network": "global/networks/default"}],
        }
    }
    for name in ("t1", "t2"):
        assert httpx.post(f"{base}/instanceTemplates", json={**template, "name": name}).status_code == 200
    compute.settle()
    mig = {"name": "m1", "targetSize": 3, "instanceTemplate": f"regions/{REGION}/instanceTemplates/t1"}
    assert httpx.post(f"{base}/instanceGroupManagers", json=mig).status_code == 200
    compute.settle()
    before = set(compute.instances(PROJECT, REGION, "m1"))
    # resize down deletes instances of the MIG's choosing
    assert httpx.post(f"{base}/instanceGroupManagers/m1/resize", params={"size": 2}).status_code == 200
    compute.settle()
    assert len(compute.instances(PROJECT, REGION, "m1")) == 2
    # a new template with the default (PROACTIVE) update policy: the MIG recreates running instances by itself
    body = {"instanceTemplate": f"regions/{REGION}/instanceTemplates/t2"}
    op = httpx.post(f"{base}/instanceGroupManagers/m1/setInstanceTemplate", json=body).json()
    assert httpx.post(f"{base}/operations/{op['name']}/wait").json()["status"] == "DONE"
    actions = {vm.action for vm in compute.instances(PROJECT, REGION, "m1").values()}
    assert actions == {"RECREATING"}
    compute.settle()
    assert set(compute.instances(PROJECT, REGION, "m1")) <= before


# -- the controller and the deployer driving a gcp group ------------------------------------------------------------


@pytest.fixture
async def live_sqlite(tmp_path: Path) -> AsyncIterator[LiveServer]:
    store = SQLiteStore(tmp_path / "scaleq.db")
    await store.open()
    try:
        async with serve(store, ServerSettings(lease_seconds=2.0, sweep_interval=0.2, long_poll_max=5.0)) as live:
            yield live
    finally:
        await store.close()


async def test_the_controller_scales_a_gcp_group_out_by_name_and_in_by_deleting_the_drained_instance(
    compute: ComputeStandIn, live_sqlite: LiveServer
) -> None:
    live = live_sqlite
    g = gcp_group(compute, max_workers=2)
    provider = gcp(server=live.url, token=live.tokens["worker"])
    admin, worker = live.client("admin"), live.client("worker")
    try:
        async with controlling(Controller([(g, provider)], RemoteObserver(admin), tick=0.2)):
            job, _ = await admin.submit(SubmitRequest(queue="q", definition=JobDefinition(command=["true"])))
            create = await eventually(lambda: _called(compute, "createInstances"), what="createInstances")
            (name,) = [i["name"] for i in create[0].body["instances"]]
            assert await eventually(lambda: ids(provider, g), what="the instance listed") == [name]

            # no VM runs here: register a worker under the instance's name, as the container would
            await worker.register(
                {"id": name, "queue": "q", "group": "cpu", "slots": 1, "runtimes": ["process"], "cpus": 2}
            )
            await admin.cancel(job.id)  # no demand left: the idle worker is drained after its idle timeout
            await eventually(lambda: _state(admin, name, "draining"), timeout=15, what="drain")
            assert not compute.called("deleteInstances")  # draining is not gone: its instance stays meanwhile
            await worker.deregister(name)  # what the drained worker does as it exits
            delete = await eventually(lambda: _called(compute, "deleteInstances"), timeout=10, what="deleteInstances")
            assert [u.rsplit("/", 1)[-1] for u in delete[0].body["instances"]] == [name]
            await eventually(lambda: _no_workers(provider, g), timeout=10, what="instance gone")
        assert len(compute.called("createInstances")) == 1 and len(compute.called("deleteInstances")) == 1
        assert not compute.called("resize")
        events = await admin.events(group="cpu", limit=100)
        up = [e for e in events if e["kind"] == "scale_up"]
        down = [e for e in events if e["kind"] == "scale_down"]
        assert up and up[-1]["to"] == 1 and "starting 1" in up[-1]["reason"]
        assert down and "idle" in down[-1]["reason"]
    finally:
        await provider.destroy(g)
        await provider.close()
        await admin.close()
        await worker.close()


async def _called(compute: ComputeStandIn, name: str) -> list:
    return compute.called(name)


async def _state(c: Client, worker_id: str, state: str) -> bool:
    return any(w.id == worker_id and w.state == state for w in await c.workers(include_gone=True))


async def _no_workers(provider: GcpProvider, g: Group) -> bool:
    return await provider.workers(g) == []


async def test_apply_rolls_a_changed_gcp_group_and_destroy_removes_it(
    compute: ComputeStandIn, live_sqlite: LiveServer, tmp_path: Path
) -> None:
    live, admin = live_sqlite, live_sqlite.client("admin")
    ctx = ProviderContext("t", live.url, live.tokens["worker"], tmp_path)
    g = gcp_group(compute, min_workers=1, idle_timeout=60)
    try:
        applied = await Deployer(Grid(name="t", groups=[g]), tmp_path, admin, ctx).apply()
        (first,) = [line.split()[-1] for line in applied[0].done if line.startswith("started")]
        compute.settle()

        changed = gcp_group(compute, min_workers=1, idle_timeout=60, image=IMAGE.replace(":1", ":2"))
        deployer = Deployer(Grid(name="t", groups=[changed]), tmp_path, admin, ctx)
        (plan,) = await deployer.plan()
        assert (plan.action, plan.workers, plan.out_of_date) == ("update", 1, 1)
        assert any("image" in change for change in plan.changes)
        (applied,) = await deployer.apply()
        # never registered, so it is stopped directly: exactly its instance is deleted; a new one has the new template
        assert f"draining out-of-date worker {first}" in applied.done
        (delete,) = compute.called("deleteInstances")
        assert [u.rsplit("/", 1)[-1] for u in delete.body["instances"]] == [first]
        compute.settle()
        provider = make_provider(changed, ctx)
        (current,) = await provider.workers(changed)
        assert current.id != first and current.version == changed.version()

        (destroyed,) = await deployer.destroy()
        assert destroyed.done == [f"removed worker {current.id}"]
        assert not compute.migs and not compute.templates
    finally:
        await admin.close()


async def test_instances_whose_workers_never_register_are_replaced_never_piled_up(
    compute: ComputeStandIn, sqlite_store: SQLiteStore
) -> None:
    """Instances come up but their workers never reach the server: after startup_grace each is deleted, said in an
    event, and the MIG never holds more than max_workers instances (those being deleted included)."""
    g = gcp_group(compute, max_workers=2, startup_grace=60)

    async def instances() -> int:
        return len(compute.instances(PROJECT, REGION, mig_name("t", "cpu")))

    p = gcp()
    try:
        events = await never_registering(p, g, sqlite_store, instances)
    finally:
        await p.close()
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 3 * g.max_workers
    assert all("did not register within startup_grace (60 s)" in e.reason for e in lapsed)
    assert len(compute.called("deleteInstances")) == 3 * g.max_workers  # each lapsed instance, and nothing else


async def test_instances_gcp_cannot_create_are_stopped_after_startup_grace_with_gcps_reason(
    compute: ComputeStandIn, sqlite_store: SQLiteStore
) -> None:
    """A quota GCP reports per instance (createInstances DONE, the instances CREATING while the MIG retries): after
    startup_grace each is deleted, never more than max_workers, and the event quotes GCP's lastAttempt error."""
    compute.refuse_creation("QUOTA_EXCEEDED", QUOTA)
    g = gcp_group(compute, max_workers=2, startup_grace=60)

    async def instances() -> int:
        return len(compute.instances(PROJECT, REGION, mig_name("t", "cpu")))

    p = gcp()

    async def all_failed() -> bool:
        listed = {w.id for w in await p.workers(g) if w.status == "starting"}
        return bool(listed) and listed <= set(await p.last_errors(g))

    async def failed() -> None:
        await eventually(all_failed, what="creation attempts failed")

    try:
        events = await never_registering(p, g, sqlite_store, instances, rounds=2, failed=failed)
    finally:
        await p.close()
    lapsed = [e for e in events if e.kind == "not_registered"]
    assert len(lapsed) == 2 * g.max_workers
    assert all(
        f"GCP could not create instance {e.reason.split()[1]}: QUOTA_EXCEEDED: {QUOTA}" in e.reason for e in lapsed
    )


@pytest.mark.parametrize(
    "refusal, state",
    [
        (
            ("fail_operation", "createInstances", "QUOTA_EXCEEDED", "Quota 'CPUS' exceeded.  Limit: 8.0 in region"),
            "quota",
        ),
        (("inject", 429, "Rate Limit Exceeded", "rateLimitExceeded"), "rate_limited"),
        (("inject", 403, "Quota exceeded for quota metric 'Queries'", "quotaExceeded"), "quota"),
    ],
)
async def test_quota_and_rate_limit_refusals_are_the_groups_state(
    compute: ComputeStandIn, sqlite_store: SQLiteStore, refusal: tuple, state: str
) -> None:
    g = gcp_group(compute, max_workers=2)
    knob, *args = refusal
    p = gcp()
    try:
        refused, recovered = await refused_then_retried(
            p, g, sqlite_store, lambda: getattr(compute, knob)(*args, times=1), lambda: None
        )
    finally:
        await p.close()
    assert refused.state == state and args[-2 if knob == "inject" else -1].split(".")[0] in refused.message
    assert (recovered.state, recovered.message, recovered.current) == ("ok", "", 1)


async def test_jobs_of_a_preempted_spot_vm_come_back_without_spending_an_attempt(
    compute: ComputeStandIn, sqlite_store: SQLiteStore
) -> None:
    spot = GcpSettings(project=PROJECT, region=REGION, zones=ZONES, api_endpoint=compute.url, spot=True)
    g, provider = gcp_group(compute, gcp=spot), gcp()
    try:
        jobs, events = await taken_back(
            provider, g, sqlite_store, lambda name: compute.preempt(PROJECT, REGION, mig_name("t", "cpu"), name)
        )
        (taken, kept) = jobs
        (event,) = [e for e in events if e.kind == "preempted"]
        assert f"worker {taken} was preempted (GCP: Instance was preempted (compute.instances.preempted in " in (
            event.reason
        )
        assert "1 job(s) back in the queue without spending an attempt" in event.reason
        back = await sqlite_store.get_job(jobs[taken])
        assert (back.state, back.attempts) == ("queued", 0)
        assert [a.outcome for a in await sqlite_store.list_attempts(back.id)] == ["preempted"]
        assert (await sqlite_store.get_job(jobs[kept])).state == "running"  # silent, not preempted: left to its lease
        # asked the way Google's preemption-history sample asks: the zone operations of that type
        asked = compute.called("compute.zoneOperations.list")
        assert asked and all(c.query["filter"] == 'operationType="compute.instances.preempted"' for c in asked)
    finally:
        await provider.destroy(g)
        await provider.close()


def test_the_standin_lists_preemptions_by_filter_and_refuses_what_it_cannot_read(compute: ComputeStandIn) -> None:
    base = compute.url

    def operations(zone: str, **params: str) -> httpx.Response:
        return httpx.get(f"{base}/compute/v1/projects/{PROJECT}/zones/{zone}/operations", params=params)

    assert operations("us-central1-a").json()["items"] == []
    assert operations("mars-1-a").status_code == 404
    assert operations("us-central1-a", filter="name eq foo").status_code == 400


async def test_vms_get_an_external_ip_unless_the_group_says_not(compute: ComputeStandIn) -> None:
    def interface(name: str) -> dict:
        (template,) = [t for (_, _, n), t in compute.templates.items() if n.startswith(f"scaleq-t-{name}-")]
        (nic,) = template["properties"]["networkInterfaces"]
        return nic

    private = GcpSettings(project=PROJECT, region=REGION, zones=ZONES, api_endpoint=compute.url, external_ip=False)
    default, none = gcp_group(compute, "pub"), gcp_group(compute, "priv", gcp=private)
    provider = gcp()
    try:
        await provider.start(default, 1)
        await provider.start(none, 1)
        assert interface("pub")["accessConfigs"] == [{"name": "External NAT", "type": "ONE_TO_ONE_NAT"}]
        assert "accessConfigs" not in interface("priv")  # the network's Cloud NAT is its way out
        assert default.version() != none.version()
    finally:
        for g in (default, none):
            await provider.destroy(g)
        await provider.close()


async def test_only_a_recent_preemption_of_the_instance_counts(compute: ComputeStandIn) -> None:
    spot = GcpSettings(project=PROJECT, region=REGION, zones=ZONES, api_endpoint=compute.url, spot=True)
    g, provider = gcp_group(compute, gcp=spot), gcp()
    try:
        taken, other = await provider.start(g, 2)
        await provider.workers(g)
        op = compute.preempt(PROJECT, REGION, mig_name("t", "cpu"), taken)
        ((_, _, recorded),) = compute.zone_ops
        # a MIG recreates a preempted VM under its name: a preemption older than PREEMPTED_WITHIN was of an earlier VM
        old = datetime.now(UTC) - timedelta(seconds=PREEMPTED_WITHIN + 60)
        recorded["insertTime"] = old.isoformat(timespec="milliseconds")
        assert await provider.preempted(g, [taken, other]) == {}
        recorded["insertTime"] = op["insertTime"]
        assert list(await provider.preempted(g, [taken, other])) == [taken]
        assert await provider.preempted(g, [other]) == {}
    finally:
        await provider.destroy(g)
        await provider.close()
