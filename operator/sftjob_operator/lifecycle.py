"""Pure lifecycle: from the job and the pods as they are now, what to do next.

`reconcile_job` is called on every event and timer tick with the SFTJob and the
pods observed through the API. It never looks at event order: the phase, the
conditions and the actions are derived from observed state each time, so running
it twice, or after an operator restart, gives the same answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from . import conditions as cond
from .api import EffectiveTraining, FailureInfo, SFTJob, SFTJobSpec, SFTJobStatus
from .children import build_pods, training_spec_hash
from .pod_state import is_live, pod_attempt, pod_phase, pod_rank, start_verdict
from .retry_policy import Failure, decide_retry, decisive_failure
from .trainer_config import build_trainer_config

EventType = Literal["Normal", "Warning"]


@dataclass(frozen=True)
class Event:
    type: EventType
    reason: str
    message: str


@dataclass
class Actions:
    """What the shell must do, in order: patch config, delete pods, create pods, patch status."""

    status: dict[str, Any] = field(default_factory=dict)
    create_pods: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    trainer_config: dict[str, Any] | None = None
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    # Seconds until this job needs a pass even if nothing changes (a wait that ends).
    requeue_after: float | None = None


def is_same_job(handed_uid: str | None, live: Mapping[str, Any] | None) -> bool:
    """Whether the job a pass was handed still exists: same name (`live` was read by it) and uid.

    A job deleted or re-created under the same name since Kopf cached its body must get
    nothing from that body: no children, no pods, no status.
    """
    if live is None or not handed_uid:
        return False
    return (live.get("metadata") or {}).get("uid") == handed_uid


def iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


# --------------------------------------------------------------------- reconcile


def _status_of(job: SFTJob) -> SFTJobStatus:
    return job.status or SFTJobStatus()


def _conditions_patch(status: SFTJobStatus) -> list[dict[str, Any]]:
    return [c.model_dump(mode="json", exclude_none=True) for c in status.conditions]


def _launch(
    job: SFTJob,
    attempt: int,
    default_image: str,
    actions: Actions,
    per_device: int | None = None,
    accumulation: int | None = None,
) -> None:
    # Batch sizes travel in the ConfigMap, which every rank of the launch reads.
    actions.trainer_config = build_trainer_config(
        job, attempt=attempt, per_device=per_device, accumulation=accumulation
    )
    actions.create_pods = build_pods(job, attempt, default_image)


# Spec fields a user may change on a launched job; everything else is frozen for the run.
MUTABLE_FIELDS = ("suspend", "retry", "ttlSecondsAfterFinished", "activeDeadlineSeconds")


def running_job(job: SFTJob, launched_spec: SFTJobSpec | None) -> SFTJob:
    """The job as it runs: the launched spec with the fields that may change taken from now."""
    if launched_spec is None:
        return job
    current = {name: getattr(job.spec, name) for name in MUTABLE_FIELDS}
    return job.model_copy(update={"spec": launched_spec.model_copy(update=current)})


def reconcile_job(
    job: SFTJob,
    pods: list[dict[str, Any]],
    now: datetime,
    default_image: str,
    launched_spec: SFTJobSpec | None = None,
) -> Actions:
    """The next actions for `job` given all of its pods (any attempt) as observed now.

    `launched_spec` is the spec the running pods were built from (kept in the job's
    ConfigMap); relaunches reuse it, so an ignored edit never sneaks into a restart.
    """
    changed_job = job
    job = running_job(job, launched_spec)
    actions = Actions()
    status = _status_of(job).model_copy(deep=True)
    generation = job.metadata.generation
    stamp = iso(now)
    spec = job.spec
    original = status.model_dump(mode="json", exclude_none=True)

    # A crash between creating pods and recording the launch leaves pods newer than the
    # status: adopt them instead of launching again.
    attempt = max([status.attempts] + [pod_attempt(p) for p in pods])
    adopted = attempt > status.attempts
    if attempt > status.attempts:
        # The adopted launch was built from the current spec: record it, or a later edit
        # would never be reported as ignored.
        status.specHash = status.specHash or training_spec_hash(job)
    status.attempts = attempt
    current = {pod_rank(p): p for p in pods if pod_attempt(p) == attempt}
    stale = [p for p in pods if pod_attempt(p) != attempt and is_live(p)]
    actions.delete_pods += [p["metadata"]["name"] for p in stale]

    if status.phase in ("Succeeded", "Failed"):
        actions.delete_pods += [p["metadata"]["name"] for p in current.values() if is_live(p)]
        _expire(job, status, now, actions)
        return _finish(actions, status, original)

    _note_spec_change(changed_job, status, stamp, generation)

    if spec.suspend:
        actions.delete_pods += [p["metadata"]["name"] for p in current.values() if is_live(p)]
        if status.phase != "Suspended":
            status.phase = "Suspended"
            status.conditions = cond.set_exclusive(
                status.conditions,
                cond.SUSPENDED,
                "SuspendedByUser",
                "spec.suspend is true: pods stopped; set it to false to resume from the newest "
                "checkpoint",
                stamp,
                generation,
            )
            actions.events.append(Event("Normal", "Suspended", "pods stopped, status kept"))
        return _finish(actions, status, original)

    if status.phase == "Suspended" and adopted:
        # An earlier pass already resumed (its status write is not visible to this one
        # yet): its pods are the run now; launching again would start a second one.
        status.phase = "Pending"
        _mark_resumed(status, stamp, generation)
        return _finish(actions, status, original)

    if attempt == 0 or status.phase == "Suspended":
        resumed = status.phase == "Suspended"
        if resumed:
            # As for a Kubernetes Job: activeDeadlineSeconds counts running time, so the
            # clock restarts when the resumed pods start.
            status.startTime = None
        attempt += 1
        status.attempts = attempt
        status.specHash = status.specHash or training_spec_hash(job)
        effective = status.effectiveTraining
        _launch(
            job,
            attempt,
            default_image,
            actions,
            effective.perDeviceTrainBatchSize if effective else None,
            effective.gradientAccumulationSteps if effective else None,
        )
        status.phase = "Pending"
        reason = "Resumed" if resumed else "Launched"
        message = f"launch {attempt}: {spec.resources.nodes} pod(s) created" + (
            ", resuming from the newest checkpoint" if resumed else ""
        )
        # Running stays False until a pod runs; Restarting (if set) stays until then too.
        status.conditions = cond.set_condition(
            status.conditions, cond.RUNNING, "False", reason, message, stamp, generation
        )
        if resumed:
            _mark_resumed(status, stamp, generation)
        actions.events.append(Event("Normal", reason, message))
        return _finish(actions, status, original)

    deadline = spec.activeDeadlineSeconds
    started = parse_time(status.startTime)
    # Ranks that all finished before the operator looked have succeeded, deadline or not.
    finished = all(
        pod_phase(current.get(rank, {})) == "Succeeded" for rank in range(spec.resources.nodes)
    )
    if deadline and started and (now - started).total_seconds() > deadline and not finished:
        actions.delete_pods += [p["metadata"]["name"] for p in current.values() if is_live(p)]
        _fail(
            status,
            "DeadlineExceeded",
            f"ran longer than activeDeadlineSeconds ({deadline}s)",
            stamp,
            generation,
            actions,
        )
        return _finish(actions, status, original)

    expected = range(spec.resources.nodes)
    failure = decisive_failure(current, expected)
    if failure is not None:
        actions.delete_pods += [p["metadata"]["name"] for p in current.values() if is_live(p)]
        _handle_failure(job, status, failure, now, default_image, actions)
        return _finish(actions, status, original)

    phases = [pod_phase(current[rank]) for rank in expected]
    if all(phase == "Succeeded" for phase in phases):
        status.phase = "Succeeded"
        status.completionTime = stamp
        status.outputPath = spec.output.path
        message = f"all {len(phases)} rank(s) finished; output in {spec.output.path}"
        status.conditions = cond.set_exclusive(
            status.conditions, cond.SUCCEEDED, "TrainingComplete", message, stamp, generation
        )
        actions.events.append(Event("Normal", "Succeeded", message))
        return _finish(actions, status, original)

    # A pod that cannot start (kubelet waiting reason, Unschedulable) holds up every rank.
    blocked = start_verdict(current.values(), spec.retry.podStartTimeoutSeconds, now)
    if blocked is not None:
        if blocked.fail:
            actions.delete_pods += [p["metadata"]["name"] for p in current.values() if is_live(p)]
            _fail(status, blocked.reason, blocked.message, stamp, generation, actions)
        else:
            status.conditions = cond.set_condition(
                status.conditions,
                cond.RUNNING,
                "False",
                blocked.reason,
                blocked.message,
                stamp,
                generation,
            )
            actions.requeue_after = blocked.requeue_after
        return _finish(actions, status, original)

    if any(phase == "Running" for phase in phases):
        if status.phase != "Running":
            status.phase = "Running"
            status.startTime = status.startTime or _earliest_start(current.values()) or stamp
            message = f"launch {attempt}: training on {len(phases)} pod(s)"
            status.conditions = cond.set_exclusive(
                status.conditions, cond.RUNNING, "Training", message, stamp, generation
            )
            actions.events.append(Event("Normal", "Running", message))
        return _finish(actions, status, original)

    return _finish(actions, status, original)


def _mark_resumed(status: SFTJobStatus, stamp: str, generation: int | None) -> None:
    status.conditions = cond.set_condition(
        status.conditions,
        cond.SUSPENDED,
        "False",
        "Resumed",
        "spec.suspend is false",
        stamp,
        generation,
    )


def _earliest_start(pods: Any) -> str | None:
    starts = sorted(s for p in pods if (s := (p.get("status") or {}).get("startTime")))
    return starts[0] if starts else None


def _handle_failure(
    job: SFTJob,
    status: SFTJobStatus,
    failure: Failure,
    now: datetime,
    default_image: str,
    actions: Actions,
) -> None:
    stamp = iso(now)
    generation = job.metadata.generation
    status.lastFailure = FailureInfo(
        reason=failure.reason,
        message=failure.message[:1000],
        step=failure.step,
        time=stamp,
        attempt=status.attempts,
    )
    decision = decide_retry(failure, job.spec, status)
    if not decision.relaunch:
        _fail(status, decision.reason, decision.message, stamp, generation, actions)
        return
    status.restarts += 1
    status.attempts += 1
    if (decision.per_device, decision.accumulation) != (
        job.spec.training.perDeviceTrainBatchSize,
        job.spec.training.gradientAccumulationSteps,
    ):
        status.effectiveTraining = EffectiveTraining(
            perDeviceTrainBatchSize=decision.per_device,
            gradientAccumulationSteps=decision.accumulation,
        )
    _launch(
        job, status.attempts, default_image, actions, decision.per_device, decision.accumulation
    )
    status.phase = "Restarting"
    message = f"restart {status.restarts}/{job.spec.retry.maxRestarts}: {decision.message}"
    status.conditions = cond.set_exclusive(
        status.conditions, cond.RESTARTING, decision.reason, message, stamp, generation
    )
    actions.events.append(Event("Warning", decision.reason, message))


def _fail(
    status: SFTJobStatus,
    reason: str,
    message: str,
    stamp: str,
    generation: int | None,
    actions: Actions,
) -> None:
    status.phase = "Failed"
    status.completionTime = stamp
    status.conditions = cond.set_exclusive(
        status.conditions, cond.FAILED, reason, message, stamp, generation
    )
    actions.events.append(Event("Warning", reason, message))


def _expire(job: SFTJob, status: SFTJobStatus, now: datetime, actions: Actions) -> None:
    ttl = job.spec.ttlSecondsAfterFinished
    finished = parse_time(status.completionTime)
    if ttl is not None and finished is not None and (now - finished).total_seconds() >= ttl:
        actions.delete_job = True


def _note_spec_change(
    job: SFTJob, status: SFTJobStatus, stamp: str, generation: int | None
) -> None:
    if not status.specHash:
        return
    changed = training_spec_hash(job) != status.specHash
    already = cond.is_true(status.conditions, cond.SPEC_CHANGE_IGNORED)
    if changed and not already:
        status.conditions = cond.set_condition(
            status.conditions,
            cond.SPEC_CHANGE_IGNORED,
            "True",
            "ImmutableWhileRunning",
            "training specs are immutable once launched: the run continues with the spec it "
            "started with. Only spec.suspend (and retry, ttl, deadline) may change; create a "
            "new SFTJob to train differently",
            stamp,
            generation,
        )
    elif not changed and already:
        status.conditions = cond.set_condition(
            status.conditions,
            cond.SPEC_CHANGE_IGNORED,
            "False",
            "SpecRestored",
            "the spec matches the running one again",
            stamp,
            generation,
        )


def _finish(actions: Actions, status: SFTJobStatus, original: dict[str, Any]) -> Actions:
    updated = status.model_dump(mode="json", exclude_none=True)
    # Only the operator's own fields: progress and measuredPlan belong to the trainer.
    owned = (
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
    )
    actions.status = {k: updated.get(k) for k in owned if updated.get(k) != original.get(k)}
    return actions


# --------------------------------------------------------------------- planning


def planned_status(job: SFTJob, now: datetime) -> dict[str, Any]:
    """Status for a valid spec: the plan, the advice and the Planned condition."""
    from .advice import advise
    from .plan import plan_for

    status = _status_of(job)
    plan = plan_for(job.spec)
    advisories = advise(job.spec, plan)
    total = plan.totalSteps if plan.totalSteps is not None else "pending"
    message = (
        f"effective batch {plan.effectiveBatchSize} over {plan.worldSize} process(es), "
        f"{total} steps" + (" (estimate)" if plan.estimate else "")
    )
    conditions = cond.set_condition(
        status.conditions,
        cond.PLANNED,
        "True",
        "PlanReady",
        message,
        iso(now),
        job.metadata.generation,
    )
    return {
        "plan": plan.model_dump(mode="json", exclude_none=True),
        "advisories": [a.model_dump(mode="json", exclude_none=True) for a in advisories],
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
        "observedGeneration": job.metadata.generation,
        "phase": status.phase or "Pending",
    }


def invalid_status(
    existing: SFTJobStatus | None, messages: list[str], now: datetime, generation: int | None
) -> dict[str, Any]:
    """Status for a spec that cannot run: Failed/InvalidSpec naming every bad field."""
    status = existing or SFTJobStatus()
    message = "; ".join(messages)
    conditions = cond.set_condition(
        status.conditions, cond.PLANNED, "False", "InvalidSpec", message, iso(now), generation
    )
    conditions = cond.set_exclusive(
        conditions, cond.FAILED, "InvalidSpec", message, iso(now), generation
    )
    return {
        "phase": "Failed",
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
        "observedGeneration": generation,
        "completionTime": iso(now),
    }
