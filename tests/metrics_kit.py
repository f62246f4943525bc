"""Reading one job's series from the operator's Prometheus text (the controller and e2e
tiers scrape the real operator's /metrics)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def job_samples(text: str, namespace: str, name: str) -> dict[str, float]:
    """The job's samples in a /metrics page, by name (phase series as name:phase)."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = sample.labels
            if labels.get("namespace") == namespace and labels.get("name") == name:
                key = f"{sample.name}:{labels['phase']}" if "phase" in labels else sample.name
                found[key] = sample.value
    return found
