"""CRD structural schemas: defaulting, pruning and validation (jsonschema), worded like the apiserver."""

from __future__ import annotations

import copy
import json
from typing import Any

import jsonschema

TOP_LEVEL = ("apiVersion", "kind", "metadata")


def to_jsonschema(schema: Any) -> Any:
    """Translate the Kubernetes dialect (OpenAPI 3.0: nullable, boolean exclusiveMinimum,
    int-or-string) into plain JSON Schema (draft 7)."""
    if isinstance(schema, list):
        return [to_jsonschema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    result: dict[str, Any] = {}
    for key, value in schema.items():
        if key.startswith("x-kubernetes-") or key in ("nullable", "format"):
            continue
        if key in ("properties", "patternProperties", "definitions"):
            # A mapping of names to schemas: the names are data, not keywords.
            result[key] = {name: to_jsonschema(child) for name, child in value.items()}
        else:
            result[key] = to_jsonschema(value)
    # OpenAPI 3.0 writes `minimum: 0, exclusiveMinimum: true`; draft 7 wants the number.
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        flag = schema.get(exclusive)
        if isinstance(flag, bool):
            result.pop(exclusive, None)
            if flag and bound in result:
                result[exclusive] = result.pop(bound)
    if schema.get("x-kubernetes-int-or-string"):
        result.pop("type", None)
        result = {"anyOf": [{"type": "integer"}, {"type": "string"}], **result}
    if schema.get("nullable") and "type" in result:
        result["type"] = [result["type"], "null"]
    return result


def apply_defaults(value: Any, schema: dict[str, Any] | None) -> None:
    """Fill absent fields that declare ``default``, top-down, as the server does on write."""
    if not schema:
        return
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key, item in value.items():
                if key not in (schema.get("properties") or {}):
                    apply_defaults(item, extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            apply_defaults(item, schema["items"])


def prune(value: Any, schema: dict[str, Any] | None, path: str, dropped: list[str]) -> None:
    """Remove fields the schema does not know, unless it preserves unknown fields."""
    if not schema or schema.get("x-kubernetes-preserve-unknown-fields"):
        return
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        for key in list(value):
            if path == "" and key in TOP_LEVEL:
                continue
            child = f"{path}.{key}" if path else key
            if key in props:
                prune(value[key], props[key], child, dropped)
            elif isinstance(extra, dict):
                prune(value[key], extra, child, dropped)
            elif extra is True:
                continue
            else:
                dropped.append(child)
                del value[key]
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            prune(item, schema["items"], f"{path}[{index}]", dropped)


def _field(path: Any) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return '"object"'
    if isinstance(value, list):
        return '"array"'
    return json.dumps(value)


def validate(obj: dict[str, Any], schema: dict[str, Any]) -> list[dict[str, str]]:
    """Return apiserver-style causes ({reason, message, field}) for every schema violation."""
    instance = {k: v for k, v in obj.items() if k not in TOP_LEVEL}
    checked = to_jsonschema(schema)
    for key in TOP_LEVEL:
        (checked.get("properties") or {}).pop(key, None)
    if isinstance(checked.get("required"), list):
        checked["required"] = [r for r in checked["required"] if r not in TOP_LEVEL]
    causes = []
    validator = jsonschema.Draft7Validator(checked)
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path))):
        field = _field(error.absolute_path)
        kind = error.validator
        if kind == "required":
            missing = error.message.split("'")[1] if "'" in error.message else "?"
            full = f"{field}.{missing}" if field else missing
            causes.append(
                {"reason": "FieldValueRequired", "message": "Required value", "field": full}
            )
        elif kind == "type":
            expected = error.validator_value
            expected = expected[0] if isinstance(expected, list) else expected
            causes.append(
                {
                    "reason": "FieldValueTypeInvalid",
                    "message": f"Invalid value: {_show(error.instance)}: {field} in body must be of type {expected}: {_show(error.instance)}",
                    "field": field,
                }
            )
        elif kind == "enum":
            allowed = ", ".join(json.dumps(v) for v in error.validator_value)
            causes.append(
                {
                    "reason": "FieldValueNotSupported",
                    "message": f"Unsupported value: {_show(error.instance)}: supported values: {allowed}",
                    "field": field,
                }
            )
        else:
            words = {
                "minimum": f"should be greater than or equal to {error.validator_value}",
                "maximum": f"should be less than or equal to {error.validator_value}",
                "exclusiveMinimum": f"should be greater than {error.validator_value}",
                "exclusiveMaximum": f"should be less than {error.validator_value}",
                "minLength": f"should be at least {error.validator_value} chars long",
                "maxLength": f"may not be more than {error.validator_value} chars long",
                "minItems": f"should have at least {error.validator_value} items",
                "maxItems": f"must have at most {error.validator_value} items",
                "pattern": f"should match '{error.validator_value}'",
            }
            detail = words.get(str(kind), error.message)
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "message": f"Invalid value: {_show(error.instance)}: {field} in body {detail}",
                    "field": field,
                }
            )
    return causes
