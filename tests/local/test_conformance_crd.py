"""Conformance probes: CRD registration, discovery, schema validation/defaulting/pruning,
status-subresource isolation, generation, Tables, OpenAPI."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"


def test_crd_reports_established_and_names_accepted(cluster, widgets):
    crd = cluster.ok("GET", f"{CRDS}/{widgets.crd_name}")
    conditions = {c["type"]: c["status"] for c in crd["status"]["conditions"]}
    assert conditions["Established"] == "True" and conditions["NamesAccepted"] == "True"
    assert crd["status"]["acceptedNames"]["kind"] == "Widget"


def test_discovery_lists_the_custom_resource_with_status_subresource(cluster, widgets):
    groups = cluster.ok("GET", "/apis")
    assert widgets.group in [g["name"] for g in groups["groups"]]
    group = cluster.ok("GET", f"/apis/{widgets.group}")
    assert group["preferredVersion"]["version"] == "v1"
    resources = {r["name"]: r for r in cluster.ok("GET", f"/apis/{widgets.group}/v1")["resources"]}
    main = resources["widgets"]
    assert main["kind"] == "Widget" and main["namespaced"] is True
    assert main["shortNames"] == ["wg"] and main["categories"] == ["sftjob-test"]
    assert {
        "create",
        "get",
        "list",
        "watch",
        "patch",
        "update",
        "delete",
        "deletecollection",
    } <= set(main["verbs"])
    assert set(resources["widgets/status"]["verbs"]) == {"get", "patch", "update"}


def test_crd_name_must_be_plural_dot_group(cluster, crd_body):
    body = crd_body("mismatch.test.sftjob.dev")
    body["metadata"]["name"] = "wrong.test.sftjob.dev"
    status, error = cluster.request("POST", CRDS, body)
    assert status == 422 and error["reason"] == "Invalid"
    assert "metadata.name" in [c["field"] for c in error["details"]["causes"]]


def test_schema_violations_are_422_with_causes(cluster, widgets, uniq):
    body = {
        "apiVersion": f"{widgets.group}/v1",
        "kind": "Widget",
        "metadata": {"name": f"bad-{uniq}"},
        "spec": {"color": "green"},
    }
    status, error = cluster.request("POST", widgets.path(), body)
    assert status == 422 and error["reason"] == "Invalid"
    assert error["details"]["kind"] == "Widget" and error["details"]["group"] == widgets.group
    causes = {c["field"]: c for c in error["details"]["causes"]}
    assert causes["spec.size"]["reason"] == "FieldValueRequired"
    assert causes["spec.color"]["reason"] == "FieldValueNotSupported"
    assert error["message"].startswith(f'Widget.{widgets.group} "bad-{uniq}" is invalid: ')
    body["spec"] = {"size": 0}
    status, error = cluster.request("POST", widgets.path(), body)
    assert status == 422
    assert "should be greater than or equal to 1" in error["details"]["causes"][0]["message"]
    body["spec"] = {"size": "three"}
    status, error = cluster.request("POST", widgets.path(), body)
    assert status == 422 and "must be of type integer" in error["message"]


def test_schema_defaults_are_applied(cluster, widgets, uniq):
    obj = widgets.create(f"def-{uniq}", {"size": 2})
    assert obj["spec"] == {"size": 2, "color": "blue"}


def test_unknown_fields_are_pruned_unless_preserved(cluster, widgets, uniq):
    obj = widgets.create(
        f"prune-{uniq}", {"size": 1, "bogus": True, "extra": {"anything": {"goes": 1}}}, junk="x"
    )
    assert "bogus" not in obj["spec"] and "junk" not in obj
    assert obj["spec"]["extra"] == {"anything": {"goes": 1}}


def test_strict_field_validation_rejects_unknown_fields(cluster, widgets, uniq):
    body = {
        "apiVersion": f"{widgets.group}/v1",
        "kind": "Widget",
        "metadata": {"name": f"strict-{uniq}"},
        "spec": {"size": 1, "bogus": 1},
    }
    status, error = cluster.request(
        "POST", widgets.path(), body, query={"fieldValidation": "Strict"}
    )
    assert status == 400 and error["reason"] == "BadRequest"
    assert 'unknown field "spec.bogus"' in error["message"]


def test_create_ignores_status_when_it_is_a_subresource(cluster, widgets, uniq):
    obj = widgets.create(f"st-{uniq}", status={"phase": "Fake"})
    assert "status" not in obj or obj["status"] != {"phase": "Fake"}
    assert obj["metadata"]["generation"] == 1


def test_status_subresource_isolation_and_generation(cluster, widgets, uniq):
    name = f"iso-{uniq}"
    widgets.create(name, {"size": 1})
    merge = "application/merge-patch+json"
    # Writing status through the main resource is ignored.
    main = cluster.ok(
        "PATCH", widgets.path(name), {"status": {"phase": "Main"}}, content_type=merge
    )
    assert "phase" not in (main.get("status") or {})
    # Writing spec through /status is ignored; status lands; generation stays.
    status = cluster.ok(
        "PATCH",
        widgets.path(name, "status"),
        {"spec": {"size": 9}, "status": {"phase": "Ready"}},
        content_type=merge,
    )
    assert status["status"]["phase"] == "Ready" and status["spec"]["size"] == 1
    assert status["metadata"]["generation"] == 1
    # A spec change bumps generation; a metadata-only change does not.
    spec = cluster.ok("PATCH", widgets.path(name), {"spec": {"size": 2}}, content_type=merge)
    assert spec["metadata"]["generation"] == 2 and spec["status"]["phase"] == "Ready"
    labels = cluster.ok(
        "PATCH", widgets.path(name), {"metadata": {"labels": {"a": "b"}}}, content_type=merge
    )
    assert labels["metadata"]["generation"] == 2
    assert int(labels["metadata"]["resourceVersion"]) > int(spec["metadata"]["resourceVersion"])


def test_status_merge_patch_resource_version_is_a_precondition_and_uid_is_not(
    cluster, widgets, uniq
):
    # The store compares the patched object's resourceVersion with the stored one before
    # the status strategy runs (store.go Update: 409 "the object has been modified"); the
    # custom resource status strategy then copies the stored metadata over the patched
    # one (customresource/status_strategy.go PrepareForUpdate), so a uid in the body is
    # neither checked nor applied. The operator's status patches rely on the first.
    name = f"strv-{uniq}"
    first = widgets.create(name, {"size": 1})
    merge = "application/merge-patch+json"
    current = cluster.ok(
        "PATCH",
        widgets.path(name, "status"),
        {
            "metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
            "status": {"phase": "A"},
        },
        content_type=merge,
    )
    assert current["status"]["phase"] == "A"
    stale = {
        "metadata": {"resourceVersion": first["metadata"]["resourceVersion"]},
        "status": {"phase": "B"},
    }
    status, error = cluster.request(
        "PATCH", widgets.path(name, "status"), stale, content_type=merge
    )
    assert status == 409 and error["reason"] == "Conflict"
    assert "the object has been modified" in error["message"]
    other_uid = {
        "metadata": {"uid": "00000000-0000-0000-0000-000000000000"},
        "status": {"phase": "C"},
    }
    patched = cluster.ok("PATCH", widgets.path(name, "status"), other_uid, content_type=merge)
    assert patched["status"]["phase"] == "C"
    assert patched["metadata"]["uid"] == first["metadata"]["uid"]


def test_put_on_custom_resource_requires_resource_version(cluster, widgets, uniq):
    obj = widgets.create(f"putrv-{uniq}")
    del obj["metadata"]["resourceVersion"]
    status, error = cluster.request("PUT", widgets.path(f"putrv-{uniq}"), obj)
    assert status == 422 and error["details"]["causes"][0]["field"] == "metadata.resourceVersion"


def test_strategic_merge_patch_on_custom_resource_is_415(cluster, widgets, uniq):
    widgets.create(f"smp-{uniq}")
    status, error = cluster.request(
        "PATCH",
        widgets.path(f"smp-{uniq}"),
        {"spec": {"size": 2}},
        content_type="application/strategic-merge-patch+json",
    )
    assert status == 415 and error["reason"] == "UnsupportedMediaType"


def test_table_uses_printer_columns(cluster, widgets, uniq):
    name = f"tbl-{uniq}"
    widgets.create(name, {"size": 7})
    cluster.ok(
        "PATCH",
        widgets.path(name, "status"),
        {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
        content_type="application/merge-patch+json",
    )
    table = cluster.ok("GET", widgets.path(), accept=TABLE)
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    assert [c["name"] for c in table["columnDefinitions"]] == ["Name", "Size", "Ready", "Age"]
    row = next(r for r in table["rows"] if r["cells"][0] == name)
    assert row["cells"][1] == 7 and row["cells"][2] == "True"
    assert (
        row["object"]["kind"] == "PartialObjectMetadata"
        and row["object"]["metadata"]["name"] == name
    )
    full = cluster.ok("GET", widgets.path(name), accept=TABLE, query={"includeObject": "Object"})
    assert full["rows"][0]["object"]["spec"]["size"] == 7


def test_pod_table_has_the_usual_columns(cluster, ns, uniq):
    pod = {
        "metadata": {"name": f"tp-{uniq}"},
        "spec": {"containers": [{"name": "main", "image": "busybox"}]},
    }
    cluster.ok("POST", f"/api/v1/namespaces/{ns}/pods", pod)
    table = cluster.ok("GET", f"/api/v1/namespaces/{ns}/pods/tp-{uniq}", accept=TABLE)
    names = [c["name"] for c in table["columnDefinitions"] if c["priority"] == 0]
    assert names == ["Name", "Ready", "Status", "Restarts", "Age"]
    assert table["rows"][0]["cells"][:3] == [f"tp-{uniq}", "0/1", "Pending"]
    cluster.request(
        "DELETE", f"/api/v1/namespaces/{ns}/pods/tp-{uniq}", query={"gracePeriodSeconds": "0"}
    )


def test_openapi_v3_lists_the_custom_group_with_field_validation(cluster, widgets):
    root = cluster.ok("GET", "/openapi/v3")
    entry = root["paths"][f"apis/{widgets.group}/v1"]["serverRelativeURL"]
    path, _, query = entry.partition("?")
    doc = cluster.ok("GET", path, query=dict([query.split("=", 1)]) if query else None)
    patches = [op["patch"] for op in doc["paths"].values() if "patch" in op]
    assert any(p["x-kubernetes-group-version-kind"]["kind"] == "Widget" for p in patches)
    assert any(
        param["name"] == "fieldValidation" for p in patches for param in p.get("parameters", [])
    )


def test_deleting_the_crd_removes_resources_and_discovery(cluster, crd_body, uniq):
    group = f"gone{uniq}.test.sftjob.dev"
    cluster.ok("POST", CRDS, crd_body(group))
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
    path = f"/apis/{group}/v1/namespaces/{cluster.namespace}/widgets"
    cluster.wait_for(
        lambda: (
            cluster.request(
                "POST",
                path,
                {
                    "apiVersion": f"{group}/v1",
                    "kind": "Widget",
                    "metadata": {"name": "w"},
                    "spec": {"size": 1},
                },
            )[0]
            == 201
        ),
        timeout=30,
    )
    cluster.ok("DELETE", f"{CRDS}/widgets.{group}")
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 404, timeout=60)
    assert cluster.request("GET", f"{path}/w")[0] == 404
