"""The pure lifecycle: launches, adoption, phases, retries, suspend, deadlines and TTL.

Pods are plain dicts shaped like the API's; `apply` merges a reconcile's status patch
into the job the way the shell's merge-patch does, so multi-step scenarios run
through the same function the operator calls.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sftjob_operator.api import SFTJob, SFTJobStatus, parse_sftjob
from sftjob_operator.children import DEFAULT_TRAINER_IMAGE, training_spec_hash
from sftjob_operator.lifecycle import (
    Actions,
    Event,
    invalid_status,
    is_same_job,
    iso,
    planned_status,
    reconcile_job,
    stale_eta_cleared,
    status_after,
)
from sftjob_operator.plan import plan_for
from sftjob_operator.retry_policy import Failure, classify_failure, decide_retry, shrink_batch
from sftjob_operator.trainer_config import build_trainer_config

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
STAMP = "2025-03-01T12:00:00Z"
IMAGE = "registry.example/trainer:test"
OWNED = {
    "phase",
    "conditions",
    "attempts",
    "restarts",
    "effectiveTraining",
    "lastFailure",
    "startTime",
    "completionTime",
    "outputPath",
    "specHash",
}


def make_job(
    status: dict[str, Any] | None = None,
    *,
    nodes: int = 1,
    per_device: int = 2,
    accumulation: int = 8,
    generation: int = 1,
    **spec_changes: Any,
) -> SFTJob:
    spec: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"name": "trl-lib/Capybara", "limit": 1000},
        "training": {
            "perDeviceTrainBatchSize": per_device,
            "gradientAccumulationSteps": accumulation,
        },
        "resources": {"nodes": nodes},
    }
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    job = parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": generation},
            "spec": spec,
        }
    )
    if status is None:
        return job
    # Every status the operator wrote records the generation it acted on.
    status = {"observedGeneration": generation, **status}
    return job.model_copy(update={"status": SFTJobStatus.model_validate(status)})


def with_spec(job: SFTJob, **spec_changes: Any) -> SFTJob:
    """The same job (status kept) with a changed spec."""
    spec = job.spec.model_dump(mode="json", exclude_none=True)
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    fresh = parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": job.metadata.model_dump(),
            "spec": spec,
        }
    )
    return fresh.model_copy(update={"status": job.status})


def apply(job: SFTJob, actions: Actions, *, launched: bool = True) -> SFTJob:
    """The job after the shell merge-patches `actions.status` (None deletes a field).

    `launched`: every create succeeded, so the launch-complete patch was written too;
    False stops where a crash between creating pods and recording the launch would.
    """
    current = job.status.model_dump(mode="json", exclude_none=True) if job.status else {}
    patches = [actions.status, actions.launch_status] if launched else [actions.status]
    for patch in patches:
        for key, value in patch.items():
            if value is None:
                current.pop(key, None)
            else:
                current[key] = value
    return job.model_copy(update={"status": SFTJobStatus.model_validate(current)})


def all_events(actions: Actions) -> list[str]:
    return [e.reason for e in actions.events + actions.launch_events]


def pod(
    attempt: int,
    rank: int,
    phase: str = "Pending",
    *,
    exit_code: int | None = None,
    term_reason: str | None = None,
    message: str | None = None,
    reason: str | None = None,
    unschedulable: str | None = None,
    start_time: str | None = None,
    deleting: bool = False,
    owner: str = "u-1",
) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "name": f"demo-a{attempt}-r{rank}",
        "namespace": "ml",
        "ownerReferences": [{"kind": "SFTJob", "name": "demo", "uid": owner, "controller": True}],
        "labels": {
            "sftjob.dev/job-name": "demo",
            "sftjob.dev/attempt": str(attempt),
            "sftjob.dev/rank": str(rank),
        },
    }
    if deleting:
        metadata["deletionTimestamp"] = STAMP
    status: dict[str, Any] = {"phase": phase}
    if start_time:
        status["startTime"] = start_time
    if reason:
        status["reason"] = reason
        status["message"] = f"the node was low on resource: {reason.lower()}"
    if unschedulable:
        status["conditions"] = [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        ]
    if exit_code is not None or term_reason is not None or message is not None:
        terminated: dict[str, Any] = {"exitCode": exit_code if exit_code is not None else 1}
        if term_reason:
            terminated["reason"] = term_reason
        if message is not None:
            terminated["message"] = message
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {"metadata": metadata, "status": status}


def report(reason: str, message: str, step: int | None = 7, code: int = 1) -> dict[str, Any]:
    """A Failed pod whose trainer wrote its JSON summary to the termination log."""
    body = json.dumps({"reason": reason, "message": message, "step": step})
    return {"message": body, "exit_code": code}


def failed(attempt: int, rank: int, **kwargs: Any) -> dict[str, Any]:
    return pod(attempt, rank, "Failed", **kwargs)


def conditions_of(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in status["conditions"]}


def running_job(nodes: int = 1, **kwargs: Any) -> SFTJob:
    """A job whose attempt 1 has been launched and observed running."""
    job = make_job(nodes=nodes, **kwargs)
    job = apply(job, reconcile_job(job, [], NOW, IMAGE))
    pods = [pod(1, r, "Running", start_time=STAMP) for r in range(nodes)]
    return apply(job, reconcile_job(job, pods, NOW, IMAGE))


def names(pods: list[dict[str, Any]]) -> list[str]:
    return [p["metadata"]["name"] for p in pods]


# --------------------------------------------------------------------- launch


class TestLaunch:
    def test_first_reconcile_launches_attempt_one(self) -> None:
        job = make_job(nodes=2)
        actions = reconcile_job(job, [], NOW, IMAGE)
        assert names(actions.create_pods) == ["demo-a1-r0", "demo-a1-r1"]
        assert {p["spec"]["containers"][0]["image"] for p in actions.create_pods} == {IMAGE}
        assert actions.delete_pods == []
        assert actions.trainer_config is not None
        assert actions.trainer_config["attempt"] == 1
        assert actions.trainer_config == build_trainer_config(job, attempt=1)
        # The decision is written before any pod exists...
        assert actions.status["attempts"] == 1
        assert actions.status["launchedAttempt"] == 0
        assert actions.status["phase"] == "Pending"
        assert actions.status["specHash"] == training_spec_hash(job)
        assert actions.events == []
        # ...and the launch is recorded complete once every pod was created.
        assert actions.launch_status["launchedAttempt"] == 1
        running = conditions_of(actions.launch_status)["Running"]
        assert (running["status"], running["reason"]) == ("False", "Launched")
        assert running["lastTransitionTime"] == STAMP
        assert running["observedGeneration"] == 1
        assert actions.launch_events == [
            Event("Normal", "Launched", "launch 1: 2 pod(s) created", "a1")
        ]
        assert actions.delete_job is False
        assert actions.requeue_after is None

    def test_second_reconcile_with_created_pods_creates_nothing(self) -> None:
        job = make_job(nodes=2)
        first = reconcile_job(job, [], NOW, IMAGE)
        job = apply(job, first)
        pods = [pod(1, 0), pod(1, 1)]
        again = reconcile_job(job, pods, NOW + timedelta(seconds=5), IMAGE)
        assert again.create_pods == []
        assert again.delete_pods == []
        assert again.trainer_config is None
        assert again.events == []
        assert again.status == {}

    def test_pods_newer_than_status_are_adopted(self) -> None:
        # The operator crashed after creating the pods and before writing the status.
        job = make_job(nodes=2)
        actions = reconcile_job(job, [pod(1, 0), pod(1, 1)], NOW, IMAGE)
        assert actions.create_pods == []
        assert actions.delete_pods == []
        assert actions.trainer_config is None
        assert actions.status["attempts"] == 1

    def test_adopted_launch_records_the_spec_hash(self) -> None:
        # Without the hash, a later spec edit would never be reported as ignored.
        job = make_job(nodes=2)
        actions = reconcile_job(job, [pod(1, 0), pod(1, 1)], NOW, IMAGE)
        assert actions.status["specHash"] == training_spec_hash(job)

    def test_adopted_running_pods_mark_the_job_running(self) -> None:
        # Adoption completes the launch; the next pass sees the pod running.
        job = make_job()
        running = [pod(1, 0, "Running", start_time=STAMP)]
        actions = reconcile_job(job, running, NOW, IMAGE)
        assert actions.create_pods == []
        assert actions.status["attempts"] == 1
        assert actions.launch_status["launchedAttempt"] == 1
        actions = reconcile_job(apply(job, actions), running, NOW, IMAGE)
        assert actions.status["phase"] == "Running"

    def test_default_image_used_when_spec_has_none(self) -> None:
        actions = reconcile_job(make_job(), [], NOW, DEFAULT_TRAINER_IMAGE)
        assert actions.create_pods[0]["spec"]["containers"][0]["image"] == DEFAULT_TRAINER_IMAGE
        custom = reconcile_job(make_job(image="own/img:1"), [], NOW, IMAGE)
        assert custom.create_pods[0]["spec"]["containers"][0]["image"] == "own/img:1"

    def test_stale_live_pods_of_older_attempts_are_deleted(self) -> None:
        job = make_job({"attempts": 2, "phase": "Running", "specHash": "x"})
        pods = [
            pod(1, 0, "Running"),
            pod(1, 1, "Running", deleting=True),  # already going away
            failed(1, 2, exit_code=143),  # finished: nothing to delete
            pod(2, 0, "Running"),
        ]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0"]
        assert actions.create_pods == []


# --------------------------------------------------------------------- running / success


class TestRunningAndSuccess:
    def test_running_when_any_pod_runs(self) -> None:
        job = apply(make_job(nodes=2), reconcile_job(make_job(nodes=2), [], NOW, IMAGE))
        later = NOW + timedelta(minutes=1)
        pods = [pod(1, 0, "Running", start_time="2025-03-01T12:00:30Z"), pod(1, 1, "Pending")]
        actions = reconcile_job(job, pods, later, IMAGE)
        assert actions.status["phase"] == "Running"
        assert actions.status["startTime"] == "2025-03-01T12:00:30Z"
        running = conditions_of(actions.status)["Running"]
        assert (running["status"], running["reason"]) == ("True", "Training")
        assert running["lastTransitionTime"] == iso(later)
        # One Event for the transition, with the condition's reason (not its type).
        assert [e.reason for e in actions.events] == [running["reason"]]
        # The next pass changes nothing and says nothing.
        job = apply(job, actions)
        again = reconcile_job(job, pods, later + timedelta(minutes=1), IMAGE)
        assert again.events == []
        assert again.status == {}

    def test_start_time_falls_back_to_now(self) -> None:
        job = apply(make_job(), reconcile_job(make_job(), [], NOW, IMAGE))
        actions = reconcile_job(job, [pod(1, 0, "Running")], NOW + timedelta(seconds=9), IMAGE)
        assert actions.status["startTime"] == "2025-03-01T12:00:09Z"

    def test_succeeded_needs_every_rank(self) -> None:
        job = running_job(nodes=2)
        half = reconcile_job(job, [pod(1, 0, "Succeeded"), pod(1, 1, "Running")], NOW, IMAGE)
        assert half.status.get("phase") is None  # still Running: nothing to patch
        assert job.status is not None and job.status.phase == "Running"
        assert half.delete_pods == []

        done = reconcile_job(
            job, [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")], NOW + timedelta(hours=1), IMAGE
        )
        assert done.status["phase"] == "Succeeded"
        assert done.status["completionTime"] == "2025-03-01T13:00:00Z"
        assert done.status["outputPath"] == "/output"
        conds = conditions_of(done.status)
        assert (conds["Succeeded"]["status"], conds["Succeeded"]["reason"]) == (
            "True",
            "TrainingComplete",
        )
        assert conds["Running"]["status"] == "False"
        assert [e.reason for e in done.events] == ["TrainingComplete"]
        assert done.create_pods == [] and done.delete_pods == []

    def test_pending_and_succeeded_mix_is_not_success(self) -> None:
        job = apply(make_job(nodes=2), reconcile_job(make_job(nodes=2), [], NOW, IMAGE))
        actions = reconcile_job(job, [pod(1, 0, "Succeeded"), pod(1, 1, "Pending")], NOW, IMAGE)
        assert "phase" not in actions.status
        assert actions.create_pods == []

    def test_unschedulable_pod_reports_the_scheduler_message(self) -> None:
        job = apply(make_job(), reconcile_job(make_job(), [], NOW, IMAGE))
        why = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
        later = NOW + timedelta(seconds=30)
        actions = reconcile_job(job, [pod(1, 0, "Pending", unschedulable=why)], later, IMAGE)
        running = conditions_of(actions.status)["Running"]
        assert (running["status"], running["reason"]) == ("False", "Unschedulable")
        # The scheduler's own words, then which pod and when the wait ends.
        assert running["message"].startswith(why + " (pod demo-a1-r0;")
        # Still False since the launch: the transition time does not move.
        assert running["lastTransitionTime"] == STAMP
        assert "phase" not in actions.status
        assert actions.create_pods == [] and actions.delete_pods == []

    def test_status_patch_holds_only_operator_fields(self) -> None:
        job = apply(make_job(), reconcile_job(make_job(), [], NOW, IMAGE))
        assert job.status is not None
        trainer_written = job.status.model_dump(mode="json", exclude_none=True) | {
            "progress": {"step": 40, "totalSteps": 375, "loss": 1.2},
            "measuredPlan": {
                "worldSize": 1,
                "effectiveBatchSize": 16,
                "perDeviceTrainBatchSize": 2,
                "gradientAccumulationSteps": 8,
            },
            "plan": plan_for(job.spec).model_dump(mode="json"),
            "observedGeneration": 1,
        }
        job = make_job(trainer_written)
        actions = reconcile_job(job, [pod(1, 0, "Running", start_time=STAMP)], NOW, IMAGE)
        assert actions.status  # the Running transition is patched...
        assert set(actions.status) <= OWNED  # ...with nothing the trainer owns
        assert set(actions.status) == {"phase", "conditions", "startTime"}


# --------------------------------------------------------------------- failures


class TestFailures:
    @pytest.mark.parametrize("reason", ["DataError", "ConfigError", "ModelLoadError"])
    def test_fatal_trainer_errors_fail_at_once_and_tear_down(self, reason: str) -> None:
        job = running_job(nodes=2)
        message = "column 'messages' missing in row 12"
        pods = [pod(1, 0, "Running"), failed(1, 1, **report(reason, message, step=3, code=11))]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0"]
        assert actions.create_pods == []
        assert actions.trainer_config is None
        assert actions.status["phase"] == "Failed"
        assert actions.status["completionTime"] == STAMP
        failed_cond = conditions_of(actions.status)["Failed"]
        assert (failed_cond["status"], failed_cond["reason"], failed_cond["message"]) == (
            "True",
            reason,
            message,
        )
        assert conditions_of(actions.status)["Running"]["status"] == "False"
        assert actions.status["lastFailure"] == {
            "reason": reason,
            "message": message,
            "step": 3,
            "time": STAMP,
            "attempt": 1,
        }
        assert "restarts" not in actions.status
        assert actions.events == [Event("Warning", reason, message, "a1")]

    def test_failed_job_stays_failed_and_cleans_up(self) -> None:
        job = running_job()
        pods = [failed(1, 0, **report("DataError", "bad"))]
        job = apply(job, reconcile_job(job, pods, NOW, IMAGE))
        again = reconcile_job(job, pods, NOW + timedelta(seconds=1), IMAGE)
        assert again.status == {} and again.create_pods == [] and again.events == []

    def test_oom_shrinks_the_batch_and_keeps_the_plan(self) -> None:
        job = running_job(per_device=4, accumulation=2)
        pods = [failed(1, 0, **report("OutOfMemory", "CUDA out of memory", step=5, code=10))]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert names(actions.create_pods) == ["demo-a2-r0"]
        assert actions.create_pods[0]["metadata"]["labels"]["sftjob.dev/attempt"] == "2"
        config = actions.trainer_config
        assert config is not None
        assert config["attempt"] == 2
        assert config["resolved"]["perDeviceTrainBatchSize"] == 2
        assert config["resolved"]["gradientAccumulationSteps"] == 4
        assert config["spec"]["training"]["perDeviceTrainBatchSize"] == 4  # as written
        original = build_trainer_config(job)
        assert config["plan"] == original["plan"]
        assert config["plan"]["perDeviceTrainBatchSize"] == 4
        assert config["plan"]["effectiveBatchSize"] == 8
        assert actions.status["effectiveTraining"] == {
            "perDeviceTrainBatchSize": 2,
            "gradientAccumulationSteps": 4,
        }
        assert actions.status["restarts"] == 1
        assert actions.status["attempts"] == 2
        assert actions.status["phase"] == "Restarting"
        assert actions.status["lastFailure"]["reason"] == "OutOfMemory"
        assert actions.status["lastFailure"]["attempt"] == 1
        restarting = conditions_of(actions.status)["Restarting"]
        assert (restarting["status"], restarting["reason"]) == ("True", "OutOfMemoryShrink")
        assert conditions_of(actions.status)["Running"]["status"] == "False"
        assert [(e.type, e.reason) for e in actions.events] == [("Warning", "OutOfMemoryShrink")]

    def test_second_oom_shrinks_from_the_effective_batch(self) -> None:
        job = running_job(per_device=4, accumulation=2)
        first = reconcile_job(job, [failed(1, 0, **report("OutOfMemory", "oom"))], NOW, IMAGE)
        job = apply(job, first)
        pods = [failed(1, 0, **report("OutOfMemory", "oom")), pod(2, 0, "Running")]
        job = apply(job, reconcile_job(job, pods, NOW, IMAGE))
        second = reconcile_job(job, [failed(2, 0, **report("OutOfMemory", "oom"))], NOW, IMAGE)
        assert second.trainer_config is not None
        resolved = second.trainer_config["resolved"]
        assert (resolved["perDeviceTrainBatchSize"], resolved["gradientAccumulationSteps"]) == (
            1,
            8,
        )
        assert second.status["restarts"] == 2
        assert names(second.create_pods) == ["demo-a3-r0"]

    def test_oom_at_micro_batch_one_fails_with_advice(self) -> None:
        job = running_job(per_device=1, accumulation=16)
        actions = reconcile_job(job, [failed(1, 0, **report("OutOfMemory", "oom"))], NOW, IMAGE)
        assert actions.create_pods == []
        assert actions.status["phase"] == "Failed"
        failed_cond = conditions_of(actions.status)["Failed"]
        assert failed_cond["reason"] == "OutOfMemory"
        assert "already 1" in failed_cond["message"]
        assert "gradientCheckpointing" in failed_cond["message"]

    def test_odd_micro_batch_shrinks_to_an_exact_divisor(self) -> None:
        job = running_job(per_device=3, accumulation=5)
        actions = reconcile_job(job, [failed(1, 0, **report("OutOfMemory", "oom"))], NOW, IMAGE)
        assert actions.trainer_config is not None
        resolved = actions.trainer_config["resolved"]
        assert (resolved["perDeviceTrainBatchSize"], resolved["gradientAccumulationSteps"]) == (
            1,
            15,
        )
        assert 1 * 15 == 3 * 5  # effective batch unchanged

    def test_oom_without_auto_shrink_fails(self) -> None:
        job = running_job(retry={"oomAutoShrink": False})
        actions = reconcile_job(job, [failed(1, 0, **report("OutOfMemory", "oom"))], NOW, IMAGE)
        assert actions.create_pods == []
        assert actions.status["phase"] == "Failed"
        failed_cond = conditions_of(actions.status)["Failed"]
        assert failed_cond["reason"] == "OutOfMemory"
        assert "oomAutoShrink is off" in failed_cond["message"]

    def test_missing_rank_relaunches_with_the_same_batch(self) -> None:
        job = running_job(nodes=2)
        actions = reconcile_job(job, [pod(1, 0, "Running")], NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0"]
        # Rank 0 of attempt 1 still runs (it may be writing a checkpoint): no new pod yet.
        assert actions.create_pods == [] and actions.launch_status == {}
        assert actions.requeue_after is not None
        restarted = apply(job, actions, launched=False)
        terminating = [pod(1, 0, "Running", deleting=True)]
        wait = reconcile_job(restarted, terminating, NOW, IMAGE)
        assert wait.create_pods == [] and wait.delete_pods == [] and wait.status == {}
        after = reconcile_job(restarted, [], NOW, IMAGE)
        assert names(after.create_pods) == ["demo-a2-r0", "demo-a2-r1"]
        assert after.status == {}  # nothing to decide again: no second restart
        assert after.launch_status["launchedAttempt"] == 2
        assert after.trainer_config is not None
        resolved = after.trainer_config["resolved"]
        assert (resolved["perDeviceTrainBatchSize"], resolved["gradientAccumulationSteps"]) == (
            2,
            8,
        )
        assert "effectiveTraining" not in actions.status
        assert actions.status["restarts"] == 1
        assert actions.status["lastFailure"]["reason"] == "PodLost"
        assert "rank 1" in actions.status["lastFailure"]["message"]
        assert conditions_of(actions.status)["Restarting"]["reason"] == "PodLost"

    def test_evicted_pod_relaunches(self) -> None:
        job = running_job(nodes=2)
        pods = [pod(1, 0, "Running"), failed(1, 1, reason="Evicted", exit_code=137)]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0"]
        assert actions.create_pods == []  # until rank 0 of attempt 1 is gone
        after = reconcile_job(apply(job, actions), [pods[1]], NOW, IMAGE)
        assert names(after.create_pods) == ["demo-a2-r0", "demo-a2-r1"]
        assert actions.status["lastFailure"]["reason"] == "PodLost"
        assert "Evicted" in actions.status["lastFailure"]["message"]
        assert actions.status["phase"] == "Restarting"

    def test_own_failure_explains_more_than_torn_down_ranks(self) -> None:
        job = running_job(nodes=2)
        pods = [failed(1, 0, exit_code=143), failed(1, 1, **report("DataError", "bad row"))]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.status["lastFailure"]["reason"] == "DataError"
        assert actions.status["phase"] == "Failed"

    def test_max_restarts_is_honoured(self) -> None:
        job = running_job(retry={"maxRestarts": 2})
        for attempt in (1, 2):
            actions = reconcile_job(job, [failed(attempt, 0, exit_code=143)], NOW, IMAGE)
            assert len(actions.create_pods) == 1
            job = apply(job, actions)
        assert job.status is not None and job.status.restarts == 2
        last = reconcile_job(job, [failed(3, 0, exit_code=143)], NOW, IMAGE)
        assert last.create_pods == []
        assert last.status["phase"] == "Failed"
        failed_cond = conditions_of(last.status)["Failed"]
        assert failed_cond["reason"] == "RestartLimitExceeded"
        assert "retry.maxRestarts" in failed_cond["message"]
        assert "restarts" not in last.status  # unchanged: 2

    def test_zero_restarts_fails_on_the_first_loss(self) -> None:
        job = running_job(retry={"maxRestarts": 0})
        actions = reconcile_job(job, [], NOW, IMAGE)
        assert actions.create_pods == []
        assert conditions_of(actions.status)["Failed"]["reason"] == "RestartLimitExceeded"


class TestClassifyFailure:
    @pytest.mark.parametrize(
        ("code", "reason"),
        [
            (10, "OutOfMemory"),
            (11, "DataError"),
            (12, "ConfigError"),
            (13, "ModelLoadError"),
            (14, "Interrupted"),
            (137, "Interrupted"),
            (143, "Interrupted"),
        ],
    )
    def test_exit_code_fallbacks(self, code: int, reason: str) -> None:
        failure = classify_failure(failed(1, 2, exit_code=code, message="Traceback ..."))
        assert (failure.reason, failure.rank) == (reason, 2)

    def test_oom_killed_container(self) -> None:
        failure = classify_failure(failed(1, 0, exit_code=137, term_reason="OOMKilled"))
        assert failure.reason == "OutOfMemory"
        assert "memory limit" in failure.message

    def test_trainer_report_wins_over_exit_code(self) -> None:
        failure = classify_failure(failed(1, 0, **report("DataError", "empty split", 0, code=1)))
        assert failure == Failure("DataError", "empty split", 0, 0)

    def test_non_json_message_is_an_internal_error_with_the_log_tail(self) -> None:
        log = "x" * 1000 + "\nRuntimeError: boom"
        failure = classify_failure(failed(1, 0, exit_code=1, message=log))
        assert failure.reason == "InternalError"
        assert failure.message.endswith("RuntimeError: boom")
        assert len(failure.message) == 600

    def test_json_without_reason_is_not_a_report(self) -> None:
        failure = classify_failure(failed(1, 0, exit_code=1, message='{"step": 3}'))
        assert failure.reason == "InternalError"
        assert failure.message == '{"step": 3}'

    def test_no_message_names_the_exit_code(self) -> None:
        failure = classify_failure(failed(1, 0, exit_code=2))
        assert failure == Failure("InternalError", "exit code 2", None, 0)

    @pytest.mark.parametrize("reason", ["Evicted", "Preempted", "NodeLost"])
    def test_lost_pod_reasons(self, reason: str) -> None:
        assert classify_failure(failed(1, 0, reason=reason)).reason == "PodLost"

    def test_container_the_kubelet_cannot_locate_is_a_lost_pod(self) -> None:
        # What a kubelet reports for a container gone with its node (status_manager.go
        # TerminatePod): exit code 137 here is not a signal the trainer got.
        lost = failed(
            1,
            1,
            exit_code=137,
            term_reason="ContainerStatusUnknown",
            message="The container could not be located when the pod was terminated",
        )
        failure = classify_failure(lost)
        assert (failure.reason, failure.rank, failure.step) == ("PodLost", 1, None)
        assert "could not be located" in failure.message

    def test_lost_container_relaunches_from_the_checkpoint_with_the_same_batch(self) -> None:
        job = running_job()
        lost = failed(
            1,
            0,
            exit_code=137,
            term_reason="ContainerStatusUnknown",
            message="The container could not be located when the pod was terminated",
        )
        actions = reconcile_job(job, [lost], NOW, IMAGE)
        assert names(actions.create_pods) == ["demo-a2-r0"]
        assert actions.status["phase"] == "Restarting"
        assert actions.status["restarts"] == 1
        assert actions.status["lastFailure"]["reason"] == "PodLost"
        restarting = conditions_of(actions.status)["Restarting"]
        assert restarting["reason"] == "PodLost"
        assert "resuming from the newest checkpoint" in restarting["message"]
        assert "effectiveTraining" not in actions.status


class TestRetryPolicy:
    @pytest.mark.parametrize(
        ("before", "after"),
        [((2, 8), (1, 16)), ((4, 2), (2, 4)), ((3, 5), (1, 15)), ((6, 4), (3, 8)), ((1, 8), None)],
    )
    def test_shrink_batch(self, before: tuple[int, int], after: tuple[int, int] | None) -> None:
        assert shrink_batch(*before) == after

    def test_shrink_keeps_the_effective_batch_exactly(self) -> None:
        for per_device in range(2, 65):
            shrunk = shrink_batch(per_device, 3)
            assert shrunk is not None
            assert shrunk[0] < per_device
            assert shrunk[0] * shrunk[1] == per_device * 3

    def test_fatal_reasons_never_retry_even_with_restarts_left(self) -> None:
        job = make_job()
        decision = decide_retry(Failure("ConfigError", "bad arg"), job.spec, SFTJobStatus())
        assert (decision.relaunch, decision.reason, decision.message) == (
            False,
            "ConfigError",
            "bad arg",
        )

    def test_internal_error_is_retried(self) -> None:
        job = make_job()
        decision = decide_retry(Failure("InternalError", "segfault"), job.spec, SFTJobStatus())
        assert decision.relaunch is True
        assert (decision.per_device, decision.accumulation) == (2, 8)


# --------------------------------------------------------------------- suspend / deadline / ttl


class TestSuspend:
    def test_suspend_stops_pods_and_resume_launches_a_new_attempt(self) -> None:
        job = running_job(nodes=2)
        suspended = with_spec(job, suspend=True)
        pods = [pod(1, 0, "Running"), pod(1, 1, "Running")]
        actions = reconcile_job(suspended, pods, NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0", "demo-a1-r1"]
        assert actions.create_pods == []
        assert actions.status["phase"] == "Suspended"
        conds = conditions_of(actions.status)
        assert (conds["Suspended"]["status"], conds["Suspended"]["reason"]) == (
            "True",
            "SuspendedByUser",
        )
        assert conds["Running"]["status"] == "False"
        assert "SpecChangeIgnored" not in conds  # suspend alone is not a spec change
        assert all_events(actions) == ["SuspendedByUser"]

        suspended = apply(suspended, actions)
        terminating = [pod(1, 0, "Running", deleting=True), failed(1, 1, exit_code=143)]
        quiet = reconcile_job(suspended, terminating, NOW, IMAGE)
        assert quiet.status == {} and quiet.events == [] and quiet.create_pods == []

        resumed = with_spec(suspended, suspend=False)
        later = NOW + timedelta(hours=2)
        back = reconcile_job(resumed, terminating, later, IMAGE)
        # Rank 0 is still terminating (writing its checkpoint): the resume waits for it.
        assert back.create_pods == [] and back.status["attempts"] == 2
        assert all_events(back) == ["Resumed"]
        back = reconcile_job(resumed, terminating[1:], later, IMAGE)
        assert names(back.create_pods) == ["demo-a2-r0", "demo-a2-r1"]
        assert back.trainer_config is not None and back.trainer_config["attempt"] == 2
        assert back.status["attempts"] == 2
        assert "restarts" not in back.status  # a resume is not a restart
        assert back.status["startTime"] is None  # the deadline clock restarts (merge-patch null)
        assert back.status["phase"] == "Pending"
        conds = conditions_of(back.status)
        assert (conds["Suspended"]["status"], conds["Suspended"]["reason"]) == ("False", "Resumed")
        assert "SpecChangeIgnored" not in conds
        # Posted twice (this pass and the waiting one): one Event name, so one Event.
        assert [(e.reason, e.key) for e in back.events] == [("Resumed", "a2")]
        assert all_events(back) == ["Resumed", "Launched"]

    def test_resume_keeps_the_shrunk_batch(self) -> None:
        job = make_job(
            {
                "phase": "Suspended",
                "attempts": 2,
                "restarts": 1,
                "effectiveTraining": {
                    "perDeviceTrainBatchSize": 1,
                    "gradientAccumulationSteps": 16,
                },
            }
        )
        actions = reconcile_job(job, [], NOW, IMAGE)
        assert actions.trainer_config is not None
        resolved = actions.trainer_config["resolved"]
        assert (resolved["perDeviceTrainBatchSize"], resolved["gradientAccumulationSteps"]) == (
            1,
            16,
        )

    def test_suspended_time_does_not_count_against_the_deadline(self) -> None:
        job = running_job(activeDeadlineSeconds=3600)
        job = apply(
            with_spec(job, suspend=True),
            reconcile_job(with_spec(job, suspend=True), [], NOW, IMAGE),
        )
        resumed = with_spec(job, suspend=False)
        later = NOW + timedelta(days=1)
        job = apply(resumed, reconcile_job(resumed, [], later, IMAGE))
        actions = reconcile_job(
            job, [pod(2, 0, "Running", start_time=iso(later))], later + timedelta(minutes=1), IMAGE
        )
        assert actions.status.get("phase") == "Running"
        assert actions.delete_pods == []


class TestDeadline:
    def test_deadline_exceeded_fails_and_deletes_pods(self) -> None:
        job = running_job(nodes=2, activeDeadlineSeconds=3600)
        pods = [pod(1, 0, "Running"), pod(1, 1, "Running")]
        before = reconcile_job(job, pods, NOW + timedelta(seconds=3600), IMAGE)
        assert before.status == {} and before.delete_pods == []
        actions = reconcile_job(job, pods, NOW + timedelta(seconds=3601), IMAGE)
        assert actions.delete_pods == ["demo-a1-r0", "demo-a1-r1"]
        assert actions.create_pods == []
        assert actions.status["phase"] == "Failed"
        failed_cond = conditions_of(actions.status)["Failed"]
        assert failed_cond["reason"] == "DeadlineExceeded"
        assert "3600" in failed_cond["message"]

    def test_finished_training_is_not_failed_by_a_late_look(self) -> None:
        # Both ranks finished in time; the operator only noticed after the deadline.
        job = running_job(nodes=2, activeDeadlineSeconds=3600)
        pods = [pod(1, 0, "Succeeded"), pod(1, 1, "Succeeded")]
        actions = reconcile_job(job, pods, NOW + timedelta(seconds=3700), IMAGE)
        assert actions.status["phase"] == "Succeeded"


class TestTTL:
    @pytest.mark.parametrize("phase", ["Succeeded", "Failed"])
    def test_job_deleted_only_after_ttl(self, phase: str) -> None:
        job = make_job(
            {"phase": phase, "attempts": 1, "completionTime": STAMP},
            ttlSecondsAfterFinished=60,
        )
        assert reconcile_job(job, [], NOW + timedelta(seconds=59), IMAGE).delete_job is False
        assert reconcile_job(job, [], NOW + timedelta(seconds=60), IMAGE).delete_job is True

    def test_no_ttl_keeps_the_job(self) -> None:
        job = make_job({"phase": "Succeeded", "attempts": 1, "completionTime": STAMP})
        assert reconcile_job(job, [], NOW + timedelta(days=30), IMAGE).delete_job is False

    def test_finished_job_deletes_leftover_live_pods(self) -> None:
        job = make_job({"phase": "Failed", "attempts": 1, "completionTime": STAMP})
        actions = reconcile_job(job, [pod(1, 0, "Running"), failed(1, 1)], NOW, IMAGE)
        assert actions.delete_pods == ["demo-a1-r0"]
        assert actions.create_pods == [] and actions.status == {}


# --------------------------------------------------------------------- spec changes


class TestSpecChange:
    def test_training_change_after_launch_is_ignored_and_reported(self) -> None:
        job = running_job()
        changed = with_spec(job, training={"learningRate": 1e-5})
        pods = [pod(1, 0, "Running")]
        actions = reconcile_job(changed, pods, NOW, IMAGE)
        ignored = conditions_of(actions.status)["SpecChangeIgnored"]
        assert (ignored["status"], ignored["reason"]) == ("True", "ImmutableWhileRunning")
        assert actions.create_pods == [] and actions.delete_pods == []
        assert "specHash" not in actions.status

        # Reverting the edit clears the condition.
        changed = apply(changed, actions)
        restored = with_spec(changed, training={"learningRate": None})
        assert restored.spec == job.spec
        back = reconcile_job(restored, pods, NOW, IMAGE)
        assert conditions_of(back.status)["SpecChangeIgnored"]["status"] == "False"
        assert conditions_of(back.status)["SpecChangeIgnored"]["reason"] == "SpecRestored"

    def test_retry_and_ttl_changes_are_not_spec_changes(self) -> None:
        job = running_job()
        changed = with_spec(job, retry={"maxRestarts": 7}, ttlSecondsAfterFinished=10)
        actions = reconcile_job(changed, [pod(1, 0, "Running")], NOW, IMAGE)
        assert actions.status == {}

    def test_relaunch_after_an_ignored_edit_runs_the_original_spec(self) -> None:
        job = running_job()
        changed = with_spec(job, training={"learningRate": 1e-5})
        actions = reconcile_job(
            changed, [failed(1, 0, exit_code=143)], NOW, IMAGE, launched_spec=job.spec
        )
        assert actions.trainer_config is not None
        assert actions.trainer_config["resolved"]["learningRate"] == job.spec.learning_rate


# --------------------------------------------------------------------- planning


class TestPlannedStatus:
    def test_carries_plan_advisories_and_planned_condition(self) -> None:
        job = make_job(generation=4, training={"learningRate": 0.5})
        status = planned_status(job, NOW)
        assert status["plan"] == plan_for(job.spec).model_dump(mode="json", exclude_none=True)
        assert status["plan"]["totalSteps"] == 189  # ceil(1000/2/8)=63 steps x 3 epochs
        assert status["phase"] == "Pending"
        assert status["observedGeneration"] == 4
        codes = [a["code"] for a in status["advisories"]]
        assert "LearningRateOutOfRange" in codes
        (planned,) = status["conditions"]
        assert planned["type"] == "Planned"
        assert (planned["status"], planned["reason"]) == ("True", "PlanReady")
        assert planned["message"] == "effective batch 16 over 1 process(es), 189 steps"
        assert planned["lastTransitionTime"] == STAMP
        assert planned["observedGeneration"] == 4

    def test_unknown_size_is_an_estimate(self) -> None:
        job = make_job(dataset={"limit": None})
        assert job.spec.dataset.known_size() is None
        status = planned_status(job, NOW)
        assert "totalSteps" not in status["plan"]
        assert status["conditions"][0]["message"].endswith("pending steps (estimate)")


class TestInvalidStatus:
    def test_failed_invalid_spec_names_every_field(self) -> None:
        messages = [
            "spec.training.maxSeqLength: unknown field: renamed to maxLength",
            "spec.resources.gpus: unknown field; did you mean gpusPerNode?",
        ]
        status = invalid_status(None, messages, NOW, 2)
        assert status["phase"] == "Failed"
        assert status["completionTime"] == STAMP
        assert status["observedGeneration"] == 2
        conds = conditions_of(status)
        assert (conds["Planned"]["status"], conds["Planned"]["reason"]) == ("False", "InvalidSpec")
        assert (conds["Failed"]["status"], conds["Failed"]["reason"]) == ("True", "InvalidSpec")
        for cond in (conds["Planned"], conds["Failed"]):
            assert "spec.training.maxSeqLength" in cond["message"]
            assert "spec.resources.gpus" in cond["message"]

    def test_keeps_existing_conditions_and_clears_running(self) -> None:
        existing = SFTJobStatus.model_validate(
            {
                "conditions": [
                    {
                        "type": "Planned",
                        "status": "True",
                        "reason": "PlanReady",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    },
                    {
                        "type": "Running",
                        "status": "True",
                        "reason": "Training",
                        "lastTransitionTime": "2025-01-01T00:00:00Z",
                    },
                ]
            }
        )
        status = invalid_status(existing, ["spec.x: bad"], NOW, 3)
        assert [c["type"] for c in status["conditions"]] == ["Planned", "Running", "Failed"]
        conds = conditions_of(status)
        assert conds["Planned"]["status"] == "False"
        assert conds["Planned"]["lastTransitionTime"] == STAMP
        assert conds["Running"]["status"] == "False"


class TestResumeRace:
    def test_a_pass_that_sees_a_stale_suspended_status_adopts_the_resumed_pods(self) -> None:
        # Pass 1 resumed (attempt 2 pods exist) but pass 2 still reads phase Suspended,
        # attempts 1: it must adopt attempt 2, not launch attempt 3.
        job = make_job(
            status={"phase": "Suspended", "attempts": 1, "specHash": None},
        )
        pods = [pod(2, 0, "Pending")]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.create_pods == []
        assert actions.delete_pods == []
        assert actions.status["attempts"] == 2
        assert actions.status["phase"] == "Pending"


@pytest.mark.parametrize(
    ("handed_uid", "live", "same"),
    [
        ("uid-1", {"metadata": {"name": "x", "uid": "uid-1"}}, True),
        # Deleted: the GET answered 404.
        ("uid-1", None, False),
        # Deleted and re-created under the same name: another object.
        ("uid-1", {"metadata": {"name": "x", "uid": "uid-2"}}, False),
        # A body without a uid cannot be matched to anything.
        (None, {"metadata": {"name": "x", "uid": "uid-1"}}, False),
        ("", {"metadata": {"name": "x"}}, False),
    ],
)
def test_is_same_job_only_for_the_live_object_with_the_handed_uid(
    handed_uid: str | None, live: dict[str, Any] | None, same: bool
) -> None:
    assert is_same_job(handed_uid, live) is same


# --------------------------------------------------------------------- issue 19


def launched_job(nodes: int = 1, **kwargs: Any) -> SFTJob:
    """Attempt 1 launched (every pod created), nothing observed running yet."""
    job = make_job(nodes=nodes, **kwargs)
    return apply(job, reconcile_job(job, [], NOW, IMAGE))


class TestOwnership:
    def test_pods_of_another_job_with_the_same_name_are_not_adopted(self) -> None:
        # A previous job named demo (uid old) left a pod of attempt 3 that is terminating.
        job = make_job()
        theirs = pod(3, 0, "Running", owner="old-uid")
        actions = reconcile_job(job, [theirs], NOW, IMAGE)
        assert actions.status["attempts"] == 1  # not 3
        assert names(actions.create_pods) == ["demo-a1-r0"]
        assert actions.delete_pods == []  # never deletes what is not its own

    def test_a_foreign_pod_of_the_current_attempt_is_not_this_jobs_run(self) -> None:
        job = running_job()
        # Its own pod is gone; a pod with its name and labels but another owner succeeded.
        actions = reconcile_job(job, [pod(1, 0, "Succeeded", owner="old-uid")], NOW, IMAGE)
        assert actions.status.get("phase") != "Succeeded"
        assert actions.status["lastFailure"]["reason"] == "PodLost"


class TestHalfMadeLaunch:
    """Defect 4: a crash part-way through creating the pods of a launch."""

    def test_missing_ranks_of_an_incomplete_launch_are_created_not_lost(self) -> None:
        job = make_job(nodes=2, retry={"maxRestarts": 0})
        first = reconcile_job(job, [], NOW, IMAGE)
        # The intent was written, rank 0 created, then the operator died.
        job = apply(job, first, launched=False)
        assert job.status is not None and job.status.launchedAttempt == 0
        made = [pod(1, 0)]
        actions = reconcile_job(job, made, NOW + timedelta(seconds=30), IMAGE)
        assert names(actions.create_pods) == ["demo-a1-r1"]
        assert actions.status == {}  # no PodLost, no restart, no Failed
        assert actions.launch_status["launchedAttempt"] == 1
        assert [e.reason for e in actions.launch_events] == ["Launched"]

    def test_a_launch_complete_then_missing_rank_is_a_lost_pod(self) -> None:
        job = launched_job(nodes=2, retry={"maxRestarts": 0})
        actions = reconcile_job(job, [pod(1, 0)], NOW, IMAGE)
        assert conditions_of(actions.status)["Failed"]["reason"] == "RestartLimitExceeded"
        assert actions.status["lastFailure"]["reason"] == "PodLost"

    def test_status_from_before_launched_attempt_counts_as_launched(self) -> None:
        job = make_job({"phase": "Running", "attempts": 1, "specHash": "x"}, nodes=2)
        actions = reconcile_job(job, [pod(1, 0, "Running")], NOW, IMAGE)
        assert actions.status["lastFailure"]["reason"] == "PodLost"


class TestRelaunchWaitsForTheOldAttempt:
    """Defect 5: the new attempt starts only once every pod of the old one is gone."""

    def test_a_terminating_running_pod_holds_the_new_attempt(self) -> None:
        job = running_job(nodes=2)
        oom = failed(1, 1, **report("OutOfMemory", "oom", code=10))
        first = reconcile_job(job, [pod(1, 0, "Running"), oom], NOW, IMAGE)
        assert first.status["attempts"] == 2 and first.status["restarts"] == 1
        assert first.delete_pods == ["demo-a1-r0"] and first.create_pods == []
        assert first.trainer_config is None  # the ConfigMap still describes attempt 1
        job = apply(job, first)
        for seconds in (1, 60, 119):
            terminating = [pod(1, 0, "Running", deleting=True), oom]
            wait = reconcile_job(job, terminating, NOW + timedelta(seconds=seconds), IMAGE)
            assert wait.create_pods == [] and wait.status == {} and wait.delete_pods == []
            assert wait.requeue_after is not None and wait.requeue_after <= 5
        gone = reconcile_job(job, [oom], NOW + timedelta(seconds=120), IMAGE)
        assert names(gone.create_pods) == ["demo-a2-r0", "demo-a2-r1"]
        assert gone.trainer_config is not None and gone.trainer_config["attempt"] == 2

    def test_a_pod_that_finished_terminating_does_not_hold_it(self) -> None:
        job = running_job()
        oom = failed(1, 0, **report("OutOfMemory", "oom", code=10))
        actions = reconcile_job(job, [oom], NOW, IMAGE)
        assert names(actions.create_pods) == ["demo-a2-r0"]


class TestBackoff:
    def test_the_new_attempt_waits_for_the_backoff(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from dataclasses import replace

        from sftjob_operator import lifecycle

        def with_backoff(*args: Any) -> Any:
            return replace(decide_retry(*args), backoff_seconds=30.0)

        monkeypatch.setattr(lifecycle, "decide_retry", with_backoff)
        job = running_job()
        lost = failed(1, 0, reason="Evicted", exit_code=137)
        first = reconcile_job(job, [lost], NOW, IMAGE)
        assert first.status["nextAttemptTime"] == "2025-03-01T12:00:30Z"
        assert first.create_pods == [] and first.requeue_after == 30.0
        job = apply(job, first)
        early = reconcile_job(job, [lost], NOW + timedelta(seconds=20), IMAGE)
        assert early.create_pods == [] and early.status == {}
        assert early.requeue_after == 10.0
        due = reconcile_job(job, [lost], NOW + timedelta(seconds=30), IMAGE)
        assert names(due.create_pods) == ["demo-a2-r0"]
        assert due.launch_status["nextAttemptTime"] is None


def replay(
    job: SFTJob, pods: list[dict[str, Any]], actions: Actions, step: int
) -> tuple[SFTJob, list[dict[str, Any]], list[Event]]:
    """The world after the shell applied `actions` up to a crash before step `step`.

    Steps: 0 events, 1 status, 2 deletions, 3 creations, 4 launch events, 5 launch status.
    Deleted pods that were not running vanish; created pods start Pending.
    """
    events: list[Event] = []
    if step > 0:
        events += actions.events
    if step > 1:
        job = apply(job, actions, launched=False)
    if step > 2:
        pods = [p for p in pods if p["metadata"]["name"] not in actions.delete_pods]
    if step > 3:
        created = [
            pod(
                int(p["metadata"]["labels"]["sftjob.dev/attempt"]),
                int(p["metadata"]["labels"]["sftjob.dev/rank"]),
            )
            for p in actions.create_pods
        ]
        pods = pods + created
    if step > 4:
        events += actions.launch_events
    if step > 5:
        job = apply(job, Actions(status=actions.launch_status))
    return job, pods, events


def settle(
    job: SFTJob, pods: list[dict[str, Any]], now: datetime
) -> tuple[SFTJob, list[dict[str, Any]], list[Event]]:
    """Passes without crashes until nothing changes any more."""
    events: list[Event] = []
    for _ in range(10):
        actions = reconcile_job(job, pods, now, IMAGE)
        job, pods, posted = replay(job, pods, actions, 6)
        events += posted
        if not (
            actions.status or actions.launch_status or actions.create_pods or actions.delete_pods
        ):
            return job, pods, events
    raise AssertionError("did not settle")


class TestCrashPoints:
    """Defect 12: a crash between any two writes of a relaunch loses and doubles nothing."""

    @pytest.mark.parametrize("step", range(7))
    def test_relaunch_after_a_crash_at_each_step(self, step: int) -> None:
        job = running_job(nodes=2, retry={"maxRestarts": 3})
        pods = [pod(1, 0, "Running"), failed(1, 1, **report("InternalError", "NCCL", code=1))]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        job, pods, events = replay(job, pods, actions, step)
        job, pods, more = settle(job, pods, NOW + timedelta(seconds=1))
        events += more
        status = job.status
        assert status is not None
        assert (status.attempts, status.launchedAttempt, status.restarts) == (2, 2, 1)
        assert status.lastFailure is not None and status.lastFailure.reason == "InternalError"
        assert conditions_of(status.model_dump(mode="json"))["Restarting"]["status"] == "True"
        live = sorted(names([p for p in pods if p["status"]["phase"] in ("Pending", "Running")]))
        assert live == ["demo-a2-r0", "demo-a2-r1"]
        # Every event of the relaunch was posted, each under one name (key) only.
        keyed = {(e.reason, e.key) for e in events}
        assert {("InternalError", "a2"), ("Launched", "a2")} <= keyed
        # A repeated decision repeats its key, so the shell's second post is a no-op.
        assert {e.key for e in events if e.reason in ("InternalError", "Launched")} == {"a2"}

    @pytest.mark.parametrize("step", range(7))
    def test_first_launch_after_a_crash_at_each_step(self, step: int) -> None:
        job = make_job(nodes=2)
        actions = reconcile_job(job, [], NOW, IMAGE)
        job, pods, events = replay(job, [], actions, step)
        job, pods, more = settle(job, pods, NOW)
        events += more
        assert job.status is not None
        assert (job.status.attempts, job.status.launchedAttempt, job.status.restarts) == (1, 1, 0)
        assert names(pods) == ["demo-a1-r0", "demo-a1-r1"]
        assert ("Launched", "a1") in {(e.reason, e.key) for e in events}


class TestEdits:
    def test_invalid_edit_keeps_the_run_and_names_the_fields(self) -> None:
        job = running_job(activeDeadlineSeconds=3600)
        errors = ["spec.model: set either name or path, not both"]
        pods = [pod(1, 0, "Running", start_time=STAMP)]
        actions = reconcile_job(job, pods, NOW, IMAGE, job.spec, errors)
        ignored = conditions_of(actions.status)["SpecChangeIgnored"]
        assert (ignored["status"], ignored["reason"]) == ("True", "InvalidSpec")
        assert "spec.model" in ignored["message"]
        assert [e.reason for e in actions.events] == ["InvalidSpec"]
        job = apply(job, actions)
        # The lifecycle goes on: success, and the deadline, are seen as before.
        again = reconcile_job(job, pods, NOW, IMAGE, job.spec, errors)
        assert again.status == {} and again.events == []
        done = reconcile_job(job, [pod(1, 0, "Succeeded")], NOW, IMAGE, job.spec, errors)
        assert done.status["phase"] == "Succeeded"
        late = reconcile_job(job, pods, NOW + timedelta(seconds=3601), IMAGE, job.spec, errors)
        assert late.status["phase"] == "Failed"

    def test_overlay_takes_each_valid_mutable_field_from_the_edit(self) -> None:
        from sftjob_operator.lifecycle import overlay_mutable_fields

        launched = make_job().spec
        raw = launched.model_dump(mode="json", exclude_none=True) | {
            "suspend": True,
            "ttlSecondsAfterFinished": 60,
            "activeDeadlineSeconds": -5,  # invalid alone: keeps the launched value
            "model": {"name": "a", "path": "/b"},  # the cross-field error elsewhere
        }
        spec = overlay_mutable_fields(launched, raw)
        assert spec.suspend is True and spec.ttlSecondsAfterFinished == 60
        assert spec.activeDeadlineSeconds == launched.activeDeadlineSeconds
        assert spec.model == launched.model

    def test_edit_of_a_finished_job_is_reported_once(self) -> None:
        job = running_job()
        job = apply(job, reconcile_job(job, [pod(1, 0, "Succeeded")], NOW, IMAGE))
        edited = with_spec(job, training={"learningRate": 1e-5})
        edited = edited.model_copy(
            update={"metadata": edited.metadata.model_copy(update={"generation": 2})}
        )
        actions = reconcile_job(edited, [pod(1, 0, "Succeeded")], NOW, IMAGE)
        ignored = conditions_of(actions.status)["SpecChangeIgnored"]
        assert (ignored["status"], ignored["reason"]) == ("True", "JobFinished")
        assert "create a new SFTJob" in ignored["message"]
        assert actions.status["observedGeneration"] == 2
        assert [(e.reason, e.key) for e in actions.events] == [("JobFinished", "g2")]
        again = reconcile_job(apply(edited, actions), [pod(1, 0, "Succeeded")], NOW, IMAGE)
        assert again.status == {} and again.events == []

    def test_ttl_edit_of_a_finished_job_applies_without_a_report(self) -> None:
        job = running_job()
        job = apply(job, reconcile_job(job, [pod(1, 0, "Succeeded")], NOW, IMAGE))
        edited = with_spec(job, ttlSecondsAfterFinished=600)
        edited = edited.model_copy(
            update={"metadata": edited.metadata.model_copy(update={"generation": 2})}
        )
        actions = reconcile_job(edited, [], NOW + timedelta(seconds=100), IMAGE)
        assert actions.status == {"observedGeneration": 2}
        assert actions.requeue_after == 500.0


class TestDeadlineWhileRelaunching:
    def test_the_deadline_fails_a_relaunch_that_is_still_waiting(self) -> None:
        job = running_job(nodes=2, activeDeadlineSeconds=100)
        pods = [pod(1, 0, "Running"), failed(1, 1, exit_code=143)]
        job = apply(job, reconcile_job(job, pods, NOW + timedelta(seconds=10), IMAGE))
        assert job.status is not None and job.status.phase == "Restarting"
        terminating = [pod(1, 0, "Running", deleting=True), pods[1]]
        late = reconcile_job(job, terminating, NOW + timedelta(seconds=101), IMAGE)
        assert late.status["phase"] == "Failed" and late.create_pods == []
        assert conditions_of(late.status)["Failed"]["reason"] == "DeadlineExceeded"


class TestRequeueAfter:
    def test_running_with_a_deadline_wakes_just_after_it(self) -> None:
        job = running_job(activeDeadlineSeconds=100)
        actions = reconcile_job(job, [pod(1, 0, "Running")], NOW + timedelta(seconds=40), IMAGE)
        assert actions.requeue_after == 61.0

    def test_nothing_timed_means_no_requeue(self) -> None:
        job = running_job()
        assert reconcile_job(job, [pod(1, 0, "Running")], NOW, IMAGE).requeue_after is None

    def test_finished_job_wakes_at_its_ttl(self) -> None:
        job = make_job(
            {"phase": "Succeeded", "attempts": 1, "completionTime": STAMP},
            ttlSecondsAfterFinished=60,
        )
        assert reconcile_job(job, [], NOW + timedelta(seconds=15), IMAGE).requeue_after == 45.0


def test_event_names_are_deterministic_dns_subdomains() -> None:
    import re

    from sftjob_operator.kube import event_name

    name = event_name("demo", "u-1", "Launched", "a2")
    assert name == event_name("demo", "u-1", "Launched", "a2")
    assert name != event_name("demo", "u-2", "Launched", "a2")  # a re-created job
    assert name != event_name("demo", "u-1", "Launched", "a3")
    long = event_name("x" * 253, "u-1", "Launched", "a1")
    for value in (name, long):
        assert len(value) <= 253
        assert re.fullmatch(
            r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*", value
        )


class TestRankSettle:
    """A rank's failure is decided once its peers had a moment to fail too: the first exit
    seen is often the symptom (rank 0's broken collective), not the cause (rank 1's OOM)."""

    @staticmethod
    def ended(pod_: dict[str, Any], at: datetime) -> dict[str, Any]:
        pod_["status"]["containerStatuses"][0]["state"]["terminated"]["finishedAt"] = iso(at)
        return pod_

    def test_waits_for_the_running_rank_then_the_most_specific_cause_wins(self) -> None:
        job = running_job(nodes=2)
        nccl = report("InternalError", "NCCL error: remote process exited")
        rank0 = self.ended(failed(1, 0, **nccl), NOW)
        waiting = reconcile_job(
            job, [rank0, pod(1, 1, "Running")], NOW + timedelta(seconds=2), IMAGE
        )
        assert waiting.status == {} and not waiting.delete_pods and waiting.events == []
        assert waiting.requeue_after == pytest.approx(3)
        # Rank 1's OOM lands inside the window: it is the cause, and the batch shrinks.
        rank1 = self.ended(failed(1, 1, **report("OutOfMemory", "CUDA out of memory")), NOW)
        decided = reconcile_job(job, [rank0, rank1], NOW + timedelta(seconds=3), IMAGE)
        assert decided.status["lastFailure"]["reason"] == "OutOfMemory"
        assert conditions_of(decided.status)["Restarting"]["reason"] == "OutOfMemoryShrink"

    def test_after_the_window_it_decides_with_what_it_saw(self) -> None:
        job = running_job(nodes=2)
        rank0 = self.ended(failed(1, 0, **report("InternalError", "NCCL error")), NOW)
        late = reconcile_job(job, [rank0, pod(1, 1, "Running")], NOW + timedelta(seconds=6), IMAGE)
        assert late.status["lastFailure"]["reason"] == "InternalError"
        assert "demo-a1-r1" in late.delete_pods


class TestPassGates:
    """The decisions a pass takes before the lifecycle proper, kept pure."""

    def test_an_invalid_spec_is_reported_once_per_generation(self) -> None:
        from sftjob_operator.lifecycle import invalid_spec_is_reported

        assert invalid_spec_is_reported(None, 1)
        assert not invalid_spec_is_reported(SFTJobStatus(observedGeneration=1), 1)
        assert invalid_spec_is_reported(SFTJobStatus(observedGeneration=1), 2)

    def test_only_a_launched_job_runs_on_through_an_invalid_edit(self) -> None:
        from sftjob_operator.lifecycle import runs_on_launched_spec

        assert not runs_on_launched_spec(None)
        assert not runs_on_launched_spec(SFTJobStatus())
        assert runs_on_launched_spec(SFTJobStatus(attempts=1))

    def test_a_generation_is_planned_once_and_never_after_launch_or_finish(self) -> None:
        from sftjob_operator.lifecycle import needs_plan

        assert needs_plan(SFTJobStatus(), 1)
        assert not needs_plan(SFTJobStatus(observedGeneration=1), 1)
        assert needs_plan(SFTJobStatus(observedGeneration=1), 2)
        assert not needs_plan(SFTJobStatus(attempts=1), 2)
        assert not needs_plan(SFTJobStatus(phase="Failed"), 2)


# --------------------------------------------------------------------- no stale ETA

PROGRESS_WITH_ETA = {"step": 12, "totalSteps": 200, "eta": "42h27m", "etaSeconds": 152820}


def running_with_eta(nodes: int = 1) -> SFTJob:
    """A running job whose last progress report promised 42h27m more."""
    job = running_job(nodes=nodes)
    assert job.status is not None and job.status.phase == "Running"
    status = {**job.status.model_dump(mode="json", exclude_none=True)}
    status["progress"] = PROGRESS_WITH_ETA
    return job.model_copy(update={"status": SFTJobStatus.model_validate(status)})


class TestNoStaleEta:
    def test_a_suspended_job_has_no_eta(self) -> None:
        job = with_spec(running_with_eta(), suspend=True)
        actions = reconcile_job(job, [pod(1, 0, "Running")], NOW, IMAGE)
        assert actions.status["phase"] == "Suspended"
        assert actions.status["progress"] == {"eta": None, "etaSeconds": None}
        after = status_after(job.status, actions.status)  # the shell's merge patch
        assert after.progress is not None
        assert (after.progress.eta, after.progress.etaSeconds) == (None, None)
        assert after.progress.step == 12  # the rest of the progress stays

    def test_a_failed_job_has_no_eta(self) -> None:
        job = running_with_eta()
        pods = [failed(1, 0, **report("DataError", "column 'messages' missing", code=11))]
        actions = reconcile_job(job, pods, NOW, IMAGE)
        assert actions.status["phase"] == "Failed"
        assert actions.status["progress"] == {"eta": None, "etaSeconds": None}

    def test_a_restarting_job_has_no_eta(self) -> None:
        job = running_with_eta()
        actions = reconcile_job(job, [failed(1, 0, exit_code=1)], NOW, IMAGE)
        assert actions.status["phase"] == "Restarting"
        assert actions.status["progress"] == {"eta": None, "etaSeconds": None}

    def test_a_running_job_keeps_its_eta(self) -> None:
        job = running_with_eta()
        actions = reconcile_job(job, [pod(1, 0, "Running", start_time=STAMP)], NOW, IMAGE)
        assert "progress" not in actions.status

    def test_a_cleared_eta_is_not_cleared_again(self) -> None:
        job = with_spec(running_with_eta(), suspend=True)
        first = reconcile_job(job, [pod(1, 0, "Running")], NOW, IMAGE)
        once = job.model_copy(update={"status": status_after(job.status, first.status)})
        again = reconcile_job(once, [], NOW, IMAGE)
        assert "progress" not in again.status


@pytest.mark.parametrize(
    ("phase", "progress", "expected"),
    [
        ("Running", PROGRESS_WITH_ETA, {}),
        ("Succeeded", PROGRESS_WITH_ETA, {"progress": {"eta": None, "etaSeconds": None}}),
        ("Pending", {"step": 0, "etaSeconds": 5}, {"progress": {"eta": None, "etaSeconds": None}}),
        ("Failed", {"step": 3}, {}),
        ("Failed", None, {}),
    ],
)
def test_stale_eta_cleared(phase: str, progress: dict[str, Any] | None, expected: Any) -> None:
    status = SFTJobStatus.model_validate({"phase": phase, "progress": progress})
    assert stale_eta_cleared(status) == expected
