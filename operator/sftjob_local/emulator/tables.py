"""Server-side printing: ``meta.k8s.io/v1`` Tables for ``kubectl get`` (printer columns, ages)."""

from __future__ import annotations

import datetime
import re
from typing import Any

# kubectl's AGE text, shared with `sftjob get` (the operator package is the lower layer).
from sftjob_operator.job_view import human_duration

from .resources import ResourceType

_TOKEN_RE = re.compile(
    r"""\.([A-Za-z0-9_-]+)                          # .field
      | \[(\d+|\*)\]                                # [0] or [*]
      | \[\?\(@\.([A-Za-z0-9_.-]+)\s*==\s*["']([^"']*)["']\)\]   # [?(@.type=="Ready")]
    """,
    re.VERBOSE,
)


def jsonpath(obj: Any, expr: str) -> list[Any]:
    """The JSONPath subset printer columns use: fields, indexes, [*] and equality filters."""
    expr = expr.strip()
    if expr.startswith("{") and expr.endswith("}"):
        expr = expr[1:-1]
    expr = expr.lstrip("$")
    values = [obj]
    pos = 0
    while pos < len(expr):
        m = _TOKEN_RE.match(expr, pos)
        if not m:
            return []
        pos = m.end()
        field, index, filter_path, filter_value = m.groups()
        next_values: list[Any] = []
        for value in values:
            if field is not None and isinstance(value, dict) and field in value:
                next_values.append(value[field])
            elif index is not None and isinstance(value, list):
                if index == "*":
                    next_values.extend(value)
                elif int(index) < len(value):
                    next_values.append(value[int(index)])
            elif filter_path is not None and isinstance(value, list):
                for item in value:
                    found: Any = item
                    for key in filter_path.split("."):
                        found = found.get(key) if isinstance(found, dict) else None
                    if found is not None and str(found) == filter_value:
                        next_values.append(item)
        values = next_values
    return values


def parse_time(text: str | None) -> datetime.datetime | None:
    if not text:
        return None
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None


def age(timestamp: str | None) -> str:
    when = parse_time(timestamp)
    if when is None:
        return "<unknown>"
    return human_duration((datetime.datetime.now(datetime.UTC) - when).total_seconds())


def _column(
    name: str, type_: str = "string", priority: int = 0, fmt: str = "", description: str = ""
) -> dict[str, Any]:
    return {
        "name": name,
        "type": type_,
        "format": fmt,
        "description": description,
        "priority": priority,
    }


NAME = _column("Name", fmt="name", description="Name must be unique within a namespace.")
AGE = _column(
    "Age",
    description="CreationTimestamp is a timestamp representing the server time when this object was created.",
)


def _terminated_reason(terminated: dict[str, Any], prefix: str = "") -> str:
    if terminated.get("reason"):
        return prefix + terminated["reason"]
    if terminated.get("signal"):
        return f"{prefix}Signal:{terminated['signal']}"
    return f"{prefix}ExitCode:{terminated.get('exitCode', 0)}"


def _finished_at(container_status: dict[str, Any]) -> str:
    return ((container_status.get("lastState") or {}).get("terminated") or {}).get(
        "finishedAt"
    ) or ""


