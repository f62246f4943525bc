"""deploy/monitoring/sftjob-dashboard.json is a valid Grafana dashboard: it validates against
Grafana's own dashboard schema, and each Prometheus query against the Prometheus query
schema (both vendored from grafana-foundation-sdk, see grafana_schema/SOURCE.md), and a
dashboard broken in the ways people break them does not."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator, ValidationError

SCHEMAS = Path(__file__).resolve().parent / "grafana_schema"
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "monitoring" / "sftjob-dashboard.json"


def _schema(name: str) -> Draft7Validator:
    schema = json.loads((SCHEMAS / f"{name}.jsonschema.json").read_text())
    Draft7Validator.check_schema(schema)
    return Draft7Validator(schema)


DASHBOARD_SCHEMA = _schema("dashboard")
PROMETHEUS_QUERY_SCHEMA = _schema("prometheus")


def _messages(errors: Iterable[ValidationError], prefix: str = "") -> list[str]:
    """`path: message` of each error; for a oneOf (a panel is a Panel or a RowPanel) the
    errors of every branch, which say what is wrong rather than "not valid under any"."""
    messages = []
    for error in errors:
        if error.context:
            messages += _messages(error.context, prefix)
        else:
            messages.append(f"{prefix}{'/'.join(map(str, error.absolute_path))}: {error.message}")
    return messages


def schema_errors(dashboard: dict[str, Any]) -> list[str]:
    """Where `dashboard` breaks Grafana's schemas: the dashboard's, then each Prometheus
    target's (a panel's targets are free-form objects to the dashboard schema)."""
    errors = _messages(DASHBOARD_SCHEMA.iter_errors(dashboard))
    for i, panel in enumerate(dashboard.get("panels") or []):
        for j, target in enumerate(panel.get("targets") or []):
            if (target.get("datasource") or {}).get("type") == "prometheus":
                found = PROMETHEUS_QUERY_SCHEMA.iter_errors(target)
                errors += _messages(found, f"panels/{i}/targets/{j}/")
    return errors


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def test_the_dashboard_is_schema_valid() -> None:
    dashboard = _dashboard()
    assert dashboard["panels"] and all(p["targets"] for p in dashboard["panels"])
    assert schema_errors(dashboard) == []


def _without_type(d: dict[str, Any]) -> None:
    del d["panels"][0]["type"]


def _grid_pos_as_text(d: dict[str, Any]) -> None:
    d["panels"][1]["gridPos"]["w"] = "12"


def _grid_pos_too_wide(d: dict[str, Any]) -> None:
    d["panels"][1]["gridPos"]["w"] = 25


def _datasource_as_name(d: dict[str, Any]) -> None:
    d["panels"][2]["datasource"] = "Prometheus"


def _target_without_expr(d: dict[str, Any]) -> None:
    del d["panels"][2]["targets"][0]["expr"]


def _unknown_panel_field(d: dict[str, Any]) -> None:
    d["panels"][3]["gridpos"] = d["panels"][3].pop("gridPos")


def _no_annotations(d: dict[str, Any]) -> None:
    del d["annotations"]


def _variable_without_name(d: dict[str, Any]) -> None:
    del d["templating"]["list"][1]["name"]


BREAKAGES = {
    "panel without type": (_without_type, "panels/0: 'type' is a required property"),
    "gridPos width as text": (_grid_pos_as_text, "panels/1/gridPos/w: '12' is not of type"),
    "gridPos wider than the grid": (_grid_pos_too_wide, "panels/1/gridPos/w: 25 is greater"),
    "datasource as a name": (_datasource_as_name, "panels/2/datasource: 'Prometheus' is not"),
    "query without expr": (_target_without_expr, "panels/2/targets/0/: 'expr' is a required"),
    "misspelt panel field": (_unknown_panel_field, "panels/3: Additional properties"),
    "no annotations": (_no_annotations, ": 'annotations' is a required property"),
    "variable without name": (_variable_without_name, "templating/list/1: 'name' is a required"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_dashboard_fails_the_schema(breakage: str) -> None:
    breaks, expected = BREAKAGES[breakage]
    broken = copy.deepcopy(_dashboard())
    breaks(broken)
    errors = schema_errors(broken)
    assert any(e.startswith(expected) for e in errors), errors
