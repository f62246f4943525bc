"""The SFTJob field reference (Markdown), generated from the CRD schema.

README.md embeds this table between markers; a test fails when it drifts, and
`sftjob reference --write README.md` refreshes it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .crd import openapi_v3_schema

BEGIN = "<!-- BEGIN GENERATED SFTJOB REFERENCE (sftjob reference --write README.md) -->"
END = "<!-- END GENERATED SFTJOB REFERENCE -->"


def _type_of(node: dict[str, Any]) -> str:
    kind = str(node.get("type", "object"))
    if "enum" in node:
        return " \\| ".join(f"`{v}`" for v in node["enum"])
    if kind == "array":
        return f"list of {_type_of(node.get('items', {}))}"
    if kind == "object" and "additionalProperties" in node:
        return f"map of {_type_of(node['additionalProperties'])}"
    return kind


def _rows(node: dict[str, Any], path: str, required: bool) -> list[str]:
    rows: list[str] = []
    default = node.get("default")
    shown_default = "" if default in (None, {}) else f"`{json.dumps(default)}`"
    description = " ".join(str(node.get("description", "")).split()).replace("|", "\\|")
    if path:
        rows.append(
            f"| `{path}` | {_type_of(node)} | {'yes' if required else ''} | {shown_default} "
            f"| {description} |"
        )
    child = node.get("items", node) if node.get("type") == "array" else node
    needed = set(child.get("required", ()))
    suffix = "[]" if node.get("type") == "array" else ""
    for name, sub in child.get("properties", {}).items():
        rows += _rows(sub, f"{path}{suffix}.{name}" if path else name, name in needed)
    return rows


def reference_markdown() -> str:
    spec = openapi_v3_schema()["properties"]["spec"]
    lines = [
        BEGIN,
        "| field | type | required | default | description |",
        "|---|---|---|---|---|",
        *_rows(spec, "", True),
        END,
    ]
    return "\n".join(lines) + "\n"


def embedded_reference(readme: str) -> str | None:
    start, end = readme.find(BEGIN), readme.find(END)
    if start < 0 or end < 0:
        return None
    return readme[start : end + len(END)] + "\n"


def write_into(readme_path: Path) -> None:
    text = readme_path.read_text()
    current = embedded_reference(text)
    if current is None:
        raise ValueError(f"{readme_path} has no {BEGIN} ... {END} block")
    readme_path.write_text(text.replace(current, reference_markdown()))
