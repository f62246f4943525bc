"""Pure scheduling rules of the local control plane: which node a Pod fits (no I/O).

The decisions and the FailedScheduling text follow kube-scheduler v1.32 with
its default profile (k8s.io/kubernetes, pkg/scheduler):

* a pod's request (`pod_requests`): the resource helper the NodeResourcesFit
  plugin calls (k8s.io/component-helpers resource.PodRequests): the sum over
  containers, at least each init container (a sidecar, restartPolicy Always,
  adds to the sum and to every later init container), plus `spec.overhead`.
  Requests a container leaves out default to its limits, as the apiserver's
  defaulting does on create (pkg/apis/core/v1/defaults.go SetDefaults_Pod);
* Filter plugins, in the default profile's order; a node records the reasons
  of the FIRST plugin that rejects it (framework/runtime RunFilterPlugins):
  NodeUnschedulable   `node(s) were unschedulable` (spec.unschedulable, unless
                      the pod tolerates node.kubernetes.io/unschedulable:NoSchedule)
  TaintToleration     `node(s) had untolerated taint {key: value}` (first
                      NoSchedule/NoExecute taint no toleration matches)
  NodeAffinity        `node(s) didn't match Pod's node affinity/selector`
                      (nodeSelector AND required nodeSelectorTerms; its PreFilter
                      narrows to `matchFields metadata.name In` names: other
                      nodes get `node(s) didn't satisfy plugin(s) [NodeAffinity]`,
                      terms that name no node at all `pod affinity terms conflict`)
  NodeResourcesFit    `Too many pods`, `Insufficient cpu`, `Insufficient memory`,
                      `Insufficient ephemeral-storage`, `Insufficient <name>` for
                      extended resources (every lacking resource is listed)
  against allocatable minus the requests of the node's non-terminal pods (the
  scheduler's pod informer leaves out Succeeded/Failed pods).
* the message (framework/types.go FitError.Error): `0/N nodes are available: `
  then `<count> <reason>` per distinct reason, sorted as strings, then the
  DefaultPreemption PostFilter's `preemption: 0/N nodes are available: ...`:
  a node rejected by a resolvable reason (NodeResourcesFit) without
  lower-priority pods on it gives `No preemption victims found for incoming pod`,
  every other node `Preemption is not helpful for scheduling`
  (framework/preemption/preemption.go, defaultpreemption SelectVictimsOnNode);
  a pod with `preemptionPolicy: Never` gets `preemption: not eligible due to
  preemptionPolicy=Never.`
* VolumeBinding's PreFilter (volumebinding/volume_binding.go podHasPVCs), run
  after NodeAffinity's: a pod naming a PersistentVolumeClaim that does not
  exist (`persistentvolumeclaim "x" not found`), is being deleted
  (`persistentvolumeclaim "x" is being deleted`) or is Lost
  (`persistentvolumeclaim "x" bound to non-existent persistentvolume "y"`)
  fits no node (UnschedulableAndUnresolvable): `0/N nodes are available: <that>.`
  and every node `Preemption is not helpful for scheduling`. Claims bind when
  their first pod is scheduled (`claims_to_bind`), as a WaitForFirstConsumer
  StorageClass does;
* Score: LeastAllocated of NodeResourcesFit (cpu and memory, weight 1 each,
  requests of 0 counted as 100m / 200Mi like the scheduler's non-zero
  defaults), ties broken by the order of the given nodes (the real scheduler
  picks at random among ties; a fixed order keeps the local cluster
  reproducible).

Not modelled: preemption itself (no pod is evicted to make room; where
lower-priority pods would make room, the node's filter reasons are reported),
inter-pod (anti-)affinity, topology spread, host ports, volume plugins,
scheduling gates (gated pods are left alone), extenders, the other score plugins,
PersistentVolumes and StorageClasses (no PV objects: a claim binds to the node's
folder), generic ephemeral volumes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .node_spec import parse_quantity

Obj = dict[str, Any]

TERMINAL_PHASES = ("Succeeded", "Failed")

# Reasons, verbatim from the v1.32 plugins named in the module docstring.
REASON_UNSCHEDULABLE_NODE = "node(s) were unschedulable"
REASON_NODE_AFFINITY = "node(s) didn't match Pod's node affinity/selector"
REASON_PREFILTER_NODE_NAMES = "node(s) didn't satisfy plugin(s) [NodeAffinity]"
REASON_AFFINITY_CONFLICT = "pod affinity terms conflict"
REASON_TOO_MANY_PODS = "Too many pods"
REASON_NO_VICTIMS = "No preemption victims found for incoming pod"
REASON_PREEMPTION_NOT_HELPFUL = "Preemption is not helpful for scheduling"
NO_NODES_MESSAGE = "no nodes available to schedule pods"
PREEMPTION_NEVER = "not eligible due to preemptionPolicy=Never."
UNSCHEDULABLE_TAINT_KEY = "node.kubernetes.io/unschedulable"

# Status codes of the scheduling framework that matter for preemption.
UNSCHEDULABLE = "Unschedulable"
UNRESOLVABLE = "UnschedulableAndUnresolvable"

# pkg/scheduler/util non-zero defaults, used for scoring only.
DEFAULT_MILLI_CPU_REQUEST = 100
DEFAULT_MEMORY_REQUEST = 200 * 1024 * 1024


# ---------------------------------------------------------------------------- requests
def _is_scalar_resource(name: str) -> bool:
    """Extended (`vendor/name`), hugepages and attachable-volumes resources:
    the scheduler's ScalarResources (pkg/scheduler/util IsScalarResourceName)."""
    return "/" in name or name.startswith(("hugepages-", "attachable-volumes-"))


