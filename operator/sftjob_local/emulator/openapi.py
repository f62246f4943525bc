"""OpenAPI documents as kubectl reads them.

``/openapi/v3`` (root + one JSON document per group-version) is what ``kubectl apply`` uses to
find server-side field validation and what ``kubectl explain`` renders: the CRD schemas are
served there under ``components.schemas`` with ``x-kubernetes-group-version-kind``.

``/openapi/v2`` is fetched by client-go only as protobuf (``Accept:
application/com.github.proto-openapi.spec.v2@v1.0+protobuf``): kubectl's client-side validation
(used for kinds the v3 documents do not know yet, e.g. a custom resource whose CRD is applied in
the same ``kubectl apply``) and ``kubectl explain --output=plaintext-openapiv2``. It is served
as gnostic's ``openapi.v2.Document`` protobuf when asked for, as JSON otherwise
(:func:`negotiate`); a JSON body sent to a protobuf-only client fails in kubectl with
``proto: cannot parse invalid wire-format data``.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from .protobuf import encode_varint
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


def _v2_schema(schema: Any) -> Any:
    """A CRD's structural schema as the v2 document publishes it (what kubectl's proto models parse).

    Unknown-field-preserving objects lose ``type``/``properties`` (arbitrary values: client-side
    validation must not reject their fields); arrays without ``items`` lose ``type`` (kubectl
    rejects a whole v2 document with such an array); OpenAPI v3-only keywords are dropped.
    """
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in ("properties",) and isinstance(value, dict):
            out[key] = {name: _v2_schema(sub) for name, sub in value.items()}
        elif key == "items":
            out[key] = _v2_schema(value)
        elif key == "additionalProperties":
            out[key] = _v2_schema(value) if isinstance(value, dict) else value
        elif key in ("oneOf", "anyOf", "not", "nullable", "allOf"):
            continue
        else:
            out[key] = value
    if out.get("x-kubernetes-preserve-unknown-fields") or out.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out.pop("properties", None)
        out.pop("additionalProperties", None)
    if out.get("type") == "array" and not isinstance(out.get("items"), dict):
        out.pop("type", None)
    return out


def v2_doc(registry: Registry) -> dict[str, Any]:
    definitions = {}
    for rt in registry.all():
        # Built-ins carry no schema here: arbitrary objects (client-side validation passes them).
        definition = _v2_schema(rt.schema) if rt.schema else {}
        definition["x-kubernetes-group-version-kind"] = [_gvk(rt)]
        definitions[_definition_name(rt)] = definition
    return {
        "swagger": "2.0",
        "info": {"title": "Kubernetes", "version": VERSION},
        "paths": {},
        "definitions": definitions,
    }


# ---------------------------------------------------------------- protobuf (gnostic openapi.v2)
# Field numbers from gnostic's openapiv2/OpenAPIv2.proto (package openapi.v2).
_SCHEMA_STRINGS = {"$ref": 1, "format": 2, "title": 3, "description": 4, "pattern": 13}
_SCHEMA_DOUBLES = {"multipleOf": 6, "maximum": 7, "minimum": 9}
_SCHEMA_BOOLS = {"exclusiveMaximum": 8, "exclusiveMinimum": 10, "uniqueItems": 16, "readOnly": 27}
_SCHEMA_INTS = {
    "maxLength": 11,
    "minLength": 12,
    "maxItems": 14,
    "minItems": 15,
    "maxProperties": 17,
    "minProperties": 18,
}


def _key(field: int, wire: int) -> bytes:
    return encode_varint(field << 3 | wire)


def _bytes_field(field: int, data: bytes) -> bytes:
    return _key(field, 2) + encode_varint(len(data)) + data


def _str_field(field: int, text: str) -> bytes:
    return _bytes_field(field, text.encode())


def _any(value: Any) -> bytes:
    # openapi.v2.Any{yaml = 2}: JSON is valid YAML, and what kubectl parses the value from.
    return _str_field(2, json.dumps(value))


def _named(field: int, name: str, value: bytes) -> bytes:
    return _bytes_field(field, _str_field(1, name) + _bytes_field(2, value))


def _schema_pb(schema: dict[str, Any]) -> bytes:
    out = bytearray()
    for key, field in _SCHEMA_STRINGS.items():
        if isinstance(schema.get(key), str):
            out += _str_field(field, schema[key])
    if "default" in schema:
        out += _bytes_field(5, _any(schema["default"]))
    for key, field in _SCHEMA_DOUBLES.items():
        value = schema.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out += _key(field, 1) + struct.pack("<d", float(value))
    for key, field in _SCHEMA_BOOLS.items():
        if schema.get(key) is True:
            out += _key(field, 0) + b"\x01"
    for key, field in _SCHEMA_INTS.items():
        value = schema.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            out += _key(field, 0) + encode_varint(value)
    for name in schema.get("required") or ():
        out += _str_field(19, str(name))
    for value in schema.get("enum") or ():
        out += _bytes_field(20, _any(value))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        out += _bytes_field(21, _bytes_field(1, _schema_pb(extra)))
    elif isinstance(extra, bool):
        out += _bytes_field(21, _key(2, 0) + (b"\x01" if extra else b"\x00"))
    if isinstance(schema.get("type"), str):
        out += _bytes_field(22, _str_field(1, schema["type"]))
    if isinstance(schema.get("items"), dict):
        out += _bytes_field(23, _bytes_field(1, _schema_pb(schema["items"])))
    if isinstance(schema.get("properties"), dict):
        props = b"".join(
            _named(1, name, _schema_pb(sub))
            for name, sub in schema["properties"].items()
            if isinstance(sub, dict)
        )
        out += _bytes_field(25, props)
    for key, value in schema.items():
        if key.startswith("x-"):
            out += _named(31, key, _any(value))
    return bytes(out)


def v2_protobuf(doc: dict[str, Any]) -> bytes:
    """The v2 document as ``openapi.v2.Document`` protobuf (swagger, info, definitions)."""
    info = doc.get("info") or {}
    out = bytearray(_str_field(1, doc.get("swagger", "2.0")))
    out += _bytes_field(
        2, _str_field(1, info.get("title", "")) + _str_field(2, info.get("version", ""))
    )
    out += _bytes_field(8, b"")
    definitions = b"".join(
        _named(1, name, _schema_pb(schema)) for name, schema in doc.get("definitions", {}).items()
    )
    out += _bytes_field(9, definitions)
    return bytes(out)


# ---------------------------------------------------------------- content negotiation
V2_PROTOBUF = "application/com.github.proto-openapi.spec.v2@v1.0+protobuf"
V3_PROTOBUF = "application/com.github.proto-openapi.spec.v3@v1.0+protobuf"


def negotiate(accept: str, protobuf: str | None) -> str | None:
    """The media type to answer with: JSON when acceptable (or nothing was asked), ``protobuf``
    when only that is, None (406) when neither is acceptable."""
    types = [part.split(";")[0].strip().lower() for part in accept.split(",") if part.strip()]
    if not types or any(t in ("application/json", "application/*", "*/*") for t in types):
        return "application/json"
    if protobuf is not None and protobuf in types:
        return protobuf
    return None
