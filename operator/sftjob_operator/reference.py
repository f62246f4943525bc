"""The field references (Markdown) of SFTJob and SFTProfile, generated from the CRD schemas.

README.md embeds each table between its markers; a test fails when one drifts, and
`sftjob reference --write README.md` refreshes both.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .crd import openapi_v3_schema, profile_openapi_v3_schema

BEGIN = "<!-- BEGIN GENERATED SFTJOB REFERENCE (sftjob reference --write README.md) -->"
END = "<!-- END GENERATED SFTJOB REFERENCE -->"
PROFILE_BEGIN = "<!-- BEGIN GENERATED SFTPROFILE REFERENCE (sftjob reference --write README.md) -->"
PROFILE_END = "<!-- END GENERATED SFTPROFILE REFERENCE -->"


@dataclass(frozen=True)
class Block:
    """One generated table of README.md: the spec fields of one kind, between two markers."""

    begin: str
    end: str
    spec: dict[str, Any]

    def markdown(self) -> str:
        lines = [
            self.begin,
            "| field | type | required | default | description |",
            "|---|---|---|---|---|",
            *_rows(self.spec, "", True),
            self.end,
        ]
        return "\n".join(lines) + "\n"

    def embedded(self, readme: str) -> str | None:
        start, end = readme.find(self.begin), readme.find(self.end)
        if start < 0 or end < 0:
            return None
        return readme[start : end + len(self.end)] + "\n"


def sftjob_block() -> Block:
    return Block(BEGIN, END, openapi_v3_schema()["properties"]["spec"])


def sftprofile_block() -> Block:
    return Block(PROFILE_BEGIN, PROFILE_END, profile_openapi_v3_schema()["properties"]["spec"])


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
    return sftjob_block().markdown()


def profile_reference_markdown() -> str:
    return sftprofile_block().markdown()


def embedded_reference(readme: str) -> str | None:
    return sftjob_block().embedded(readme)


def embedded_profile_reference(readme: str) -> str | None:
    return sftprofile_block().embedded(readme)


def write_into(readme_path: Path) -> None:
    text = readme_path.read_text()
    for block in (sftjob_block(), sftprofile_block()):
        current = block.embedded(text)
        if current is None:
            raise ValueError(f"{readme_path} has no {block.begin} ... {block.end} block")
        text = text.replace(current, block.markdown())
    readme_path.write_text(text)