def _amount(name: str, qty: Any) -> int:
    """A quantity in the scheduler's units: millicores for cpu (MilliValue),
    whole units rounded up for everything else (Value)."""
    value = parse_quantity(qty)
    if name == "cpu":
        value *= 1000
    return math.ceil(value)


def _container_requests(container: Obj) -> dict[str, int]:
    res = container.get("resources") or {}
    merged: dict[str, Any] = dict(res.get("limits") or {})
    merged.update(res.get("requests") or {})  # requests default to limits
    out: dict[str, int] = {}
    for name, qty in merged.items():
        if name in ("cpu", "memory", "ephemeral-storage") or _is_scalar_resource(name):
            out[name] = _amount(name, qty)
    return out


def _add(into: dict[str, int], extra: dict[str, int]) -> None:
    for name, n in extra.items():
        into[name] = into.get(name, 0) + n


def _max(into: dict[str, int], other: dict[str, int]) -> None:
    for name, n in other.items():
        into[name] = max(into.get(name, 0), n)


def pod_requests(pod: Obj) -> dict[str, int]:
    """The pod's effective request (cpu in millicores, the rest in units)."""
    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for c in spec.get("containers") or []:
        _add(total, _container_requests(c))
    sidecars: dict[str, int] = {}
    init_peak: dict[str, int] = {}
    for c in spec.get("initContainers") or []:
        asked = _container_requests(c)
        if c.get("restartPolicy") == "Always":
            _add(total, asked)
            _add(sidecars, asked)
            current = dict(sidecars)
        else:
            current = dict(asked)
            _add(current, sidecars)
        _max(init_peak, current)
    _max(total, init_peak)
    overhead = {
        name: _amount(name, qty)
        for name, qty in (spec.get("overhead") or {}).items()
        if name in ("cpu", "memory", "ephemeral-storage") or _is_scalar_resource(name)
    }
    _add(total, overhead)
    return {k: v for k, v in total.items() if v}


def node_allocatable(node: Obj) -> dict[str, int]:
    """`status.allocatable` in the scheduler's units (`pods` as a count)."""
    out: dict[str, int] = {}
    for name, qty in ((node.get("status") or {}).get("allocatable") or {}).items():
        try:
            out[name] = _amount(name, qty)
        except ValueError:
            continue
    return out


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


