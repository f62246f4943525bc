"""The local scheduler's pure rules (sftjob_local.node_scheduler) against
kube-scheduler v1.32 (k8s.io/kubernetes pkg/scheduler):

- requests: k8s.io/component-helpers resource.PodRequests (containers summed,
  init containers as a maximum, sidecars added, overhead added) and
  pkg/apis/core/v1/defaults.go (requests default to limits);
- reasons: framework/plugins/noderesources/fit.go (fitsRequest),
  nodeaffinity/node_affinity.go (ErrReasonPod, PreFilter), tainttoleration
  (`node(s) had untolerated taint {k: v}`), nodeunschedulable
  (`node(s) were unschedulable`);
- claims: volumebinding/volume_binding.go (podHasPVCs, PreFilter:
  UnschedulableAndUnresolvable with the claim's error as the whole reason);
- message: framework/types.go FitError.Error (sorted `<n> <reason>` histogram)
  plus the DefaultPreemption PostFilter (`preemption: ...`, preemption.go /
  default_preemption.go SelectVictimsOnNode).
Real messages of this shape, for comparison: "0/4 nodes are available: 1
Insufficient cpu, 3 node(s) didn't satisfy plugin(s) [NodeAffinity]. preemption:
0/4 nodes are available: 1 No preemption victims found for incoming pod, 3
Preemption is not helpful for scheduling."
"""

from __future__ import annotations

from typing import Any

import pytest
from sftjob_local.cluster import node_names, parse_node_labels, parse_node_taints
from sftjob_local.node import default_max_pods
from sftjob_local.node_scheduler import (
    NodeState,
    claim_problem,
    claims_to_bind,
    filter_node,
    kubelet_admission,
    matches_node_affinity,
    pod_requests,
    schedule,
    tolerates,
)


def node(
    name: str = "n1",
    *,
    cpu: str = "2",
    memory: str = "4Gi",
    pods: str = "110",
    labels: dict[str, str] | None = None,
    taints: list[dict[str, str]] | None = None,
    unschedulable: bool = False,
    **extra: str,
) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if taints:
        spec["taints"] = taints
    if unschedulable:
        spec["unschedulable"] = True
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, **(labels or {})}},
        "spec": spec,
        "status": {
            "allocatable": {
                "cpu": cpu,
                "memory": memory,
                "pods": pods,
                "ephemeral-storage": "10Gi",
                **extra,
            }
        },
    }


def pod(
    requests: dict[str, str] | None = None,
    *,
    limits: dict[str, str] | None = None,
    name: str = "p",
    **spec: Any,
) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests:
        resources["requests"] = requests
    if limits:
        resources["limits"] = limits
    return {
        "metadata": {"name": name, "namespace": "default", "uid": name},
        "spec": {"containers": [{"name": "c", "resources": resources}], **spec},
    }


def state(n: dict[str, Any], *pods: dict[str, Any]) -> NodeState:
    return NodeState(n, list(pods))


NO_VICTIMS = "No preemption victims found for incoming pod"
NOT_HELPFUL = "Preemption is not helpful for scheduling"


# ---------------------------------------------------------------------------- requests
def test_requests_sum_containers_max_init_containers_add_sidecars_and_overhead() -> None:
    p = {
        "spec": {
            "initContainers": [
                {"name": "i1", "resources": {"requests": {"cpu": "2", "memory": "1G"}}},
                {"name": "i2", "resources": {"requests": {"cpu": "2", "memory": "3G"}}},
            ],
            "containers": [
                {"name": "c1", "resources": {"requests": {"cpu": "2", "memory": "1G"}}},
                {"name": "c2", "resources": {"requests": {"cpu": "1", "memory": "1G"}}},
            ],
        }
    }
    # component-helpers' own example: CPU 3, memory 3G
    assert pod_requests(p) == {"cpu": 3000, "memory": 3 * 10**9}
    p["spec"]["overhead"] = {"cpu": "250m"}
    assert pod_requests(p)["cpu"] == 3250
    # a sidecar (restartPolicy Always) runs alongside everything after it
    p["spec"]["initContainers"].insert(
        0, {"name": "side", "restartPolicy": "Always", "resources": {"requests": {"cpu": "500m"}}}
    )
    assert pod_requests(p)["cpu"] == 3000 + 500 + 250


