"""The lifecycle's bounded wait for pods that cannot start (kubelet and scheduler reasons)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sftjob_operator.api import SFTJob, parse_sftjob
from sftjob_operator.lifecycle import reconcile_job
from test_lifecycle import apply  # the shell's merge patches, decision then launch

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
IMAGE = "registry.example/trainer:test"


def make_job(timeout: int | None = None, nodes: int = 1) -> SFTJob:
    spec: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"name": "trl-lib/Capybara", "limit": 1000},
        "resources": {"nodes": nodes},
        "secrets": {"hfToken": {"name": "hf-token"}},
    }
    if timeout is not None:
        spec["retry"] = {"podStartTimeoutSeconds": timeout}
    return parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": 1},
            "spec": spec,
        }
    )


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(rank: int, phase: str = "Pending", waiting: dict[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "phase": phase,
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": iso(NOW)}],
    }
    if waiting is not None:
        status["containerStatuses"] = [{"name": "trainer", "state": {"waiting": waiting}}]
    elif phase == "Running":
        status["containerStatuses"] = [{"name": "trainer", "state": {"running": {}}}]
    return {
        "metadata": {
            "name": f"demo-a1-r{rank}",
            "creationTimestamp": iso(NOW),
            "labels": {"sftjob.dev/attempt": "1", "sftjob.dev/rank": str(rank)},
            # Owned by the job (only pods whose controller is the job's uid are its own).
            "ownerReferences": [
                {"kind": "SFTJob", "name": "demo", "uid": "u-1", "controller": True}
            ],
        },
        "status": status,
    }


SECRET_MISSING = {"reason": "CreateContainerConfigError", "message": 'secret "hf-token" not found'}


def conditions(job: SFTJob) -> dict[str, Any]:
    assert job.status is not None
    return {c.type: c for c in job.status.conditions}


def launched(timeout: int | None = None, nodes: int = 1) -> SFTJob:
    job = make_job(timeout, nodes)
    return apply(job, reconcile_job(job, [], NOW, IMAGE))


def test_waiting_reason_is_shown_until_the_timeout_then_fails_and_deletes_pods() -> None:
    job = launched(timeout=120)
    pods = [pod(0, waiting=SECRET_MISSING)]
    actions = reconcile_job(job, pods, NOW + timedelta(seconds=30), IMAGE)
    job = apply(job, actions)
    running = conditions(job)["Running"]
    assert (running.status, running.reason) == ("False", "CreateContainerConfigError")
    assert running.message.startswith('secret "hf-token" not found (pod demo-a1-r0')
    assert job.status is not None and job.status.phase == "Pending"
    assert actions.requeue_after == 90  # when the wait ends
    assert actions.delete_pods == []

    actions = reconcile_job(job, pods, NOW + timedelta(seconds=120), IMAGE)
    job = apply(job, actions)
    assert job.status is not None and job.status.phase == "Failed"
    failed = conditions(job)["Failed"]
    assert (failed.status, failed.reason) == ("True", "CreateContainerConfigError")
    assert 'secret "hf-token" not found' in failed.message
    assert actions.delete_pods == ["demo-a1-r0"]
    assert [e.reason for e in actions.events] == ["CreateContainerConfigError"]


def test_default_timeout_is_600_seconds() -> None:
    job = launched()
    pods = [pod(0, waiting=SECRET_MISSING)]
    assert reconcile_job(job, pods, NOW + timedelta(seconds=599), IMAGE).requeue_after == 1
    failed = apply(job, reconcile_job(job, pods, NOW + timedelta(seconds=600), IMAGE))
    assert failed.status is not None and failed.status.phase == "Failed"


def test_invalid_image_name_fails_at_once() -> None:
    job = launched()
    bad = {"reason": "InvalidImageName", "message": 'couldn\'t parse image name "Trainer:1"'}
    actions = reconcile_job(job, [pod(0, waiting=bad)], NOW + timedelta(seconds=1), IMAGE)
    assert actions.status["phase"] == "Failed"
    assert actions.delete_pods == ["demo-a1-r0"]


def test_a_blocked_rank_holds_the_job_even_when_another_runs() -> None:
    job = launched(timeout=60, nodes=2)
    pull = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "x"'}
    pods = [pod(0, "Running"), pod(1, waiting=pull)]
    job = apply(job, reconcile_job(job, pods, NOW + timedelta(seconds=10), IMAGE))
    assert job.status is not None and job.status.phase == "Pending"
    assert conditions(job)["Running"].reason == "ImagePullBackOff"
    actions = reconcile_job(job, pods, NOW + timedelta(seconds=60), IMAGE)
    assert actions.status["phase"] == "Failed"
    assert sorted(actions.delete_pods) == ["demo-a1-r0", "demo-a1-r1"]


def test_the_wait_heals_when_the_pod_starts() -> None:
    job = launched(timeout=60)
    job = apply(job, reconcile_job(job, [pod(0, waiting=SECRET_MISSING)], NOW, IMAGE))
    actions = reconcile_job(job, [pod(0, "Running")], NOW + timedelta(seconds=200), IMAGE)
    job = apply(job, actions)
    assert job.status is not None and job.status.phase == "Running"
    assert conditions(job)["Running"].status == "True"
    assert actions.requeue_after is None


def test_unschedulable_longer_than_the_timeout_fails() -> None:
    job = launched(timeout=300)
    why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
    stuck = pod(0)
    stuck["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": why,
            "lastTransitionTime": iso(NOW + timedelta(seconds=2)),
        }
    ]
    waiting = reconcile_job(job, [stuck], NOW + timedelta(seconds=100), IMAGE)
    assert waiting.requeue_after == 202  # from the Unschedulable transition, not creation
    job = apply(job, waiting)
    assert conditions(job)["Running"].reason == "Unschedulable"
    actions = reconcile_job(job, [stuck], NOW + timedelta(seconds=302), IMAGE)
    job = apply(job, actions)
    failed = conditions(job)["Failed"]
    assert (failed.reason, job.status and job.status.phase) == ("Unschedulable", "Failed")
    assert why in failed.message and actions.delete_pods == ["demo-a1-r0"]
