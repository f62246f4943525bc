"""Conformance probes: finalizers, graceful pod deletion, garbage collection, pods and their
status/logs/binding, nodes, events and the non-resource endpoints."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]
MERGE = "application/merge-patch+json"


def pods(ns: str, name: str = "", sub: str = "") -> str:
    return (
        f"/api/v1/namespaces/{ns}/pods" + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")
    )


def pod_body(name: str, node: str | None = None, **meta) -> dict:
    spec = {
        "containers": [{"name": "main", "image": "busybox"}, {"name": "side", "image": "busybox"}]
    }
    if node:
        spec["nodeName"] = node
    return {"metadata": {"name": name, **meta}, "spec": spec}


def owner_ref(obj: dict) -> dict:
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": obj["metadata"]["name"],
        "uid": obj["metadata"]["uid"],
    }


def cm(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


# ---------------------------------------------------------------- finalizers
def test_finalizers_hold_deletion_until_removed(cluster, widgets, uniq):
    name = f"fin-{uniq}"
    created = widgets.create(name, metadata={"name": name, "finalizers": ["test.sftjob.dev/hold"]})
    status, deleting = cluster.request("DELETE", widgets.path(name))
    assert status == 200
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["generation"] == created["metadata"]["generation"] + 1
    assert cluster.request("GET", widgets.path(name))[0] == 200  # still there
    rv = deleting["metadata"]["resourceVersion"]
    cluster.ok("PATCH", widgets.path(name), {"metadata": {"finalizers": None}}, content_type=MERGE)
    assert cluster.request("GET", widgets.path(name))[0] == 404
    events = cluster.watch(
        widgets.path(),
        {"resourceVersion": rv, "fieldSelector": f"metadata.name={name}"},
        max_events=1,
    )
    assert events[0]["type"] == "DELETED"


def test_no_new_finalizers_on_a_terminating_object(cluster, ns, uniq):
    name = f"nofin-{uniq}"
    cluster.ok("POST", cm(ns), {"metadata": {"name": name, "finalizers": ["test.sftjob.dev/a"]}})
    cluster.ok("DELETE", cm(ns, name))
    status, error = cluster.request(
        "PATCH",
        cm(ns, name),
        {"metadata": {"finalizers": ["test.sftjob.dev/a", "test.sftjob.dev/b"]}},
        content_type=MERGE,
    )
    assert status == 422 and error["reason"] == "Invalid"
    cluster.ok("PATCH", cm(ns, name), {"metadata": {"finalizers": None}}, content_type=MERGE)


# ---------------------------------------------------------------- pods
def test_pod_create_sets_pending_phase(cluster, ns, uniq):
    pod = cluster.ok("POST", pods(ns), pod_body(f"pend-{uniq}"))
    assert pod["status"]["phase"] == "Pending"
    cluster.ok("DELETE", pods(ns, f"pend-{uniq}"))


def test_unbound_pod_is_deleted_immediately(cluster, ns, uniq):
    cluster.ok("POST", pods(ns), pod_body(f"unbound-{uniq}"))
    cluster.ok("DELETE", pods(ns, f"unbound-{uniq}"))
    cluster.wait_for(
        lambda: cluster.request("GET", pods(ns, f"unbound-{uniq}"))[0] == 404, timeout=20
    )


def test_bound_pod_deletion_is_graceful_until_grace_zero(cluster, ns, uniq):
    name = f"grace-{uniq}"
    cluster.ok("POST", pods(ns), pod_body(name, node=f"sftjob-no-node-{uniq}"))
    deleting = cluster.ok(
        "DELETE",
        pods(ns, name),
        {"kind": "DeleteOptions", "apiVersion": "v1", "gracePeriodSeconds": 15},
    )
    assert deleting["metadata"]["deletionTimestamp"]
    assert deleting["metadata"]["deletionGracePeriodSeconds"] == 15
    assert cluster.request("GET", pods(ns, name))[0] == 200
    # The kubelet's final word: delete with grace 0.
    cluster.ok("DELETE", pods(ns, name), query={"gracePeriodSeconds": "0"})
    cluster.wait_for(lambda: cluster.request("GET", pods(ns, name))[0] == 404, timeout=20)


def test_terminal_pod_is_deleted_immediately(cluster, ns, uniq):
    name = f"done-{uniq}"
    cluster.ok("POST", pods(ns), pod_body(name, node=f"sftjob-no-node-{uniq}"))
    cluster.ok(
        "PATCH", pods(ns, name, "status"), {"status": {"phase": "Succeeded"}}, content_type=MERGE
    )
    cluster.ok("DELETE", pods(ns, name))
    cluster.wait_for(lambda: cluster.request("GET", pods(ns, name))[0] == 404, timeout=20)


def test_pod_status_subresource_isolation(cluster, ns, uniq):
    name = f"pst-{uniq}"
    cluster.ok("POST", pods(ns), pod_body(name))
    smp = "application/strategic-merge-patch+json"
    patch = {
        "spec": {"activeDeadlineSeconds": 5},
        "status": {"phase": "Running", "podIP": "10.0.0.9"},
    }
    running = cluster.ok("PATCH", pods(ns, name, "status"), patch, content_type=smp)
    assert running["status"]["phase"] == "Running" and running["status"]["podIP"] == "10.0.0.9"
    assert "activeDeadlineSeconds" not in running["spec"]  # spec is not writable through /status
    main = cluster.ok(
        "PATCH",
        pods(ns, name),
        {"metadata": {"labels": {"via": "main"}}, "status": {"phase": "Failed"}},
        content_type=smp,
    )
    assert main["status"]["phase"] == "Running" and main["metadata"]["labels"]["via"] == "main"
    cluster.request("DELETE", pods(ns, name), query={"gracePeriodSeconds": "0"})


def test_pod_status_conditions_merge_by_type(cluster, ns, uniq):
    name = f"cond-{uniq}"
    cluster.ok("POST", pods(ns), pod_body(name))
    smp = "application/strategic-merge-patch+json"
    cluster.ok(
        "PATCH",
        pods(ns, name, "status"),
        {
            "status": {
                "conditions": [
                    {"type": "Ready", "status": "False"},
                    {"type": "Initialized", "status": "True"},
                ]
            }
        },
        content_type=smp,
    )
    pod = cluster.ok(
        "PATCH",
        pods(ns, name, "status"),
        {"status": {"conditions": [{"type": "Ready", "status": "True"}]}},
        content_type=smp,
    )
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]} == {
        "Ready": "True",
        "Initialized": "True",
    }
    cluster.request("DELETE", pods(ns, name), query={"gracePeriodSeconds": "0"})


def test_pod_binding_sets_the_node_once(cluster, ns, uniq):
    name = f"bind-{uniq}"
    cluster.ok("POST", pods(ns), pod_body(name))
    binding = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": name},
        "target": {"apiVersion": "v1", "kind": "Node", "name": f"sftjob-no-node-{uniq}"},
    }
    status, _ = cluster.request("POST", pods(ns, name, "binding"), binding)
    assert status == 201
    assert cluster.ok("GET", pods(ns, name))["spec"]["nodeName"] == f"sftjob-no-node-{uniq}"
    status, error = cluster.request("POST", pods(ns, name, "binding"), binding)
    assert status == 409 and error["reason"] == "Conflict"
    cluster.request("DELETE", pods(ns, name), query={"gracePeriodSeconds": "0"})


def _as_running(cluster, ns: str, pod: dict, *containers: str) -> None:
    """Report the containers running, as the local node does (container IDs name the run)."""
    uid = pod["metadata"]["uid"]
    statuses = [
        {
            "name": c,
            "image": "busybox",
            "imageID": "",
            "ready": True,
            "restartCount": 0,
            "containerID": f"local://{uid}/{c}/0",
            "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
        }
        for c in containers
    ]
    cluster.ok(
        "PATCH",
        pods(ns, pod["metadata"]["name"], "status"),
        {"status": {"phase": "Running", "containerStatuses": statuses}},
        content_type=MERGE,
    )


def _log_file(cluster, ns: str, pod: dict, container: str, run: int = 0):
    meta = pod["metadata"]
    path = cluster.log_dir / f"{ns}_{meta['name']}_{meta['uid']}" / container / f"{run}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def test_pod_logs_are_served_from_the_log_dir(cluster, ns, uniq):
    """Files as the local node writes them (sftjob_local.node_logs); the errors are the
    kubelet's (pkg/kubelet/kubelet_pods.go validateContainerLogStatus) and the
    apiserver's (pkg/registry/core/pod/strategy.go LogLocation)."""
    cluster.require_emulator("log files are written by the local node, not by a kubelet")
    name = f"logs-{uniq}"
    pod = cluster.ok("POST", pods(ns), pod_body(name, node="local-node"))
    main = {"container": "main"}
    status, error = cluster.request("GET", pods(ns, name, "log"), query=main, accept="*/*")
    assert status == 400
    assert (
        error["message"]
        == f'container "main" in pod "{name}" is waiting to start: ContainerCreating'
    )
    status, error = cluster.request("GET", pods(ns, name, "log"), accept="*/*")
    assert status == 400
    assert error["message"] == (
        f"a container name must be specified for pod {name}, choose one of: [main side]"
    )
    _as_running(cluster, ns, pod, "main", "side")
    _log_file(cluster, ns, pod, "main").write_text(
        "2026-01-01T00:00:01.5Z stdout F one\n"
        "2026-01-01T00:00:02Z stderr F two\n"
        "2026-01-01T00:00:03.123456789Z stdout P thr\n"
        "2026-01-01T00:00:03.2Z stdout F ee\n"
    )
    _log_file(cluster, ns, pod, "side").write_text("2026-01-01T00:00:01Z stdout F side\n")

    def logs(**query: str) -> str:
        return cluster.ok("GET", pods(ns, name, "log"), query={**main, **query}, accept="*/*")

    assert logs() == "one\ntwo\nthree\n"
    assert logs(tailLines="1") == "ee\n"
    assert logs(tailLines="2") == "three\n"
    assert logs(sinceTime="2026-01-01T00:00:02Z") == "two\nthree\n"
    assert logs(timestamps="true", tailLines="3") == (
        "2026-01-01T00:00:02Z two\n2026-01-01T00:00:03.123456789Z thr2026-01-01T00:00:03.2Z ee\n"
    )
    assert logs(limitBytes="6") == "one\ntw"
    assert logs(container="side") == "side\n"
    status, error = cluster.request(
        "GET", pods(ns, name, "log"), query={"container": "nope"}, accept="*/*"
    )
    assert status == 400 and error["message"] == f"container nope is not valid for pod {name}"
    status, error = cluster.request(
        "GET", pods(ns, name, "log"), query={**main, "previous": "true"}, accept="*/*"
    )
    assert status == 400
    assert error["message"] == f'previous terminated container "main" in pod "{name}" not found'
    status, error = cluster.request(
        "GET", pods(ns, name, "log"), query={**main, "tailLines": "-1"}, accept="*/*"
    )
    assert status == 422 and error["details"]["causes"][0]["field"] == "tailLines"