def test_requests_default_to_limits_and_count_extended_resources() -> None:
    p = pod(limits={"cpu": "1500m", "memory": "1Mi", "nvidia.com/gpu": "2"})
    assert pod_requests(p) == {"cpu": 1500, "memory": 2**20, "nvidia.com/gpu": 2}
    assert pod_requests(pod({"cpu": "100m"}, limits={"cpu": "1"})) == {"cpu": 100}
    assert pod_requests(pod()) == {}


# ---------------------------------------------------------------------------- filters
def test_fit_lists_every_insufficient_resource_against_what_bound_pods_use() -> None:
    busy = state(node(cpu="2", memory="1Gi"), pod({"cpu": "1500m", "memory": "512Mi"}))
    status = filter_node(pod({"cpu": "1", "memory": "600Mi"}), busy)
    assert status is not None and status.code == "Unschedulable"
    assert status.reasons == ["Insufficient cpu", "Insufficient memory"]
    assert filter_node(pod({"cpu": "500m", "memory": "512Mi"}), busy) is None
    assert filter_node(pod({"example.com/foo": "1"}), busy).reasons == [  # type: ignore[union-attr]
        "Insufficient example.com/foo"
    ]


def test_pod_count_is_checked_even_without_requests() -> None:
    full = state(node(pods="1"), pod(name="a"))
    assert filter_node(pod(), full).reasons == ["Too many pods"]  # type: ignore[union-attr]
    assert filter_node(pod(), state(node(pods="1"))) is None


def test_node_selector_and_required_affinity_operators() -> None:
    n = node(labels={"zone": "a", "gpu-count": "4"})

    def affinity(*terms: dict[str, Any]) -> dict[str, Any]:
        return pod(
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": list(terms)
                    }
                }
            }
        )

    def expr(key: str, op: str, *values: str) -> dict[str, Any]:
        return {"matchExpressions": [{"key": key, "operator": op, "values": list(values)}]}

    assert matches_node_affinity(pod(nodeSelector={"zone": "a"}), n)
    assert not matches_node_affinity(pod(nodeSelector={"zone": "a", "x": "y"}), n)
    assert matches_node_affinity(affinity(expr("zone", "In", "a", "b")), n)
    assert not matches_node_affinity(affinity(expr("zone", "NotIn", "a")), n)
    assert matches_node_affinity(affinity(expr("missing", "NotIn", "a")), n)
    assert matches_node_affinity(affinity(expr("zone", "Exists")), n)
    assert matches_node_affinity(affinity(expr("missing", "DoesNotExist")), n)
    assert matches_node_affinity(affinity(expr("gpu-count", "Gt", "3")), n)
    assert not matches_node_affinity(affinity(expr("gpu-count", "Lt", "4")), n)
    assert not matches_node_affinity(affinity(expr("zone", "Gt", "1")), n)  # not a number
    # terms are ORed, the expressions of one term ANDed; an empty term matches nothing
    both = {"matchExpressions": [*expr("zone", "In", "a")["matchExpressions"],
                                 *expr("zone", "In", "b")["matchExpressions"]]}  # fmt: skip
    assert not matches_node_affinity(affinity(both), n)
    assert matches_node_affinity(affinity(both, expr("zone", "Exists")), n)
    assert not matches_node_affinity(affinity({}), n)
    fields = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["n1"]}]}
    assert matches_node_affinity(affinity(fields), n)
    # nodeSelector and affinity must both hold
    both_kinds = affinity(expr("zone", "In", "a"))
    both_kinds["spec"]["nodeSelector"] = {"zone": "b"}
    assert not matches_node_affinity(both_kinds, n)


