"""CustomResourceDefinition generated from the typed API model.

Kubernetes wants a *structural* OpenAPI v3 schema: no $ref, every node typed,
nullable instead of anyOf-with-null, OpenAPI 3.0's boolean exclusiveMinimum. This
module turns pydantic's JSON Schema into that, keeping every field's description
so `kubectl explain sftjob.spec.training` is useful. `crds/sftjob.yaml` is the
output of `sftjob crd`; a test fails when the committed file drifts.
"""

from __future__ import annotations

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
        "description": "Optimizer step / total steps.",
    },
    {
        "name": "Epoch",
        "type": "number",
        "jsonPath": ".status.progress.epoch",
        "description": "Epochs done.",
    },
    {
        "name": "Loss",
        "type": "number",
        "jsonPath": ".status.progress.loss",
        "description": "Latest training loss.",
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


def openapi_v3_schema() -> JsonSchema:
    spec = model_schema(SFTJobSpec)
    spec["description"] = "What to fine-tune, on which data, how, and on which hardware."
    status = model_schema(SFTJobStatus)
    status["description"] = "Observed state, written by the operator and the trainer."
    return {
        "type": "object",
        "description": "SFTJob fine-tunes a language model with TRL's SFTTrainer "
        "(full, LoRA or QLoRA) on one or many GPU nodes.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "tuning.sftjob.dev/v1alpha1"},
            "kind": {"type": "string", "description": "SFTJob"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


def crd_manifest() -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{GROUP}"},
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": list(CATEGORIES),
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_v3_schema()},
                }
            ],
        },
    }


def crd_yaml() -> str:
    header = "# GENERATED by `sftjob crd` from operator/sftjob_operator/api.py. Do not edit.\n"
    return header + yaml.safe_dump(crd_manifest(), sort_keys=False, width=100)
