"""Prometheus metrics: the operator's own (jobs by phase, reconcile latency, API errors) and
one set of series per SFTJob (step, loss, throughput, MFU, ETA, phase, restarts), labelled by
namespace and name and removed when the job is deleted.

The per-job values are a pure function of the job's status (`job_values`, `phase_values`);
the reconciler only hands each pass's resulting status to `OperatorMetrics.observe_job`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from .api import SFTJobStatus

PHASES = ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed")
JOB_LABELS = ("namespace", "name")


@dataclass(frozen=True)
class JobGauge:
    """One per-job gauge: its name (units in the name), help text and how to read it."""

    name: str
    documentation: str
    read: Callable[[SFTJobStatus], float | None]


def _progress(field: str) -> Callable[[SFTJobStatus], float | None]:
    def read(status: SFTJobStatus) -> float | None:
        value = getattr(status.progress, field) if status.progress else None
        return None if value is None else float(value)

    return read


JOB_GAUGES = (
    JobGauge("sftjob_step", "Optimizer steps done by the job", _progress("step")),
    JobGauge("sftjob_total_steps", "Optimizer steps the job plans", _progress("totalSteps")),
    JobGauge("sftjob_epoch", "Epochs done by the job (fractional)", _progress("epoch")),
    JobGauge("sftjob_loss", "Latest training loss of the job", _progress("loss")),
    JobGauge("sftjob_eval_loss", "Latest eval loss of the job", _progress("evalLoss")),
    JobGauge("sftjob_learning_rate", "Current learning rate of the job", _progress("learningRate")),
    JobGauge("sftjob_grad_norm", "Latest gradient norm of the job", _progress("gradNorm")),
    JobGauge(
        "sftjob_tokens_per_second",
        "Training throughput of the job in tokens per second",
        _progress("tokensPerSecond"),
    ),
    JobGauge(
        "sftjob_eta_seconds", "Estimated seconds until the job finishes", _progress("etaSeconds")
    ),
    JobGauge(
        "sftjob_model_flops_utilization_ratio",
        "Model FLOPs utilisation of the job (0-1), where the trainer knows its GPUs' peak",
        _progress("mfu"),
    ),
    JobGauge("sftjob_attempts", "Launches of the job so far", lambda s: float(s.attempts)),
    JobGauge("sftjob_restarts", "Restarts of the job so far", lambda s: float(s.restarts)),
)


def job_values(status: SFTJobStatus) -> dict[str, float | None]:
    """Each per-job gauge's value for `status`; None where the status does not know it
    (the series is then removed rather than left at a stale value)."""
    values = {gauge.name: gauge.read(status) for gauge in JOB_GAUGES}
    if status.phase != "Running":
        # An ETA only means something while the job runs (a failed job has none).
        values["sftjob_eta_seconds"] = None
    return values


def phase_values(phase: str | None) -> dict[str, float]:
    """kube-state-metrics style: one series per phase, 1 for the job's phase, 0 for others."""
    return {candidate: 1.0 if candidate == (phase or "Pending") else 0.0 for candidate in PHASES}


def failure_reason(status: SFTJobStatus) -> str | None:
    """The reason of the job's failure while it is Failed."""
    if status.phase == "Failed" and status.lastFailure:
        return status.lastFailure.reason
    return None


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Gauge(
            "sftjob_jobs",
            "SFTJobs seen by this operator, by phase",
            ["phase"],
            registry=self.registry,
        )
        self.reconcile_seconds = Histogram(
            "sftjob_reconcile_seconds",
            "Time spent in one reconcile pass",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.api_errors = Counter(
            "sftjob_api_errors_total",
            "Kubernetes API calls that failed",
            ["call"],
            registry=self.registry,
        )
        self.job_gauges = {
            gauge.name: Gauge(gauge.name, gauge.documentation, JOB_LABELS, registry=self.registry)
            for gauge in JOB_GAUGES
        }
        self.job_phase = Gauge(
            "sftjob_phase",
            "The job's phase: 1 for the current one, 0 for the others",
            [*JOB_LABELS, "phase"],
            registry=self.registry,
        )
        self.job_failed = Gauge(
            "sftjob_failed",
            "1 while the job has failed, labelled with the failure's reason",
            [*JOB_LABELS, "reason"],
            registry=self.registry,
        )
        self._phases: dict[tuple[str, str], str] = {}
        self._failure_reasons: dict[tuple[str, str], str] = {}

    def observe_phase(self, namespace: str, name: str, phase: str) -> None:
        self._phases[(namespace, name)] = phase
        self._refresh()

    def observe_job(self, namespace: str, name: str, status: SFTJobStatus) -> None:
        """Set the job's series from its status after a reconcile pass."""
        self.observe_phase(namespace, name, status.phase or "Pending")
        for metric, value in job_values(status).items():
            if value is None:
                _remove(self.job_gauges[metric], namespace, name)
            else:
                self.job_gauges[metric].labels(namespace, name).set(value)
        for phase, value in phase_values(status.phase).items():
            self.job_phase.labels(namespace, name, phase).set(value)
        reason = failure_reason(status)
        previous = self._failure_reasons.pop((namespace, name), None)
        if previous is not None and previous != reason:
            _remove(self.job_failed, namespace, name, previous)
        if reason is not None:
            self._failure_reasons[(namespace, name)] = reason
            self.job_failed.labels(namespace, name, reason).set(1)

    def forget(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted job."""
        self._phases.pop((namespace, name), None)
        self._refresh()
        for gauge in self.job_gauges.values():
            _remove(gauge, namespace, name)
        for phase in PHASES:
            _remove(self.job_phase, namespace, name, phase)
        reason = self._failure_reasons.pop((namespace, name), None)
        if reason is not None:
            _remove(self.job_failed, namespace, name, reason)

    def _refresh(self) -> None:
        counts: dict[str, int] = {}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in PHASES:
            self.jobs.labels(phase=phase).set(counts.get(phase, 0))

    def api_error(self, call: str) -> None:
        self.api_errors.labels(call=call).inc()

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


def _remove(gauge: Gauge, *labels: str) -> None:
    """Remove one series; absent is fine (a value never known, or a second delete)."""
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


METRICS = OperatorMetrics()