def test_pod_log_follow_streams_until_the_container_ends(cluster, ns, uniq):
    cluster.require_emulator("log files are written by the local node, not by a kubelet")
    name = f"follow-{uniq}"
    pod = cluster.ok("POST", pods(ns), pod_body(name, node="local-node"))
    _as_running(cluster, ns, pod, "main", "side")
    log = _log_file(cluster, ns, pod, "main")
    log.write_text("2026-01-01T00:00:01Z stdout F start\n")

    def finish() -> None:
        time.sleep(0.4)
        with log.open("a") as f:
            f.write("2026-01-01T00:00:02Z stdout F more\n")
        time.sleep(0.4)
        terminated = {"terminated": {"exitCode": 0, "reason": "Completed"}}
        statuses = [{"name": c, "state": terminated} for c in ("main", "side")]
        cluster.ok(
            "PATCH",
            pods(ns, name, "status"),
            {"status": {"phase": "Succeeded", "containerStatuses": statuses}},
            content_type=MERGE,
        )

    writer = threading.Thread(target=finish)
    writer.start()
    started = time.monotonic()
    text = cluster.ok(
        "GET", pods(ns, name, "log"), query={"follow": "true", "container": "main"}, accept="*/*"
    )
    writer.join()
    assert text == "start\nmore\n"
    assert time.monotonic() - started < 10


