"""Minimal OpenAPI documents: enough for ``kubectl apply`` to find server-side field validation."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .resources import Registry, ResourceType

VERSION = "v1.32.0"


def _gv_path(group: str, version: str) -> str:
    return f"apis/{group}/{version}" if group else f"api/{version}"


def _definition_name(rt: ResourceType) -> str:
    group = ".".join(reversed(rt.group.split("."))) if rt.group else "io.k8s.api.core"
    return f"{group}.{rt.version}.{rt.kind}"


def _gvk(rt: ResourceType) -> dict[str, str]:
    return {"group": rt.group, "version": rt.version, "kind": rt.kind}


def group_version_doc(registry: Registry, group: str, version: str) -> dict[str, Any] | None:
    types = [rt for rt in registry.all() if (rt.group, rt.version) == (group, version)]
    if not types:
        return None
    paths: dict[str, Any] = {}
    schemas: dict[str, Any] = {}
    field_validation = {
        "name": "fieldValidation",
        "in": "query",
        "description": "fieldValidation instructs the server on how to handle objects containing unknown or duplicate fields.",
        "schema": {"type": "string", "uniqueItems": True},
    }
    for rt in types:
        prefix = f"/{_gv_path(group, version)}"
        base = (
            f"{prefix}/namespaces/{{namespace}}/{rt.plural}"
            if rt.namespaced
            else f"{prefix}/{rt.plural}"
        )
        ok = {"200": {"description": "OK"}}
        paths[base] = {
            "post": {
                "x-kubernetes-action": "post",
                "x-kubernetes-group-version-kind": _gvk(rt),
                "parameters": [field_validation],
                "responses": ok,
            },
            "get": {
                "x-kubernetes-action": "list",
                "x-kubernetes-group-version-kind": _gvk(rt),
                "responses": ok,
            },
        }
        paths[f"{base}/{{name}}"] = {
            op: {
                "x-kubernetes-action": op,
                "x-kubernetes-group-version-kind": _gvk(rt),
                "parameters": [field_validation],
                "responses": ok,
            }
            for op in ("put", "patch")
        }
        definition = (
            dict(rt.schema)
            if rt.schema
            else {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
        )
        definition["x-kubernetes-group-version-kind"] = [_gvk(rt)]
        schemas[_definition_name(rt)] = definition
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": VERSION},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def v3_root(registry: Registry) -> dict[str, Any]:
    gvs = sorted({(rt.group, rt.version) for rt in registry.all()})
    paths = {}
    for group, version in gvs:
        doc = group_version_doc(registry, group, version)
        digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()
        paths[_gv_path(group, version)] = {
            "serverRelativeURL": f"/openapi/v3/{_gv_path(group, version)}?hash={digest}"
        }
    return {"paths": paths}


def v2_doc(registry: Registry) -> dict[str, Any]:
    definitions = {}
    for rt in registry.all():
        definition = dict(rt.schema) if rt.schema else {"type": "object"}
        definition["x-kubernetes-group-version-kind"] = [_gvk(rt)]
        definitions[_definition_name(rt)] = definition
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": VERSION},
        "paths": {},
        "definitions": definitions,
    }