def pod_priority(pod: Obj) -> int:
    return int((pod.get("spec") or {}).get("priority") or 0)


# ---------------------------------------------------------------------------- taints
def tolerates(toleration: Obj, taint: Obj) -> bool:
    """k8s.io/api core/v1 Toleration.ToleratesTaint."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    if key and key != taint.get("key"):
        return False
    operator = toleration.get("operator") or "Equal"
    if operator == "Equal":
        return (toleration.get("value") or "") == (taint.get("value") or "")
    return operator == "Exists"


def untolerated_taint(pod: Obj, taints: Iterable[Obj]) -> Obj | None:
    """The first NoSchedule/NoExecute taint that no toleration of the pod matches
    (PreferNoSchedule only affects scoring)."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in taints:
        if taint.get("effect") not in ("NoSchedule", "NoExecute"):
            continue
        if not any(tolerates(t, taint) for t in tolerations):
            return taint
    return None


# ---------------------------------------------------------------------------- affinity
def _requirement_matches(expr: Obj, value: str | None) -> bool:
    """One node selector requirement against a label/field value (None: absent),
    as k8s.io/component-helpers nodeaffinity does through labels.Requirement."""
    op = expr.get("operator")
    values = [str(v) for v in expr.get("values") or []]
    if op == "In":
        return value is not None and value in values
    if op == "NotIn":
        return value is None or value not in values
    if op == "Exists":
        return value is not None
    if op == "DoesNotExist":
        return value is None
    if op in ("Gt", "Lt"):
        if value is None or len(values) != 1:
            return False
        try:
            have, want = int(value), int(values[0])
        except ValueError:
            return False
        return have > want if op == "Gt" else have < want
    return False


def _term_matches(term: Obj, node: Obj) -> bool:
    """A nodeSelectorTerm: its matchExpressions and matchFields ANDed; an empty
    term matches nothing."""
    exprs = term.get("matchExpressions") or []
    fields = term.get("matchFields") or []
    if not exprs and not fields:
        return False
    meta = node.get("metadata") or {}
    labels = meta.get("labels") or {}
    for expr in exprs:
        if not _requirement_matches(expr, labels.get(expr.get("key", ""))):
            return False
    for expr in fields:
        value = meta.get("name") if expr.get("key") == "metadata.name" else None
        if expr.get("key") != "metadata.name" or not _requirement_matches(expr, value):
            return False
    return True


def _required_terms(pod: Obj) -> list[Obj] | None:
    affinity = ((pod.get("spec") or {}).get("affinity") or {}).get("nodeAffinity") or {}
    required = affinity.get("requiredDuringSchedulingIgnoredDuringExecution")
    if required is None:
        return None
    return list(required.get("nodeSelectorTerms") or [])


def matches_node_affinity(pod: Obj, node: Obj) -> bool:
    """nodeSelector (every label equal) AND required node affinity (terms ORed)."""
    labels = (node.get("metadata") or {}).get("labels") or {}
    for key, value in ((pod.get("spec") or {}).get("nodeSelector") or {}).items():
        if labels.get(key) != value:
            return False
    terms = _required_terms(pod)
    if terms is None:
        return True
    return any(_term_matches(t, node) for t in terms)


def prefilter_node_names(pod: Obj) -> set[str] | None:
    """NodeAffinity PreFilter: the node names every term pins with
    `matchFields metadata.name In` (union over terms, intersection within a
    term), or None when some term does not pin names (all nodes stay eligible)."""
    terms = _required_terms(pod)
    if not terms:
        return None
    names: set[str] = set()
    for term in terms:
        pinned: set[str] | None = None
        for expr in term.get("matchFields") or []:
            if expr.get("key") == "metadata.name" and expr.get("operator") == "In":
                values = {str(v) for v in expr.get("values") or []}
                pinned = values if pinned is None else pinned & values
        if pinned is None:
            return None
        names |= pinned
    return names


