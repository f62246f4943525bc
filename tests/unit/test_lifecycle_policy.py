"""The pure side of profile enforcement: when a job's profile is resolved, what a refusal and
a recovery write, what a launch under a profile records, and how a live deadline edit is held
to the cap the run was launched under (launch_policy)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sftjob_operator.api import SFTJob, SFTJobStatus, parse_sftjob
from sftjob_operator.launch_policy import LaunchPolicy, deadline_after_edit
from sftjob_operator.lifecycle import (
    POLICY_VIOLATION,
    failed_by_policy,
    policy_applies,
    policy_cleared_status,
    policy_violation_status,
    reconcile_job,
    status_after,
)
from sftjob_operator.policy import PodDefaults

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
IMAGE = "registry.example/trainer:test"
CAPPED = LaunchPolicy(
    pod=PodDefaults(queueName="tenant-queue", priorityClassName="low", ephemeralStorage="3Gi"),
    max_deadline_seconds=3600,
    default_deadline_seconds=1800,
    effective={
        "profile": "tenant",
        "profileGeneration": 2,
        "fromProfile": [{"field": "spec.activeDeadlineSeconds", "value": "1800"}],
    },
)


def make_job(status: dict[str, Any] | None = None, generation: int = 1, **spec: Any) -> SFTJob:
    job = parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1", "generation": generation},
            "spec": {
                "model": {"path": "/data/tiny-model"},
                "dataset": {"path": "/data/chat.jsonl", "limit": 64},
                "method": "lora",
                "resources": {"nodes": 1, "gpusPerNode": 0},
                **spec,
            },
        }
    )
    if status is None:
        return job
    return job.model_copy(update={"status": SFTJobStatus.model_validate(status)})


def refused(generation: int = 1) -> SFTJobStatus:
    patch = policy_violation_status(
        None, ["spec.method: full is not allowed (rule limits.allowedMethods)"], NOW, generation
    )
    return status_after(None, patch)


class TestWhenThePolicyIsResolved:
    def test_before_the_first_launch_only(self) -> None:
        assert policy_applies(None, 1)
        assert policy_applies(SFTJobStatus(phase="Pending", observedGeneration=1), 1)
        # Suspended at creation: resolved when it is resumed, with the profile of that day.
        assert policy_applies(SFTJobStatus(phase="Suspended", observedGeneration=1), 1)
        assert not policy_applies(SFTJobStatus(phase="Running", attempts=1), 1)
        assert not policy_applies(SFTJobStatus(phase="Suspended", attempts=2), 3)
        assert not policy_applies(SFTJobStatus(phase="Succeeded", attempts=1), 2)

    def test_a_refused_job_is_checked_again_only_for_a_new_generation(self) -> None:
        assert failed_by_policy(refused())
        assert not policy_applies(refused(1), 1)
        assert policy_applies(refused(1), 2)

    def test_other_failures_stay_final(self) -> None:
        failed = SFTJobStatus.model_validate(
            {
                "phase": "Failed",
                "observedGeneration": 1,
                "conditions": [
                    {"type": "Failed", "status": "True", "reason": "InvalidSpec", "message": "x"}
                ],
            }
        )
        assert not failed_by_policy(failed)
        assert not policy_applies(failed, 2)


class TestRefusalAndRecovery:
    def test_refusal_names_every_rule_and_field_in_one_message(self) -> None:
        messages = [
            "spec.method: full is not allowed (rule limits.allowedMethods)",
            "spec.image: docker.io/x is not allowed (rule limits.allowedImages)",
        ]
        patch = policy_violation_status(None, messages, NOW, 3)
        assert patch["phase"] == "Failed" and patch["observedGeneration"] == 3
        by_type = {c["type"]: c for c in patch["conditions"]}
        assert by_type["Failed"]["status"] == "True"
        assert by_type["Failed"]["reason"] == POLICY_VIOLATION
        assert by_type["Failed"]["message"] == "; ".join(messages)
        assert by_type["Planned"]["status"] == "False"

    def test_a_compliant_edit_makes_the_job_pending_again(self) -> None:
        patch = policy_cleared_status(refused(1), "tenant", NOW, 2)
        status = status_after(refused(1), patch)
        assert status.phase == "Pending" and status.completionTime is None
        failed = next(c for c in status.conditions if c.type == "Failed")
        assert (failed.status, failed.reason) == ("False", "PolicyCompliant")
        assert "profile tenant" in failed.message
        # Not yet planned for the new generation: the pass plans it next.
        assert status.observedGeneration == 1


class TestLaunchUnderAProfile:
    def test_first_launch_records_effective_and_builds_pods_with_profile_settings(self) -> None:
        job = make_job()
        effective = job.spec.model_copy(update={"activeDeadlineSeconds": 1800})
        actions = reconcile_job(job, [], NOW, IMAGE, effective, policy=CAPPED)
        assert actions.status["effective"] == CAPPED.effective
        assert actions.launch_policy == CAPPED
        [pod] = actions.create_pods
        assert pod["spec"]["priorityClassName"] == "low"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tenant-queue"
        requests = pod["spec"]["containers"][0]["resources"]["requests"]
        assert requests["ephemeral-storage"] == "3Gi"
        # The ranks run the effective spec: the profile's deadline is in their config.
        assert actions.trainer_config is not None
        assert actions.trainer_config["spec"]["activeDeadlineSeconds"] == 1800

    def test_the_spec_hash_is_of_the_jobs_own_spec(self) -> None:
        """So the profile's additions never read as an edit of the running job."""
        from sftjob_operator.children import training_spec_hash

        job = make_job()
        effective = job.spec.model_copy(update={"image": "ghcr.io/x/trainer:1"})
        actions = reconcile_job(job, [], NOW, IMAGE, effective, policy=CAPPED)
        assert actions.status["specHash"] == training_spec_hash(job)
        assert actions.create_pods[0]["spec"]["containers"][0]["image"] == "ghcr.io/x/trainer:1"

    def test_no_profile_records_nothing(self) -> None:
        actions = reconcile_job(make_job(), [], NOW, IMAGE, None)
        assert "effective" not in actions.status
        assert actions.launch_policy == LaunchPolicy()


