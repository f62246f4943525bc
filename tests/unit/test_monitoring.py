"""deploy/monitoring: the Grafana dashboard queries only metrics the operator exports, and the
PodMonitor scrapes the operator Deployment's metrics port."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml
from sftjob_operator.metrics import OperatorMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "monitoring" / "sftjob-dashboard.json"
PANEL_TYPES = {"table", "timeseries", "bargauge", "stat", "gauge", "piechart"}

# Identifiers in PromQL that are not metric names (functions are recognised by their "(").
PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
# Clauses whose parentheses hold label names.
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
IDENTIFIER = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(\s*\()?")


def promql_metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings (label values, regexes)
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range and subquery windows
    text = LABEL_LIST.sub("", text)
    return {
        match.group(1)
        for match in IDENTIFIER.finditer(text)
        if not match.group(2) and match.group(1).lower() not in PROMQL_WORDS
    }


def exported_names() -> set[str]:
    """Every series name the operator's registry can expose, suffixes included."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names = set()
    for family in OperatorMetrics().registry.collect():
        names.update(family.name + suffix for suffix in suffixes[family.type])
    return names


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return loaded


def _queries(dashboard: dict[str, Any]) -> list[str]:
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(METRIC{...}, label): the metric is the query's first argument.
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"])
            assert inner, variable
            exprs.append(inner.group(1))
    return exprs


def test_promql_metric_names_ignores_functions_labels_and_windows() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, call) (rate(a_bucket{x=~"$y", z="w"}[5m])))'
        " / on (name) group_left b_total - c:recorded offset 5m and bool d"
    )
    assert promql_metric_names(expr) == {"a_bucket", "b_total", "c:recorded", "d"}


def test_dashboard_structure() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    titles = {p["title"] for p in panels}
    assert {"Fleet", "Training loss", "Throughput", "Failures by reason"} <= titles
    for p in panels:
        assert p["type"] in PANEL_TYPES, p["title"]
        assert (
            set(p["gridPos"]) == {"x", "y", "w", "h"}
            and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
        )
        assert p["targets"], p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(set(refs)) == len(refs), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["datasource"]["type"] == "prometheus"
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert {"datasource", "namespace", "job"} <= variables


def test_every_metric_the_dashboard_queries_is_exported() -> None:
    exported = exported_names()
    queried = set().union(*(promql_metric_names(e) for e in _queries(_dashboard())))
    assert {"sftjob_loss", "sftjob_step", "sftjob_tokens_per_second", "sftjob_failed"} <= queried
    assert queried - exported == set()


def test_a_renamed_metric_would_fail_the_check() -> None:
    exported = exported_names()
    assert "sftjob_loss" in exported and "sftjob_reconcile_seconds_bucket" in exported
    assert "sftjob_api_errors_total" in exported
    assert not promql_metric_names("rate(sftjob_losses[5m])") <= exported


def test_podmonitor_scrapes_the_operators_metrics_port() -> None:
    monitor = yaml.safe_load((DEPLOY / "monitoring" / "podmonitor.yaml").read_text())
    operator = next(
        doc
        for doc in yaml.safe_load_all((DEPLOY / "base" / "operator.yaml").read_text())
        if doc and doc["kind"] == "Deployment"
    )
    template = operator["spec"]["template"]
    container_ports = {p["name"] for c in template["spec"]["containers"] for p in c["ports"]}
    endpoint_ports = {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]}
    assert endpoint_ports == {"metrics"} and endpoint_ports <= container_ports
    labels = template["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert operator["metadata"]["namespace"] in monitor["spec"]["namespaceSelector"]["matchNames"]
    env = {e["name"]: e.get("value") for c in template["spec"]["containers"] for e in c["env"]}
    metrics_port = next(
        p["containerPort"]
        for c in template["spec"]["containers"]
        for p in c["ports"]
        if p["name"] == "metrics"
    )
    assert env["SFTJOB_METRICS_PORT"] == str(metrics_port)
