"""Conformance probes: create/read/update/patch/delete semantics of the API server."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]


def cm_path(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


def make_cm(cluster, ns, name, data=None, labels=None):
    body = {"metadata": {"name": name, "labels": labels or {}}, "data": data or {"k": "v"}}
    return cluster.ok("POST", cm_path(ns), body)


def test_create_answers_201_with_server_set_metadata(cluster, ns, uniq):
    status, obj = cluster.request(
        "POST", cm_path(ns), {"metadata": {"name": f"cm-{uniq}"}, "data": {"a": "1"}}
    )
    assert status == 201
    meta = obj["metadata"]
    assert meta["uid"] and meta["creationTimestamp"].endswith("Z")
    assert int(meta["resourceVersion"]) > 0
    assert meta["namespace"] == ns
    assert obj["kind"] == "ConfigMap" and obj["apiVersion"] == "v1"


def test_create_duplicate_is_409_already_exists(cluster, ns, uniq):
    make_cm(cluster, ns, f"dup-{uniq}")
    status, body = cluster.request("POST", cm_path(ns), {"metadata": {"name": f"dup-{uniq}"}})
    assert status == 409
    assert body["kind"] == "Status" and body["status"] == "Failure"
    assert body["reason"] == "AlreadyExists"
    assert body["details"]["name"] == f"dup-{uniq}" and body["details"]["kind"] == "configmaps"


def test_get_missing_is_404_not_found_status(cluster, ns):
    status, body = cluster.request("GET", cm_path(ns, "no-such-thing"))
    assert status == 404
    assert body["reason"] == "NotFound" and body["code"] == 404
    assert body["message"] == 'configmaps "no-such-thing" not found'
    # Go's omitempty: the empty core group is absent from details.
    assert body["details"] == {"name": "no-such-thing", "kind": "configmaps"}


def test_generate_name_appends_a_random_suffix(cluster, ns):
    status, obj = cluster.request("POST", cm_path(ns), {"metadata": {"generateName": "gen-"}})
    assert status == 201
    name = obj["metadata"]["name"]
    assert name.startswith("gen-") and len(name) == len("gen-") + 5


def test_create_in_missing_namespace_is_404(cluster):
    status, body = cluster.request(
        "POST", cm_path("sftjob-missing-ns-zz"), {"metadata": {"name": "x"}}
    )
    assert status == 404 and body["reason"] == "NotFound"
    assert body["details"]["kind"] == "namespaces"


def test_body_namespace_must_match_url(cluster, ns):
    status, body = cluster.request(
        "POST", cm_path(ns), {"metadata": {"name": "x", "namespace": "other-ns"}}
    )
    assert status == 400 and body["reason"] == "BadRequest"


def test_invalid_name_is_422(cluster, ns):
    status, body = cluster.request("POST", cm_path(ns), {"metadata": {"name": "Not_Valid"}})
    assert status == 422 and body["reason"] == "Invalid"
    assert body["details"]["causes"][0]["field"] == "metadata.name"


def test_every_write_bumps_the_resource_version(cluster, ns, uniq):
    first = make_cm(cluster, ns, f"rv-{uniq}")
    second = cluster.ok(
        "PATCH",
        cm_path(ns, f"rv-{uniq}"),
        {"data": {"k": "w"}},
        content_type="application/merge-patch+json",
    )
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    listing = cluster.ok("GET", cm_path(ns))
    assert int(listing["metadata"]["resourceVersion"]) >= int(second["metadata"]["resourceVersion"])
    assert listing["kind"] == "ConfigMapList"


def test_noop_patch_keeps_the_resource_version(cluster, ns, uniq):
    obj = make_cm(cluster, ns, f"noop-{uniq}", data={"k": "v"})
    same = cluster.ok(
        "PATCH",
        cm_path(ns, f"noop-{uniq}"),
        {"data": {"k": "v"}},
        content_type="application/merge-patch+json",
    )
    assert same["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_put_replaces_and_stale_put_is_409_conflict(cluster, ns, uniq):
    obj = make_cm(cluster, ns, f"put-{uniq}", data={"a": "1", "b": "2"})
    obj["data"] = {"c": "3"}
    replaced = cluster.ok("PUT", cm_path(ns, f"put-{uniq}"), obj)
    assert replaced["data"] == {"c": "3"}
    status, body = cluster.request(
        "PUT", cm_path(ns, f"put-{uniq}"), obj
    )  # obj still has the old rv
    assert status == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]


def test_merge_patch_with_stale_resource_version_is_409(cluster, ns, uniq):
    obj = make_cm(cluster, ns, f"mp-{uniq}")
    cluster.ok(
        "PATCH",
        cm_path(ns, f"mp-{uniq}"),
        {"data": {"k": "x"}},
        content_type="application/merge-patch+json",
    )
    stale = {
        "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
        "data": {"k": "y"},
    }
    status, body = cluster.request(
        "PATCH", cm_path(ns, f"mp-{uniq}"), stale, content_type="application/merge-patch+json"
    )
    assert status == 409 and body["reason"] == "Conflict"


def test_merge_patch_null_removes_a_key(cluster, ns, uniq):
    make_cm(cluster, ns, f"null-{uniq}", data={"a": "1", "b": "2"})
    obj = cluster.ok(
        "PATCH",
        cm_path(ns, f"null-{uniq}"),
        {"data": {"a": None}},
        content_type="application/merge-patch+json",
    )
    assert obj["data"] == {"b": "2"}


def test_json_patch_test_op_guards_the_resource_version(cluster, ns, uniq):
    obj = make_cm(cluster, ns, f"jp-{uniq}")
    rv = obj["metadata"]["resourceVersion"]
    good = [
        {"op": "test", "path": "/metadata/resourceVersion", "value": rv},
        {"op": "add", "path": "/metadata/finalizers", "value": ["test.sftjob.dev/x"]},
    ]
    patched = cluster.ok(
        "PATCH", cm_path(ns, f"jp-{uniq}"), good, content_type="application/json-patch+json"
    )
    assert patched["metadata"]["finalizers"] == ["test.sftjob.dev/x"]
    status, body = cluster.request(
        "PATCH", cm_path(ns, f"jp-{uniq}"), good, content_type="application/json-patch+json"
    )
    assert status == 422 and body["reason"] == "Invalid"
    cleanup = [{"op": "remove", "path": "/metadata/finalizers"}]
    cluster.ok(
        "PATCH", cm_path(ns, f"jp-{uniq}"), cleanup, content_type="application/json-patch+json"
    )


def test_strategic_merge_patch_merges_containers_by_name(cluster, ns, uniq):
    path = f"/apis/apps/v1/namespaces/{ns}/deployments"
    labels = {"app": f"smp-{uniq}"}
    body = {
        "metadata": {"name": f"smp-{uniq}"},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [
                        {"name": "a", "image": "busybox", "env": [{"name": "X", "value": "1"}]},
                        {"name": "b", "image": "busybox"},
                    ]
                },
            },
        },
    }
    cluster.ok("POST", path, body)
    patch = {
        "spec": {
            "template": {
                "spec": {
                    "containers": [
                        {"name": "a", "env": [{"name": "Y", "value": "2"}]},
                        {"name": "b", "$patch": "delete"},
                    ]
                }
            }
        }
    }
    obj = cluster.ok(
        "PATCH", f"{path}/smp-{uniq}", patch, content_type="application/strategic-merge-patch+json"
    )
    containers = obj["spec"]["template"]["spec"]["containers"]
    assert [c["name"] for c in containers] == ["a"]
    assert containers[0]["image"] == "busybox"
    assert {e["name"] for e in containers[0]["env"]} == {"X", "Y"}


def test_unknown_patch_content_type_is_415(cluster, ns, uniq):
    make_cm(cluster, ns, f"ct-{uniq}")
    status, body = cluster.request(
        "PATCH", cm_path(ns, f"ct-{uniq}"), "data: {}", content_type="text/plain"
    )
    assert status == 415 and body["reason"] == "UnsupportedMediaType"


def test_delete_answers_200_and_the_object_is_gone(cluster, ns, uniq):
    make_cm(cluster, ns, f"del-{uniq}")
    status, _ = cluster.request("DELETE", cm_path(ns, f"del-{uniq}"))
    assert status == 200
    assert cluster.request("GET", cm_path(ns, f"del-{uniq}"))[0] == 404
    assert cluster.request("DELETE", cm_path(ns, f"del-{uniq}"))[0] == 404


def test_delete_precondition_uid_mismatch_is_409(cluster, ns, uniq):
    make_cm(cluster, ns, f"pre-{uniq}")
    options = {
        "kind": "DeleteOptions",
        "apiVersion": "v1",
        "preconditions": {"uid": "00000000-0000-0000-0000-000000000000"},
    }
    status, body = cluster.request("DELETE", cm_path(ns, f"pre-{uniq}"), options)
    assert status == 409 and body["reason"] == "Conflict"


def test_deletecollection_honours_the_label_selector(cluster, ns, uniq):
    make_cm(cluster, ns, f"dc-a-{uniq}", labels={"batch": uniq, "drop": "yes"})
    make_cm(cluster, ns, f"dc-b-{uniq}", labels={"batch": uniq, "drop": "no"})
    cluster.ok("DELETE", cm_path(ns), query={"labelSelector": f"batch={uniq},drop=yes"})
    left = cluster.ok("GET", cm_path(ns), query={"labelSelector": f"batch={uniq}"})
    assert [i["metadata"]["name"] for i in left["items"]] == [f"dc-b-{uniq}"]


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("tier={u}", {"a", "b", "c"}),
        ("tier=={u},size==big", {"a"}),
        ("tier={u},size!=big", {"b", "c"}),
        ("tier={u},size in (big,small)", {"a", "b"}),
        ("tier={u},size notin (big)", {"b", "c"}),
        ("tier={u},opt", {"c"}),
        ("tier={u},!opt", {"a", "b"}),
    ],
    ids=["eq", "double-eq", "not-eq", "in", "notin", "exists", "not-exists"],
)
def test_label_selectors(cluster, ns, uniq, selector, expected):
    make_cm(cluster, ns, f"a-{uniq}", labels={"tier": uniq, "size": "big"})
    make_cm(cluster, ns, f"b-{uniq}", labels={"tier": uniq, "size": "small"})
    make_cm(cluster, ns, f"c-{uniq}", labels={"tier": uniq, "opt": "1"})
    found = cluster.ok("GET", cm_path(ns), query={"labelSelector": selector.format(u=uniq)})
    assert {i["metadata"]["name"].split("-")[0] for i in found["items"]} == expected


def test_field_selectors_on_name_namespace_and_pod_phase(cluster, ns, uniq):
    make_cm(cluster, ns, f"fs-{uniq}")
    by_name = cluster.ok("GET", cm_path(ns), query={"fieldSelector": f"metadata.name=fs-{uniq}"})
    assert [i["metadata"]["name"] for i in by_name["items"]] == [f"fs-{uniq}"]
    everywhere = cluster.ok(
        "GET",
        "/api/v1/configmaps",
        query={"fieldSelector": f"metadata.namespace={ns},metadata.name=fs-{uniq}"},
    )
    assert len(everywhere["items"]) == 1
    pod = {
        "metadata": {"name": f"fs-{uniq}"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    cluster.ok("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    pending = cluster.ok(
        "GET",
        f"/api/v1/namespaces/{ns}/pods",
        query={"fieldSelector": f"status.phase=Pending,metadata.name=fs-{uniq}"},
    )
    running = cluster.ok(
        "GET",
        f"/api/v1/namespaces/{ns}/pods",
        query={"fieldSelector": f"status.phase!=Pending,metadata.name=fs-{uniq}"},
    )
    assert len(pending["items"]) == 1 and running["items"] == []
    cluster.request(
        "DELETE", f"/api/v1/namespaces/{ns}/pods/fs-{uniq}", query={"gracePeriodSeconds": "0"}
    )


def test_namespace_lifecycle_cascades_to_contents(cluster, uniq):
    name = f"sftjob-ns-{uniq}"
    created = cluster.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    assert created["status"]["phase"] == "Active"
    cluster.ok("POST", cm_path(name), {"metadata": {"name": "inside"}})
    cluster.ok("DELETE", f"/api/v1/namespaces/{name}")
    cluster.wait_for(
        lambda: cluster.request("GET", f"/api/v1/namespaces/{name}")[0] == 404, timeout=60
    )
    assert cluster.request("GET", cm_path(name, "inside"))[0] == 404


def test_typed_client_gets_objects_back_from_create_and_watch(cluster, ns, uniq):
    """The ``kubernetes`` client returns None on a 200 create; the server must answer 201."""
    import kubernetes

    body = kubernetes.client.V1ConfigMap(
        metadata=kubernetes.client.V1ObjectMeta(name=f"typed-{uniq}"), data={"a": "b"}
    )
    created = cluster.core.create_namespaced_config_map(ns, body)
    assert created is not None and created.metadata.uid
    listing = cluster.core.list_namespaced_config_map(
        ns, field_selector=f"metadata.name=typed-{uniq}"
    )
    assert [i.metadata.name for i in listing.items] == [f"typed-{uniq}"]
    cluster.core.patch_namespaced_config_map(f"typed-{uniq}", ns, {"data": {"a": "c"}})
    stream = kubernetes.watch.Watch().stream(
        cluster.core.list_namespaced_config_map,
        ns,
        field_selector=f"metadata.name=typed-{uniq}",
        resource_version=created.metadata.resource_version,
        timeout_seconds=5,
    )
    first = next(stream)
    assert first["type"] == "MODIFIED" and first["object"].data == {"a": "c"}


def test_apply_patch_creates_then_updates_and_needs_a_field_manager(cluster, ns, uniq):
    # Server-side apply is simplified in the emulator (a merge); these basics hold on both.
    apply = "application/apply-patch+yaml"
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": f"ssa-{uniq}"},
        "data": {"a": "1"},
    }
    status, error = cluster.request("PATCH", cm_path(ns, f"ssa-{uniq}"), doc, content_type=apply)
    assert status == 422 and "fieldManager" in error["message"]
    status, created = cluster.request(
        "PATCH",
        cm_path(ns, f"ssa-{uniq}"),
        doc,
        content_type=apply,
        query={"fieldManager": "conformance"},
    )
    assert status == 201 and created["data"] == {"a": "1"}
    doc["data"] = {"a": "2"}
    updated = cluster.ok(
        "PATCH",
        cm_path(ns, f"ssa-{uniq}"),
        doc,
        content_type=apply,
        query={"fieldManager": "conformance"},
    )
    assert updated["data"] == {"a": "2"}


def test_kmock_reactions_inject_faults_ahead_of_the_emulation(cluster, ns, uniq):
    cluster.require_emulator("fault injection uses the emulator's kmock DSL")
    emulator = cluster.emulator.emulator
    broken = cm_path(ns, f"broken-{uniq}")
    (
        emulator[f"get {broken}"]
        << 503
        << {"kind": "Status", "apiVersion": "v1", "code": 503, "reason": "ServiceUnavailable"}
    )
    status, body = cluster.request("GET", broken)
    assert status == 503 and body["reason"] == "ServiceUnavailable"
    assert cluster.request("GET", cm_path(ns, f"other-{uniq}"))[0] == 404  # the rest is untouched