def _pod_cells(pod: dict[str, Any]) -> list[Any]:
    """printPod (v1.32): READY, STATUS (init progress, waiting/terminated reasons, Terminating),
    RESTARTS with the time of the last restart, AGE; wide: IP, NODE, NOMINATED NODE, READINESS
    GATES. Timestamps compare as RFC 3339 strings (all UTC, same format)."""
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    phase = status.get("phase") or "Pending"  # the apiserver sets Pending on create
    reason = status.get("reason") or phase
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "SchedulingGated":
            reason = "SchedulingGated"
    init_specs = {c.get("name"): c for c in spec.get("initContainers") or []}

    def sidecar(name: str) -> bool:  # a restartable init container
        return (init_specs.get(name) or {}).get("restartPolicy") == "Always"

    total = len(spec.get("containers") or []) + sum(1 for n in init_specs if sidecar(n))
    ready = restarts = sidecar_restarts = 0
    last_restart = last_sidecar_restart = ""
    initializing = False
    init_statuses = status.get("initContainerStatuses") or []
    for index, container in enumerate(init_statuses):
        restarts += int(container.get("restartCount") or 0)
        last_restart = max(last_restart, _finished_at(container))
        if sidecar(container.get("name")):
            sidecar_restarts += int(container.get("restartCount") or 0)
            last_sidecar_restart = max(last_sidecar_restart, _finished_at(container))
        state = container.get("state") or {}
        terminated, waiting = state.get("terminated"), state.get("waiting") or {}
        if terminated is not None and int(terminated.get("exitCode") or 0) == 0:
            continue
        if sidecar(container.get("name")) and container.get("started"):
            ready += 1 if container.get("ready") else 0
            continue
        if terminated is not None:
            reason = _terminated_reason(terminated, "Init:")
        elif waiting.get("reason") and waiting["reason"] != "PodInitializing":
            reason = "Init:" + waiting["reason"]
        else:
            reason = f"Init:{index}/{len(init_specs)}"
        initializing = True
        break
    initialized = any(
        c.get("type") == "Initialized" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )
    if not initializing or initialized:
        restarts, last_restart = sidecar_restarts, last_sidecar_restart
        running = False
        for container in reversed(status.get("containerStatuses") or []):
            restarts += int(container.get("restartCount") or 0)
            last_restart = max(last_restart, _finished_at(container))
            state = container.get("state") or {}
            waiting, terminated = state.get("waiting") or {}, state.get("terminated")
            if waiting.get("reason"):
                reason = waiting["reason"]
            elif terminated is not None:
                reason = _terminated_reason(terminated)
            elif container.get("ready") and state.get("running") is not None:
                running = True
                ready += 1
        if reason == "Completed" and running:
            pod_ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            reason = "Running" if pod_ready else "NotReady"
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        if status.get("reason") == "NodeLost":
            reason = "Unknown"
        elif phase not in ("Succeeded", "Failed"):
            reason = "Terminating"
    restarts_text = str(restarts)
    if restarts and last_restart:
        restarts_text = f"{restarts} ({age(last_restart)} ago)"
    pod_ips = status.get("podIPs") or []
    return [
        f"{ready}/{total}",
        reason,
        restarts_text,
        age(pod["metadata"].get("creationTimestamp")),
        (pod_ips[0].get("ip") if pod_ips else status.get("podIP")) or "<none>",
        spec.get("nodeName") or "<none>",
        status.get("nominatedNodeName") or "<none>",
        _readiness_gates(pod),
    ]


def _readiness_gates(pod: dict[str, Any]) -> str:
    """printPod's READINESS GATES: "<ready>/<total>" over spec.readinessGates, "<none>" without."""
    gates = (pod.get("spec") or {}).get("readinessGates") or []
    if not gates:
        return "<none>"
    conditions = {
        c.get("type"): c.get("status") for c in (pod.get("status") or {}).get("conditions") or []
    }
    ready = sum(1 for g in gates if conditions.get(g.get("conditionType")) == "True")
    return f"{ready}/{len(gates)}"


def format_labels(labels: dict[str, str] | None) -> str:
    """labels.FormatLabels: sorted ``k=v`` pairs, "<none>" when empty."""
    if not labels:
        return "<none>"
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


def format_selector(selector: dict[str, Any] | None) -> str:
    """metav1.LabelSelectorAsSelector(...).String(): requirements sorted by key; "" for none."""
    requirements = [(k, f"{k}={v}") for k, v in ((selector or {}).get("matchLabels") or {}).items()]
    for expr in (selector or {}).get("matchExpressions") or []:
        key, op, values = expr.get("key", ""), expr.get("operator", ""), expr.get("values") or []
        text = {
            "In": f"{key} in ({','.join(sorted(values))})",
            "NotIn": f"{key} notin ({','.join(sorted(values))})",
            "Exists": key,
            "DoesNotExist": f"!{key}",
        }.get(op, f"{key} {op}")
        requirements.append((key, text))
    return ",".join(text for _, text in sorted(requirements, key=lambda r: r[0]))