def running(generation: int, **spec: Any) -> SFTJob:
    """A launched job (attempt 1 running) whose current spec carries `spec`."""
    from sftjob_operator.children import training_spec_hash

    status = {
        "phase": "Running",
        "attempts": 1,
        "launchedAttempt": 1,
        "observedGeneration": 1,
        "startTime": "2025-03-01T11:00:00Z",
        "specHash": training_spec_hash(make_job()),
    }
    return make_job(status, generation=generation, **spec)


RUNNING_POD = {
    "metadata": {
        "name": "demo-a1-r0",
        "namespace": "ml",
        "ownerReferences": [{"kind": "SFTJob", "name": "demo", "uid": "u-1", "controller": True}],
        "labels": {
            "sftjob.dev/job-name": "demo",
            "sftjob.dev/attempt": "1",
            "sftjob.dev/rank": "0",
        },
    },
    "status": {"phase": "Running", "startTime": "2025-03-01T11:00:00Z"},
}


class TestLiveDeadlineEdits:
    def test_the_rule(self) -> None:
        assert deadline_after_edit(600, 1800, CAPPED).seconds == 600
        assert deadline_after_edit(3600, 1800, CAPPED).seconds == 3600  # at the cap
        assert deadline_after_edit(3600, 1800, CAPPED).refused is None
        above = deadline_after_edit(7200, 1800, CAPPED)
        assert above.seconds == 1800
        assert above.refused is not None
        assert "limits.maxActiveDeadlineSeconds" in above.refused
        assert "spec.activeDeadlineSeconds" in above.refused
        # Removing it is the profile's default again, not "no deadline".
        assert deadline_after_edit(None, 1800, CAPPED).seconds == 1800
        # Without a profile: the edit as it is (None: no deadline).
        assert deadline_after_edit(None, 1800, LaunchPolicy()).seconds is None
        assert deadline_after_edit(99999, 1800, LaunchPolicy()).seconds == 99999

    def test_raising_the_deadline_above_the_cap_is_refused_and_reported(self) -> None:
        launched = make_job(activeDeadlineSeconds=1800).spec
        job = running(2, activeDeadlineSeconds=7200)
        # 45 min after the start: past the launched 1800 s, within the refused 7200 s.
        later = datetime(2025, 3, 1, 11, 45, 0, tzinfo=UTC)
        actions = reconcile_job(job, [RUNNING_POD], later, IMAGE, launched, policy=CAPPED)
        by_type = {c["type"]: c for c in actions.status["conditions"]}
        ignored = by_type["SpecChangeIgnored"]
        assert (ignored["status"], ignored["reason"]) == ("True", POLICY_VIOLATION)
        assert "limits.maxActiveDeadlineSeconds" in ignored["message"]
        # One Event, with the condition's reason, for the refused edit.
        assert [e.reason for e in actions.events].count(POLICY_VIOLATION) == 1
        # The run keeps its launched deadline: it is over, so it fails.
        assert actions.status["phase"] == "Failed"
        assert by_type["Failed"]["reason"] == "DeadlineExceeded"
        assert actions.delete_pods == ["demo-a1-r0"]

    def test_removing_the_deadline_keeps_the_profiles(self) -> None:
        launched = make_job(activeDeadlineSeconds=1800).spec
        job = running(2)  # the edit removed spec.activeDeadlineSeconds
        later = datetime(2025, 3, 1, 11, 45, 0, tzinfo=UTC)
        actions = reconcile_job(job, [RUNNING_POD], later, IMAGE, launched, policy=CAPPED)
        assert actions.status["phase"] == "Failed"
        assert "SpecChangeIgnored" not in [c["type"] for c in actions.status["conditions"]]

    def test_a_deadline_within_the_cap_applies(self) -> None:
        launched = make_job(activeDeadlineSeconds=1800).spec
        job = running(2, activeDeadlineSeconds=3600)
        later = datetime(2025, 3, 1, 11, 45, 0, tzinfo=UTC)
        actions = reconcile_job(job, [RUNNING_POD], later, IMAGE, launched, policy=CAPPED)
        assert actions.status.get("phase") != "Failed"
        assert actions.requeue_after == 3600 - 2700 + 1


class TestFrozenPolicyDocument:
    def test_round_trips_through_the_config_map_text(self) -> None:
        assert LaunchPolicy.from_json(CAPPED.to_json()) == CAPPED
        assert LaunchPolicy.from_json(None) == LaunchPolicy()
