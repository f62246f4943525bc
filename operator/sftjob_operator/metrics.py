"""Prometheus metrics: jobs by phase, reconcile latency, API errors."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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
        self._phases: dict[tuple[str, str], str] = {}

    def observe_phase(self, namespace: str, name: str, phase: str) -> None:
        self._phases[(namespace, name)] = phase
        self._refresh()

    def forget(self, namespace: str, name: str) -> None:
        self._phases.pop((namespace, name), None)
        self._refresh()

    def _refresh(self) -> None:
        counts: dict[str, int] = {}
        for phase in self._phases.values():
            counts[phase] = counts.get(phase, 0) + 1
        for phase in ("Pending", "Running", "Restarting", "Suspended", "Succeeded", "Failed"):
            self.jobs.labels(phase=phase).set(counts.get(phase, 0))

    def api_error(self, call: str) -> None:
        self.api_errors.labels(call=call).inc()

    def serve(self, port: int) -> None:
        start_http_server(port, registry=self.registry)


METRICS = OperatorMetrics()