# ---------------------------------------------------------------------------- fit
@dataclass
class NodeState:
    """A node as the scheduler sees it: the Node object and the pods bound to it."""

    node: Obj
    pods: list[Obj] = field(default_factory=list)

    @property
    def name(self) -> str:
        return str((self.node.get("metadata") or {}).get("name", ""))

    def requested(self, exclude: Iterable[Obj] = ()) -> dict[str, int]:
        skip = {id(p) for p in exclude}
        total: dict[str, int] = {}
        for pod in self.pods:
            if id(pod) not in skip:
                _add(total, pod_requests(pod))
        return total


@dataclass
class Status:
    code: str
    reasons: list[str]


@dataclass
class Insufficient:
    """One lacking resource (noderesources.InsufficientResource)."""

    resource: str
    reason: str
    requested: int
    used: int
    capacity: int


def lacking_resources(
    pod: Obj, state: NodeState, exclude: Iterable[Obj] = (), asked: dict[str, int] | None = None
) -> list[Insufficient]:
    """NodeResourcesFit's fitsRequest, in its order: pods, cpu, memory,
    ephemeral-storage, then scalar resources (sorted here; a Go map there)."""
    exclude = list(exclude)
    allocatable = node_allocatable(state.node)
    requested = state.requested(exclude)
    out = []
    count = len(state.pods) - len(exclude)
    if count + 1 > allocatable.get("pods", 0):
        out.append(Insufficient("pods", REASON_TOO_MANY_PODS, 1, count, allocatable.get("pods", 0)))  # fmt: skip
    asked = pod_requests(pod) if asked is None else asked
    names = ["cpu", "memory", "ephemeral-storage", *sorted(n for n in asked if _is_scalar_resource(n))]  # fmt: skip
    for name in names:
        want, used, cap = asked.get(name, 0), requested.get(name, 0), allocatable.get(name, 0)
        if want > 0 and want > cap - used:
            out.append(Insufficient(name, f"Insufficient {name}", want, used, cap))
    return out


def insufficient_resources(pod: Obj, state: NodeState, exclude: Iterable[Obj] = ()) -> list[str]:
    """NodeResourcesFit's reasons (fitsRequest), in its order."""
    return [r.reason for r in lacking_resources(pod, state, exclude)]


def kubelet_admission(pod: Obj, node: Obj, active_pods: Sequence[Obj]) -> tuple[str, str] | None:
    """The kubelet's admission of a pod bound to its node (pkg/kubelet/lifecycle/
    predicate.go, v1.32): None when admitted, else (reason, message) of the
    FIRST failure: `OutOf<resource>` / `Node didn't have enough resource: <r>,
    requested: N, used: N, capacity: N` (cpu in millicores), then
    `NodeAffinity` / `Predicate NodeAffinity failed`, then an untolerated
    NoExecute taint, `TaintToleration` / `Predicate TaintToleration failed`.
    Extended resources the node does not advertise at all are dropped first
    (removeMissingExtendedResources). The kubelet then fails the pod with
    message `Pod was rejected: <message>`."""
    allocatable = node_allocatable(node)
    asked = {
        name: n
        for name, n in pod_requests(pod).items()
        if name in allocatable or not _is_extended_resource(name)
    }
    lacking = lacking_resources(pod, NodeState(node, list(active_pods)), asked=asked)
    if lacking:
        r = lacking[0]
        return (
            f"OutOf{r.resource}",
            f"Node didn't have enough resource: {r.resource}, requested: {r.requested}, "
            f"used: {r.used}, capacity: {r.capacity}",
        )
    if not matches_node_affinity(pod, node):
        return "NodeAffinity", "Predicate NodeAffinity failed"
    taints = [t for t in (node.get("spec") or {}).get("taints") or [] if t.get("effect") == "NoExecute"]  # fmt: skip
    if untolerated_taint(pod, taints) is not None:
        return "TaintToleration", "Predicate TaintToleration failed"
    return None


