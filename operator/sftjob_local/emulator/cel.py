"""CRD validation rules: ``x-kubernetes-validations`` (CEL), evaluated as the apiserver does.

The expressions run on Google's CEL C++ runtime (``cel-expr-python``: parser, type checker,
the strings, optional and bindings extensions); this module only does what the apiextensions
apiserver does around it, after k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel
(validation.go, compilation.go) and pkg/apis/apiextensions/validation/validation.go:

- ``check_crd_rules``: at CRD create/update ``message`` must be one line (and is required
  for a multi-line rule), ``reason`` one of the four field error reasons, ``fieldPath`` a
  field of the schema; then every rule and messageExpression must compile, ``oldSelf`` may
  not be used below items of a list that is not a map-list, ``optionalOldSelf`` needs a
  rule that reads ``oldSelf``; else 422 on the CRD
  (``spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule:
  Invalid value: apiextensions.ValidationRule{...}: compilation failed: ERROR: <input>:...``).
- ``validate``: on every write of a custom resource, each rule runs with ``self`` bound to
  its node (rules at any depth: properties, list items, additionalProperties values; numbers
  of ``number`` nodes are doubles). Null
  values are skipped, and null fields of an object read as absent. Transition rules (that
  read ``oldSelf``) run only on update where an old value correlates (object properties,
  map keys; items of plain lists do not correlate), unless ``optionalOldSelf`` makes
  ``oldSelf`` an optional. A false result gives the rule's ``message``, else the string of
  ``messageExpression``, else ``failed rule: <rule>``, at the node's path plus ``fieldPath``,
  with ``reason`` (FieldValueInvalid by default: ``spec: Invalid value: "object": <msg>``).
  Validation ratcheting (on by default since 1.30): a failing rule that does not read
  ``oldSelf`` is not an error on an update that leaves its node unchanged.

Type checking: rules and messageExpressions are checked with ``self``/``oldSelf`` typed from
the schema (cel_types.py: objects as generated protobuf messages, so an undefined field or a
wrong operand type refuses the CRD, as on a real server), then evaluated over plain maps with
property names escaped (``foo-bar`` → ``self.foo__dash__bar``).

Simplified: no cost estimation or runtime cost budget; ``number`` fields and formatted
strings (date-time, duration) are dyn in the checker; of Kubernetes' own libraries only lists
(isSorted, sum, min, max, indexOf, lastIndexOf) and regex (find, findAll) are declared:
rules using quantity, urls or authz are refused at CRD creation ("undeclared reference"),
where a real server accepts them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from cel_expr_python import cel
from cel_expr_python.ext import ext_bindings, ext_optional, ext_strings

from . import cel_types

REASONS = ("FieldValueDuplicate", "FieldValueForbidden", "FieldValueInvalid", "FieldValueRequired")
_OLD_SELF = re.compile(r"\boldSelf\b")
_RESOURCE_ROOT_META = ("name", "generateName")


# --------------------------------------------------------------------------- types and values


def _cel_type(schema: dict[str, Any] | None) -> Any:
    """The CEL type ``self`` has at a schema node (model.SchemaDeclType, simplified)."""
    if not schema or schema.get("x-kubernetes-int-or-string"):
        return cel.Type.DYN
    kind = schema.get("type")
    if kind == "string":
        return cel.Type.STRING
    if kind == "integer":
        return cel.Type.INT
    if kind == "boolean":
        return cel.Type.BOOL
    if kind == "array":
        return cel.Type.List(_cel_type(schema.get("items")))
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and not schema.get("properties"):
            return cel.Type.Map(cel.Type.STRING, _cel_type(extra))
        return cel.Type.Map(cel.Type.STRING, cel.Type.DYN)
    # number: a double that the runtime compares with ints (CrossTypeNumericComparisons).
    return cel.Type.DYN


def _type_key(schema: dict[str, Any] | None) -> str:
    return str(_cel_type(schema).name())


def to_cel_value(value: Any, schema: dict[str, Any] | None, resource_root: bool = False) -> Any:
    """A JSON value as the rule sees it (UnstructuredToVal): numbers of ``number`` nodes are
    doubles, null fields of objects are absent, property names are escaped
    (``foo-bar`` → ``foo__dash__bar``), a resource root shows only metadata.name and
    metadata.generateName."""
    if value is None or not schema:
        return value
    kind = schema.get("type")
    if kind == "number" and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, list):
        return [to_cel_value(v, schema.get("items")) for v in value]
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        out: dict[str, Any] = {}
        for key, item in value.items():
            if key in props:
                name = cel_types.escape(key)
                if item is None or name is None:
                    continue  # "null valued nodes shall be considered absent"
                out[name] = to_cel_value(
                    item, props[key], bool(props[key].get("x-kubernetes-embedded-resource"))
                )
            elif isinstance(extra, dict):
                out[key] = to_cel_value(item, extra)
            elif props and not schema.get("x-kubernetes-preserve-unknown-fields"):
                continue
            else:
                out[key] = item
        if resource_root:
            for key in ("apiVersion", "kind"):
                if key in value:
                    out[key] = value[key]
            meta = value.get("metadata") or {}
            out["metadata"] = {k: meta[k] for k in _RESOURCE_ROOT_META if k in meta}
        return out
    return value


# --------------------------------------------------------------------------- libraries


def _index_of(items: list[Any], wanted: Any) -> int:
    return next((i for i, item in enumerate(items) if item == wanted), -1)


def _last_index_of(items: list[Any], wanted: Any) -> int:
    found = [i for i, item in enumerate(items) if item == wanted]
    return found[-1] if found else -1


def _extreme(pick: Any, name: str) -> Any:
    def impl(items: list[Any]) -> Any:
        if not items:
            raise ValueError(f"{name} called on empty list")
        return pick(items)

    return impl


def _find_all(text: str, pattern: str, limit: int = -1) -> list[str]:
    found = [m.group(0) for m in re.finditer(pattern, text)]
    return found if limit < 0 else found[:limit]


def _kubernetes_libraries() -> Any:
    """Kubernetes' CEL lists and regex libraries (k8s.io/apiserver/pkg/cel/library lists.go,
    regex.go); regexes run on Python's re, which agrees with RE2 on the common syntax."""
    any_list = cel.Type.List(cel.Type.DYN)
    string, integer = cel.Type.STRING, cel.Type.INT

    def member(name: str, overload: str, result: Any, params: list[Any], impl: Any) -> Any:
        return cel.FunctionDecl(
            name, [cel.Overload(overload, result, params, is_member=True, impl=impl)]
        )

    return cel.CelExtension(
        "kubernetes",
        [
            member(
                "isSorted",
                "list_is_sorted",
                cel.Type.BOOL,
                [any_list],
                lambda xs: all(a <= b for a, b in zip(xs, xs[1:], strict=False)),
            ),
            member("sum", "list_sum", cel.Type.DYN, [any_list], lambda xs: sum(xs)),
            member("min", "list_min", cel.Type.DYN, [any_list], _extreme(min, "min")),
            member("max", "list_max", cel.Type.DYN, [any_list], _extreme(max, "max")),
            member("indexOf", "list_index_of", integer, [any_list, cel.Type.DYN], _index_of),
            member(
                "lastIndexOf",
                "list_last_index_of",
                integer,
                [any_list, cel.Type.DYN],
                _last_index_of,
            ),
            member(
                "find",
                "string_find",
                string,
                [string, string],
                lambda text, pattern: next(iter(_find_all(text, pattern, 1)), ""),
            ),
            cel.FunctionDecl(
                "findAll",
                [
                    cel.Overload(
                        "string_find_all",
                        cel.Type.List(string),
                        [string, string],
                        is_member=True,
                        impl=_find_all,
                    ),
                    cel.Overload(
                        "string_find_all_n",
                        cel.Type.List(string),
                        [string, string, integer],
                        is_member=True,
                        impl=_find_all,
                    ),
                ],
            ),
        ],
    )


