"""Pure retry policy: why a pod failed, which rank's failure explains the run, what to do.

`classify_failure` reads the trainer's termination report first, then what
Kubernetes saw; `decisive_failure` picks the failure that explains the run across
ranks; `decide_retry` says relaunch (with which batch sizes) or fail.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .api import SFTJobSpec, SFTJobStatus
from .pod_state import pod_phase, pod_rank, terminated_state

# Reasons the trainer writes in its termination message (and their exit codes).
TRAINER_EXIT_CODES = {
    10: "OutOfMemory",
    11: "DataError",
    12: "ConfigError",
    13: "ModelLoadError",
    14: "Interrupted",
}
FATAL_REASONS = ("DataError", "ConfigError", "ModelLoadError")
# Pod-level reasons a kubelet or scheduler gives when the pod, not the training, failed.
LOST_POD_REASONS = ("Evicted", "Preempted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated")
# The kubelet's container reason when it cannot find the container any more (its node rebooted,
# its runtime lost it): exit code 137 then says nothing about the training, the pod was lost.
# pkg/kubelet/kubelet_pods.go convertToAPIContainerStatuses, status_manager.go TerminatePod.
LOST_CONTAINER_REASON = "ContainerStatusUnknown"


@dataclass(frozen=True)
class Failure:
    reason: str
    message: str
    step: int | None = None
    rank: int | None = None


@dataclass(frozen=True)
class RetryDecision:
    relaunch: bool
    reason: str
    message: str
    per_device: int
    accumulation: int
    # Seconds to wait after the failure before the new attempt's pods are created.
    backoff_seconds: float = 0.0


def classify_failure(pod: dict[str, Any]) -> Failure:
    """Why a failed pod failed: the trainer's own report first, then what Kubernetes saw."""
    rank = pod_rank(pod)
    status = pod.get("status") or {}
    if status.get("reason") in LOST_POD_REASONS:
        return Failure(
            "PodLost", f"pod {status.get('reason')}: {status.get('message', '')}".strip(), rank=rank
        )
    terminated = terminated_state(pod)
    message = str(terminated.get("message") or "").strip()
    if terminated.get("reason") == LOST_CONTAINER_REASON:
        return Failure(
            "PodLost", f"container {LOST_CONTAINER_REASON}: {message}".strip(), rank=rank
        )
    report = _trainer_report(message)
    if report is not None:
        return Failure(
            str(report.get("reason") or "InternalError"),
            str(report.get("message") or ""),
            _int_or_none(report.get("step")),
            rank,
        )
    if terminated.get("reason") == "OOMKilled":
        return Failure("OutOfMemory", "container killed for exceeding its memory limit", rank=rank)
    code = terminated.get("exitCode")
    if isinstance(code, int) and code in TRAINER_EXIT_CODES:
        return Failure(TRAINER_EXIT_CODES[code], _tail(message), rank=rank)
    if code in (137, 143):
        return Failure("Interrupted", f"killed by signal (exit code {code})", rank=rank)
    return Failure("InternalError", _tail(message) or f"exit code {code}", rank=rank)


def _trainer_report(message: str) -> dict[str, Any] | None:
    if not message.startswith("{"):
        return None
    try:
        parsed = json.loads(message)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) and "reason" in parsed else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) else None


def _tail(text: str, limit: int = 600) -> str:
    return text[-limit:]


def decisive_failure(current: dict[int, dict[str, Any]], expected: range) -> Failure | None:
    failures: list[Failure] = []
    for rank in expected:
        pod = current.get(rank)
        if pod is None:
            failures.append(Failure("PodLost", f"pod of rank {rank} was deleted", rank=rank))
        elif pod_phase(pod) == "Failed":
            failures.append(classify_failure(pod))
    if not failures:
        return None
    # A rank that failed on its own explains more than ranks torn down after it (Interrupted).
    failures.sort(key=lambda f: (f.reason in ("Interrupted", "PodLost"), f.rank or 0))
    return failures[0]


# --------------------------------------------------------------------- retry policy


def shrink_batch(per_device: int, accumulation: int) -> tuple[int, int] | None:
    """Halve the micro-batch and scale accumulation so the effective batch stays exact."""
    for divisor in range(per_device // 2, 0, -1):
        if per_device % divisor == 0:
            return divisor, accumulation * (per_device // divisor)
    return None


def decide_retry(failure: Failure, spec: SFTJobSpec, status: SFTJobStatus) -> RetryDecision:
    effective = status.effectiveTraining
    per_device = (
        effective.perDeviceTrainBatchSize if effective else spec.training.perDeviceTrainBatchSize
    )
    accumulation = (
        effective.gradientAccumulationSteps
        if effective
        else spec.training.gradientAccumulationSteps
    )
    if failure.reason in FATAL_REASONS:
        return RetryDecision(False, failure.reason, failure.message, per_device, accumulation)
    if status.restarts >= spec.retry.maxRestarts:
        return RetryDecision(
            False,
            "RestartLimitExceeded",
            f"{failure.reason}: {failure.message} (gave up after {status.restarts} restarts; "
            "raise retry.maxRestarts to allow more)",
            per_device,
            accumulation,
        )
    if failure.reason == "OutOfMemory":
        if not spec.retry.oomAutoShrink:
            return RetryDecision(
                False,
                "OutOfMemory",
                f"out of memory at perDeviceTrainBatchSize {per_device} and retry.oomAutoShrink "
                "is off: lower perDeviceTrainBatchSize and raise gradientAccumulationSteps",
                per_device,
                accumulation,
            )
        shrunk = shrink_batch(per_device, accumulation)
        if shrunk is None:
            return RetryDecision(
                False,
                "OutOfMemory",
                "out of memory with perDeviceTrainBatchSize already 1: turn on "
                "gradientCheckpointing, lower maxLength, use method lora/qlora, or shard the "
                "model with distributed: fsdp over more GPUs",
                per_device,
                accumulation,
            )
        new_pd, new_acc = shrunk
        return RetryDecision(
            True,
            "OutOfMemoryShrink",
            f"out of memory at perDeviceTrainBatchSize {per_device}: relaunching with "
            f"perDeviceTrainBatchSize {new_pd} and gradientAccumulationSteps {new_acc} "
            "(same effective batch and plan)",
            new_pd,
            new_acc,
        )
    return RetryDecision(
        True,
        failure.reason,
        f"{failure.reason}: {failure.message or 'pod failed'}; relaunching, resuming from the "
        "newest checkpoint",
        per_device,
        accumulation,
    )
