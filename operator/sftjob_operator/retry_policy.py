"""Pure retry policy: why a pod failed, which rank's failure explains the run, what to do.

`classify_failure` reads the trainer's termination report first, then what
Kubernetes saw; `decisive_failure` picks the failure that explains the run across
ranks (the most specific cause wins); `decide_retry` looks the class up in
`RETRY_POLICY` and says fail, relaunch, relaunch with a smaller micro-batch, or
relaunch after a backoff.

The trainer decides the class where it knows the cause (sftjob_trainer.failures):

| class            | retried? | how                                            |
|------------------|----------|------------------------------------------------|
| ConfigError      | never    | the same spec fails the same way every time    |
| DataError        | never    | the same data fails the same way every time    |
| ModelLoadError   | never    | the model is not there (404, bad path, no auth)|
| OutOfMemory      | yes      | halve the micro-batch (retry.oomAutoShrink)    |
| StorageFull      | never    | the output volume is full: the same write fails|
| NetworkError     | yes      | after a backoff: 10 s x 2^restarts, max 300 s  |
| InternalError    | yes      | resume from the newest checkpoint              |
| Interrupted      | yes      | resume (SIGTERM, a peer torn down)             |
| PodLost          | yes      | resume (evicted, preempted, node lost)         |

Every relaunch counts against retry.maxRestarts.
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
    15: "NetworkError",
    16: "StorageFull",
}
# Pod-level reasons a kubelet or scheduler gives when the pod, not the training, failed.
LOST_POD_REASONS = ("Evicted", "Preempted", "NodeLost", "Shutdown", "NodeShutdown", "Terminated")
# The kubelet's container reason when it cannot find the container any more (its node rebooted,
# its runtime lost it): exit code 137 then says nothing about the training, the pod was lost.
# pkg/kubelet/kubelet_pods.go convertToAPIContainerStatuses, status_manager.go TerminatePod.
LOST_CONTAINER_REASON = "ContainerStatusUnknown"


@dataclass(frozen=True)
class ClassPolicy:
    """What a failure class gets: a relaunch at all, a smaller micro-batch, a wait first.

    `specificity` ranks causes across ranks: lower explains the run better (see
    `decisive_failure`).
    """

    retry: bool
    shrink: bool = False
    backoff: bool = False
    specificity: int = 3


# The retry policy as data. Specificity: a rank's own deterministic error (0) explains the
# run before its OOM (1: shrinking would only meet the same error again), which comes before
# a network failure (2); a rank's own cause beats another rank's InternalError (3: NCCL or
# gloo report a peer that died as a broken collective), which beats ranks that were only
# stopped or lost (4).
RETRY_POLICY: dict[str, ClassPolicy] = {
    "ConfigError": ClassPolicy(retry=False, specificity=0),
    "DataError": ClassPolicy(retry=False, specificity=0),
    "ModelLoadError": ClassPolicy(retry=False, specificity=0),
    "StorageFull": ClassPolicy(retry=False, specificity=0),
    "OutOfMemory": ClassPolicy(retry=True, shrink=True, specificity=1),
    "NetworkError": ClassPolicy(retry=True, backoff=True, specificity=2),
    "InternalError": ClassPolicy(retry=True, specificity=3),
    "Interrupted": ClassPolicy(retry=True, specificity=4),
    "PodLost": ClassPolicy(retry=True, specificity=4),
}
# A reason this operator does not know (a newer trainer) is treated as an InternalError.
UNKNOWN_CLASS_POLICY = RETRY_POLICY["InternalError"]
FATAL_REASONS = tuple(reason for reason, policy in RETRY_POLICY.items() if not policy.retry)

# Backoff of the transient classes: the kubelet's own CrashLoopBackOff for a crashing
# container (pkg/kubelet/kubelet.go backOffPeriod = 10 s, doubled per restart, capped at
# MaxContainerBackOff = 300 s), which users already know from `kubectl get pods`. The
# trainer's hub client has already retried within the pod (huggingface_hub's http_backoff:
# 5 tries over about 23 s), so a pod that still failed met an outage at least that long:
# waiting 10, 20, 40 s... before reloading the model gives the hub or the network time to
# come back instead of spending every retry.maxRestarts within a minute.
BACKOFF_BASE_SECONDS = 10.0
BACKOFF_MAX_SECONDS = 300.0


def policy_for(reason: str) -> ClassPolicy:
    return RETRY_POLICY.get(reason, UNKNOWN_CLASS_POLICY)


def backoff_seconds(restarts: int) -> float:
    """Wait before relaunch number `restarts + 1` of a transient class."""
    return min(BACKOFF_MAX_SECONDS, BACKOFF_BASE_SECONDS * 2 ** max(restarts, 0))


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
    # Do not start the new attempt before lastFailure.time + backoff_seconds.
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
    """The failure that explains the run: the most specific cause, then the lowest rank.

    When one rank runs out of memory, the launcher or the collective tears the others
    down: they report InternalError (NCCL/gloo saw a peer vanish) or Interrupted. The
    rank's own cause (ConfigError, OOM, ...) is what the retry policy must act on.
    """
    failures: list[Failure] = []
    for rank in expected:
        pod = current.get(rank)
        if pod is None:
            failures.append(Failure("PodLost", f"pod of rank {rank} was deleted", rank=rank))
        elif pod_phase(pod) == "Failed":
            failures.append(classify_failure(pod))
    if not failures:
        return None
    return min(failures, key=lambda f: (policy_for(f.reason).specificity, f.rank or 0))


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
    policy = policy_for(failure.reason)
    if not policy.retry:
        # Deterministic: every relaunch would reload the model and fail the same way.
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
    if policy.shrink:
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
    wait = backoff_seconds(status.restarts) if policy.backoff else 0.0
    when = f"relaunching in {wait:g}s" if wait else "relaunching"
    return RetryDecision(
        True,
        failure.reason,
        f"{failure.reason}: {failure.message or 'pod failed'}; {when}, resuming from the "
        "newest checkpoint",
        per_device,
        accumulation,
        wait,
    )