# --------------------------------------------------------------------------- compilation

_ENVS: dict[tuple[str, bool], Any] = {}


def _env(schema: dict[str, Any] | None, optional_old_self: bool) -> Any:
    key = (_type_key(schema), optional_old_self)
    if key not in _ENVS:
        _ENVS[key] = _new_env(_cel_type(schema), optional_old_self)
    return _ENVS[key]


_TYPED_ENVS: dict[tuple[str, bool], Any] = {}


def _typed_env(schema: dict[str, Any] | None, resource_root: bool, optional_old_self: bool) -> Any:
    """The environment rules are checked in: ``self`` typed from the schema (cel_types)."""
    self_type = cel_types.self_type(schema, resource_root)
    if self_type is None:
        return _env(schema, optional_old_self)
    key = (str(self_type.name()), optional_old_self)
    if key not in _TYPED_ENVS:
        _TYPED_ENVS[key] = _new_env(self_type, optional_old_self, descriptor_pool=cel_types.pool())
    return _TYPED_ENVS[key]


def _new_env(self_type: Any, optional_old_self: bool, **options: Any) -> Any:
    """A CEL environment with ``self`` (and ``oldSelf``) of `self_type` and the
    Kubernetes extensions; `options` go to ``cel.NewEnv`` as they are."""
    variables = {"self": self_type}
    if optional_old_self:
        # oldSelf is bound to an optional inside cel.bind (see _wrap_optional).
        variables["__oldSelfValue"] = self_type
        variables["__hasOldSelf"] = cel.Type.BOOL
    else:
        variables["oldSelf"] = self_type
    return new_environment(variables, **options)


