"""Node capacity and kube-scheduler's filters on the local control plane, seen
only through the API (each test module here runs its own small cluster).

Expected messages: kube-scheduler v1.32, framework/types.go FitError.Error
with the DefaultPreemption PostFilter suffix; reasons from the plugins
noderesources/fit.go, nodeaffinity, tainttoleration (see node_scheduler's
docstring and test_scheduler_rules.py for the sources).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import ensure_claim, py_pod, wait_for, wait_phase
from sftjob_local.cluster import LocalCluster

pytestmark = pytest.mark.local

NO_VICTIMS = "No preemption victims found for incoming pod"
NOT_HELPFUL = "Preemption is not helpful for scheduling"

# Holds its slot until a file appears in the shared claim folder.
HOLD = "import os, time\nwhile not os.path.exists('/signal/go'): time.sleep(0.05)\nprint('done')\n"


def holder(name: str, **spec: Any) -> dict[str, Any]:
    pod = py_pod(name, HOLD)
    pod["spec"]["containers"][0]["volumeMounts"] = [{"name": "s", "mountPath": "/signal"}]
    pod["spec"]["volumes"] = [{"name": "s", "persistentVolumeClaim": {"claimName": "signal"}}]
    pod["spec"].update(spec)
    return pod


def release(cluster: LocalCluster, ns: str) -> None:
    folder = cluster.workdir / "pvc" / ns / "signal"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "go").write_text("")


def asking(name: str, **requests: str) -> dict[str, Any]:
    pod = py_pod(name, "print('ran')")
    pod["spec"]["containers"][0]["resources"] = {"requests": dict(requests)}
    return pod


def unschedulable(core: CoreV1Api, ns: str, name: str) -> Any:
    def check() -> Any:
        for cond in core.read_namespaced_pod(name, ns).status.conditions or []:
            if cond.type == "PodScheduled" and cond.status == "False":
                return cond
        return None

    return wait_for(check, what=f"{ns}/{name} PodScheduled=False")


def scheduling_events(core: CoreV1Api, ns: str, name: str) -> list[Any]:
    return [
        e
        for e in core.list_namespaced_event(ns).items
        if e.reason == "FailedScheduling" and e.involved_object.name == name
    ]


def assert_never_started(cluster: LocalCluster, core: CoreV1Api, ns: str, name: str) -> None:
    """No process ever ran: no container status, no pod folder, no log."""
    pod = core.read_namespaced_pod(name, ns)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    assert not pod.status.container_statuses
    assert not list((cluster.workdir / "pods" / ns).glob(f"{name}-*"))
    assert not (cluster.log_dir / ns / name).exists()


def namespace(core: CoreV1Api, name: str) -> str:
    """A namespace with the `signal` claim every holder mounts."""
    core.create_namespace({"metadata": {"name": name}})
    ensure_claim(core, name, "signal")
    return name


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, CoreV1Api]]:
    """One node: 1 CPU, 1Gi, 1 GPU, 2 pods."""
    workdir = tmp_path_factory.mktemp("small")
    with LocalCluster(workdir=workdir, gpus=1, cpus=1, memory="1Gi", max_pods=2) as c:
        core = CoreV1Api(kubernetes.config.new_client_from_config(str(c.kubeconfig)))
        yield c, core


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, CoreV1Api]]:
    """Two nodes (local-node, local-node-2) of 2 CPUs each."""
    workdir = tmp_path_factory.mktemp("pair")
    with LocalCluster(workdir=workdir, nodes=2, cpus=2, memory="2Gi", max_pods=4) as c:
        core = CoreV1Api(kubernetes.config.new_client_from_config(str(c.kubeconfig)))
        yield c, core


# ---------------------------------------------------------------------------- one node
def test_node_reports_the_configured_capacity_and_kubelet_labels(
    small: tuple[LocalCluster, CoreV1Api],
) -> None:
    _, core = small
    node = core.read_node("local-node")
    expected = {"cpu": "1", "memory": "1Gi", "pods": "2", "nvidia.com/gpu": "1"}
    assert {k: node.status.capacity[k] for k in expected} == expected
    assert {k: node.status.allocatable[k] for k in expected} == expected
    assert int(node.status.allocatable["ephemeral-storage"]) > 0
    labels = node.metadata.labels
    assert labels["kubernetes.io/hostname"] == "local-node"
    assert labels["kubernetes.io/os"] == "linux"
    assert labels["kubernetes.io/arch"] == "amd64"


@pytest.mark.parametrize(
    ("requests", "reasons"),
    [
        ({"cpu": "2"}, "1 Insufficient cpu"),
        ({"memory": "2Gi"}, "1 Insufficient memory"),
        ({"nvidia.com/gpu": "2"}, "1 Insufficient nvidia.com/gpu"),
        ({"cpu": "1500m", "memory": "4Gi"}, "1 Insufficient cpu, 1 Insufficient memory"),
    ],
)
def test_pod_asking_more_than_the_node_stays_pending_and_never_starts(
    small: tuple[LocalCluster, CoreV1Api], requests: dict[str, str], reasons: str
) -> None:
    cluster, core = small
    ns = namespace(core, f"big-{uuid.uuid4().hex[:6]}")
    pod = asking("greedy", **requests)
    if "nvidia.com/gpu" in requests:
        pod["spec"]["containers"][0]["resources"]["limits"] = {"nvidia.com/gpu": "2"}
    core.create_namespaced_pod(ns, pod)
    cond = unschedulable(core, ns, "greedy")
    message = (
        f"0/1 nodes are available: {reasons}. preemption: 0/1 nodes are available: 1 {NO_VICTIMS}."
    )
    assert (cond.reason, cond.message) == ("Unschedulable", message)
    events = wait_for(lambda: scheduling_events(core, ns, "greedy"), what="FailedScheduling")
    assert events[0].type == "Warning" and events[0].message == message
    assert events[0].reporting_component == "default-scheduler"
    assert assert_never_started(cluster, core, ns, "greedy") is None
    core.delete_namespaced_pod("greedy", ns)


def test_pod_count_capacity_and_scheduling_once_a_slot_frees(
    small: tuple[LocalCluster, CoreV1Api],
) -> None:
    cluster, core = small
    ns = namespace(core, "count")
    core.create_namespaced_pod(ns, holder("one"))
    core.create_namespaced_pod(ns, holder("two"))
    wait_phase(core, ns, "one", "Running")
    wait_phase(core, ns, "two", "Running")
    core.create_namespaced_pod(ns, asking("third"))
    cond = unschedulable(core, ns, "third")
    assert cond.message == (
        f"0/1 nodes are available: 1 Too many pods. "
        f"preemption: 0/1 nodes are available: 1 {NO_VICTIMS}."
    )
    assert_never_started(cluster, core, ns, "third")
    release(cluster, ns)  # the holders finish: Succeeded pods no longer count
    assert wait_phase(core, ns, "third", "Succeeded", "Failed").status.phase == "Succeeded"
    assert core.read_namespaced_pod_log("third", ns).strip() == "ran"


def test_pod_bound_directly_is_admitted_like_the_kubelet_does(
    small: tuple[LocalCluster, CoreV1Api],
) -> None:
    """pkg/kubelet/lifecycle/predicate.go (v1.32): a pod that skips the
    scheduler (spec.nodeName set) and does not fit is failed by the kubelet
    with reason OutOf<resource> and `Pod was rejected: ...`; nothing runs."""
    cluster, core = small
    ns = namespace(core, "direct")
    pod = asking("direct", cpu="2")
    pod["spec"]["nodeName"] = "local-node"
    core.create_namespaced_pod(ns, pod)
    failed = wait_phase(core, ns, "direct", "Failed", "Succeeded")
    assert failed.status.phase == "Failed"
    assert failed.status.reason == "OutOfcpu"
    assert failed.status.message == (
        "Pod was rejected: Node didn't have enough resource: cpu, requested: 2000, used: 0, "
        "capacity: 1000"
    )
    assert not failed.status.container_statuses
    assert not (cluster.log_dir / ns / "direct").exists()
    pinned = py_pod("pinned", "print('ran')")
    pinned["spec"]["nodeName"] = "local-node"
    pinned["spec"]["nodeSelector"] = {"pool": "elsewhere"}
    core.create_namespaced_pod(ns, pinned)
    failed = wait_phase(core, ns, "pinned", "Failed", "Succeeded")
    assert (failed.status.reason, failed.status.message) == (
        "NodeAffinity",
        "Pod was rejected: Predicate NodeAffinity failed",
    )
    fits = asking("fits", cpu="500m")
    fits["spec"]["nodeName"] = "local-node"
    core.create_namespaced_pod(ns, fits)
    assert wait_phase(core, ns, "fits", "Succeeded", "Failed").status.phase == "Succeeded"


# ---------------------------------------------------------------------------- two nodes
def test_nodes_are_named_and_pods_spread_to_the_least_allocated(
    pair: tuple[LocalCluster, CoreV1Api],
) -> None:
    cluster, core = pair
    assert [n.metadata.name for n in core.list_node().items] == ["local-node", "local-node-2"]
    ns = namespace(core, "spread")
    core.create_namespaced_pod(ns, holder("a"))
    core.create_namespaced_pod(ns, holder("b"))
    a = wait_phase(core, ns, "a", "Running")
    b = wait_phase(core, ns, "b", "Running")
    assert {a.spec.node_name, b.spec.node_name} == {"local-node", "local-node-2"}
    env_node = {name: core.read_namespaced_pod(name, ns).spec.node_name for name in ("a", "b")}
    release(cluster, ns)
    for name in ("a", "b"):
        done = wait_phase(core, ns, name, "Succeeded", "Failed")
        assert done.status.phase == "Succeeded" and done.spec.node_name == env_node[name]


def test_node_selector_and_required_affinity_pick_the_node(
    pair: tuple[LocalCluster, CoreV1Api],
) -> None:
    _, core = pair
    ns = namespace(core, "affinity")
    by_selector = py_pod("sel", "print('ran')")
    by_selector["spec"]["nodeSelector"] = {"kubernetes.io/hostname": "local-node-2"}
    core.create_namespaced_pod(ns, by_selector)
    by_affinity = py_pod("aff", "print('ran')")
    by_affinity["spec"]["affinity"] = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {
                        "matchExpressions": [
                            {
                                "key": "kubernetes.io/hostname",
                                "operator": "NotIn",
                                "values": ["local-node-2"],
                            }
                        ]
                    }  # fmt: skip
                ]
            }
        }
    }
    core.create_namespaced_pod(ns, by_affinity)
    assert wait_phase(core, ns, "sel", "Succeeded").spec.node_name == "local-node-2"
    assert wait_phase(core, ns, "aff", "Succeeded").spec.node_name == "local-node"

    nowhere = py_pod("nowhere", "print('ran')")
    nowhere["spec"]["nodeSelector"] = {"pool": "gpu"}
    core.create_namespaced_pod(ns, nowhere)
    cond = unschedulable(core, ns, "nowhere")
    assert cond.message == (
        "0/2 nodes are available: 2 node(s) didn't match Pod's node affinity/selector. "
        f"preemption: 0/2 nodes are available: 2 {NOT_HELPFUL}."
    )
    # Labelling a node (what `kubectl label node` does) makes the pod schedulable.
    core.patch_node("local-node-2", {"metadata": {"labels": {"pool": "gpu"}}})
    try:
        assert wait_phase(core, ns, "nowhere", "Succeeded").spec.node_name == "local-node-2"
    finally:
        core.patch_node("local-node-2", {"metadata": {"labels": {"pool": None}}})


def test_taints_keep_pods_away_unless_tolerated(pair: tuple[LocalCluster, CoreV1Api]) -> None:
    _, core = pair
    ns = namespace(core, "taints")
    taint = {"key": "dedicated", "value": "train", "effect": "NoSchedule"}
    core.patch_node("local-node", {"spec": {"taints": [taint]}})
    core.patch_node("local-node-2", {"spec": {"taints": [taint]}})
    try:
        core.create_namespaced_pod(ns, py_pod("plain", "print('ran')"))
        cond = unschedulable(core, ns, "plain")
        assert cond.message == (
            "0/2 nodes are available: 2 node(s) had untolerated taint {dedicated: train}. "
            f"preemption: 0/2 nodes are available: 2 {NOT_HELPFUL}."
        )
        tolerant = py_pod("tolerant", "print('ran')")
        tolerant["spec"]["tolerations"] = [
            {"key": "dedicated", "operator": "Equal", "value": "train", "effect": "NoSchedule"}
        ]
        core.create_namespaced_pod(ns, tolerant)
        assert wait_phase(core, ns, "tolerant", "Succeeded").status.phase == "Succeeded"
        # Removing the taint of one node lets the plain pod go there.
        core.patch_node("local-node-2", {"spec": {"taints": None}})
        assert wait_phase(core, ns, "plain", "Succeeded").spec.node_name == "local-node-2"
    finally:
        core.patch_node("local-node", {"spec": {"taints": None}})
        core.patch_node("local-node-2", {"spec": {"taints": None}})


def test_each_node_runs_only_its_own_pods_and_gpus_do_not_overlap(tmp_path: Path) -> None:
    code = "import os; print(os.environ['SFTJOB_LOCAL_NODE'], os.environ['CUDA_VISIBLE_DEVICES'])"
    with LocalCluster(workdir=tmp_path, nodes=2, gpus=1, cpus=1, max_pods=2) as cluster:
        core = CoreV1Api(kubernetes.config.new_client_from_config(str(cluster.kubeconfig)))
        ensure_claim(core, "default", "signal")
        for name in ("g1", "g2"):
            pod = holder(name)
            pod["spec"]["containers"][0]["command"] = ["python", "-c", HOLD + code]
            pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
            core.create_namespaced_pod("default", pod)
        for name in ("g1", "g2"):
            wait_phase(core, "default", name, "Running")
        release(cluster, "default")
        lines = {}
        for name in ("g1", "g2"):
            pod = wait_phase(core, "default", name, "Succeeded")
            node, device = core.read_namespaced_pod_log(name, "default").split()[-2:]
            assert node == pod.spec.node_name
            lines[node] = device
        assert lines == {"local-node": "0", "local-node-2": "1"}
