"""Server-side printing: ``meta.k8s.io/v1`` Tables for ``kubectl get`` (printer columns, ages)."""

from __future__ import annotations

import datetime
import re
from typing import Any

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


def human_duration(seconds: float) -> str:
    """The apimachinery HumanDuration that kubectl shows as AGE."""
    s = int(max(seconds, 0))
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 192:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if days < 730:
        return f"{days}d"
    return f"{days // 365}y{days % 365}d"


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


def _pod_cells(pod: dict[str, Any]) -> list[Any]:
    spec, status = pod.get("spec") or {}, pod.get("status") or {}
    statuses = status.get("containerStatuses") or []
    total = len(spec.get("containers") or [])
    ready = sum(1 for s in statuses if s.get("ready"))
    reason = status.get("reason") or status.get("phase") or "Pending"
    for s in statuses:
        state = s.get("state") or {}
        if (state.get("waiting") or {}).get("reason"):
            reason = state["waiting"]["reason"]
        elif (state.get("terminated") or {}).get("reason") and reason not in (
            "Succeeded",
            "Failed",
        ):
            reason = state["terminated"]["reason"]
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        reason = "Terminating"
    restarts = sum(int(s.get("restartCount") or 0) for s in statuses)
    return [
        f"{ready}/{total}",
        reason,
        restarts,
        age(pod["metadata"].get("creationTimestamp")),
        status.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
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

        def service(o: dict[str, Any]) -> list[Any]:
            spec = o.get("spec") or {}
            ports = ",".join(
                f"{p.get('port')}/{p.get('protocol', 'TCP')}" for p in spec.get("ports") or []
            )
            return [
                spec.get("type", "ClusterIP"),
                spec.get("clusterIP") or "<none>",
                "<none>",
                ports or "<none>",
                age(o["metadata"].get("creationTimestamp")),
            ]

        return [
            _column("Type"),
            _column("Cluster-IP"),
            _column("External-IP"),
            _column("Port(s)"),
            AGE,
        ], service
    if rt.kind == "Node":

        def node(o: dict[str, Any]) -> list[Any]:
            conditions = (o.get("status") or {}).get("conditions") or []
            ready = next((c.get("status") for c in conditions if c.get("type") == "Ready"), None)
            version = ((o.get("status") or {}).get("nodeInfo") or {}).get("kubeletVersion", "")
            return [
                "Ready" if ready == "True" else "NotReady",
                "<none>",
                age(o["metadata"].get("creationTimestamp")),
                version,
            ]

        return [_column("Status"), _column("Roles"), AGE, _column("Version")], node
    if rt.kind == "CustomResourceDefinition":
        return [_column("Created At", "date")], lambda o: [o["metadata"].get("creationTimestamp")]
    return [AGE], lambda o: [age(o["metadata"].get("creationTimestamp"))]


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
    columns, cells = _custom_columns(rt) if rt.custom else _builtin_columns(rt)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [obj["metadata"]["name"], *cells(obj)]}
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
        "columnDefinitions": [NAME, *columns],
        "rows": rows,
    }


def wants_table(accept: str) -> bool:
    """``kubectl get`` asks for ``application/json;as=Table;v=v1;g=meta.k8s.io`` first."""
    first = accept.split(",")[0].replace(" ", "")
    return "as=Table" in first and "g=meta.k8s.io" in first