def new_environment(variables: dict[str, Any], **options: Any) -> Any:
    """A CEL environment declaring `variables` (name → CEL type), with the extensions every
    Kubernetes CEL expression has (strings, optional, bindings, lists, regex): CRD rules
    here, admission policies in admission_policy_api.py."""
    return cel.NewEnv(
        **options,
        variables=variables,
        extensions=[
            ext_strings.ExtStrings(),
            ext_optional.ExtOptional(),
            ext_bindings.ExtBindings(),
            _kubernetes_libraries(),
        ],
    )


class _WrongType(Exception):
    pass


def _compile(
    text: str, schema: dict[str, Any], resource_root: bool, optional: bool, want: Any
) -> Any:
    """Type-check ``text`` against the schema's types (RuntimeError with the checker's words,
    _WrongType when it cannot yield ``want``), then compile it for evaluation over maps."""
    source = text
    if optional:
        # Parse errors keep the user's columns; then check the rule with oldSelf optional.
        _env(schema, False).compile(text, disable_check=True)
        source = _wrap_optional(text)
    checked = _typed_env(schema, resource_root, optional).compile(source)
    if not _may_be(checked, want):
        raise _WrongType
    return _env(schema, optional).compile(source)


def _wrap_optional(rule: str) -> str:
    return (
        f"cel.bind(oldSelf, __hasOldSelf ? optional.of(__oldSelfValue) : optional.none(), ({rule}))"
    )


def compile_error_text(exc: Exception) -> str:
    """The checker's error as cel-go prints it (``ERROR: <input>:1:5: ...``)."""
    text = str(exc).strip()
    text = re.sub(r"^[A-Z_]+: ", "", text)
    return re.sub(r"\s*\[[A-Z_]+\]$", "", text)


@dataclass
class CompiledRule:
    rule: dict[str, Any]
    program: Any = None
    message_program: Any = None
    uses_old_self: bool = False
    optional_old_self: bool = False
    field_path: str = ""
    errors: list[tuple[str, str, Any, str]] = field(default_factory=list)
    # (what: rule|messageExpression|reason|fieldPath|optionalOldSelf, cause reason, value, message)


def _may_be(program: Any, wanted: Any) -> bool:
    """Whether a checked expression's type is ``wanted`` (or dyn: known only at run time)."""
    kind = program.return_type()
    return bool(kind == wanted or kind == cel.Type.DYN)


def _newlines(text: str) -> bool:
    return bool(re.search(r"[\n\r]", text))


def _rule_schema_errors(
    rule: dict[str, Any], schema: dict[str, Any]
) -> list[tuple[str, str, Any, str]]:
    """The checks the apiserver makes before compiling (message, reason, fieldPath)."""
    errors: list[tuple[str, str, Any, str]] = []
    text = str(rule.get("rule") or "").strip()
    message = rule.get("message") or ""
    if message and not message.strip():
        errors.append(
            ("message", "FieldValueInvalid", message, "message must be non-empty if specified")
        )
    elif _newlines(message.strip()):
        errors.append(
            ("message", "FieldValueInvalid", message, "message must not contain line breaks")
        )
    elif _newlines(text) and not message.strip():
        errors.append(
            (
                "message",
                "FieldValueRequired",
                None,
                "message must be specified if rule contains line breaks",
            )
        )
    expression = rule.get("messageExpression") or ""
    if expression and not expression.strip():
        errors.append(
            (
                "messageExpression",
                "FieldValueRequired",
                None,
                "messageExpression must be non-empty if specified",
            )
        )
    reason = rule.get("reason")
    if reason is not None and reason not in REASONS:
        supported = ", ".join(json.dumps(r) for r in REASONS)
        errors.append(
            ("reason", "FieldValueNotSupported", reason, f"supported values: {supported}")
        )
    path = rule.get("fieldPath") or ""
    if path and not path.strip():
        errors.append(
            ("fieldPath", "FieldValueInvalid", path, "fieldPath must be non-empty if specified")
        )
    elif _newlines(path):
        errors.append(
            ("fieldPath", "FieldValueInvalid", path, "fieldPath must not contain line breaks")
        )
    elif path:
        try:
            normalize_field_path(path, schema)
        except ValueError:
            errors.append(
                ("fieldPath", "FieldValueInvalid", path, "fieldPath must be a valid path")
            )
    return errors


