"""Pure reading of a pod as the API reports it: its attempt, rank, phase and states.

`start_blocker` tells why a Pending pod cannot start (the kubelet's container waiting
reasons, the scheduler's Unschedulable) and since when; `start_verdict` turns the blockers
of a launch into fail-now or wait-until, for spec.retry.podStartTimeoutSeconds.

Pods are plain dicts in the API's camelCase (what `kube.py` returns); nothing here
talks to the API.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from .children import LABEL_ATTEMPT, LABEL_RANK


def pod_attempt(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return 0


def pod_rank(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_RANK])
    except (KeyError, ValueError):
        return -1


def pod_phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def terminated_state(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
    return {}


def unschedulable_message(pod: dict[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return str(condition.get("message") or "no node fits the pod")
    return None


def is_live(pod: dict[str, Any]) -> bool:
    """Pending or Running and not being deleted."""
    return pod_phase(pod) in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp")


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Whether `obj`'s controller ownerReference names the object with `uid`.

    Names and labels repeat when a job is re-created under the same name; only the uid
    tells this job's children from a previous one's (or from a user's object).
    """
    if not uid:
        return False
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid for r in references)


# ------------------------------------------------------------------ pods that cannot start

# Container waiting reasons that mean "this container cannot start", as the kubelet writes
# them (state.waiting.reason). The normal waits, ContainerCreating and PodInitializing, are
# not among them. Image reasons: pkg/kubelet/images/types.go (ErrImagePull,
# ImagePullBackOff, ImageInspectError, ErrImageNeverPull, InvalidImageName) and the CRI's
# pull errors evalCRIPullErr passes on (k8s.io/cri-api/pkg/errors: RegistryUnavailable,
# SignatureValidationFailed). Container reasons: pkg/kubelet/kuberuntime/
# kuberuntime_container.go (CreateContainerConfigError: a missing Secret, ConfigMap or key;
# CreateContainerError, PreCreateHookError, PreStartHookError, PostStartHookError) and
# pkg/kubelet/container/sync_result.go (RunContainerError).
START_BLOCKING_REASONS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "ImageInspectError",
    "ErrImageNeverPull",
    "InvalidImageName",
    "RegistryUnavailable",
    "SignatureValidationFailed",
    "CreateContainerConfigError",
    "CreateContainerError",
    "PreCreateHookError",
    "PreStartHookError",
    "PostStartHookError",
    "RunContainerError",
)
# Reasons that never heal: the image reference does not parse, and the image comes from
# the job's spec, which cannot change during the run. Every other reason may heal (the
# registry comes back, the Secret is created, a node frees up), so it gets
# spec.retry.podStartTimeoutSeconds.
NEVER_HEALING_REASONS = ("InvalidImageName",)
UNSCHEDULABLE = "Unschedulable"


@dataclass(frozen=True)
class StartBlocker:
    """Why one pod cannot start, as the kubelet or the scheduler says it, and since when."""

    pod: str
    reason: str
    message: str
    # When the wait began: for Unschedulable the PodScheduled=False transition, for a
    # container the pod's binding (PodScheduled=True), as the kubelet starts only then.
    since: datetime | None
    container: str | None = None

    @property
    def heals(self) -> bool:
        return self.reason not in NEVER_HEALING_REASONS

    def describe(self) -> str:
        where = f"pod {self.pod}" + (f" container {self.container}" if self.container else "")
        return f"{where}: {self.reason}: {self.message}".rstrip(": ")


@dataclass(frozen=True)
class StartVerdict:
    """What a launch whose pods cannot start needs: fail now, or wait `requeue_after` more."""

    fail: bool
    reason: str
    message: str
    requeue_after: float | None = None


def _time(value: Any) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None


def _pod_condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind:
            return dict(condition)
    return {}


def waiting_states(pod: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(container name, state.waiting) of every waiting container, init containers first."""
    status = pod.get("status") or {}
    out = []
    for key in ("initContainerStatuses", "containerStatuses"):
        for container in status.get(key) or []:
            waiting = (container.get("state") or {}).get("waiting")
            if waiting is not None:
                out.append((str(container.get("name") or ""), dict(waiting)))
    return out


def start_blocker(pod: dict[str, Any]) -> StartBlocker | None:
    """Why `pod` cannot start, or None when it is starting, running or done normally."""
    if pod_phase(pod) != "Pending" or pod["metadata"].get("deletionTimestamp"):
        return None
    name = str(pod["metadata"].get("name") or "")
    created = _time(pod["metadata"].get("creationTimestamp"))
    scheduled = _pod_condition(pod, "PodScheduled")
    message = unschedulable_message(pod)
    if message is not None:
        return StartBlocker(
            name, UNSCHEDULABLE, message, _time(scheduled.get("lastTransitionTime")) or created
        )
    bound = (
        _time(scheduled.get("lastTransitionTime")) if scheduled.get("status") == "True" else None
    )
    for container, waiting in waiting_states(pod):
        reason = str(waiting.get("reason") or "")
        if reason in START_BLOCKING_REASONS:
            text = str(waiting.get("message") or "")
            return StartBlocker(name, reason, text, bound or created, container)
    return None


def start_verdict(
    pods: Iterable[dict[str, Any]], timeout_seconds: float, now: datetime
) -> StartVerdict | None:
    """Whether a launch whose pods cannot start fails now, or how long it may still wait.

    None when no pod is blocked. A reason that never heals fails at once; any other fails
    once its pod has waited `timeout_seconds` since the wait began; until then the verdict
    carries the kubelet's (or scheduler's) reason and message and when to look again.
    """
    blockers = [b for p in pods if (b := start_blocker(p)) is not None]
    if not blockers:
        return None
    hopeless = next((b for b in blockers if not b.heals), None)
    if hopeless is not None:
        return StartVerdict(
            True,
            hopeless.reason,
            f"{hopeless.describe()} (this never heals: the image comes from the job's spec)",
        )

    def deadline(blocker: StartBlocker) -> datetime:
        return (blocker.since or now) + timedelta(seconds=timeout_seconds)

    first = min(blockers, key=deadline)
    due = deadline(first)
    if now >= due:
        waited = int((now - (first.since or now)).total_seconds())
        return StartVerdict(
            True,
            first.reason,
            f"{first.describe()} (still not started after {waited}s; "
            f"spec.retry.podStartTimeoutSeconds is {int(timeout_seconds)})",
        )
    where = f"pod {first.pod}" + (f" container {first.container}" if first.container else "")
    return StartVerdict(
        False,
        first.reason,
        f"{first.message or first.reason} ({where}; the job fails at "
        f"{due.astimezone(UTC):%Y-%m-%dT%H:%M:%SZ} unless it starts: "
        f"spec.retry.podStartTimeoutSeconds is {int(timeout_seconds)})",
        requeue_after=(due - now).total_seconds(),
    )