def _is_extended_resource(name: str) -> bool:
    """v1helper.IsExtendedResourceName: a domain-prefixed name outside kubernetes.io."""
    domain = name.split("/", 1)[0] if "/" in name else ""
    return bool(domain) and domain != "kubernetes.io" and not domain.endswith(".kubernetes.io")


def filter_node(pod: Obj, state: NodeState) -> Status | None:
    """Run the filter plugins on one node; None when the pod fits."""
    spec = state.node.get("spec") or {}
    if spec.get("unschedulable"):
        taint = {"key": UNSCHEDULABLE_TAINT_KEY, "effect": "NoSchedule"}
        tolerations = (pod.get("spec") or {}).get("tolerations") or []
        if not any(tolerates(t, taint) for t in tolerations):
            return Status(UNRESOLVABLE, [REASON_UNSCHEDULABLE_NODE])
    taint = untolerated_taint(pod, spec.get("taints") or [])
    if taint is not None:
        reason = f"node(s) had untolerated taint {{{taint.get('key', '')}: {taint.get('value') or ''}}}"  # fmt: skip
        return Status(UNRESOLVABLE, [reason])
    if not matches_node_affinity(pod, state.node):
        return Status(UNRESOLVABLE, [REASON_NODE_AFFINITY])
    reasons = insufficient_resources(pod, state)
    if reasons:
        return Status(UNSCHEDULABLE, reasons)
    return None


