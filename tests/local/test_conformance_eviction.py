"""Conformance probes: the pods/eviction subresource (policy/v1 Eviction)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]


def pods(ns: str, name: str = "", sub: str = "") -> str:
    return (
        f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
    )


def eviction(name: str, ns: str, **delete_options: object) -> dict:
    body: dict = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": name, "namespace": ns}}  # fmt: skip
    if delete_options:
        body["deleteOptions"] = delete_options
    return body


def test_eviction_sets_disruption_target_and_deletes_gracefully(cluster, ns, uniq):
    """pkg/registry/core/pod/storage/eviction.go: EvictionREST.Create → 201 Status Success;
    addConditionAndDeletePod adds DisruptionTarget=True, reason EvictionByEvictionAPI,
    message "Eviction API: evicting", then deletes; a pod bound to a node is deleted
    gracefully (pkg/registry/core/pod/strategy.go CheckGracefulDelete), so with no
    kubelet to finish it (the node does not exist) it stays with a deletionTimestamp."""
    name = f"evict-{uniq}"
    spec = {
        "nodeName": f"sftjob-no-node-{uniq}",
        "containers": [{"name": "main", "image": "busybox"}],
    }
    cluster.ok("POST", pods(ns), {"metadata": {"name": name}, "spec": spec})
    status, answer = cluster.request(
        "POST", pods(ns, name, "eviction"), eviction(name, ns, gracePeriodSeconds=30)
    )
    assert status == 201, answer
    assert (answer["kind"], answer["status"]) == ("Status", "Success")
    pod = cluster.ok("GET", pods(ns, name))
    assert pod["metadata"]["deletionTimestamp"]
    assert pod["metadata"]["deletionGracePeriodSeconds"] == 30
    cond = {c["type"]: c for c in pod["status"]["conditions"]}["DisruptionTarget"]
    assert (cond["status"], cond["reason"], cond["message"]) == (
        "True",
        "EvictionByEvictionAPI",
        "Eviction API: evicting",
    )
    cluster.request("DELETE", pods(ns, name), query={"gracePeriodSeconds": "0"})


def test_eviction_refusals(cluster, ns, uniq):
    """eviction.go: a name that differs from the URL's → 400 BadRequest "name in URL does
    not match name in Eviction object"; a missing pod → 404 NotFound; dryRun deletes nothing."""
    name = f"evict2-{uniq}"
    cluster.ok(
        "POST",
        pods(ns),
        {
            "metadata": {"name": name},
            # no scheduler picks it up, so it stays unbound also on a real cluster
            "spec": {
                "schedulerName": f"sftjob-no-scheduler-{uniq}",
                "containers": [{"name": "main", "image": "busybox"}],
            },
        },
    )
    status, error = cluster.request("POST", pods(ns, name, "eviction"), eviction("other", ns))
    assert (status, error["reason"]) == (400, "BadRequest")
    assert error["message"] == "name in URL does not match name in Eviction object"
    status, error = cluster.request(
        "POST", pods(ns, f"absent-{uniq}", "eviction"), eviction(f"absent-{uniq}", ns)
    )
    assert (status, error["reason"]) == (404, "NotFound")
    status, _ = cluster.request(
        "POST", pods(ns, name, "eviction"), eviction(name, ns), query={"dryRun": "All"}
    )
    assert status == 201
    pod = cluster.ok("GET", pods(ns, name))
    assert "deletionTimestamp" not in pod["metadata"]
    assert "DisruptionTarget" not in {c["type"] for c in pod["status"].get("conditions") or []}
    # an unbound pod is deleted at once
    assert cluster.request("POST", pods(ns, name, "eviction"), eviction(name, ns))[0] == 201
    assert cluster.request("GET", pods(ns, name))[0] == 404
