"""Label and field selectors, parsed once per request and matched against stored objects."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from .errors import bad_request

Matcher = Callable[[dict[str, Any]], bool]

_SET_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s+(in|notin)\s+\((.*)\)\s*$")
_OP_RE = re.compile(r"^\s*([A-Za-z0-9_./-]+)\s*(==|=|!=)\s*([A-Za-z0-9_.-]*)\s*$")
_KEY_RE = re.compile(r"^\s*(!?)\s*([A-Za-z0-9_./-]+)\s*$")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside ``in (a,b)`` parentheses."""
    parts, depth, current = [], 0, ""
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


def parse_label_selector(text: str | None) -> Matcher:
    if not text:
        return lambda obj: True
    requirements: list[Callable[[dict[str, str]], bool]] = []
    for part in _split_top_level(text):
        if m := _SET_RE.match(part):
            if m.group(1):
                raise bad_request(f"unable to parse requirement: {part!r}")
            key, op = m.group(2), m.group(3)
            values = {v.strip() for v in m.group(4).split(",") if v.strip()}
            if op == "in":
                requirements.append(lambda lb, k=key, vs=values: lb.get(k) in vs)
            else:
                requirements.append(lambda lb, k=key, vs=values: lb.get(k) not in vs)
        elif m := _OP_RE.match(part):
            key, op, value = m.groups()
            if op == "!=":
                requirements.append(lambda lb, k=key, v=value: lb.get(k) != v)
            else:
                requirements.append(lambda lb, k=key, v=value: lb.get(k) == v)
        elif m := _KEY_RE.match(part):
            negate, key = m.groups()
            if negate:
                requirements.append(lambda lb, k=key: k not in lb)
            else:
                requirements.append(lambda lb, k=key: k in lb)
        else:
            raise bad_request(f"unable to parse requirement: {part!r}")

    def match(obj: dict[str, Any]) -> bool:
        labels = (obj.get("metadata") or {}).get("labels") or {}
        return all(req(labels) for req in requirements)

    return match


def field_value(obj: dict[str, Any], path: str) -> str:
    """A dotted field as the real server compares it: a string, empty when absent."""
    value: Any = obj
    for key in path.split("."):
        if not isinstance(value, dict):
            return ""
        value = value.get(key)
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def parse_field_selector(text: str | None) -> Matcher:
    if not text:
        return lambda obj: True
    requirements: list[tuple[str, bool, str]] = []
    for part in _split_top_level(text):
        m = re.match(r"^\s*([A-Za-z0-9_.]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        path, op, value = m.groups()
        requirements.append((path, op != "!=", value))

    def match(obj: dict[str, Any]) -> bool:
        return all((field_value(obj, path) == value) == eq for path, eq, value in requirements)

    return match