def test_tolerations_match_like_the_api_helper() -> None:
    taint = {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}
    assert tolerates({"key": "dedicated", "value": "gpu", "effect": "NoSchedule"}, taint)
    assert tolerates({"key": "dedicated", "value": "gpu"}, taint)  # no effect: all effects
    assert not tolerates({"key": "dedicated", "value": "cpu"}, taint)
    assert tolerates({"key": "dedicated", "operator": "Exists"}, taint)
    assert tolerates({"operator": "Exists"}, taint)  # empty key + Exists: every taint
    assert not tolerates({"key": "dedicated", "operator": "Exists", "effect": "NoExecute"}, taint)


def test_taints_reject_with_the_first_untolerated_one_and_ignore_prefer_no_schedule() -> None:
    taints = [
        {"key": "soft", "value": "x", "effect": "PreferNoSchedule"},
        {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
        {"key": "gone", "effect": "NoExecute"},
    ]
    st = state(node(taints=taints))
    status = filter_node(pod(), st)
    assert status is not None and status.code == "UnschedulableAndUnresolvable"
    assert status.reasons == ["node(s) had untolerated taint {dedicated: gpu}"]
    tolerant = pod(tolerations=[{"key": "dedicated", "operator": "Equal", "value": "gpu"}])
    assert filter_node(tolerant, st).reasons == ["node(s) had untolerated taint {gone: }"]  # type: ignore[union-attr]
    tolerant["spec"]["tolerations"].append({"key": "gone", "operator": "Exists"})
    assert filter_node(tolerant, st) is None


def test_unschedulable_node_unless_the_pod_tolerates_it() -> None:
    st = state(node(unschedulable=True))
    assert filter_node(pod(), st).reasons == ["node(s) were unschedulable"]  # type: ignore[union-attr]
    ok = pod(tolerations=[{"key": "node.kubernetes.io/unschedulable", "operator": "Exists",
                           "effect": "NoSchedule"}])  # fmt: skip
    assert filter_node(ok, st) is None


def test_first_failing_plugin_decides_a_node() -> None:
    # taints come before node affinity and resources in the default profile
    st = state(node(cpu="1", taints=[{"key": "k", "effect": "NoSchedule"}]))
    status = filter_node(pod({"cpu": "4"}, nodeSelector={"x": "y"}), st)
    assert status is not None and status.reasons == ["node(s) had untolerated taint {k: }"]


# ---------------------------------------------------------------------------- messages
def test_message_for_one_node_short_of_cpu() -> None:
    decision = schedule(pod({"cpu": "1000"}), [state(node())])
    assert decision.node is None
    assert decision.message == (
        "0/1 nodes are available: 1 Insufficient cpu. "
        f"preemption: 0/1 nodes are available: 1 {NO_VICTIMS}."
    )


def test_message_aggregates_reasons_over_nodes_sorted_as_strings() -> None:
    nodes = [
        state(node("a", cpu="1")),
        state(node("b", labels={"pool": "other"})),
        state(node("c", labels={"pool": "other"})),
    ]
    decision = schedule(pod({"cpu": "2"}, nodeSelector={"pool": "train"}), nodes)
    assert decision.message == (
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. "
        f"preemption: 0/3 nodes are available: 3 {NOT_HELPFUL}."
    )
    nodes[0].node["metadata"]["labels"]["pool"] = "train"
    decision = schedule(pod({"cpu": "2"}, nodeSelector={"pool": "train"}), nodes)
    assert decision.message == (
        "0/3 nodes are available: 1 Insufficient cpu, "
        "2 node(s) didn't match Pod's node affinity/selector. "
        f"preemption: 0/3 nodes are available: 1 {NO_VICTIMS}, 2 {NOT_HELPFUL}."
    )
    # sorted as strings, counts included: "10 ..." before "2 ..." as Go's sort.Strings does
    many = [state(node(f"t{i}", taints=[{"key": "t", "effect": "NoSchedule"}])) for i in range(10)]
    many += [state(node("s1", cpu="1")), state(node("s2", cpu="1"))]
    assert schedule(pod({"cpu": "2"}), many).message.startswith(
        "0/12 nodes are available: 10 node(s) had untolerated taint {t: }, 2 Insufficient cpu. "
    )


def test_message_counts_each_resource_of_a_node() -> None:
    decision = schedule(pod({"cpu": "9", "memory": "9Gi"}), [state(node("a")), state(node("b"))])
    assert decision.message == (
        "0/2 nodes are available: 2 Insufficient cpu, 2 Insufficient memory. "
        f"preemption: 0/2 nodes are available: 2 {NO_VICTIMS}."
    )


def test_lower_priority_pods_turn_no_victims_into_the_remaining_reasons() -> None:
    low = pod({"cpu": "1"}, name="low")
    n = node(cpu="2", memory="1Gi")
    high = pod({"cpu": "2", "memory": "2Gi"}, priority=10)
    message = schedule(high, [state(n, low)]).message
    assert message == (
        "0/1 nodes are available: 1 Insufficient cpu, 1 Insufficient memory. "
        "preemption: 0/1 nodes are available: 1 Insufficient memory."
    )


def test_preemption_policy_never() -> None:
    decision = schedule(pod({"cpu": "9"}, preemptionPolicy="Never"), [state(node())])
    assert decision.message == (
        "0/1 nodes are available: 1 Insufficient cpu. "
        "preemption: not eligible due to preemptionPolicy=Never."
    )


def test_match_fields_prefilter_narrows_nodes() -> None:
    def pinned(*names: str) -> dict[str, Any]:
        term = {"matchFields": [{"key": "metadata.name", "operator": "In", "values": list(names)}]}
        return pod(
            {"cpu": "9"},
            affinity={
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
                }
            },
        )

    nodes = [state(node("a")), state(node("b")), state(node("c"))]
    assert schedule(pinned("b"), nodes).message == (
        "0/3 nodes are available: 1 Insufficient cpu, "
        "2 node(s) didn't satisfy plugin(s) [NodeAffinity]. "
        f"preemption: 0/3 nodes are available: 1 {NO_VICTIMS}, 2 {NOT_HELPFUL}."
    )
    conflict = pinned("a")
    conflict["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ][0]["matchFields"].append({"key": "metadata.name", "operator": "In", "values": ["b"]})
    assert schedule(conflict, nodes).message == (
        "0/3 nodes are available: pod affinity terms conflict. "
        f"preemption: 0/3 nodes are available: 3 {NOT_HELPFUL}."
    )


def claimed(*names: str) -> dict[str, Any]:
    volumes = [{"name": f"v{i}", "persistentVolumeClaim": {"claimName": n}} for i, n in enumerate(names)]  # fmt: skip
    return pod(volumes=[*volumes, {"name": "scratch", "emptyDir": {}}])


def claim(name: str, **fields: Any) -> dict[str, Any]:
    meta = {"name": name, "namespace": "default", "uid": f"u-{name}"}
    meta.update(fields.pop("metadata", {}))
    return {"metadata": meta, "spec": fields.pop("spec", {}), "status": fields.pop("status", {})}


def test_a_missing_claim_fits_no_node_and_preemption_cannot_help() -> None:
    """Real: `0/1 nodes are available: persistentvolumeclaim "uptime-kuma-pvc" not found.
    preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling.`"""
    decision = schedule(
        claimed("data", "out"), [state(node()), state(node("n2"))], {"data": claim("data")}
    )
    assert decision.node is None
    assert decision.message == (
        '0/2 nodes are available: persistentvolumeclaim "out" not found. '
        f"preemption: 0/2 nodes are available: 2 {NOT_HELPFUL}."
    )
    both = {"data": claim("data"), "out": claim("out")}
    assert schedule(claimed("data", "out"), [state(node())], both).node == "n1"
    # A caller that tracks no claims leaves VolumeBinding out.
    assert schedule(claimed("data", "out"), [state(node())]).node == "n1"


def test_claims_being_deleted_or_lost_block_the_pod() -> None:
    deleting = claim("data", metadata={"deletionTimestamp": "2026-01-01T00:00:00Z"})
    assert claim_problem(claimed("data"), {"data": deleting}) == (
        'persistentvolumeclaim "data" is being deleted'
    )
    lost = claim("data", spec={"volumeName": "pv-1"}, status={"phase": "Lost"})
    assert claim_problem(claimed("data"), {"data": lost}) == (
        'persistentvolumeclaim "data" bound to non-existent persistentvolume "pv-1"'
    )
    assert claim_problem(pod(), {}) is None  # no claims, nothing to check


def test_only_unbound_claims_bind_and_each_once() -> None:
    bound = claim("data", spec={"volumeName": "pvc-u-data"}, status={"phase": "Bound"})
    claims = {"data": bound, "out": claim("out")}
    assert claims_to_bind(claimed("data", "out", "out"), claims) == ["out"]


def test_no_nodes() -> None:
    assert schedule(pod(), []).message == "no nodes available to schedule pods"


# ---------------------------------------------------------------------------- kubelet
def test_kubelet_admission_reports_the_first_failure() -> None:
    n = node(cpu="1", pods="2", labels={"zone": "a"})
    assert kubelet_admission(pod({"cpu": "500m"}), n, []) is None
    assert kubelet_admission(pod({"cpu": "800m", "memory": "8Gi"}), n, [pod({"cpu": "500m"})]) == (
        "OutOfcpu",
        "Node didn't have enough resource: cpu, requested: 800, used: 500, capacity: 1000",
    )
    assert kubelet_admission(pod(), n, [pod(name="a"), pod(name="b")]) == (
        "OutOfpods",
        "Node didn't have enough resource: pods, requested: 1, used: 2, capacity: 2",
    )
    # extended resources the node does not advertise are dropped (cluster-level resources)
    assert kubelet_admission(pod({"example.com/widget": "1"}), n, []) is None
    assert kubelet_admission(pod(nodeSelector={"zone": "b"}), n, []) == (
        "NodeAffinity",
        "Predicate NodeAffinity failed",
    )
    # only NoExecute taints matter to the kubelet
    tainted = node(taints=[{"key": "a", "effect": "NoSchedule"}])
    assert kubelet_admission(pod(), tainted, []) is None
    tainted["spec"]["taints"].append({"key": "b", "effect": "NoExecute"})
    assert kubelet_admission(pod(), tainted, []) == (
        "TaintToleration",
        "Predicate TaintToleration failed",
    )


# ---------------------------------------------------------------------------- score
def test_least_allocated_node_wins_and_ties_keep_node_order() -> None:
    a = state(node("a", cpu="4"), pod({"cpu": "3"}, name="x"))
    b = state(node("b", cpu="4"))
    assert schedule(pod({"cpu": "1"}), [a, b]).node == "b"
    assert schedule(pod({"cpu": "1"}), [state(node("a")), state(node("b"))]).node == "a"


# ---------------------------------------------------------------------------- flags
def test_node_flags() -> None:
    assert node_names(3) == ["local-node", "local-node-2", "local-node-3"]
    assert parse_node_labels("a=1, b=") == {"a": "1", "b": ""}
    assert parse_node_taints("gpu=true:NoSchedule,maint:NoExecute") == [
        {"key": "gpu", "value": "true", "effect": "NoSchedule"},
        {"key": "maint", "effect": "NoExecute"},
    ]
    with pytest.raises(ValueError):
        parse_node_taints("gpu=true:Sometimes")
    with pytest.raises(ValueError):
        parse_node_labels("novalue")
    assert default_max_pods(2) == 8 and default_max_pods(0.5) == 4
