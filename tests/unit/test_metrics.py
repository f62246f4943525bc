"""Per-job metrics: values from the status, one phase series per phase, gone after delete."""

from __future__ import annotations

from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sftjob_operator.api import SFTJobStatus
from sftjob_operator.metrics import OperatorMetrics, job_values, phase_values


def _running(**progress: object) -> SFTJobStatus:
    return SFTJobStatus.model_validate(
        {"phase": "Running", "restarts": 1, "attempts": 2, "progress": progress}
    )


def _series(metrics: OperatorMetrics, namespace: str, name: str) -> dict[tuple[str, str], float]:
    """(metric, phase-or-reason label) -> value for every sample of one job."""
    found: dict[tuple[str, str], float] = {}
    text = generate_latest(metrics.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("namespace") == namespace and sample.labels.get("name") == name:
                extra = sample.labels.get("phase") or sample.labels.get("reason") or ""
                found[(sample.name, extra)] = sample.value
    return found


def test_job_values_read_the_status() -> None:
    status = _running(
        step=30, totalSteps=100, loss=1.25, learningRate=2e-5, tokensPerSecond=900.0, etaSeconds=70
    )
    values = job_values(status)
    assert values["sftjob_step"] == 30
    assert values["sftjob_total_steps"] == 100
    assert values["sftjob_loss"] == 1.25
    assert values["sftjob_learning_rate"] == 2e-5
    assert values["sftjob_tokens_per_second"] == 900.0
    assert values["sftjob_eta_seconds"] == 70
    assert values["sftjob_restarts"] == 1
    assert values["sftjob_eval_loss"] is None


def test_eta_is_unknown_once_the_job_stops_running() -> None:
    failed = _running(step=30, etaSeconds=70).model_copy(update={"phase": "Failed"})
    assert job_values(failed)["sftjob_eta_seconds"] is None


def test_one_phase_series_per_phase_with_one_set() -> None:
    values = phase_values("Running")
    assert values["Running"] == 1.0
    assert sum(values.values()) == 1.0
    assert phase_values(None)["Pending"] == 1.0


def test_series_follow_the_status_and_vanish_when_the_job_is_forgotten() -> None:
    metrics = OperatorMetrics()
    metrics.observe_job("team", "a", _running(step=3, totalSteps=10, loss=2.0, etaSeconds=9))
    metrics.observe_job("team", "b", _running(step=1, totalSteps=10))
    series = _series(metrics, "team", "a")
    assert series[("sftjob_step", "")] == 3
    assert series[("sftjob_loss", "")] == 2.0
    assert series[("sftjob_phase", "Running")] == 1
    assert series[("sftjob_phase", "Pending")] == 0

    failed = SFTJobStatus.model_validate(
        {"phase": "Failed", "progress": {"step": 5}, "lastFailure": {"reason": "OutOfMemory"}}
    )
    metrics.observe_job("team", "a", failed)
    series = _series(metrics, "team", "a")
    assert series[("sftjob_step", "")] == 5
    assert ("sftjob_eta_seconds", "") not in series  # no stale ETA on a failed job
    assert series[("sftjob_failed", "OutOfMemory")] == 1
    assert series[("sftjob_phase", "Failed")] == 1

    metrics.forget("team", "a")
    assert _series(metrics, "team", "a") == {}
    assert _series(metrics, "team", "b")[("sftjob_step", "")] == 1


def test_model_flops_utilization_is_a_ratio_gauge_only_where_known() -> None:
    metrics = OperatorMetrics()
    metrics.observe_job("team", "gpu", _running(step=3, tokensPerSecond=5e4, mfu=0.41))
    metrics.observe_job("team", "cpu", _running(step=3, tokensPerSecond=900.0))
    assert _series(metrics, "team", "gpu")[("sftjob_model_flops_utilization_ratio", "")] == 0.41
    assert ("sftjob_model_flops_utilization_ratio", "") not in _series(metrics, "team", "cpu")
    metrics.forget("team", "gpu")
    assert _series(metrics, "team", "gpu") == {}