def compile_rule(
    rule: dict[str, Any], schema: dict[str, Any], resource_root: bool = False
) -> CompiledRule:
    """Compile one x-kubernetes-validations entry for a schema node; errors are collected
    (in the order and words of ValidateCustomResourceDefinitionOpenAPISchema)."""
    result = CompiledRule(rule=rule)
    result.errors = _rule_schema_errors(rule, schema)
    if result.errors:
        return result  # the apiserver does not compile rules of a node with schema errors
    text = rule.get("rule") or ""
    if not isinstance(text, str) or not text.strip():
        result.errors.append(("rule", "FieldValueRequired", None, "rule is not specified"))
        return result
    if rule.get("fieldPath"):
        result.field_path = normalize_field_path(rule["fieldPath"], schema)
    result.uses_old_self = bool(_OLD_SELF.search(text))
    result.optional_old_self = bool(rule.get("optionalOldSelf"))
    optional = result.optional_old_self and result.uses_old_self
    try:
        result.program = _compile(text, schema, resource_root, optional, cel.Type.BOOL)
    except RuntimeError as exc:
        result.errors.append(
            ("rule", "FieldValueInvalid", rule, f"compilation failed: {compile_error_text(exc)}")
        )
    except _WrongType:
        result.errors.append(
            ("rule", "FieldValueInvalid", rule, "cel expression must evaluate to a bool")
        )
    expression = rule.get("messageExpression")
    if expression and result.program is not None:
        # As compilation.go: the messageExpression is compiled once the rule compiled.
        try:
            result.message_program = _compile(
                expression, schema, resource_root, False, cel.Type.STRING
            )
        except RuntimeError as exc:
            result.errors.append(
                (
                    "messageExpression",
                    "FieldValueInvalid",
                    rule,
                    f"messageExpression compilation failed: {compile_error_text(exc)}",
                )
            )
        except _WrongType:
            result.errors.append(
                (
                    "messageExpression",
                    "FieldValueInvalid",
                    rule,
                    "messageExpression must evaluate to a string",
                )
            )
    if not result.uses_old_self and rule.get("optionalOldSelf") is not None:
        result.errors.append(
            (
                "optionalOldSelf",
                "FieldValueInvalid",
                rule["optionalOldSelf"],
                "may not be set if oldSelf is not used in rule",
            )
        )
    return result


def normalize_field_path(path: str, schema: dict[str, Any]) -> str:
    """``.a.b['c']`` checked against the schema (ValidFieldPath) and written as a field path."""
    tokens = re.findall(r"\[\s*'((?:[^'\\]|\\.)*)'\s*\]|\.([^.\[\]]+)|(.)", path)
    out = ""
    node: dict[str, Any] | None = schema
    for quoted, dotted, stray in tokens:
        if stray:
            raise ValueError(f"expected [ or . but got: {stray}")
        name = dotted or quoted.replace("\\'", "'")
        if node is None:
            raise ValueError("does not refer to a valid field")
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props is not None:
            if name not in props:
                raise ValueError("does not refer to a valid field")
            out = f"{out}.{name}" if out else name
            node = props[name]
        elif isinstance(extra, dict):
            out = f"{out}[{name}]"
            node = extra
        else:
            raise ValueError("does not refer to a valid field")
    return out


# --------------------------------------------------------------------------- CRD checks

_GO_STRING = json.dumps


