"""The Kubernetes stand-in ("kmock", ``tests/standins/kubernetes_api.py`` and ``kubernetes_rules.py``) pinned against
what the real API server documents, through the official client as the provider uses it. No real API server can be
installed here (docs/providers.md), so these are what makes the provider's tests mean something: each case names the
documentation it follows.

- [conventions]: Kubernetes API conventions, "Concurrency Control and Consistency" and "Response Status Kind"
  (409 Conflict / AlreadyExists, 422 Invalid with ``details.causes``).
- [labels]: "Labels and Selectors", the equality- and set-based requirements (400 for an unreadable selector).
- [fields]: "Field Selectors", the supported fields per kind (400 for any other).
- [watch]: "Kubernetes API Concepts", "Efficient detection of changes" and "Resource versions" (watch from a
  resourceVersion; 410 Gone as an ERROR event once that version is compacted away; ``timeoutSeconds``).
- [chunks]: "Kubernetes API Concepts", "Retrieving large results sets in chunks" (``limit``, ``continue``,
  ``remainingItemCount``; 410 once the token's version is compacted away).
- [delete]: "Pod Lifecycle", "Termination of Pods" (deletionTimestamp while terminating), and the DeleteOptions
  reference (``propagationPolicy`` one of Foreground, Background, Orphan).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes import watch as k8s_watch

from tests.standins.kubernetes_api import KubernetesStandIn

NS = "scaleq"


@pytest.fixture
def standin() -> Iterator[KubernetesStandIn]:
    with KubernetesStandIn(namespaces=(NS,), start_delay=0) as s:  # a pod runs at the kubelet's next look
        yield s


@pytest.fixture
def core(standin: KubernetesStandIn, tmp_path: Path) -> Iterator[Any]:
    api_client = k8s_config.new_client_from_config(config_file=str(standin.kubeconfig(tmp_path / "kubeconfig")))
    yield k8s.CoreV1Api(api_client)
    api_client.close()


def secret(name: str, value: str = "v", labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels or {}},
        "data": {"k": base64.b64encode(value.encode()).decode()},
    }


def pod(name: str, labels: dict[str, str] | None = None, **container: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"containers": [{"name": "worker", "image": "busybox:1", **container}]},
    }


def status_of(exc: k8s.ApiException) -> dict[str, Any]:
    body: dict[str, Any] = json.loads(exc.body)
    assert body["kind"] == "Status" and body["code"] == exc.status
    return body


# -- resourceVersion [conventions] ------------------------------------------------------------------------------------


def test_every_write_bumps_the_resource_version(core: Any, standin: KubernetesStandIn) -> None:
    created = core.create_namespaced_secret(NS, secret("s"))
    patched = core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "b"}}})
    assert int(patched.metadata.resource_version) > int(created.metadata.resource_version)
    core.create_namespaced_pod(NS, pod("p"))
    pending = core.read_namespaced_pod("p", NS).metadata.resource_version
    standin.exit_pod(NS, "p", 0)  # the kubelet's status write bumps it too
    assert int(core.read_namespaced_pod("p", NS).metadata.resource_version) > int(pending)


def test_a_stale_resource_version_is_a_409_conflict(core: Any) -> None:
    first = core.create_namespaced_secret(NS, secret("s")).metadata.resource_version
    core.patch_namespaced_secret("s", NS, {"data": {"k": base64.b64encode(b"other").decode()}})
    with pytest.raises(k8s.ApiException) as patch:
        core.patch_namespaced_secret("s", NS, {"metadata": {"resourceVersion": first, "labels": {"a": "b"}}})
    body = status_of(patch.value)
    assert (patch.value.status, body["reason"]) == (409, "Conflict")
    assert "the object has been modified; please apply your changes to the latest version" in body["message"]
    assert body["details"]["name"] == "s"

    stale = core.read_namespaced_secret("s", NS)
    stale.metadata.resource_version = first
    with pytest.raises(k8s.ApiException) as put:  # update (PUT) carries the version it read: the same rule
        core.replace_namespaced_secret("s", NS, stale)
    assert (put.value.status, status_of(put.value)["reason"]) == (409, "Conflict")
    assert core.read_namespaced_secret("s", NS).metadata.labels in (None, {})  # nothing of either write landed


def test_a_write_with_the_current_version_or_none_is_applied(core: Any) -> None:
    core.create_namespaced_secret(NS, secret("s"))
    current = core.read_namespaced_secret("s", NS)
    current.metadata.labels = {"who": "put"}
    replaced = core.replace_namespaced_secret("s", NS, current)
    assert replaced.metadata.labels == {"who": "put"}
    assert int(replaced.metadata.resource_version) > int(current.metadata.resource_version)
    patched = core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"who": "patch"}}})  # unconditional
    assert patched.metadata.labels == {"who": "patch"}


def test_creating_an_existing_name_is_409_already_exists(core: Any) -> None:
    core.create_namespaced_secret(NS, secret("s"))
    with pytest.raises(k8s.ApiException) as err:
        core.create_namespaced_secret(NS, secret("s"))
    assert (err.value.status, status_of(err.value)["reason"]) == (409, "AlreadyExists")


# -- selectors [labels] [fields] --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "names"),
    [
        ("tier=a", ["one"]),
        ("tier==a", ["one"]),
        ("tier!=a", ["three", "two"]),  # also selects objects without the key
        ("tier in (a, b)", ["one", "two"]),
        ("tier notin (a)", ["three", "two"]),
        ("tier", ["one", "two"]),
        ("!tier", ["three"]),
        ("tier,gpu=yes", ["two"]),
        ("tier in (a,b),!gpu", ["one"]),
        ("", ["one", "three", "two"]),
    ],
)
def test_label_selectors(core: Any, selector: str, names: list[str]) -> None:
    core.create_namespaced_secret(NS, secret("one", labels={"tier": "a"}))
    core.create_namespaced_secret(NS, secret("two", labels={"tier": "b", "gpu": "yes"}))
    core.create_namespaced_secret(NS, secret("three", labels={"other": "x"}))
    found = core.list_namespaced_secret(NS, label_selector=selector).items
    assert sorted(s.metadata.name for s in found) == names


@pytest.mark.parametrize("selector", ["tier in a", "tier=(a)", "!tier=a", "tier in (a", "=a"])
def test_an_unreadable_label_selector_is_400(core: Any, selector: str) -> None:
    with pytest.raises(k8s.ApiException) as err:
        core.list_namespaced_secret(NS, label_selector=selector)
    assert (err.value.status, status_of(err.value)["reason"]) == (400, "BadRequest")


def test_field_selectors_on_the_documented_fields(core: Any, standin: KubernetesStandIn) -> None:
    standin.unpullable("never/pulls:1")
    core.create_namespaced_pod(NS, pod("done"))
    core.create_namespaced_pod(NS, pod("waiting", image="never/pulls:1"))
    standin.exit_pod(NS, "done", 0)

    def names(selector: str) -> list[str]:
        return sorted(p.metadata.name for p in core.list_namespaced_pod(NS, field_selector=selector).items)

    assert names("status.phase=Succeeded") == ["done"]
    assert names("status.phase!=Succeeded") == ["waiting"]
    assert names("metadata.name==waiting") == ["waiting"]
    assert names("metadata.namespace=scaleq,status.phase=Pending") == ["waiting"]
    assert names("spec.nodeName=nowhere") == []


@pytest.mark.parametrize("selector", ["spec.containers=x", "metadata.labels=x", "status.phase~Running"])
def test_an_unsupported_field_selector_is_400(core: Any, selector: str) -> None:
    with pytest.raises(k8s.ApiException) as err:
        core.list_namespaced_pod(NS, field_selector=selector)
    assert (err.value.status, status_of(err.value)["reason"]) == (400, "BadRequest")


# -- watch [watch] ----------------------------------------------------------------------------------------------------


def events(core: Any, count: int, **kw: Any) -> list[tuple[str, str]]:
    """The first ``count`` events of a watch of secrets (the server ends it after ``timeout_seconds`` anyway)."""
    w = k8s_watch.Watch()
    seen = []
    for event in w.stream(core.list_namespaced_secret, NS, timeout_seconds=5, **kw):
        seen.append((event["type"], event["object"].metadata.name))
        if len(seen) == count:
            w.stop()
    return seen


def test_a_watch_from_a_resource_version_sees_every_change_after_it(core: Any) -> None:
    core.create_namespaced_secret(NS, secret("before"))
    since = core.list_namespaced_secret(NS).metadata.resource_version
    core.create_namespaced_secret(NS, secret("s"))
    core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "b"}}})
    core.delete_namespaced_secret("s", NS)
    assert events(core, 3, resource_version=since) == [("ADDED", "s"), ("MODIFIED", "s"), ("DELETED", "s")]


def test_a_watch_without_a_version_starts_with_the_current_objects(core: Any) -> None:
    core.create_namespaced_secret(NS, secret("a"))
    core.create_namespaced_secret(NS, secret("b", labels={"x": "y"}))
    assert events(core, 2) == [("ADDED", "a"), ("ADDED", "b")]
    assert events(core, 1, label_selector="x=y") == [("ADDED", "b")]


def test_leaving_a_watched_selection_is_a_deleted_event(core: Any) -> None:
    since = core.list_namespaced_secret(NS).metadata.resource_version
    core.create_namespaced_secret(NS, secret("s", labels={"x": "y"}))
    core.create_namespaced_secret(NS, secret("unwatched"))
    core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"x": "z"}}})
    seen = events(core, 2, resource_version=since, label_selector="x=y")
    assert seen == [("ADDED", "s"), ("DELETED", "s")]


def test_a_watch_from_a_compacted_version_is_410_expired(core: Any, standin: KubernetesStandIn) -> None:
    old = core.create_namespaced_secret(NS, secret("s")).metadata.resource_version
    core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "b"}}})
    standin.compact()
    # On the wire: HTTP 200, then one ERROR event carrying a Status with code 410.
    url = f"{standin.url}/api/v1/namespaces/{NS}/secrets"
    params = {"watch": "true", "resourceVersion": old, "timeoutSeconds": "5"}
    answer = httpx.get(url, params=params, headers={"Authorization": f"Bearer {standin.token}"}, timeout=10)
    assert answer.status_code == 200
    lines = [json.loads(line) for line in answer.text.splitlines() if line]
    assert len(lines) == 1 and lines[0]["type"] == "ERROR"
    assert (lines[0]["object"]["code"], lines[0]["object"]["reason"]) == (410, "Expired")
    assert lines[0]["object"]["message"].startswith(f"too old resource version: {old} (")
    # Through the official client (which does not retry when given a timeout): an ApiException 410.
    with pytest.raises(k8s.ApiException) as err:
        events(core, 1, resource_version=old)
    assert err.value.status == 410
    # A relist gives a version that can be watched from again.
    fresh = core.list_namespaced_secret(NS).metadata.resource_version
    core.delete_namespaced_secret("s", NS)
    assert events(core, 1, resource_version=fresh) == [("DELETED", "s")]


def test_a_watch_ends_when_its_timeout_does(core: Any) -> None:
    since = core.list_namespaced_secret(NS).metadata.resource_version
    stream = k8s_watch.Watch().stream(core.list_namespaced_secret, NS, resource_version=since, timeout_seconds=1)
    assert list(stream) == []  # nothing changed, and the server closed the stream: the loop ends


def test_a_watch_sees_the_kubelet_start_a_pod(core: Any) -> None:
    since = core.list_namespaced_pod(NS).metadata.resource_version
    core.create_namespaced_pod(NS, pod("p"))
    w = k8s_watch.Watch()
    phases = []
    for event in w.stream(core.list_namespaced_pod, NS, resource_version=since, timeout_seconds=5):
        phases.append((event["type"], event["object"].status.phase))
        if event["object"].status.phase == "Running":
            w.stop()
    assert phases == [("ADDED", "Pending"), ("MODIFIED", "Running")]


# -- validation [conventions] -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (pod("Not_DNS"), "metadata.name"),
        ({**pod("p"), "spec": {"containers": []}}, "spec.containers"),
        (pod("p", resources={"requests": {"cpu": "lots"}}), "spec.containers[0].resources.requests[cpu]"),
        (pod("p", labels={"k": "v" * 64}), "metadata.labels"),
        (pod("p", image=""), "spec.containers[0].image"),
    ],
)
def test_an_invalid_object_is_422_naming_the_field(core: Any, body: dict[str, Any], field: str) -> None:
    with pytest.raises(k8s.ApiException) as err:
        core.create_namespaced_pod(NS, body)
    status = status_of(err.value)
    assert (err.value.status, status["reason"]) == (422, "Invalid")
    assert field in [cause["field"] for cause in status["details"]["causes"]]
    assert all(cause["reason"].startswith("FieldValue") for cause in status["details"]["causes"])


def test_a_pod_spec_is_immutable_but_for_its_images(core: Any) -> None:
    core.create_namespaced_pod(NS, pod("p"))
    with pytest.raises(k8s.ApiException) as err:
        core.patch_namespaced_pod("p", NS, {"spec": {"restartPolicy": "Never"}})
    status = status_of(err.value)
    assert (err.value.status, status["details"]["causes"][0]) == (
        422,
        {"reason": "FieldValueForbidden", "field": "spec", "message": status["details"]["causes"][0]["message"]},
    )
    current = core.read_namespaced_pod("p", NS)
    current.metadata.labels = {"changed": "yes"}
    current.spec.containers[0].image = "busybox:2"
    replaced = core.replace_namespaced_pod("p", NS, current)
    assert (replaced.metadata.labels, replaced.spec.containers[0].image) == ({"changed": "yes"}, "busybox:2")


# -- deletion [delete] ------------------------------------------------------------------------------------------------


def test_delete_options(core: Any, standin: KubernetesStandIn) -> None:
    core.create_namespaced_secret(NS, secret("s"))
    with pytest.raises(k8s.ApiException) as err:
        core.delete_namespaced_secret("s", NS, propagation_policy="Sometimes")
    status = status_of(err.value)
    assert (err.value.status, status["details"]["causes"][0]["field"]) == (422, "propagationPolicy")
    core.delete_namespaced_secret("s", NS, propagation_policy="Background")
    assert core.list_namespaced_secret(NS).items == []

    core.create_namespaced_pod(NS, pod("p"))
    assert standin.pod(NS, "p")["status"]["phase"] == "Running"
    core.delete_namespaced_pod("p", NS, grace_period_seconds=30)
    terminating = core.read_namespaced_pod("p", NS)  # still there, Terminating, until its worker exits
    assert terminating.metadata.deletion_timestamp is not None
    assert terminating.metadata.deletion_grace_period_seconds == 30
    standin.exit_pod(NS, "p", 0)
    with pytest.raises(k8s.ApiException) as gone:
        core.read_namespaced_pod("p", NS)
    assert gone.value.status == 404


def test_delete_with_a_stale_resource_version_precondition_is_409(core: Any) -> None:
    first = core.create_namespaced_secret(NS, secret("s")).metadata.resource_version
    core.patch_namespaced_secret("s", NS, {"metadata": {"labels": {"a": "b"}}})
    stale = k8s.V1DeleteOptions(preconditions=k8s.V1Preconditions(resource_version=first))
    with pytest.raises(k8s.ApiException) as err:
        core.delete_namespaced_secret("s", NS, body=stale)
    assert (err.value.status, status_of(err.value)["reason"]) == (409, "Conflict")
    current = core.read_namespaced_secret("s", NS).metadata.resource_version
    core.delete_namespaced_secret("s", NS, body=k8s.V1DeleteOptions(preconditions={"resourceVersion": current}))
    assert core.list_namespaced_secret(NS).items == []


# -- lists [chunks] ---------------------------------------------------------------------------------------------------


def test_a_read_moves_no_resource_version(core: Any) -> None:
    core.create_namespaced_secret(NS, secret("s"))
    first = core.list_namespaced_secret(NS).metadata.resource_version
    assert core.list_namespaced_secret(NS).metadata.resource_version == first
    assert core.read_namespaced_secret("s", NS).metadata.resource_version == first  # the last write's version


def test_limit_and_continue_page_a_list(core: Any, standin: KubernetesStandIn) -> None:
    for name in ("a", "b", "c", "d", "e"):
        core.create_namespaced_secret(NS, secret(name, labels={"x": "y"} if name != "c" else {}))
    first = core.list_namespaced_secret(NS, label_selector="x=y", limit=2)
    assert [s.metadata.name for s in first.items] == ["a", "b"]
    assert first.metadata.remaining_item_count == 2 and first.metadata._continue
    rest = core.list_namespaced_secret(NS, label_selector="x=y", limit=2, _continue=first.metadata._continue)
    assert [s.metadata.name for s in rest.items] == ["d", "e"]
    assert rest.metadata._continue is None and rest.metadata.resource_version == first.metadata.resource_version
    core.create_namespaced_secret(NS, secret("f"))
    standin.compact()  # history up to "f" is gone: the list's version can no longer be read at
    with pytest.raises(k8s.ApiException) as err:
        core.list_namespaced_secret(NS, limit=2, _continue=first.metadata._continue)
    assert (err.value.status, status_of(err.value)["reason"]) == (410, "Expired")
    with pytest.raises(k8s.ApiException) as bad:
        core.list_namespaced_secret(NS, _continue="not-a-token")
    assert bad.value.status == 400
