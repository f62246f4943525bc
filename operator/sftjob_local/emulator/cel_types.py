"""CEL types of a CRD's structural schema, for type-checking validation rules.

The apiserver declares ``self`` with the schema's own types (apiserver/pkg/cel/common
SchemaDeclType): objects have exactly their properties, so ``self.nosuch`` or
``self.replicas + 'x'`` fail at CRD creation. CEL's C++ checker types fields through protobuf
messages, so every object node becomes a generated proto2 message (built in memory, never
evaluated: values are evaluated as plain maps, see cel.py):

integer, string, boolean → int64, string, bool (their wrapper types when ``nullable``, so
``== null`` type-checks); number, int-or-string, formatted strings (date-time, duration, ...)
and objects that only preserve unknown fields → ``google.protobuf.Value`` (dyn: numbers
compare across int and double, as Kubernetes' CrossTypeNumericComparisons allows); arrays →
repeated fields, maps (additionalProperties) → map fields, nested lists and maps inside them
→ ``ListValue``/``Struct``. Property names are escaped as Kubernetes does (``namespace`` →
``__namespace__``, ``foo-bar`` → ``foo__dash__bar``); unescapable ones are not declared.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from cel_expr_python import cel
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, wrappers_pb2

FD = descriptor_pb2.FieldDescriptorProto

RESERVED = {
    "true",
    "false",
    "null",
    "in",
    "as",
    "break",
    "const",
    "continue",
    "else",
    "for",
    "function",
    "if",
    "import",
    "let",
    "loop",
    "package",
    "namespace",
    "return",
    "var",
    "void",
    "while",
}
_ESCAPES = {"__": "__underscores__", ".": "__dot__", "-": "__dash__", "/": "__slash__"}
_ESCAPED = re.compile(r"__|[-./]|[^a-zA-Z0-9_]")
_DYN_FORMATS = {"date-time", "date", "duration", "byte", "int-or-string"}
RESOURCE_ROOT_META = ("name", "generateName")


def escape(name: str) -> str | None:
    """A property name as CEL sees it (apiserver/pkg/cel Escape), or None when unreachable."""
    if not name or name[0].isdigit():
        return None
    if name in RESERVED:
        return f"__{name}__"
    unsupported = False

    def replace(match: re.Match[str]) -> str:
        nonlocal unsupported
        if match.group(0) in _ESCAPES:
            return _ESCAPES[match.group(0)]
        unsupported = True
        return ""

    escaped = _ESCAPED.sub(replace, name)
    return None if unsupported else escaped


def _map_entry_name(field: str) -> str:
    """The nested type name protobuf requires for a map field's entries (MapEntryName)."""
    out, cap_next = "", True
    for char in field:
        if char == "_":
            cap_next = True
        elif cap_next:
            out += char.upper() if "a" <= char <= "z" else char
            cap_next = False
        else:
            out += char
    return out + "Entry"


_POOL: Any = None


def _pool() -> Any:
    global _POOL
    if _POOL is None:
        _POOL = descriptor_pool.DescriptorPool()
        for module in (struct_pb2, wrappers_pb2):
            proto = descriptor_pb2.FileDescriptorProto()
            module.DESCRIPTOR.CopyToProto(proto)
            _POOL.Add(proto)
    return _POOL


def pool() -> Any:
    return _pool()