# ---------------------------------------------------------------- garbage collection
def test_owner_deletion_collects_dependents(cluster, ns, uniq):
    owner = cluster.ok("POST", cm(ns), {"metadata": {"name": f"own-{uniq}"}})
    cluster.ok(
        "POST", cm(ns), {"metadata": {"name": f"dep-{uniq}", "ownerReferences": [owner_ref(owner)]}}
    )
    cluster.ok(
        "DELETE",
        cm(ns, f"own-{uniq}"),
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"},
    )
    cluster.wait_for(lambda: cluster.request("GET", cm(ns, f"dep-{uniq}"))[0] == 404, timeout=30)


def test_a_dependent_created_after_its_owner_is_gone_is_collected(cluster, ns, uniq):
    """A controller racing its owner's deletion creates a child that names a deleted uid; the
    garbage collector finds no solid owner and deletes it (pkg/controller/garbagecollector,
    attemptToDeleteItem: owners looked up by uid, none left → delete the dependent)."""
    owner = cluster.ok("POST", cm(ns), {"metadata": {"name": f"gone-{uniq}"}})
    cluster.ok("DELETE", cm(ns, f"gone-{uniq}"))
    cluster.wait_for(lambda: cluster.request("GET", cm(ns, f"gone-{uniq}"))[0] == 404, timeout=30)
    status, _ = cluster.request(
        "POST",
        cm(ns),
        {"metadata": {"name": f"late-{uniq}", "ownerReferences": [owner_ref(owner)]}},
    )
    assert status == 201  # the API server accepts it; only the collector removes it
    cluster.wait_for(lambda: cluster.request("GET", cm(ns, f"late-{uniq}"))[0] == 404, timeout=30)
    # An owner that exists keeps its dependent.
    alive = cluster.ok("POST", cm(ns), {"metadata": {"name": f"alive-{uniq}"}})
    cluster.ok(
        "POST",
        cm(ns),
        {"metadata": {"name": f"kept-{uniq}", "ownerReferences": [owner_ref(alive)]}},
    )
    assert cluster.request("GET", cm(ns, f"kept-{uniq}"))[0] == 200


