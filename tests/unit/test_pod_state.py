"""Reading pods: why a Pending pod cannot start (kubelet and scheduler reasons) and since when."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sftjob_operator.pod_state import (
    START_BLOCKING_REASONS,
    start_blocker,
    start_verdict,
    waiting_states,
)

CREATED = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
BOUND = CREATED + timedelta(seconds=40)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def pending_pod(
    name: str = "demo-a1-r0",
    *,
    waiting: dict[str, str] | None = None,
    init_waiting: dict[str, str] | None = None,
    scheduled: bool | None = True,
    unschedulable: str | None = None,
    phase: str = "Pending",
) -> dict[str, Any]:
    status: dict[str, Any] = {"phase": phase, "conditions": []}
    if unschedulable is not None:
        status["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
                "lastTransitionTime": iso(CREATED + timedelta(seconds=1)),
            }
        )
    elif scheduled:
        status["conditions"].append(
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": iso(BOUND)}
        )
    if waiting is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    if init_waiting is not None:
        status["initContainerStatuses"] = [{"name": "fetch", "state": {"waiting": init_waiting}}]
    return {
        "metadata": {"name": name, "creationTimestamp": iso(CREATED)},
        "status": status,
    }


SECRET_MISSING = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}
PULL_FAILED = {
    "reason": "ErrImagePull",
    "message": 'failed to pull and unpack image "example.test/trainer:typo": not found',
}
BACKING_OFF = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x:typo"'}
BAD_NAME = {
    "reason": "InvalidImageName",
    "message": 'Failed to apply default image tag "Trainer:1": couldn\'t parse image name',
}


class TestStartBlocker:
    @pytest.mark.parametrize("waiting", [SECRET_MISSING, PULL_FAILED, BACKING_OFF, BAD_NAME])
    def test_kubelet_reason_and_message_since_binding(self, waiting: dict[str, str]) -> None:
        blocker = start_blocker(pending_pod(waiting=waiting))
        assert blocker is not None
        assert (blocker.reason, blocker.message, blocker.container) == (
            waiting["reason"],
            waiting["message"],
            "trainer",
        )
        # The kubelet starts on a pod once it is bound: the wait counts from there.
        assert blocker.since == BOUND

    @pytest.mark.parametrize("reason", ["ContainerCreating", "PodInitializing"])
    def test_normal_waits_block_nothing(self, reason: str) -> None:
        assert start_blocker(pending_pod(waiting={"reason": reason})) is None

    def test_init_container_reason_counts(self) -> None:
        pod = pending_pod(init_waiting=PULL_FAILED, waiting={"reason": "PodInitializing"})
        blocker = start_blocker(pod)
        assert blocker is not None and (blocker.reason, blocker.container) == (
            "ErrImagePull",
            "fetch",
        )
        assert [name for name, _ in waiting_states(pod)] == ["fetch", "trainer"]

    def test_unschedulable_since_the_condition_turned_false(self) -> None:
        why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        blocker = start_blocker(pending_pod(unschedulable=why, scheduled=None))
        assert blocker is not None
        assert (blocker.reason, blocker.message, blocker.container) == (
            "Unschedulable",
            why,
            None,
        )
        assert blocker.since == CREATED + timedelta(seconds=1)

    def test_without_a_bound_time_the_wait_counts_from_creation(self) -> None:
        blocker = start_blocker(pending_pod(waiting=SECRET_MISSING, scheduled=False))
        assert blocker is not None and blocker.since == CREATED

    @pytest.mark.parametrize("phase", ["Running", "Succeeded", "Failed"])
    def test_only_pending_pods_are_blocked(self, phase: str) -> None:
        assert start_blocker(pending_pod(waiting=SECRET_MISSING, phase=phase)) is None

    def test_every_kubelet_image_and_container_reason_is_known(self) -> None:
        # pkg/kubelet/images/types.go and kuberuntime_container.go, as of Kubernetes 1.32.
        assert {
            "ErrImagePull",
            "ImagePullBackOff",
            "ImageInspectError",
            "ErrImageNeverPull",
            "InvalidImageName",
            "CreateContainerConfigError",
            "CreateContainerError",
        } <= set(START_BLOCKING_REASONS)

    def test_a_pod_waiting_in_a_kueue_queue_is_not_blocked(self) -> None:
        # Kueue's webhook gates a queued pod; the scheduler reports SchedulingGated, not
        # Unschedulable: waiting for admission must not run down podStartTimeoutSeconds.
        pod = pending_pod(scheduled=None)
        pod["spec"] = {"schedulingGates": [{"name": "kueue.x-k8s.io/admission"}]}
        pod["status"]["conditions"].append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "SchedulingGated",
                "message": "Scheduling is blocked due to non-empty scheduling gates",
                "lastTransitionTime": iso(CREATED),
            }
        )
        assert start_blocker(pod) is None
        assert start_verdict([pod], 60, CREATED + timedelta(hours=5)) is None


class TestStartVerdict:
    def test_nothing_blocked_no_verdict(self) -> None:
        assert (
            start_verdict([pending_pod(waiting={"reason": "ContainerCreating"})], 60, BOUND) is None
        )

    def test_waits_until_the_timeout_then_fails(self) -> None:
        pods = [pending_pod(waiting=BACKING_OFF)]
        early = start_verdict(pods, 60, BOUND + timedelta(seconds=20))
        assert early is not None and not early.fail
        assert early.reason == "ImagePullBackOff"
        assert early.requeue_after == 40
        assert early.message.startswith(BACKING_OFF["message"])
        assert "pod demo-a1-r0 container trainer" in early.message
        assert "2025-03-01T12:01:40Z" in early.message  # bound + 60 s
        late = start_verdict(pods, 60, BOUND + timedelta(seconds=60))
        assert late is not None and late.fail and late.reason == "ImagePullBackOff"
        assert 'Back-off pulling image "x:typo"' in late.message
        assert "podStartTimeoutSeconds is 60" in late.message

    def test_invalid_image_name_fails_at_once(self) -> None:
        verdict = start_verdict([pending_pod(waiting=BAD_NAME)], 600, BOUND)
        assert verdict is not None and verdict.fail and verdict.reason == "InvalidImageName"
        assert "never heals" in verdict.message

    def test_the_earliest_deadline_speaks_for_the_launch(self) -> None:
        unschedulable = pending_pod(
            "demo-a1-r1", unschedulable="0/1 nodes are available", scheduled=None
        )
        pods = [pending_pod(waiting=SECRET_MISSING), unschedulable]
        verdict = start_verdict(pods, 60, BOUND)
        # Rank 1 has been unschedulable since creation + 1 s: its wait ends first.
        assert verdict is not None and verdict.reason == "Unschedulable"
        assert verdict.requeue_after == 21