class _Builder:
    """Generates the messages of one schema node into one proto file."""

    def __init__(self, package: str) -> None:
        self.package = package
        self.file = descriptor_pb2.FileDescriptorProto(
            name=f"{package}.proto",
            package=package,
            syntax="proto2",
            dependency=["google/protobuf/struct.proto", "google/protobuf/wrappers.proto"],
        )
        self.count = 0

    def message(self, schema: dict[str, Any], resource_root: bool) -> str:
        self.count += 1
        name = f"Object{self.count}"
        message = self.file.message_type.add(name=name)
        fields: dict[str, dict[str, Any]] = {}
        if resource_root:
            fields["apiVersion"] = {"type": "string"}
            fields["kind"] = {"type": "string"}
            fields["metadata"] = {
                "type": "object",
                "properties": {k: {"type": "string"} for k in RESOURCE_ROOT_META},
            }
        for prop, child in (schema.get("properties") or {}).items():
            if resource_root and prop in ("apiVersion", "kind", "metadata"):
                continue
            fields[prop] = child if isinstance(child, dict) else {}
        for number, (prop, child) in enumerate(fields.items(), start=1):
            escaped = escape(prop)
            if escaped is None:
                continue
            self.field(message, name, escaped, number, child)
        return f".{self.package}.{name}"

    def field(
        self, message: Any, owner: str, name: str, number: int, schema: dict[str, Any]
    ) -> None:
        kind = schema.get("type")
        if kind == "array" and isinstance(schema.get("items"), dict):
            items = schema["items"]
            if items.get("type") in ("array",):
                self._add(
                    message, name, number, FD.TYPE_MESSAGE, ".google.protobuf.ListValue", True
                )
            elif items.get("type") == "object" and not items.get("properties"):
                self._add(message, name, number, FD.TYPE_MESSAGE, ".google.protobuf.Struct", True)
            else:
                proto_type, type_name = self.scalar_or_message(items, nullable=False)
                self._add(message, name, number, proto_type, type_name, True)
            return
        extra = schema.get("additionalProperties")
        if kind == "object" and isinstance(extra, dict) and not schema.get("properties"):
            entry_name = _map_entry_name(name)
            entry = message.nested_type.add(name=entry_name)
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=FD.TYPE_STRING, label=FD.LABEL_OPTIONAL)
            if extra.get("type") in ("array", "object") and not extra.get("properties"):
                value_type = ".google.protobuf." + (
                    "ListValue" if extra.get("type") == "array" else "Struct"
                )
                entry.field.add(
                    name="value",
                    number=2,
                    type=FD.TYPE_MESSAGE,
                    type_name=value_type,
                    label=FD.LABEL_OPTIONAL,
                )
            else:
                proto_type, type_name = self.scalar_or_message(extra, nullable=False)
                value = entry.field.add(
                    name="value", number=2, type=proto_type, label=FD.LABEL_OPTIONAL
                )
                if type_name:
                    value.type_name = type_name
            type_name = f".{self.package}.{owner}.{entry_name}"
            self._add(message, name, number, FD.TYPE_MESSAGE, type_name, True)
            return
        proto_type, type_name = self.scalar_or_message(schema, bool(schema.get("nullable")))
        self._add(message, name, number, proto_type, type_name, False)

    def scalar_or_message(self, schema: dict[str, Any], nullable: bool) -> tuple[int, str]:
        kind = schema.get("type")
        dyn = (FD.TYPE_MESSAGE, ".google.protobuf.Value")
        if schema.get("x-kubernetes-int-or-string") or schema.get("format") in _DYN_FORMATS:
            return dyn
        if kind == "integer":
            return (
                (FD.TYPE_MESSAGE, ".google.protobuf.Int64Value")
                if nullable
                else (FD.TYPE_INT64, "")
            )
        if kind == "string":
            return (
                (FD.TYPE_MESSAGE, ".google.protobuf.StringValue")
                if nullable
                else (FD.TYPE_STRING, "")
            )
        if kind == "boolean":
            return (
                (FD.TYPE_MESSAGE, ".google.protobuf.BoolValue") if nullable else (FD.TYPE_BOOL, "")
            )
        if kind == "object" and (schema.get("properties") or schema.get("additionalProperties")):
            if schema.get("properties"):
                return FD.TYPE_MESSAGE, self.message(
                    schema, bool(schema.get("x-kubernetes-embedded-resource"))
                )
            return FD.TYPE_MESSAGE, ".google.protobuf.Struct"
        return dyn

    @staticmethod
    def _add(
        message: Any, name: str, number: int, proto_type: int, type_name: str, repeated: bool
    ) -> None:
        field = message.field.add(
            name=name,
            number=number,
            type=proto_type,
            label=FD.LABEL_REPEATED if repeated else FD.LABEL_OPTIONAL,
            json_name=name,
        )
        if type_name:
            field.type_name = type_name


_TYPES: dict[str, Any] = {}


def self_type(schema: dict[str, Any] | None, resource_root: bool = False) -> Any:
    """The CEL type of ``self`` at a schema node, its objects declared as proto messages
    (None when protobuf cannot express the schema)."""
    if not schema:
        return cel.Type.DYN
    key = hashlib.sha256(
        json.dumps([schema, resource_root], sort_keys=True, default=str).encode()
    ).hexdigest()[:24]
    if key not in _TYPES:
        builder = _Builder(f"crd_{key}")
        declared = _declared(schema, resource_root, builder)
        if builder.file.message_type:
            try:
                _pool().Add(builder.file)
            except (TypeError, ValueError):
                # A schema protobuf cannot express (e.g. two map fields whose entry names
                # collide): the rules are then checked with dyn objects, as before.
                declared = None
        _TYPES[key] = declared
    return _TYPES[key]


def _declared(schema: dict[str, Any], resource_root: bool, builder: _Builder) -> Any:
    kind = schema.get("type")
    if schema.get("x-kubernetes-int-or-string") or schema.get("format") in _DYN_FORMATS:
        return cel.Type.DYN
    if kind == "integer":
        return cel.Type.INT
    if kind == "string":
        return cel.Type.STRING
    if kind == "boolean":
        return cel.Type.BOOL
    if kind == "array":
        items = schema.get("items")
        return cel.Type.List(
            _declared(items, False, builder) if isinstance(items, dict) else cel.Type.DYN
        )
    if kind == "object":
        extra = schema.get("additionalProperties")
        if schema.get("properties") or resource_root:
            return cel.Type(builder.message(schema, resource_root).lstrip("."))
        if isinstance(extra, dict):
            return cel.Type.Map(cel.Type.STRING, _declared(extra, False, builder))
    return cel.Type.DYN