def test_orphan_policy_keeps_dependents_without_the_reference(cluster, ns, uniq):
    owner = cluster.ok("POST", cm(ns), {"metadata": {"name": f"oown-{uniq}"}})
    cluster.ok(
        "POST",
        cm(ns),
        {"metadata": {"name": f"odep-{uniq}", "ownerReferences": [owner_ref(owner)]}},
    )
    cluster.ok(
        "DELETE",
        cm(ns, f"oown-{uniq}"),
        {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Orphan"},
    )
    cluster.wait_for(lambda: cluster.request("GET", cm(ns, f"oown-{uniq}"))[0] == 404, timeout=30)
    dependent = cluster.ok("GET", cm(ns, f"odep-{uniq}"))
    assert not dependent["metadata"].get("ownerReferences")


def test_dependent_with_two_owners_survives_until_both_are_gone(cluster, ns, uniq):
    first = cluster.ok("POST", cm(ns), {"metadata": {"name": f"o1-{uniq}"}})
    second = cluster.ok("POST", cm(ns), {"metadata": {"name": f"o2-{uniq}"}})
    cluster.ok(
        "POST",
        cm(ns),
        {
            "metadata": {
                "name": f"both-{uniq}",
                "ownerReferences": [owner_ref(first), owner_ref(second)],
            }
        },
    )
    cluster.ok("DELETE", cm(ns, f"o1-{uniq}"))
    cluster.wait_for(
        lambda: len(cluster.ok("GET", cm(ns, f"both-{uniq}"))["metadata"]["ownerReferences"]) == 1,
        timeout=30,
    )
    cluster.ok("DELETE", cm(ns, f"o2-{uniq}"))
    cluster.wait_for(lambda: cluster.request("GET", cm(ns, f"both-{uniq}"))[0] == 404, timeout=30)


def test_custom_resource_owner_collects_its_pod(cluster, widgets, ns, uniq):
    owner = widgets.create(f"gc-{uniq}")
    cluster.ok("POST", pods(ns), pod_body(f"child-{uniq}", ownerReferences=[owner_ref(owner)]))
    cluster.ok("DELETE", widgets.path(f"gc-{uniq}"))
    cluster.wait_for(
        lambda: cluster.request("GET", pods(ns, f"child-{uniq}"))[0] == 404, timeout=30
    )


# ---------------------------------------------------------------- events, nodes, non-resource endpoints
def test_core_events_are_visible_in_both_event_apis(cluster, ns, uniq):
    involved = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": f"ev-{uniq}",
        "namespace": ns,
        "uid": "1234",
    }
    event = {
        "metadata": {"name": f"ev-{uniq}.1"},
        "involvedObject": involved,
        "reason": "Tested",
        "message": "hello",
        "type": "Normal",
        "source": {"component": "sftjob-test"},
        "firstTimestamp": "2025-01-01T00:00:00Z",
        "lastTimestamp": "2025-01-01T00:00:00Z",
        "count": 1,
    }
    cluster.ok("POST", f"/api/v1/namespaces/{ns}/events", event)
    core = cluster.ok(
        "GET",
        f"/api/v1/namespaces/{ns}/events",
        query={"fieldSelector": f"involvedObject.name=ev-{uniq},involvedObject.kind=ConfigMap"},
    )
    assert [e["message"] for e in core["items"]] == ["hello"]
    new = cluster.ok("GET", f"/apis/events.k8s.io/v1/namespaces/{ns}/events/ev-{uniq}.1")
    assert new["note"] == "hello" and new["regarding"]["name"] == f"ev-{uniq}"


