"""GPU-aware scheduling on the local node (the shared cluster has 2 GPUs)."""

from __future__ import annotations

import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import ensure_claim, py_pod, wait_for, wait_phase
from sftjob_local.cluster import LocalCluster

pytestmark = pytest.mark.local


def gpu_pod(name: str, gpus: int, code: str = "print('ran')") -> dict:
    pod = py_pod(name, code)
    pod["spec"]["containers"][0]["resources"] = {
        "requests": {"nvidia.com/gpu": str(gpus)},
        "limits": {"nvidia.com/gpu": str(gpus)},
    }
    return pod


def scheduled_condition(core: CoreV1Api, ns: str, name: str):
    for cond in core.read_namespaced_pod(name, ns).status.conditions or []:
        if cond.type == "PodScheduled":
            return cond
    return None


def test_pod_asking_more_gpus_than_the_node_has_stays_unschedulable(
    core: CoreV1Api, ns: str
) -> None:
    core.create_namespaced_pod(ns, gpu_pod("greedy", 3))
    cond = wait_for(
        lambda: (c := scheduled_condition(core, ns, "greedy")) and c.status == "False" and c,
        what="PodScheduled=False",
    )
    assert cond.reason == "Unschedulable"
    # kube-scheduler v1.32 appends the DefaultPreemption PostFilter's verdict
    # (pkg/scheduler/framework/types.go FitError.Error, preemption.go).
    assert cond.message == (
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are "
        "available: 1 No preemption victims found for incoming pod."
    )
    pod = core.read_namespaced_pod("greedy", ns)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    events = wait_for(
        lambda: [
            e
            for e in core.list_namespaced_event(ns).items
            if e.reason == "FailedScheduling" and e.involved_object.name == "greedy"
        ],
        what="FailedScheduling event",
    )
    assert events[0].type == "Warning"


def test_one_gpu_pod_runs_with_its_device(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(
        ns, gpu_pod("one", 1, "import os; print('DEV', os.environ['CUDA_VISIBLE_DEVICES'])")
    )
    assert wait_phase(core, ns, "one", "Succeeded", "Failed").status.phase == "Succeeded"
    assert scheduled_condition(core, ns, "one").status == "True"
    assert core.read_namespaced_pod_log("one", ns).strip() in ("DEV 0", "DEV 1")


def test_pending_pod_is_scheduled_once_gpus_free_up(
    core: CoreV1Api, ns: str, cluster: LocalCluster
) -> None:
    # The first pod holds both GPUs until it is told to finish (a file appears).
    hold = gpu_pod(
        "holder",
        2,
        "import os, time\nwhile not os.path.exists('/signal/go'): time.sleep(0.05)\n",
    )
    hold["spec"]["containers"][0]["volumeMounts"] = [{"name": "s", "mountPath": "/signal"}]
    hold["spec"]["volumes"] = [{"name": "s", "persistentVolumeClaim": {"claimName": "signal"}}]
    ensure_claim(core, ns, "signal")
    core.create_namespaced_pod(ns, hold)
    wait_phase(core, ns, "holder", "Running")
    core.create_namespaced_pod(ns, gpu_pod("next", 1))
    cond = wait_for(
        lambda: (c := scheduled_condition(core, ns, "next")) and c.status == "False" and c,
        what="next unschedulable while the GPUs are taken",
    )
    assert cond.reason == "Unschedulable"
    # Release the GPUs through the shared claim folder; the waiting pod then runs.
    (cluster.workdir / "pvc" / ns / "signal" / "go").write_text("")
    assert wait_phase(core, ns, "holder", "Succeeded", "Failed").status.phase == "Succeeded"
    assert wait_phase(core, ns, "next", "Succeeded", "Failed").status.phase == "Succeeded"


def test_pods_bound_to_another_node_are_left_alone(core: CoreV1Api, ns: str) -> None:
    pod = py_pod("elsewhere", "print('must not run here')")
    pod["spec"]["nodeName"] = "some-other-node"
    core.create_namespaced_pod(ns, pod)
    core.create_namespaced_pod(ns, py_pod("here", "print('ran')"))
    # by the time a pod created later has finished, the first would have run too
    wait_phase(core, ns, "here", "Succeeded", "Failed")
    pod = core.read_namespaced_pod("elsewhere", ns)
    assert not (pod.status and pod.status.phase in ("Running", "Succeeded", "Failed"))
    assert not (pod.status and pod.status.container_statuses)


def test_a_pod_whose_claim_is_missing_waits_until_the_claim_exists(
    core: CoreV1Api, ns: str, cluster: LocalCluster
) -> None:
    """kube-scheduler's VolumeBinding PreFilter (volume_binding.go podHasPVCs) keeps the pod
    Pending, UnschedulableAndUnresolvable: a real message reads `0/1 nodes are available:
    persistentvolumeclaim "x" not found. preemption: 0/1 nodes are available: 1 Preemption
    is not helpful for scheduling.` Once the claim exists the pod schedules and the claim
    binds to its first consumer's node (WaitForFirstConsumer)."""
    pod = py_pod("needs-claim", "print('ran')", volumeMounts=[{"name": "d", "mountPath": "/d"}])
    pod["spec"]["volumes"] = [{"name": "d", "persistentVolumeClaim": {"claimName": "late"}}]
    core.create_namespaced_pod(ns, pod)
    cond = wait_for(
        lambda: (c := scheduled_condition(core, ns, "needs-claim")) and c.status == "False" and c,
        what="the pod unschedulable for its missing claim",
    )
    assert (cond.reason, cond.message) == (
        "Unschedulable",
        '0/1 nodes are available: persistentvolumeclaim "late" not found. '
        "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.",
    )
    assert not (cluster.workdir / "pvc" / ns / "late").exists()  # nothing ran
    ensure_claim(core, ns, "late")
    assert wait_phase(core, ns, "needs-claim", "Succeeded", "Failed").status.phase == "Succeeded"
    claim = core.read_namespaced_persistent_volume_claim("late", ns)
    assert (claim.status.phase, claim.spec.volume_name) == ("Bound", f"pvc-{claim.metadata.uid}")
    assert claim.status.capacity == {"storage": "1Gi"}