# ---------------------------------------------------------------------------- score
def least_allocated_score(pod: Obj, state: NodeState) -> int:
    """NodeResourcesFit LeastAllocated (cpu, memory; weight 1 each), 0..100."""
    allocatable = node_allocatable(state.node)
    used = {"cpu": 0, "memory": 0}

    def non_zero(p: Obj) -> dict[str, int]:
        asked = pod_requests(p)
        return {
            "cpu": asked.get("cpu") or DEFAULT_MILLI_CPU_REQUEST,
            "memory": asked.get("memory") or DEFAULT_MEMORY_REQUEST,
        }

    for p in [*state.pods, pod]:
        _add(used, non_zero(p))
    scores = []
    for name in ("cpu", "memory"):
        cap = allocatable.get(name, 0)
        scores.append(0 if cap == 0 or used[name] > cap else (cap - used[name]) * 100 // cap)
    return sum(scores) // len(scores)


# ---------------------------------------------------------------------------- schedule
@dataclass
class Decision:
    """Where a pod goes (`node`), or why it cannot (`message`, the FailedScheduling text)."""

    node: str | None
    message: str = ""


def _histogram(statuses: Sequence[list[str]]) -> str:
    counts: dict[str, int] = {}
    for reasons in statuses:
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    return ", ".join(sorted(f"{n} {reason}" for reason, n in counts.items()))


def _preemption(pod: Obj, total: int, failed: dict[str, Status], states: dict[str, NodeState]) -> str:  # fmt: skip
    """The DefaultPreemption PostFilter's message for a pod that fits nowhere."""
    if (pod.get("spec") or {}).get("preemptionPolicy") == "Never":
        return f"preemption: {PREEMPTION_NEVER}"
    per_node: list[list[str]] = []
    for name, status in failed.items():
        if status.code != UNSCHEDULABLE:
            continue
        priority = pod_priority(pod)
        victims = [p for p in states[name].pods if pod_priority(p) < priority]
        if not victims:
            per_node.append([REASON_NO_VICTIMS])
        else:
            # Preemption itself is not modelled: report what still blocks the pod.
            per_node.append(insufficient_resources(pod, states[name], victims) or status.reasons)
    per_node += [[REASON_PREEMPTION_NOT_HELPFUL]] * (total - len(per_node))
    return f"preemption: 0/{total} nodes are available: {_histogram(per_node)}."


def _claim_names(pod: Obj) -> list[str]:
    volumes = (pod.get("spec") or {}).get("volumes") or []
    return [
        str(v["persistentVolumeClaim"].get("claimName", ""))
        for v in volumes
        if isinstance(v.get("persistentVolumeClaim"), dict)
    ]


def claim_problem(pod: Obj, claims: Mapping[str, Obj]) -> str | None:
    """Why VolumeBinding's PreFilter rejects `pod`, or None: the first of its claims
    that is missing, Lost or being deleted. `claims`: the PVCs of the pod's namespace
    by name."""
    for name in _claim_names(pod):
        claim = claims.get(name)
        if claim is None:
            return f'persistentvolumeclaim "{name}" not found'
        if (claim.get("status") or {}).get("phase") == "Lost":
            volume = (claim.get("spec") or {}).get("volumeName", "")
            return (
                f'persistentvolumeclaim "{name}" bound to non-existent persistentvolume "{volume}"'
            )
        if (claim.get("metadata") or {}).get("deletionTimestamp"):
            return f'persistentvolumeclaim "{name}" is being deleted'
    return None


def claims_to_bind(pod: Obj, claims: Mapping[str, Obj]) -> list[str]:
    """The pod's claims still unbound (no `spec.volumeName`): they bind once it is scheduled."""
    names = dict.fromkeys(_claim_names(pod))
    return [n for n in names if n in claims and not (claims[n].get("spec") or {}).get("volumeName")]


def schedule(
    pod: Obj, nodes: Sequence[NodeState], claims: Mapping[str, Obj] | None = None
) -> Decision:
    """One scheduling cycle for `pod` over `nodes` (PreFilter, Filter, PostFilter, Score).

    `claims`: the PersistentVolumeClaims of the pod's namespace by name; None leaves
    VolumeBinding out (a caller that tracks no claims)."""
    total = len(nodes)
    if total == 0:
        return Decision(None, NO_NODES_MESSAGE)
    states = {s.name: s for s in nodes}
    failed: dict[str, Status] = {}
    pinned = prefilter_node_names(pod)
    if pinned is not None and not pinned:
        for name in states:
            failed[name] = Status(UNRESOLVABLE, [REASON_AFFINITY_CONFLICT])
        return Decision(
            None,
            f"0/{total} nodes are available: {REASON_AFFINITY_CONFLICT}. "
            + _preemption(pod, total, failed, states),
        )
    problem = claim_problem(pod, claims) if claims is not None else None
    if problem:
        for name in states:
            failed[name] = Status(UNRESOLVABLE, [problem])
        return Decision(
            None,
            f"0/{total} nodes are available: {problem}. " + _preemption(pod, total, failed, states),
        )
    feasible: list[NodeState] = []
    for state in nodes:
        if pinned is not None and state.name not in pinned:
            failed[state.name] = Status(UNRESOLVABLE, [REASON_PREFILTER_NODE_NAMES])
            continue
        status = filter_node(pod, state)
        if status is None:
            feasible.append(state)
        else:
            failed[state.name] = status
    if feasible:
        best = max(feasible, key=lambda s: least_allocated_score(pod, s))
        return Decision(best.name)
    reasons = _histogram([s.reasons for s in failed.values()])
    return Decision(
        None,
        f"0/{total} nodes are available: {reasons}. " + _preemption(pod, total, failed, states),
    )


def needs_scheduling(pod: Obj, scheduler_name: str = "default-scheduler") -> bool:
    """Pods kube-scheduler takes: unbound, not terminal, not being deleted, no
    scheduling gates, and its own `schedulerName` (default-scheduler when unset)."""
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    if spec.get("nodeName") or is_terminal(pod) or meta.get("deletionTimestamp"):
        return False
    if spec.get("schedulingGates"):
        return False
    return (spec.get("schedulerName") or "default-scheduler") == scheduler_name


def queue_order(pod: Obj) -> tuple[int, str, str, str]:
    """PrioritySort: higher priority first, then the older pod."""
    meta = pod.get("metadata") or {}
    return (
        -pod_priority(pod),
        meta.get("creationTimestamp") or "",
        meta.get("namespace") or "",
        meta.get("name") or "",
    )