def test_nodes_are_cluster_scoped_and_keep_status_on_create(cluster, uniq):
    cluster.require_emulator(
        "registering a fake Node in a real cluster would disturb its scheduler"
    )
    node = {
        "metadata": {"name": f"local-node-{uniq}"},
        "status": {"capacity": {"cpu": "2", "nvidia.com/gpu": "0"}},
    }
    created = cluster.ok("POST", "/api/v1/nodes", node)
    assert created["status"]["capacity"]["cpu"] == "2" and "namespace" not in created["metadata"]
    assert cluster.request("GET", f"/api/v1/namespaces/default/nodes/local-node-{uniq}")[0] == 404
    cluster.ok("DELETE", f"/api/v1/nodes/local-node-{uniq}")


def test_version_health_and_core_discovery(cluster):
    assert cluster.ok("GET", "/version")["major"] == "1"
    for path in ("/healthz", "/readyz", "/livez"):
        assert cluster.ok("GET", path, accept="*/*") == "ok"
    assert cluster.ok("GET", "/api")["versions"] == ["v1"]
    core = {r["name"]: r for r in cluster.ok("GET", "/api/v1")["resources"]}
    assert core["pods"]["namespaced"] is True and core["nodes"]["namespaced"] is False
    assert "pods/status" in core and "pods/log" in core
    groups = {g["name"] for g in cluster.ok("GET", "/apis")["groups"]}
    assert {
        "apps",
        "rbac.authorization.k8s.io",
        "coordination.k8s.io",
        "apiextensions.k8s.io",
        "events.k8s.io",
    } <= groups


def test_unknown_resource_is_404(cluster, ns):
    status, error = cluster.request("GET", f"/api/v1/namespaces/{ns}/gizmos")
    assert status == 404 and error["reason"] == "NotFound"