def _rule_repr(rule: dict[str, Any]) -> str:
    """The rule as the apiserver prints it in a CRD error (Go's %#v of ValidationRule)."""
    reason = rule.get("reason")
    optional = rule.get("optionalOldSelf")
    return (
        "apiextensions.ValidationRule{"
        f"Rule:{_GO_STRING(rule.get('rule') or '')}, "
        f"Message:{_GO_STRING(rule.get('message') or '')}, "
        f"MessageExpression:{_GO_STRING(rule.get('messageExpression') or '')}, "
        f"Reason:(*apiextensions.FieldValueErrorReason)({'nil' if reason is None else '0xc000000000'}), "
        f"FieldPath:{_GO_STRING(rule.get('fieldPath') or '')}, "
        f"OptionalOldSelf:(*bool)({'nil' if optional is None else '0xc000000000'})"
        "}"
    )


def _show(value: Any) -> str:
    if isinstance(value, dict) and "rule" in value:
        return _rule_repr(value)
    return json.dumps(value)


def _schema_nodes(
    schema: dict[str, Any], path: str, uncorrelatable: str | None
) -> list[tuple[dict[str, Any], str, str | None]]:
    """Every schema node with its CRD field path, and the path of the highest node below which
    old values do not correlate (items of lists that are not map-lists, atomic maps)."""
    nodes = [(schema, path, uncorrelatable)]
    for name, child in (schema.get("properties") or {}).items():
        if isinstance(child, dict):
            nodes += _schema_nodes(child, f"{path}.properties[{name}]", uncorrelatable)
    items = schema.get("items")
    if isinstance(items, dict):
        inner = f"{path}.items"
        plain = schema.get("x-kubernetes-list-type") != "map"
        nodes += _schema_nodes(items, inner, uncorrelatable or (inner if plain else None))
    extra = schema.get("additionalProperties")
    if isinstance(extra, dict):
        inner = f"{path}.additionalProperties"
        atomic = schema.get("x-kubernetes-map-type") == "atomic"
        nodes += _schema_nodes(extra, inner, uncorrelatable or (inner if atomic else None))
    return nodes


def check_crd_rules(crd_spec: dict[str, Any]) -> list[dict[str, str]]:
    """422 causes for the x-kubernetes-validations of a CRD's schemas (empty when all is well)."""
    versions = [v for v in crd_spec.get("versions") or [] if isinstance(v, dict)]
    schemas = [((v.get("schema") or {}).get("openAPIV3Schema")) for v in versions]
    # One schema for every version is validated where the internal API keeps it.
    if schemas and all(
        json.dumps(s, sort_keys=True) == json.dumps(schemas[0], sort_keys=True) for s in schemas
    ):
        located = [("spec.validation.openAPIV3Schema", schemas[0])]
    else:
        located = [(f"spec.versions[{i}].schema.openAPIV3Schema", s) for i, s in enumerate(schemas)]
    causes: list[dict[str, str]] = []
    for base, schema in located:
        if not isinstance(schema, dict):
            continue
        for node, path, uncorrelatable in _schema_nodes(schema, base, None):
            for index, rule in enumerate(node.get("x-kubernetes-validations") or []):
                where = f"{path}.x-kubernetes-validations[{index}]"
                if not isinstance(rule, dict):
                    continue
                root = node is schema or bool(node.get("x-kubernetes-embedded-resource"))
                compiled = compile_rule(rule, node, root)
                if compiled.uses_old_self and uncorrelatable:
                    compiled.errors.append(
                        (
                            "rule",
                            "FieldValueInvalid",
                            rule.get("rule"),
                            "oldSelf cannot be used on the uncorrelatable portion of the schema "
                            f"within {uncorrelatable}",
                        )
                    )
                for what, reason, value, message in compiled.errors:
                    label = {
                        "FieldValueRequired": "Required value",
                        "FieldValueNotSupported": f"Unsupported value: {_show(value)}",
                    }.get(reason, f"Invalid value: {_show(value)}")
                    text = label if message == label else f"{label}: {message}"
                    causes.append({"reason": reason, "message": text, "field": f"{where}.{what}"})
    return causes


# --------------------------------------------------------------------------- evaluation

# Compiled rules per (rule, schema node) object: a registered CRD's schema lives as long as
# the CRD, and the cached references keep the ids from being reused meanwhile.
_COMPILED: dict[tuple[int, int], tuple[dict[str, Any], dict[str, Any], CompiledRule]] = {}


