"""CustomResourceDefinition generated from the typed API model.

Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, every node typed,
nullable instead of anyOf-with-null, OpenAPI 3.0's boolean exclusiveMinimum. This
module turns pydantic's JSON Schema into that, keeping every field's description
so `kubectl explain sftjob.spec.training` is useful. Two CRDs: SFTJob (api.py) and the
cluster-scoped SFTProfile (profile_api.py). `sftjob crd --write crds` writes both
(`crds/sftjob.yaml`, `crds/sftprofile.yaml`); a test fails when a committed file drifts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .api import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    SFTJobSpec,
    SFTJobStatus,
)
from .profile_api import (
    PROFILE_CATEGORIES,
    PROFILE_KIND,
    PROFILE_PLURAL,
    PROFILE_SHORT_NAMES,
    PROFILE_SINGULAR,
    SFTProfileSpec,
    SFTProfileStatus,
)

JsonSchema = dict[str, Any]

PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Phase",
        "type": "string",
        "jsonPath": ".status.phase",
        "description": "Lifecycle phase.",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress.summary",
        "description": "Optimizer step / total steps (percent done).",
    },
    {
        "name": "Epoch",
        "type": "number",
        "jsonPath": ".status.progress.epoch",
        "description": "Epochs done.",
    },
    {
        "name": "Loss",
        "type": "string",
        "jsonPath": ".status.progress.lossDisplay",
        "description": "Latest training loss, 4 significant digits.",
    },
    {
        "name": "ETA",
        "type": "string",
        "jsonPath": ".status.progress.eta",
        "description": "Estimated time left.",
    },
    {
        "name": "Method",
        "type": "string",
        "jsonPath": ".spec.method",
        "priority": 1,
        "description": "full, lora or qlora.",
    },
    {
        "name": "Model",
        "type": "string",
        "jsonPath": ".spec.model.name",
        "priority": 1,
        "description": "Base model hub id.",
    },
    {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since creation.",
    },
]

PROFILE_PRINTER_COLUMNS: list[dict[str, Any]] = [
    {
        "name": "Namespaces",
        "type": "string",
        "jsonPath": ".spec.namespaceSelector.matchLabels",
        "description": "Labels of the namespaces it selects (empty: all, or expressions).",
    },
    {
        "name": "Max Nodes",
        "type": "integer",
        "jsonPath": ".spec.limits.maxNodes",
        "description": "Most pods per job.",
    },
    {
        "name": "Max GPUs",
        "type": "integer",
        "jsonPath": ".spec.limits.maxGpusPerJob",
        "description": "Most GPUs per job.",
    },
    {
        "name": "Image",
        "type": "string",
        "jsonPath": ".spec.defaults.image",
        "description": "Default trainer image.",
    },
    {
        "name": "Methods",
        "type": "string",
        "jsonPath": ".spec.limits.allowedMethods",
        "priority": 1,
        "description": "Allowed methods (empty: all).",
    },
    {
        "name": "Queue",
        "type": "string",
        "jsonPath": ".spec.defaults.queueName",
        "priority": 1,
        "description": "Kueue LocalQueue of its jobs.",
    },
    {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since creation.",
    },
]

# Keywords of JSON Schema that a structural OpenAPI v3 schema keeps as they are.
_KEPT = {
    "type",
    "description",
    "enum",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "format",
    "default",
    "required",
    # Cross-field rules (CrossFieldRule in api.py), evaluated by the API server.
    "x-kubernetes-validations",
}


def _resolve(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _resolve(merged, defs)
    return node


def to_structural(node: JsonSchema, defs: dict[str, JsonSchema]) -> JsonSchema:
    """One JSON Schema node (pydantic flavour) as a structural OpenAPI v3 node."""
    node = _resolve(node, defs)
    nullable = False
    if "anyOf" in node:
        options = [_resolve(o, defs) for o in node["anyOf"]]
        non_null = [o for o in options if o.get("type") != "null"]
        nullable = len(non_null) < len(options)
        if len(non_null) != 1:
            raise ValueError(f"cannot express a union in a structural schema: {node}")
        outer = {k: v for k, v in node.items() if k != "anyOf"}
        node = {**non_null[0], **outer}
    out: JsonSchema = {}
    if "const" in node:
        out["enum"] = [node["const"]]
        out["type"] = "string"
    for key, value in node.items():
        if key in _KEPT:
            out[key] = value
    if "exclusiveMinimum" in node:
        out["minimum"] = node["exclusiveMinimum"]
        out["exclusiveMinimum"] = True
    if "exclusiveMaximum" in node:
        out["maximum"] = node["exclusiveMaximum"]
        out["exclusiveMaximum"] = True
    if "enum" in out and "type" not in out:
        out["type"] = "string"
    kind = out.get("type")
    if kind == "object" or "properties" in node:
        out["type"] = "object"
        if "properties" in node:
            out["properties"] = {
                name: to_structural(child, defs) for name, child in node["properties"].items()
            }
        extra = node.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            out["additionalProperties"] = to_structural(extra, defs)
        elif extra is not False and "properties" not in node:
            # dict[str, Any]: free-form on purpose (extraArgs); keep what users write.
            out["x-kubernetes-preserve-unknown-fields"] = True
        if node.get("x-kubernetes-preserve-unknown-fields"):
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = to_structural(node.get("items", {}), defs)
    elif kind is None:
        raise ValueError(f"untyped schema node: {node}")
    if nullable:
        out["nullable"] = True
        if out.get("default") is None:
            out.pop("default", None)
    if "required" in out and not out["required"]:
        out.pop("required")
    return out


def _with_object_defaults(schema: JsonSchema) -> JsonSchema:
    """Give optional sub-objects `default: {}` so the API server fills their field defaults."""
    required = set(schema.get("required", ()))
    for name, child in schema.get("properties", {}).items():
        optional = name not in required and not child.get("nullable")
        if optional and child.get("type") == "object" and "properties" in child:
            child.setdefault("default", {})
        _with_object_defaults(child)
    if "items" in schema:
        _with_object_defaults(schema["items"])
    return schema


def model_schema(model: type[Any]) -> JsonSchema:
    raw = model.model_json_schema(mode="validation")
    defs = raw.pop("$defs", {})
    return _with_object_defaults(to_structural(raw, defs))


def _object_schema(kind: str, description: str, spec: JsonSchema, status: JsonSchema) -> JsonSchema:
    return {
        "type": "object",
        "description": description,
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": f"{GROUP}/{VERSION}"},
            "kind": {"type": "string", "description": kind},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def openapi_v3_schema() -> JsonSchema:
    spec = model_schema(SFTJobSpec)
    spec["description"] = "What to fine-tune, on which data, how, and on which hardware."
    status = model_schema(SFTJobStatus)
    status["description"] = "Observed state, written by the operator and the trainer."
    return _object_schema(
        KIND,
        "SFTJob fine-tunes a language model with TRL's SFTTrainer "
        "(full, LoRA or QLoRA) on one or many GPU nodes.",
        spec,
        status,
    )


def profile_openapi_v3_schema() -> JsonSchema:
    spec = model_schema(SFTProfileSpec)
    spec["description"] = (
        "Which namespaces use the profile, the defaults merged under their jobs, and the limits "
        "their jobs must keep."
    )
    status = model_schema(SFTProfileStatus)
    status["description"] = "Observed state."
    return _object_schema(
        PROFILE_KIND,
        "SFTProfile is a platform admin's settings for the SFTJobs of selected namespaces: "
        "defaults (image, node pool, queue, model cache, resources per GPU) and limits "
        "(images, methods, sizes, sources, Secrets, env) that tenants cannot bypass.",
        spec,
        status,
    )


def _crd(
    *,
    kind: str,
    plural: str,
    singular: str,
    short_names: list[str],
    categories: list[str],
    scope: str,
    columns: list[dict[str, Any]],
    schema: JsonSchema,
) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": scope,
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": singular,
                "shortNames": list(short_names),
                "categories": list(categories),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {"openAPIV3Schema": schema},
                }
            ],
        },
    }


def crd_manifest() -> dict[str, Any]:
    return _crd(
        kind=KIND,
        plural=PLURAL,
        singular=SINGULAR,
        short_names=SHORT_NAMES,
        categories=CATEGORIES,
        scope="Namespaced",
        columns=PRINTER_COLUMNS,
        schema=openapi_v3_schema(),
    )


def profile_crd_manifest() -> dict[str, Any]:
    return _crd(
        kind=PROFILE_KIND,
        plural=PROFILE_PLURAL,
        singular=PROFILE_SINGULAR,
        short_names=PROFILE_SHORT_NAMES,
        categories=PROFILE_CATEGORIES,
        scope="Cluster",
        columns=PROFILE_PRINTER_COLUMNS,
        schema=profile_openapi_v3_schema(),
    )


def _as_yaml(manifest: dict[str, Any], source: str) -> str:
    header = f"# GENERATED by `sftjob crd` from operator/sftjob_operator/{source}. Do not edit.\n"
    return header + yaml.safe_dump(manifest, sort_keys=False, width=100)


def crd_yaml() -> str:
    return _as_yaml(crd_manifest(), "api.py")


def profile_crd_yaml() -> str:
    return _as_yaml(profile_crd_manifest(), "profile_api.py")


# File name in crds/ -> its content; `sftjob crd --write crds` writes them all.
CRD_FILES: dict[str, Callable[[], str]] = {
    "sftjob.yaml": crd_yaml,
    "sftprofile.yaml": profile_crd_yaml,
}


def write_crds(folder: Path) -> list[Path]:
    written = []
    for name, render in CRD_FILES.items():
        path = folder / name
        path.write_text(render())
        written.append(path)
    return written