def _service_cells(o: dict[str, Any]) -> list[Any]:
    """printService: ports as port[:nodePort]/protocol, external IPs per service type."""
    spec = o.get("spec") or {}
    kind = spec.get("type") or "ClusterIP"
    ports = ",".join(
        f"{p.get('port')}:{p['nodePort']}/{p.get('protocol', 'TCP')}"
        if p.get("nodePort")
        else f"{p.get('port')}/{p.get('protocol', 'TCP')}"
        for p in spec.get("ports") or []
    )
    external = list(spec.get("externalIPs") or [])
    if kind == "LoadBalancer":
        ingress = ((o.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
        found = [i.get("ip") or i.get("hostname") for i in ingress] + external
        external_ip = ",".join(x for x in found if x) or "<pending>"
    elif kind == "ExternalName":
        external_ip = spec.get("externalName") or "<none>"
    else:
        external_ip = ",".join(external) or "<none>"
    return [
        kind,
        spec.get("clusterIP") or "<none>",
        external_ip,
        ports or "<none>",
        age(o["metadata"].get("creationTimestamp")),
        format_labels(spec.get("selector")),
    ]


_ACCESS_MODES = {
    "ReadWriteOnce": "RWO",
    "ReadOnlyMany": "ROX",
    "ReadWriteMany": "RWX",
    "ReadWriteOncePod": "RWOP",
}


def _pvc_cells(o: dict[str, Any]) -> list[Any]:
    """printPersistentVolumeClaim: capacity and access modes only once bound to a volume."""
    spec, status = o.get("spec") or {}, o.get("status") or {}
    capacity = access_modes = ""
    if spec.get("volumeName"):
        capacity = str((status.get("capacity") or {}).get("storage", ""))
        access_modes = ",".join(_ACCESS_MODES.get(m, m) for m in status.get("accessModes") or [])
    storage_class = spec.get("storageClassName")
    if storage_class is None:
        storage_class = (o["metadata"].get("annotations") or {}).get(
            "volume.beta.kubernetes.io/storage-class", ""
        )
    return [
        status.get("phase") or "",
        spec.get("volumeName") or "",
        capacity,
        access_modes,
        storage_class,
        spec.get("volumeAttributesClassName") or "<unset>",
        age(o["metadata"].get("creationTimestamp")),
        spec.get("volumeMode") or "<unset>",
    ]


def _binding_cells(o: dict[str, Any]) -> list[Any]:
    """printRoleBinding/printClusterRoleBinding: Kind/name of the role, subjects when wide."""
    ref = o.get("roleRef") or {}
    users, groups, service_accounts = [], [], []
    for subject in o.get("subjects") or []:
        kind, name = subject.get("kind"), subject.get("name", "")
        if kind == "User":
            users.append(name)
        elif kind == "Group":
            groups.append(name)
        elif kind == "ServiceAccount":
            service_accounts.append(f"{subject.get('namespace', '')}/{name}")
    return [
        f"{ref.get('kind', '')}/{ref.get('name', '')}",
        age(o["metadata"].get("creationTimestamp")),
        ", ".join(users),
        ", ".join(groups),
        ", ".join(service_accounts),
    ]


def _deployment_cells(o: dict[str, Any]) -> list[Any]:
    spec, status = o.get("spec") or {}, o.get("status") or {}
    containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
    return [
        f"{status.get('readyReplicas', 0)}/{spec.get('replicas', 1)}",
        status.get("updatedReplicas", 0),
        status.get("availableReplicas", 0),
        age(o["metadata"].get("creationTimestamp")),
        ",".join(c.get("name", "") for c in containers),
        ",".join(c.get("image", "") for c in containers),
        format_selector(spec.get("selector")),
    ]


def _event_doc(field: str) -> str:
    return EVENT_FIELD_DOCS.get(field, "")


EVENT_FIELD_DOCS = {
    "lastTimestamp": "The time at which the most recent occurrence of this event was recorded.",
    "type": "Type of this event (Normal, Warning), new types could be added in the future",
    "reason": "This should be a short, machine understandable string that gives the reason for the transition into the object's current status.",
    "involvedObject": "The object that this event is about.",
    "fieldPath": 'If referring to a piece of an object instead of an entire object, this string should contain a valid JSON/Go field access statement, such as desiredState.manifest.containers[2]. For example, if the object reference is to a container within a pod, this would take on a value like: "spec.containers{name}" (where "name" refers to the name of the container that triggered the event) or if no container name is specified "spec.containers[2]" (container with index 2 in this pod). This syntax is chosen only to have some well-defined way of referencing a part of an object.',
    "source": "The component reporting this event. Should be a short machine understandable string.",
    "message": "A human-readable description of the status of this operation.",
    "firstTimestamp": "The time at which the event was first recorded. (Time of server receipt is in TypeMeta.)",
    "count": "The number of times this event has occurred.",
}

# printers.go's eventColumnDefinitions: the only built-in table without Name first (it is the
# last, wide-only column).
EVENT_COLUMNS = [
    _column("Last Seen", description=_event_doc("lastTimestamp")),
    _column("Type", description=_event_doc("type")),
    _column("Reason", description=_event_doc("reason")),
    _column("Object", description=_event_doc("involvedObject")),
    _column("Subobject", priority=1, description=_event_doc("fieldPath")),
    _column("Source", priority=1, description=_event_doc("source")),
    _column("Message", description=_event_doc("message")),
    _column("First Seen", priority=1, description=_event_doc("firstTimestamp")),
    _column("Count", priority=1, description=_event_doc("count")),
    {**NAME, "priority": 1},
]


def event_cells(event: dict[str, Any]) -> list[Any]:
    """printEvent's cells (the server always prints wide; kubectl hides priority-1 columns)."""
    if "regarding" in event or (event.get("apiVersion") or "").startswith("events.k8s.io/"):
        from .core import new_event_to_core  # the events.k8s.io shape, read as core/v1

        event = new_event_to_core(event)
    first_seen = age(event.get("firstTimestamp")) if event.get("firstTimestamp") else None
    if first_seen is None:
        first_seen = age(event.get("eventTime"))
    last_seen = age(event["lastTimestamp"]) if event.get("lastTimestamp") else first_seen
    count = event.get("count") or 0
    series = event.get("series")
    if series:
        last_seen = age(series.get("lastObservedTime"))
        count = series.get("count") or 0
    elif count == 0:
        count = 1  # singleton events of the new API carry no count
    involved = event.get("involvedObject") or {}
    kind = (involved.get("kind") or "").lower()
    target = f"{kind}/{involved['name']}" if involved.get("name") else kind
    source = event.get("source") or {}
    component = source.get("component") or event.get("reportingComponent") or ""
    instance = source.get("host") or event.get("reportingInstance") or ""
    return [
        last_seen,
        event.get("type", ""),
        event.get("reason", ""),
        target,
        involved.get("fieldPath", ""),
        f"{component}, {instance}" if instance else component,
        (event.get("message") or "").strip(),
        first_seen,
        int(count),
        event["metadata"]["name"],
    ]


def _builtin_columns(rt: ResourceType) -> tuple[list[dict[str, Any]], Any]:
    """Columns and a row function for built-in kinds (a small subset of kubectl's printers)."""
    if rt.kind == "Pod":
        cols = [
            _column("Ready"),
            _column("Status"),
            _column("Restarts", "string"),
            AGE,
            _column("IP", priority=1),
            _column("Node", priority=1),
            _column("Nominated Node", priority=1),
            _column("Readiness Gates", priority=1),
        ]
        return cols, _pod_cells
    if rt.kind == "Namespace":
        return [_column("Status"), AGE], lambda o: [
            (o.get("status") or {}).get("phase", "Active"),
            age(o["metadata"].get("creationTimestamp")),
        ]
    if rt.kind == "ConfigMap":
        return [_column("Data", "integer"), AGE], lambda o: [
            len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            age(o["metadata"].get("creationTimestamp")),
        ]
    if rt.kind == "Secret":
        return [_column("Type"), _column("Data", "integer"), AGE], lambda o: [
            o.get("type", "Opaque"),
            len(o.get("data") or {}),
            age(o["metadata"].get("creationTimestamp")),
        ]
    if rt.kind == "Service":
        return [
            _column("Type"),
            _column("Cluster-IP"),
            _column("External-IP"),
            _column("Port(s)"),
            AGE,
            _column("Selector", priority=1),
        ], _service_cells
    if rt.kind == "ServiceAccount":
        return [_column("Secrets"), AGE], lambda o: [
            len(o.get("secrets") or []),
            age(o["metadata"].get("creationTimestamp")),
        ]
    if rt.kind == "PersistentVolumeClaim":
        return [
            _column("Status"),
            _column("Volume"),
            _column("Capacity"),
            _column("Access Modes"),
            _column("StorageClass"),
            _column("VolumeAttributesClass"),
            AGE,
            _column("VolumeMode", priority=1),
        ], _pvc_cells
    if rt.kind in ("RoleBinding", "ClusterRoleBinding") and rt.group == "rbac.authorization.k8s.io":
        return [
            _column("Role"),
            AGE,
            _column("Users", priority=1),
            _column("Groups", priority=1),
            _column("ServiceAccounts", priority=1),
        ], _binding_cells
    if rt.kind == "Deployment":
        return [
            _column("Ready"),
            _column("Up-to-date", "integer"),
            _column("Available", "integer"),
            AGE,
            _column("Containers", priority=1),
            _column("Images", priority=1),
            _column("Selector", priority=1),
        ], _deployment_cells
    if rt.kind == "Node":
        return [
            _column("Status"),
            _column("Roles"),
            AGE,
            _column("Version"),
            _column("Internal-IP", priority=1),
            _column("External-IP", priority=1),
            _column("OS-Image", priority=1),
            _column("Kernel-Version", priority=1),
            _column("Container-Runtime", priority=1),
        ], _node_cells
    if rt.kind == "ValidatingAdmissionPolicy" and rt.group == "admissionregistration.k8s.io":
        return [_column("Validations", "integer"), _column("ParamKind"), AGE], _policy_cells
    if rt.kind == "ValidatingAdmissionPolicyBinding" and rt.group == "admissionregistration.k8s.io":
        return [_column("PolicyName"), _column("ParamRef"), AGE], _policy_binding_cells
    if rt.kind == "Lease":
        return [_column("Holder"), AGE], lambda o: [
            (o.get("spec") or {}).get("holderIdentity") or "",
            age(o["metadata"].get("creationTimestamp")),
        ]
    # Built-ins without a printer (roles, CRDs, ...) get the apiserver's default table
    # convertor (apiserver pkg/registry/rest/table.go): Name and "Created At" in RFC 3339.
    return [_column("Created At", "date")], lambda o: [o["metadata"].get("creationTimestamp")]


def _policy_cells(o: dict[str, Any]) -> list[Any]:
    """printValidatingAdmissionPolicy: how many validations, the paramKind."""
    spec = o.get("spec") or {}
    kind = spec.get("paramKind")
    param_kind = f"{kind.get('apiVersion', '')}/{kind.get('kind', '')}" if kind else "<unset>"
    return [
        len(spec.get("validations") or []),
        param_kind,
        age(o["metadata"].get("creationTimestamp")),
    ]


def _policy_binding_cells(o: dict[str, Any]) -> list[Any]:
    """printValidatingAdmissionPolicyBinding: the policy and the param (``*/name`` when no
    namespace is given; a selector as Go prints the LabelSelector struct)."""
    spec = o.get("spec") or {}
    ref = spec.get("paramRef")
    param = "<unset>"
    if ref and ref.get("name"):
        param = f"{ref.get('namespace') or '*'}/{ref['name']}"
    elif ref and ref.get("selector") is not None:
        labels = (ref["selector"].get("matchLabels") or {}).items()
        shown = "".join(f"{k}: {v}," for k, v in sorted(labels))
        param = (
            f"&LabelSelector{{MatchLabels:map[string]string{{{shown}}},"
            "MatchExpressions:[]LabelSelectorRequirement{},}"
        )
    return [spec.get("policyName", ""), param, age(o["metadata"].get("creationTimestamp"))]


def _node_cells(o: dict[str, Any]) -> list[Any]:
    """printNode: readiness (plus SchedulingDisabled), roles from node-role labels, wide info."""
    status = o.get("status") or {}
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    ready = conditions.get("Ready")
    state = {"True": "Ready", "False": "NotReady"}.get(ready or "", "Unknown")
    if (o.get("spec") or {}).get("unschedulable"):
        state += ",SchedulingDisabled"
    labels = o["metadata"].get("labels") or {}
    roles = {
        k.removeprefix("node-role.kubernetes.io/")
        for k in labels
        if k.startswith("node-role.kubernetes.io/")
    }
    if labels.get("kubernetes.io/role"):
        roles.add(labels["kubernetes.io/role"])
    roles.discard("")
    info = status.get("nodeInfo") or {}
    addresses = status.get("addresses") or []

    def address(kind: str) -> str:
        return next((a.get("address") for a in addresses if a.get("type") == kind), "<none>")

    return [
        state,
        ",".join(sorted(roles)) or "<none>",
        age(o["metadata"].get("creationTimestamp")),
        info.get("kubeletVersion", ""),
        address("InternalIP"),
        address("ExternalIP"),
        info.get("osImage") or "<unknown>",
        info.get("kernelVersion") or "<unknown>",
        info.get("containerRuntimeVersion") or "<unknown>",
    ]


def _custom_columns(rt: ResourceType) -> tuple[list[dict[str, Any]], Any]:
    if not rt.printer_columns:
        return [AGE], lambda o: [age(o["metadata"].get("creationTimestamp"))]
    cols = [
        _column(
            c["name"],
            c.get("type", "string"),
            int(c.get("priority", 0)),
            c.get("format", ""),
            c.get("description", ""),
        )
        for c in rt.printer_columns
    ]

    def cells(obj: dict[str, Any]) -> list[Any]:
        row = []
        for column in rt.printer_columns:
            found = jsonpath(obj, column.get("jsonPath", ""))
            value = found[0] if found else None
            if value is not None and column.get("type") == "date":
                value = age(value) if isinstance(value, str) else value
            elif isinstance(value, dict | list):
                value = str(value)
            row.append(value)
        return row

    return cols, cells


def to_table(
    rt: ResourceType, objects: list[dict[str, Any]], include: str, resource_version: str
) -> dict[str, Any]:
    if rt.kind == "Event" and rt.group in ("", "events.k8s.io"):
        columns, cells = EVENT_COLUMNS, event_cells
    else:
        columns, row_cells = _custom_columns(rt) if rt.custom else _builtin_columns(rt)
        columns = [NAME, *columns]

        def cells(obj: dict[str, Any]) -> list[Any]:
            return [obj["metadata"]["name"], *row_cells(obj)]

    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": cells(obj)}
        if include == "Object":
            row["object"] = obj
        elif include != "None":
            row["object"] = {
                "kind": "PartialObjectMetadata",
                "apiVersion": "meta.k8s.io/v1",
                "metadata": obj["metadata"],
            }
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns,
        "rows": rows,
    }


def wants_table(accept: str) -> bool:
    """``kubectl get`` asks for ``application/json;as=Table;v=v1;g=meta.k8s.io`` first."""
    first = accept.split(",")[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first