def _compiled(rule: dict[str, Any], schema: dict[str, Any], resource_root: bool) -> CompiledRule:
    key = (id(rule), id(schema))
    cached = _COMPILED.get(key)
    if cached is None or cached[0] is not rule or cached[1] is not schema:
        if len(_COMPILED) > 4096:
            _COMPILED.clear()
        cached = (rule, schema, compile_rule(rule, schema, resource_root))
        _COMPILED[key] = cached
    return cached[2]


def _child(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_MISSING = object()


def runtime_error_text(text: str) -> str:
    """cel-cpp's runtime error, worded as cel-go's (what the apiserver prints)."""
    found = re.search(r'Key not found in map : "(.*)"', text)
    if found:
        return f"no such key: {found.group(1)}"
    if "divide by zero" in text:
        return "division by zero"
    if "modulus by zero" in text:
        return "modulus by zero"
    if "index out of" in text.lower():
        return "index out of bounds"
    return re.sub(r"^[A-Z_]+: ", "", text)


def _failure(path: str, node_type: str, detail: str, reason: str | None) -> dict[str, str]:
    # The resource root is validated at a nil field.Path, which prints as "<nil>".
    path = path or "<nil>"
    if reason == "FieldValueForbidden":
        return {"reason": reason, "message": f"Forbidden: {detail}", "field": path}
    if reason == "FieldValueRequired":
        return {"reason": reason, "message": f"Required value: {detail}", "field": path}
    if reason == "FieldValueDuplicate":
        return {"reason": reason, "message": f'Duplicate value: "{node_type}"', "field": path}
    return {
        "reason": "FieldValueInvalid",
        "message": f'Invalid value: "{node_type}": {detail}',
        "field": path,
    }


def _rule_label(rule: dict[str, Any]) -> str:
    return (rule.get("message") or "").strip() or (rule.get("rule") or "").strip()


def _evaluate_node(
    schema: dict[str, Any],
    value: Any,
    old: Any,
    path: str,
    resource_root: bool,
    ratchet: bool,
) -> list[dict[str, str]]:
    causes: list[dict[str, str]] = []
    rules = schema.get("x-kubernetes-validations") or []
    if not rules:
        return causes
    node_type = str(schema.get("type") or "object")
    self_value = to_cel_value(value, schema, resource_root)
    old_value = None if old is _MISSING else to_cel_value(old, schema, resource_root)
    for rule in rules:
        compiled = _compiled(rule, schema, resource_root)
        if compiled.program is None:
            if compiled.errors:
                causes.append(
                    _failure(path, node_type, f"rule compile error: {compiled.errors[0][3]}", None)
                )
            continue
        has_old = old is not _MISSING and old is not None
        if compiled.uses_old_self and not has_old and not compiled.optional_old_self:
            continue  # transition rules need an old value to compare with
        data: dict[str, Any] = {"self": self_value}
        if compiled.optional_old_self:
            data["__hasOldSelf"] = has_old
            data["__oldSelfValue"] = old_value if has_old else self_value
        elif has_old:
            data["oldSelf"] = old_value
        result = compiled.program.eval(data=data)
        outcome = result.plain_value()
        if str(result.type().name()).upper() == "ERROR":
            error = runtime_error_text(str(outcome))
            if "No matching overloads" in str(outcome):
                detail = (
                    f"'no such overload': call arguments did not match a supported operator, "
                    f"function or macro signature for rule: {_rule_label(rule)}"
                )
            else:
                detail = f"{error} evaluating rule: {_rule_label(rule)}"
            causes.append(_failure(path, node_type, detail, None))
            continue
        if outcome is True:
            continue
        if ratchet and not compiled.uses_old_self:
            continue  # validation ratcheting: an unchanged node keeps its old errors as warnings
        detail = _message(compiled, rule, data)
        where = path
        if compiled.field_path:
            where = (
                f"{path}{compiled.field_path}"
                if compiled.field_path.startswith("[")
                else _child(path, compiled.field_path)
            )
        causes.append(_failure(where, node_type, detail, rule.get("reason")))
    return causes


def _message(compiled: CompiledRule, rule: dict[str, Any], data: dict[str, Any]) -> str:
    if compiled.message_program is not None:
        plain = {k: v for k, v in data.items() if k in ("self", "oldSelf")}
        if compiled.optional_old_self and data.get("__hasOldSelf"):
            plain["oldSelf"] = data["__oldSelfValue"]
        result = compiled.message_program.eval(data=plain)
        text = result.plain_value()
        if (
            isinstance(text, str)
            and text.strip()
            and "\n" not in text.strip()
            and len(text.strip()) <= 5 * 1024
        ):
            return text.strip()
    message = (rule.get("message") or "").strip()
    return message or f"failed rule: {(rule.get('rule') or '').strip()}"


def _walk(
    schema: dict[str, Any] | None,
    value: Any,
    old: Any,
    path: str,
    resource_root: bool,
    parent_unchanged: bool,
) -> list[dict[str, str]]:
    if not isinstance(schema, dict) or value is None:
        return []
    # Ratcheting compares a node with its correlated old value, else with its parent's verdict.
    unchanged = (old == value) if old is not _MISSING else parent_unchanged
    causes = _evaluate_node(schema, value, old, path, resource_root, unchanged)
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        old_map = old if isinstance(old, dict) else None
        correlatable = schema.get("x-kubernetes-map-type") != "atomic"
        for key, item in value.items():
            if resource_root and key in ("apiVersion", "kind", "metadata"):
                continue
            child_schema = (
                props.get(key) if key in props else (extra if isinstance(extra, dict) else None)
            )
            if child_schema is None:
                continue
            child_old = (
                old_map.get(key, _MISSING) if (old_map is not None and correlatable) else _MISSING
            )
            child_path = _child(path, key) if key in props else f"{path}[{key}]"
            causes += _walk(
                child_schema,
                item,
                child_old,
                child_path,
                bool(child_schema.get("x-kubernetes-embedded-resource")),
                unchanged,
            )
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        items = schema["items"]
        keys = schema.get("x-kubernetes-list-map-keys") or []
        old_items: dict[Any, Any] = {}
        if schema.get("x-kubernetes-list-type") == "map" and keys and isinstance(old, list):
            for entry in old:
                if isinstance(entry, dict):
                    old_items[tuple(json.dumps(entry.get(k)) for k in keys)] = entry
        for index, item in enumerate(value):
            item_old: Any = _MISSING
            if old_items and isinstance(item, dict):
                item_old = old_items.get(tuple(json.dumps(item.get(k)) for k in keys), _MISSING)
            causes += _walk(
                items,
                item,
                item_old,
                f"{path}[{index}]",
                bool(items.get("x-kubernetes-embedded-resource")),
                unchanged,
            )
    return causes


_HAS_RULES: dict[int, tuple[Any, bool]] = {}


def has_rules(schema: Any) -> bool:
    """Whether a schema holds any rule (cached per schema object, as _compiled is)."""
    if not schema:
        return False
    cached = _HAS_RULES.get(id(schema))
    if cached is None or cached[0] is not schema:
        if len(_HAS_RULES) > 1024:
            _HAS_RULES.clear()
        cached = (schema, "x-kubernetes-validations" in json.dumps(schema))
        _HAS_RULES[id(schema)] = cached
    return cached[1]


def validate(
    obj: dict[str, Any], old: dict[str, Any] | None, schema: dict[str, Any]
) -> list[dict[str, str]]:
    """Causes for every failed rule of a custom resource (``old`` is None on create)."""
    if not has_rules(schema):
        return []
    return _walk(schema, obj, _MISSING if old is None else old, "", True, False)


# Schema errors after which the apiserver does not run the rules (hasBlockingErr in
# apiextensions-apiserver's customresource strategy): wrong types, enums, required fields,
# too long strings, too many items.
_BLOCKING = (
    "FieldValueTypeInvalid",
    "FieldValueNotSupported",
    "FieldValueRequired",
    "FieldValueTooLong",
    "FieldValueTooMany",
)
_BLOCKING_WORDS = ("may not be more than", "must have at most")


def validate_after_schema(
    obj: dict[str, Any],
    old: dict[str, Any] | None,
    schema: dict[str, Any],
    schema_causes: list[dict[str, str]],
) -> list[dict[str, str]]:
    """The rules' causes, or the apiserver's note that they were skipped after blocking errors."""
    if not has_rules(schema):
        return []
    blocked = any(
        c.get("reason") in _BLOCKING or any(w in c.get("message", "") for w in _BLOCKING_WORDS)
        for c in schema_causes
    )
    if blocked:
        return [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "null": some validation rules were not checked because '
                "the object was invalid; correct the existing errors to complete validation",
                "field": "<nil>",
            }
        ]
    return validate(obj, old, schema)
