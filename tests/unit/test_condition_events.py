"""Every condition transition is told once as an Event with the condition's reason."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sftjob_operator.api import Condition, SFTJobStatus
from sftjob_operator.conditions import transitions
from sftjob_operator.kube import event_name
from sftjob_operator.lifecycle import (
    Event,
    condition_events,
    patch_condition_events,
    policy_cleared_status,
    reconcile_job,
    status_after,
)
from test_lifecycle import IMAGE, NOW, STAMP, apply, make_job, pod, running_job, with_spec
from test_lifecycle_waiting import SECRET_MISSING, launched
from test_lifecycle_waiting import pod as waiting_pod


def condition(kind: str, status: str, reason: str) -> Condition:
    return Condition(
        type=kind,
        status=status,
        reason=reason,
        message=f"{kind} {reason}",
        lastTransitionTime=STAMP,
    )  # type: ignore[arg-type]


def status(*conditions: Condition, attempts: int = 1) -> dict[str, Any]:
    return {
        "attempts": attempts,
        "observedGeneration": 1,
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
    }


def test_transitions_are_the_conditions_whose_status_or_reason_changed() -> None:
    before = [condition("Planned", "True", "PlanReady"), condition("Running", "False", "Launched")]
    after = [
        condition("Planned", "True", "PlanReady"),  # unchanged
        condition("Running", "False", "ImagePullBackOff"),  # reason changed
        condition("Restarting", "True", "PodFailed"),  # new
    ]
    assert [c.type for c in transitions(before, after)] == ["Running", "Restarting"]
    assert transitions(after, after) == []


def test_one_transition_is_one_event_with_its_reason() -> None:
    before = status(condition("Running", "False", "Launched"))
    after = status(condition("Running", "False", "ImagePullBackOff"))
    events = condition_events(before, after, [])
    assert [(e.type, e.reason, e.message) for e in events] == [
        ("Normal", "ImagePullBackOff", "Running ImagePullBackOff")
    ]
    assert condition_events(after, after, []) == []  # a repeated pass tells nothing


def test_an_exclusive_switch_is_one_event_and_warnings_are_warnings() -> None:
    before = status(condition("Running", "True", "Training"))
    after = status(
        condition("Running", "False", "RestartLimitExceeded"),
        condition("Failed", "True", "RestartLimitExceeded"),
    )
    events = condition_events(before, after, [])
    assert [(e.type, e.reason) for e in events] == [("Warning", "RestartLimitExceeded")]


def test_a_transition_the_pass_already_tells_is_not_told_twice() -> None:
    before = status(condition("Running", "False", "Launched"))
    after = status(condition("Running", "True", "Training"))
    # The pass's own event carries the condition's reason.
    assert condition_events(before, after, [Event("Normal", "Training", "up", "a1")]) == []


def test_the_same_transition_keeps_its_event_name_and_a_later_one_gets_a_new_one() -> None:
    before = status(condition("Running", "False", "Launched"))
    after = status(condition("Running", "False", "ImagePullBackOff"))
    first, again = condition_events(before, after, []), condition_events(before, after, [])
    # A pass repeated after a crash posts the same name: answered 409, posted once.
    assert [event_name("demo", "u-1", e.reason, e.key) for e in first] == [
        event_name("demo", "u-1", e.reason, e.key) for e in again
    ]
    later = status(condition("Running", "False", "ImagePullBackOff"), attempts=2)
    next_attempt = condition_events(status(attempts=1), later, [])
    assert next_attempt[0].key != first[0].key


def test_a_pod_waiting_to_start_is_told_once() -> None:
    job = launched(timeout=120)
    pods = [waiting_pod(0, waiting=SECRET_MISSING)]
    actions = reconcile_job(job, pods, NOW + timedelta(seconds=30), IMAGE)
    assert [(e.type, e.reason) for e in actions.events] == [
        ("Normal", "CreateContainerConfigError")
    ]
    job = apply(job, actions)
    again = reconcile_job(job, pods, NOW + timedelta(seconds=40), IMAGE)
    assert again.events == [] and again.launch_events == []


def test_a_restored_spec_is_told_once() -> None:
    job = running_job()
    pods = [pod(1, 0, "Running")]
    changed = with_spec(job, training={"learningRate": 1e-5})
    changed = apply(changed, reconcile_job(changed, pods, NOW, IMAGE))
    restored = with_spec(changed, training={"learningRate": None})
    back = reconcile_job(restored, pods, NOW, IMAGE)
    assert [(e.type, e.reason) for e in back.events] == [("Normal", "SpecRestored")]
    quiet = reconcile_job(apply(restored, back), pods, NOW, IMAGE)
    assert quiet.events == []


def test_a_patch_the_shell_writes_itself_is_told_once() -> None:
    refused = SFTJobStatus.model_validate(
        status(condition("Failed", "True", "PolicyViolation"), attempts=0) | {"phase": "Failed"}
    )
    patch = policy_cleared_status(refused, "tenant", NOW, 2)
    events = patch_condition_events(refused, patch)
    assert [(e.type, e.reason) for e in events] == [("Normal", "PolicyCompliant")]
    assert patch_condition_events(status_after(refused, patch), patch) == []


def _changed_reasons(job: Any, actions: Any) -> set[str]:
    """The reasons of the conditions a pass changed (its decision and its launch patches)."""
    before = job.status.conditions if job.status else []
    after = apply(job, actions).status
    assert after is not None
    return {c.reason for c in transitions(before, after.conditions)}


def test_through_a_runs_life_each_event_is_a_changed_conditions_reason_told_once() -> None:
    """Launch, running, suspended, resumed, finished, edited after: every Event a pass posts
    is named after the reason of a condition that pass changed (never the condition's
    type), and no reason is told twice by one pass."""
    job = make_job()
    steps = [
        ([], {}),
        ([pod(1, 0, "Running", start_time=STAMP)], {}),
        ([pod(1, 0, "Running", start_time=STAMP)], {"suspend": True}),
        ([], {"suspend": False}),
        ([pod(2, 0, "Running", start_time=STAMP)], {}),
        ([pod(2, 0, "Succeeded")], {}),
        ([pod(2, 0, "Succeeded")], {"training": {"learningRate": 1e-5}}),
    ]
    told = []
    for generation, (pods, edit) in enumerate(steps, start=1):
        if edit:
            job = with_spec(job, **edit)
        job = job.model_copy(
            update={"metadata": job.metadata.model_copy(update={"generation": generation})}
        )
        actions = reconcile_job(job, pods, NOW, IMAGE)
        reasons = [e.reason for e in actions.events + actions.launch_events]
        assert len(set(reasons)) == len(reasons), reasons
        assert set(reasons) <= _changed_reasons(job, actions), reasons
        told += reasons
        job = apply(job, actions)
    assert job.status is not None and job.status.phase == "Succeeded"
    for phase_event in ("Training", "SuspendedByUser", "Resumed", "TrainingComplete"):
        assert phase_event in told, told
    assert "JobFinished" in told
    assert not {"Running", "Succeeded", "Suspended", "SpecChangeIgnored"} & set(told), told
