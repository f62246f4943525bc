"""Pure lifecycle: from the job and the pods as they are now, what to do next.

`reconcile_job` is called on every event, resync or requeue with the SFTJob and the
pods observed through the API. It never looks at event order: the phase, the
conditions and the actions are derived from observed state each time, so running
it twice, or after an operator restart, gives the same answer.

Launches are intent-first and two-phase, so a crash between any two writes is
finished by the next pass instead of being mistaken for a failure:
1. the decision (attempts, restarts, lastFailure, the Restarting condition, the
   backoff's nextAttemptTime) is written to the status first, its Event just before;
2. pods of earlier attempts are deleted, and the new attempt's pods are created only
   once none of them is alive (a terminating pod may still be writing its checkpoint)
   and the backoff has passed;
3. `launchedAttempt` records that every rank was created. A pass that finds
   `launchedAttempt < attempts` completes the launch (creates the missing ranks):
   no PodLost and no restart for a rank that was never created.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import ValidationError

from . import conditions as cond
from .api import (
    EffectiveStatus,
    EffectiveTraining,
    FailureInfo,
    SFTJob,
    SFTJobSpec,
    SFTJobStatus,
    SpecError,
)
from .children import build_pod, training_spec_hash
from .launch_policy import LaunchPolicy, deadline_after_edit
from .pod_state import (
    is_live,
    owned_by,
    pod_attempt,
    pod_phase,
    pod_rank,
    start_verdict,
    terminated_state,
)
from .retry_policy import Failure, decide_retry, decisive_failure
from .trainer_config import build_trainer_config

EventType = Literal["Normal", "Warning"]

# The reason of a job refused by its profile (policy.resolve's violations), and of an edit
# of a running job refused by the profile it was launched under.
POLICY_VIOLATION = "PolicyViolation"

# A launch waiting for the previous attempt's pods to go looks again after this long
# (a pod deletion wakes the job sooner; this only bounds a missed event).
OLD_PODS_RECHECK_SECONDS = 5.0
# A child name held by another owner (say a previous job of the same name that the
# garbage collector is still removing) is tried again after this long.
CHILD_CONFLICT_RETRY_SECONDS = 5.0


@dataclass(frozen=True)
class Event:
    """An Event about the job; `key` (an attempt or generation) makes it unique.

    The shell names the Event after (job uid, reason, key), so posting it again after
    a crash is answered 409 and changes nothing: each Event is posted exactly once.
    """

    type: EventType
    reason: str
    message: str
    key: str = ""


@dataclass
class Actions:
    """What the shell must do, in this order (each step is safe to repeat after a crash):

    1. post `events`, then patch `status` (for a launch: the decision, before any pod);
    2. delete `delete_pods`;
    3. with `trainer_config`: write the ConfigMap (with `launch_policy`, the profile's
       verdict frozen at the first launch) and the other static children (the
       rendezvous Service selecting rank 0 of `trainer_config["attempt"]`), then create
       `create_pods`;
    4. only when every child and pod is this job's: post `launch_events`, then patch
       `launch_status` (the launch is complete);
    5. delete the job when `delete_job`.
    `requeue_after`: seconds until the job needs a pass even if nothing changes
    (deadline, TTL, backoff, old pods going); None when only a change needs one.
    """

    status: dict[str, Any] = field(default_factory=dict)
    create_pods: list[dict[str, Any]] = field(default_factory=list)
    delete_pods: list[str] = field(default_factory=list)
    trainer_config: dict[str, Any] | None = None
    launch_policy: LaunchPolicy = field(default_factory=LaunchPolicy)
    events: list[Event] = field(default_factory=list)
    delete_job: bool = False
    launch_status: dict[str, Any] = field(default_factory=dict)
    launch_events: list[Event] = field(default_factory=list)
    # Seconds until this job needs a pass even if nothing changes (a wait that ends).
    requeue_after: float | None = None

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 0.0)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


def invalid_spec_is_reported(existing: SFTJobStatus | None, generation: int | None) -> bool:
    """For a spec that cannot run and was never launched: whether this generation still
    needs its Failed/InvalidSpec report (once per generation, not on every pass)."""
    return existing is None or existing.observedGeneration != generation


def runs_on_launched_spec(existing: SFTJobStatus | None) -> bool:
    """Whether an invalid spec leaves a run going (on the spec it was launched with)."""
    return existing is not None and existing.attempts > 0


def failed_by_policy(status: SFTJobStatus | None) -> bool:
    """Whether the job ended, never launched, because it breaks its profile."""
    if status is None or status.phase != "Failed" or status.attempts > 0:
        return False
    failed = cond.find(status.conditions, cond.FAILED)
    return failed is not None and failed.reason == POLICY_VIOLATION


def policy_applies(status: SFTJobStatus | None, generation: int | None) -> bool:
    """Whether this pass resolves the job's profile: only before the first launch.

    A job not launched yet and not finished, or one refused by policy whose spec was
    edited since (a new generation is checked again, and runs if it now complies). A
    launched job keeps the verdict frozen at its launch (launch_policy).
    """
    status = status or SFTJobStatus()
    if status.attempts > 0:
        return False
    if failed_by_policy(status):
        return status.observedGeneration != generation
    return status.phase not in ("Failed", "Succeeded")


def needs_plan(status: SFTJobStatus, generation: int | None) -> bool:
    """Whether this generation is still to be planned: not launched, not finished, and
    its plan not yet written."""
    unlaunched = status.attempts == 0 and status.phase not in ("Failed", "Succeeded")
    return unlaunched and status.observedGeneration != generation


def merge_patched(base: Mapping[str, Any], patch: Mapping[str, Any]) -> dict[str, Any]:
    """`base` with the JSON merge patch `patch` applied (RFC 7386: null deletes a key,
    objects merge, anything else replaces): what the API server stores for a status patch."""
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge_patched(out[key], value)
        elif isinstance(value, Mapping):
            out[key] = merge_patched({}, value)
        else:
            out[key] = value
    return out


def status_after(status: SFTJobStatus | None, patch: Mapping[str, Any]) -> SFTJobStatus:
    """The status once a pass's merge patch is applied to it."""
    base = (status or SFTJobStatus()).model_dump(mode="json", exclude_none=True)
    return SFTJobStatus.model_validate(merge_patched(base, patch))


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


# --------------------------------------------------------------------- the running spec

# Spec fields a user may change on a launched job; everything else is frozen for the run.
MUTABLE_FIELDS = ("suspend", "retry", "ttlSecondsAfterFinished", "activeDeadlineSeconds")


def running_job(
    job: SFTJob, launched_spec: SFTJobSpec | None, policy: LaunchPolicy | None = None
) -> SFTJob:
    """The job as it runs: the launched spec with the fields that may change taken from now
    (the deadline only within the profile's cap, see launch_policy.deadline_after_edit)."""
    if launched_spec is None:
        return job
    current = {name: getattr(job.spec, name) for name in MUTABLE_FIELDS}
    if policy is not None:
        current["activeDeadlineSeconds"] = deadline_after_edit(
            job.spec.activeDeadlineSeconds, launched_spec.activeDeadlineSeconds, policy
        ).seconds
    return job.model_copy(update={"spec": launched_spec.model_copy(update=current)})


def overlay_mutable_fields(launched: SFTJobSpec, raw_spec: Mapping[str, Any]) -> SFTJobSpec:
    """The launched spec with each mutable field of an edited (invalid) spec that parses alone.

    An edit can break a cross-field rule elsewhere in the spec and still change suspend,
    retry, TTL or the deadline: each of those is validated on its own against the launched
    spec, and one that does not parse keeps its launched value.
    """
    spec = launched
    for name in MUTABLE_FIELDS:
        candidate = spec.model_dump(mode="json", exclude_none=True)
        if name in raw_spec and raw_spec[name] is not None:
            candidate[name] = copy.deepcopy(raw_spec[name])
        else:
            candidate.pop(name, None)  # removed from the spec: its default applies
        try:
            spec = SFTJobSpec.model_validate(candidate)
        except (ValidationError, SpecError, ValueError):
            continue
    return spec


# --------------------------------------------------------------------- one pass


@dataclass
class _Pass:
    """The state one reconcile works on: the job as it runs, its pods and the status copy."""

    job: SFTJob
    edited: SFTJob
    spec_errors: list[str]
    pods: list[dict[str, Any]]
    now: datetime
    image: str
    status: SFTJobStatus
    original: dict[str, Any]
    new_generation: bool
    policy: LaunchPolicy = field(default_factory=LaunchPolicy)
    # A live edit the profile refuses (a deadline above its cap), reported as ignored.
    policy_refusal: str | None = None
    actions: Actions = field(default_factory=Actions)
    launch_base: dict[str, Any] | None = None

    @property
    def stamp(self) -> str:
        return iso(self.now)

    @property
    def generation(self) -> int | None:
        return self.job.metadata.generation

    def current_pods(self) -> dict[int, dict[str, Any]]:
        attempt = self.status.attempts
        return {pod_rank(p): p for p in self.pods if pod_attempt(p) == attempt}

    def delete_live(self, pods: Any) -> None:
        self.actions.delete_pods += [p["metadata"]["name"] for p in pods if is_live(p)]

    def set(self, kind: str, status: cond.Status, reason: str, message: str) -> None:
        self.status.conditions = cond.set_condition(
            self.status.conditions, kind, status, reason, message, self.stamp, self.generation
        )

    def set_exclusive(self, kind: str, reason: str, message: str) -> None:
        self.status.conditions = cond.set_exclusive(
            self.status.conditions, kind, reason, message, self.stamp, self.generation
        )


def _status_of(job: SFTJob) -> SFTJobStatus:
    return job.status or SFTJobStatus()


def reconcile_job(
    job: SFTJob,
    pods: list[dict[str, Any]],
    now: datetime,
    default_image: str,
    launched_spec: SFTJobSpec | None = None,
    spec_errors: list[str] | None = None,
    policy: LaunchPolicy | None = None,
) -> Actions:
    """The next actions for `job` given the pods observed now (any attempt, any owner).

    Only pods whose controller ownerReference names this job's uid are its own; a
    previous job of the same name, or a user's pod with its labels, is never adopted.
    `launched_spec` is the spec the running pods were built from (kept in the job's
    ConfigMap); relaunches reuse it, so an ignored edit never sneaks into a restart.
    `spec_errors` says the edited spec breaks a rule: the run goes on with the launched
    spec (and the mutable fields as `job` carries them) and a condition names the fields.
    `policy` is the profile's verdict: resolved now before the first launch (with
    `launched_spec` the effective spec, job over profile), frozen in the ConfigMap after;
    it gives the pods their profile settings and bounds live deadline edits.
    """
    status = _status_of(job).model_copy(deep=True)
    policy = policy or LaunchPolicy()
    refusal = (
        deadline_after_edit(
            job.spec.activeDeadlineSeconds, launched_spec.activeDeadlineSeconds, policy
        ).refused
        if launched_spec is not None
        else None
    )
    p = _Pass(
        job=running_job(job, launched_spec, policy),
        edited=job,
        spec_errors=list(spec_errors or []),
        pods=[pod for pod in pods if owned_by(pod, job.metadata.uid)],
        now=now,
        image=default_image,
        status=status,
        original=status.model_dump(mode="json", exclude_none=True),
        # An edit not yet acted on (a status that never recorded a generation: none known).
        new_generation=status.observedGeneration not in (None, job.metadata.generation),
        policy=policy,
        policy_refusal=refusal,
    )
    status.observedGeneration = job.metadata.generation

    # Pods newer than the status (a status write not visible to this pass yet, or a launch
    # made by an operator that wrote pods first): adopt them, never launch twice.
    attempt = max([status.attempts] + [pod_attempt(pod) for pod in p.pods])
    adopted = attempt > status.attempts
    if adopted:
        # The adopted launch was built from the current spec: record it, or a later edit
        # would never be reported as ignored.
        status.specHash = status.specHash or training_spec_hash(p.edited)
        status.launchedAttempt = _launched(status)
        status.attempts = attempt
        status.phase = status.phase or "Pending"
    p.delete_live(pod for pod in p.pods if pod_attempt(pod) < attempt)

    if status.phase in ("Succeeded", "Failed"):
        _finished(p)
    else:
        _note_spec_change(p)
        if p.job.spec.suspend:
            _suspend(p)
        elif status.phase == "Suspended" and adopted:
            # An earlier pass already resumed (its status write is not visible to this one
            # yet): its pods are the run now; launching again would start a second one.
            status.phase = "Pending"
            _mark_resumed(p)
            _advance_launch(p)
        elif status.attempts == 0 or status.phase == "Suspended":
            _decide_launch(p)
            _advance_launch(p)
        elif _launched(status) < status.attempts:
            _advance_launch(p)
        else:
            _observe_run(p)
    return _finish(p)


def _launched(status: SFTJobStatus) -> int:
    """The last attempt whose pods were all created (a status from before the field: all)."""
    return status.attempts if status.launchedAttempt is None else status.launchedAttempt


# --------------------------------------------------------------------- launching


def _decide_launch(p: _Pass) -> None:
    """Phase 1 of a first launch or a resume: record the new attempt before any pod exists."""
    status = p.status
    resumed = status.phase == "Suspended"
    status.launchedAttempt = _launched(status)
    status.attempts += 1
    status.nextAttemptTime = None
    # The hash of the job's own spec (not the effective one): an edit is compared with it.
    status.specHash = status.specHash or training_spec_hash(p.edited)
    if status.attempts == 1 and status.effective is None and p.policy.effective:
        # What the profile added, recorded with the launch that runs it.
        status.effective = EffectiveStatus.model_validate(dict(p.policy.effective))
    status.phase = "Pending"
    if resumed:
        # As for a Kubernetes Job: activeDeadlineSeconds counts running time, so the
        # clock restarts when the resumed pods start.
        status.startTime = None
        _mark_resumed(p)
        message = f"launch {status.attempts}: resuming from the newest checkpoint"
        p.actions.events.append(Event("Normal", "Resumed", message, f"a{status.attempts}"))


def _advance_launch(p: _Pass) -> None:
    """Phases 2 and 3: stop earlier attempts, wait out the backoff, create the missing ranks."""
    status, actions = p.status, p.actions
    attempt = status.attempts
    if _past_deadline(p):
        # A relaunch waiting for old pods or a backoff: the run's clock still runs.
        p.delete_live(p.pods)
        _fail(p, "DeadlineExceeded", _deadline_message(p))
        return
    _requeue_at_deadline(p)
    # A pod being deleted that still runs is alive: it may be writing its checkpoint into
    # the volume the new attempt resumes from, and it still answers at rank 0's address.
    alive = [
        pod
        for pod in p.pods
        if pod_attempt(pod) < attempt and pod_phase(pod) in ("Pending", "Running")
    ]
    p.delete_live(alive)
    if alive:
        actions.requeue(OLD_PODS_RECHECK_SECONDS)
        return
    not_before = parse_time(status.nextAttemptTime)
    if not_before is not None and p.now < not_before:
        actions.requeue((not_before - p.now).total_seconds())
        return
    current = p.current_pods()
    nodes = p.job.spec.resources.nodes
    missing = [rank for rank in range(nodes) if rank not in current]
    if missing:
        # Batch sizes travel in the ConfigMap, which every rank of the launch reads.
        effective = status.effectiveTraining
        actions.trainer_config = build_trainer_config(
            p.job,
            attempt=attempt,
            per_device=effective.perDeviceTrainBatchSize if effective else None,
            accumulation=effective.gradientAccumulationSteps if effective else None,
        )
        actions.launch_policy = p.policy
        pod_defaults = p.policy.pod
        actions.create_pods = [
            build_pod(p.job, rank, attempt, p.image, pod_defaults) for rank in missing
        ]
    # What follows is written only once every rank exists (see Actions).
    p.launch_base = status.model_dump(mode="json", exclude_none=True)
    status.launchedAttempt = attempt
    status.nextAttemptTime = None
    message = f"launch {attempt}: {nodes} pod(s) created"
    # Running stays False until a pod runs; Restarting (if set) stays until then too.
    p.set(cond.RUNNING, "False", "Launched", message)
    actions.launch_events.append(Event("Normal", "Launched", message, f"a{attempt}"))


# --------------------------------------------------------------------- running


def _observe_run(p: _Pass) -> None:
    """A complete launch: deadline, failures, success, running or waiting."""
    status, spec = p.status, p.job.spec
    current = p.current_pods()
    expected = range(spec.resources.nodes)
    # Ranks that all finished before the operator looked have succeeded, deadline or not.
    finished = all(pod_phase(current.get(rank, {})) == "Succeeded" for rank in expected)
    if _past_deadline(p) and not finished:
        p.delete_live(current.values())
        _fail(p, "DeadlineExceeded", _deadline_message(p))
        return

    failure = decisive_failure(current, expected)
    if failure is not None:
        settling = _rank_settle_wait(p, current)
        if settling is not None:
            # Another rank may yet fail with the cause (its OOM after this rank's NCCL
            # error): decide once it has, or once the window is over.
            p.actions.requeue(settling)
            return
        _handle_failure(p, failure)
        return

    phases = [pod_phase(current[rank]) for rank in expected]
    if all(phase == "Succeeded" for phase in phases):
        status.phase = "Succeeded"
        status.completionTime = p.stamp
        status.outputPath = spec.output.path
        message = f"all {len(phases)} rank(s) finished; output in {spec.output.path}"
        p.set_exclusive(cond.SUCCEEDED, "TrainingComplete", message)
        p.actions.events.append(Event("Normal", "TrainingComplete", message, f"a{status.attempts}"))
        _expire(p)
        return

    # A pod that cannot start (kubelet waiting reason, Unschedulable) holds up every rank.
    blocked = start_verdict(current.values(), spec.retry.podStartTimeoutSeconds, p.now)
    if blocked is not None:
        if blocked.fail:
            p.delete_live(current.values())
            _fail(p, blocked.reason, blocked.message)
            return
        p.set(cond.RUNNING, "False", blocked.reason, blocked.message)
        if blocked.requeue_after is not None:
            p.actions.requeue(blocked.requeue_after)
        _requeue_at_deadline(p)
        return

    if any(phase == "Running" for phase in phases) and status.phase != "Running":
        status.phase = "Running"
        status.startTime = status.startTime or _earliest_start(current.values()) or p.stamp
        message = f"launch {status.attempts}: training on {len(phases)} pod(s)"
        p.set_exclusive(cond.RUNNING, "Training", message)
        p.actions.events.append(Event("Normal", "Training", message, f"a{status.attempts}"))
    _requeue_at_deadline(p)


# Seconds a failed rank's peers get to fail too before the run's cause is decided. The ranks
# of a multi-node run fail within a few seconds of each other when one dies (the elastic
# agent and NCCL tear the others down), and the pods' statuses arrive one watch event at
# a time: the first one seen is often the symptom (a broken collective), not the cause.
RANK_SETTLE_SECONDS = 5.0


def _rank_settle_wait(p: _Pass, current: dict[int, dict[str, Any]]) -> float | None:
    """Seconds to wait for the other ranks before deciding on a failure; None to decide now.

    Only while some rank still runs, and measured from the first rank's exit
    (its container's finishedAt): a pass after the window, or one that sees every rank
    ended, decides at once."""
    if not any(pod_phase(pod) in ("Pending", "Running") for pod in current.values()):
        return None
    ended = [
        moment
        for pod in current.values()
        if pod_phase(pod) == "Failed"
        and (moment := parse_time(terminated_state(pod).get("finishedAt"))) is not None
    ]
    if not ended:
        return None
    remaining = RANK_SETTLE_SECONDS - (p.now - min(ended)).total_seconds()
    return remaining if remaining > 0 else None


def _past_deadline(p: _Pass) -> bool:
    deadline = p.job.spec.activeDeadlineSeconds
    started = parse_time(p.status.startTime)
    return bool(deadline and started and (p.now - started).total_seconds() > deadline)


def _requeue_at_deadline(p: _Pass) -> None:
    deadline = p.job.spec.activeDeadlineSeconds
    started = parse_time(p.status.startTime)
    if deadline and started:
        # One second past the deadline, so that pass sees it exceeded.
        p.actions.requeue(deadline - (p.now - started).total_seconds() + 1)


def _deadline_message(p: _Pass) -> str:
    return f"ran longer than activeDeadlineSeconds ({p.job.spec.activeDeadlineSeconds}s)"


def _mark_resumed(p: _Pass) -> None:
    p.set(cond.SUSPENDED, "False", "Resumed", "spec.suspend is false")


def _earliest_start(pods: Any) -> str | None:
    starts = sorted(s for pod in pods if (s := (pod.get("status") or {}).get("startTime")))
    return starts[0] if starts else None


def _handle_failure(p: _Pass, failure: Failure) -> None:
    """A failed attempt: fail the job, or record the relaunch (phase 1) and start it."""
    status, spec = p.status, p.job.spec
    status.lastFailure = FailureInfo(
        reason=failure.reason,
        message=failure.message[:1000],
        step=failure.step,
        time=p.stamp,
        attempt=status.attempts,
    )
    decision = decide_retry(failure, spec, status)
    if not decision.relaunch:
        p.delete_live(p.current_pods().values())
        _fail(p, decision.reason, decision.message)
        return
    status.launchedAttempt = status.attempts
    status.restarts += 1
    status.attempts += 1
    backoff = decision.backoff_seconds
    status.nextAttemptTime = iso(p.now + timedelta(seconds=backoff)) if backoff > 0 else None
    if (decision.per_device, decision.accumulation) != (
        spec.training.perDeviceTrainBatchSize,
        spec.training.gradientAccumulationSteps,
    ):
        status.effectiveTraining = EffectiveTraining(
            perDeviceTrainBatchSize=decision.per_device,
            gradientAccumulationSteps=decision.accumulation,
        )
    status.phase = "Restarting"
    message = f"restart {status.restarts}/{spec.retry.maxRestarts}: {decision.message}"
    if backoff > 0:
        message += f" (after {backoff:g}s)"
    p.set_exclusive(cond.RESTARTING, decision.reason, message)
    p.actions.events.append(Event("Warning", decision.reason, message, f"a{status.attempts}"))
    _advance_launch(p)


def _fail(p: _Pass, reason: str, message: str) -> None:
    p.status.phase = "Failed"
    p.status.completionTime = p.stamp
    p.set_exclusive(cond.FAILED, reason, message)
    p.actions.events.append(Event("Warning", reason, message, f"a{p.status.attempts}"))
    _expire(p)


# --------------------------------------------------------------------- suspended / finished


def _suspend(p: _Pass) -> None:
    status = p.status
    p.delete_live(p.current_pods().values())
    if status.phase != "Suspended":
        status.phase = "Suspended"
        p.set_exclusive(
            cond.SUSPENDED,
            "SuspendedByUser",
            "spec.suspend is true: pods stopped; set it to false to resume from the newest "
            "checkpoint",
        )
        message = "pods stopped, status kept"
        p.actions.events.append(Event("Normal", "SuspendedByUser", message, f"a{status.attempts}"))


def _finished(p: _Pass) -> None:
    """A finished job: leftover pods go, edits are reported as ignored, the TTL runs."""
    p.delete_live(p.current_pods().values())
    status = p.status
    if p.new_generation and (p.spec_errors or _training_changed(p, finished=True)):
        message = (
            f"the job has finished ({status.phase}): edits change nothing, and the status "
            "still describes the finished run; create a new SFTJob to train again"
        )
        if p.spec_errors:
            message += "; the edited spec is also invalid: " + "; ".join(p.spec_errors)
        p.set(cond.SPEC_CHANGE_IGNORED, "True", "JobFinished", message)
        key = f"g{p.generation}"
        p.actions.events.append(Event("Warning", "JobFinished", message, key))
    _expire(p)


def _expire(p: _Pass) -> None:
    ttl = p.job.spec.ttlSecondsAfterFinished
    finished = parse_time(p.status.completionTime)
    if ttl is None or finished is None:
        return
    left = ttl - (p.now - finished).total_seconds()
    if left <= 0:
        p.actions.delete_job = True
    else:
        p.actions.requeue(left)


def _training_changed(p: _Pass, finished: bool = False) -> bool:
    """Whether the edited spec differs from the launched one in anything but mutable fields."""
    if not p.status.specHash:
        # Never launched (say Failed for an invalid spec): any edit is one that is ignored.
        return finished
    return training_spec_hash(p.edited) != p.status.specHash


def _note_spec_change(p: _Pass) -> None:
    """An edit of a launched job: reported (the run keeps its spec), never applied."""
    status = p.status
    already = cond.find(status.conditions, cond.SPEC_CHANGE_IGNORED)
    key = f"g{p.generation}"
    if p.spec_errors:
        refused = [p.policy_refusal] if p.policy_refusal else []
        message = (
            "the edited spec is invalid and was ignored; the run goes on with the spec it was "
            "launched with (spec.suspend, retry, ttl and deadline edits apply where valid): "
            + "; ".join(p.spec_errors + refused)
        )
        if already is None or (already.reason, already.message) != ("InvalidSpec", message):
            p.set(cond.SPEC_CHANGE_IGNORED, "True", "InvalidSpec", message)
            p.actions.events.append(Event("Warning", "InvalidSpec", message, key))
        return
    if not status.specHash:
        return
    if p.policy_refusal:
        message = (
            "the edit breaks the profile the job was launched under and was ignored: "
            + p.policy_refusal
        )
        if already is None or (already.reason, already.message) != (POLICY_VIOLATION, message):
            p.set(cond.SPEC_CHANGE_IGNORED, "True", POLICY_VIOLATION, message)
            p.actions.events.append(Event("Warning", POLICY_VIOLATION, message, key))
        return
    changed = _training_changed(p)
    reported = already is not None and already.status == "True"
    immutable_reported = (
        reported and already is not None and already.reason == "ImmutableWhileRunning"
    )
    if changed and not immutable_reported:
        message = (
            "training specs are immutable once launched: the run continues with the spec it "
            "started with. Only spec.suspend (and retry, ttl, deadline) may change; create a "
            "new SFTJob to train differently"
        )
        p.set(cond.SPEC_CHANGE_IGNORED, "True", "ImmutableWhileRunning", message)
        p.actions.events.append(Event("Warning", "ImmutableWhileRunning", message, key))
    elif not changed and reported:
        p.set(
            cond.SPEC_CHANGE_IGNORED,
            "False",
            "SpecRestored",
            "the spec matches the running one again",
        )


# Only the operator's own fields: progress and measuredPlan belong to the trainer.
OPERATOR_STATUS_FIELDS = (
    "phase",
    "conditions",
    "attempts",
    "restarts",
    "launchedAttempt",
    "nextAttemptTime",
    "effectiveTraining",
    "lastFailure",
    "effective",
    "startTime",
    "completionTime",
    "outputPath",
    "specHash",
    "observedGeneration",
)


def _diff(updated: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    return {k: updated.get(k) for k in OPERATOR_STATUS_FIELDS if updated.get(k) != base.get(k)}


def stale_eta_cleared(status: SFTJobStatus) -> dict[str, Any]:
    """The patch that removes the ETA of a job that is not Running (Suspended, Failed,
    Succeeded, Restarting, Pending): a time left is a promise only a run can keep."""
    progress = status.progress
    if status.phase == "Running" or progress is None:
        return {}
    if progress.eta is None and progress.etaSeconds is None:
        return {}
    return {"progress": {"eta": None, "etaSeconds": None}}


# Condition transitions told as Warnings; every other transition is Normal.
WARNING_CONDITIONS = (cond.FAILED, cond.RESTARTING, cond.SPEC_CHANGE_IGNORED)


def condition_events(
    before: Mapping[str, Any], after: Mapping[str, Any], queued: list[Event]
) -> list[Event]:
    """One Event per condition transition between two statuses, with the condition's reason.

    A transition the pass already tells (`queued`: the hand-written events, each named
    after the reason of the condition it sets) is not told twice, nor is one reason shared by
    several conditions (an exclusive switch sets the old condition False with the new
    one's reason). The key (condition, status, attempt, generation) makes a pass repeated
    after a crash post the same Event name (409); a pass that changes nothing has no
    transition, so none.
    """
    old = SFTJobStatus.model_validate(before).conditions
    new = SFTJobStatus.model_validate(after)
    # The condition switched on tells a shared reason (Failed True, not Running False).
    changed = sorted(cond.transitions(old, new.conditions), key=lambda c: c.status != "True")
    told = {event.reason for event in queued}
    events = []
    for condition in changed:
        if condition.reason in told:
            continue
        told.add(condition.reason)
        warning = condition.type in WARNING_CONDITIONS and condition.status == "True"
        key = f"{condition.type}-{condition.status}-a{new.attempts}-g{new.observedGeneration}"
        events.append(
            Event("Warning" if warning else "Normal", condition.reason, condition.message, key)
        )
    return events


def patch_condition_events(
    status: SFTJobStatus | None, patch: Mapping[str, Any], queued: list[Event] | None = None
) -> list[Event]:
    """condition_events for a status patch the shell writes itself (not a pass's decision)."""
    base = (status or SFTJobStatus()).model_dump(mode="json", exclude_none=True)
    return condition_events(base, merge_patched(base, patch), queued or [])


def _finish(p: _Pass) -> Actions:
    updated = p.status.model_dump(mode="json", exclude_none=True)
    if p.launch_base is None:
        p.actions.status = _diff(updated, p.original)
        p.actions.events += condition_events(p.original, updated, p.actions.events)
    else:
        p.actions.status = _diff(p.launch_base, p.original)
        p.actions.launch_status = _diff(updated, p.launch_base)
        p.actions.events += condition_events(p.original, p.launch_base, p.actions.events)
        queued = p.actions.events + p.actions.launch_events
        p.actions.launch_events += condition_events(p.launch_base, updated, queued)
    p.actions.status.update(stale_eta_cleared(p.status))
    p.actions.delete_pods = list(dict.fromkeys(p.actions.delete_pods))
    return p.actions


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
    return _refused_status(existing, "InvalidSpec", messages, now, generation)


def policy_violation_status(
    existing: SFTJobStatus | None, messages: list[str], now: datetime, generation: int | None
) -> dict[str, Any]:
    """Status for a job that breaks its profile: Failed/PolicyViolation naming every rule
    and field (policy.PolicyViolation as text), before any child exists."""
    return _refused_status(existing, POLICY_VIOLATION, messages, now, generation)


def policy_cleared_status(
    existing: SFTJobStatus | None, profile: str | None, now: datetime, generation: int | None
) -> dict[str, Any]:
    """Status for a job refused by policy whose edited spec now complies: Pending again,
    so this pass plans and launches it (policy_applies let it be checked again)."""
    status = existing or SFTJobStatus()
    under = f"profile {profile}" if profile else "the policy (no profile applies)"
    message = f"generation {generation} complies with {under}"
    conditions = cond.set_condition(
        status.conditions, cond.FAILED, "False", "PolicyCompliant", message, iso(now), generation
    )
    return {
        "phase": "Pending",
        "completionTime": None,
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
    }


def _refused_status(
    existing: SFTJobStatus | None,
    reason: str,
    messages: list[str],
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    status = existing or SFTJobStatus()
    message = "; ".join(messages)
    conditions = cond.set_condition(
        status.conditions, cond.PLANNED, "False", reason, message, iso(now), generation
    )
    conditions = cond.set_exclusive(conditions, cond.FAILED, reason, message, iso(now), generation)
    return {
        "phase": "Failed",
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
        "observedGeneration": generation,
        "completionTime": iso(now),
    }


def child_conflict_status(
    existing: SFTJobStatus | None,
    conflicts: list[str],
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    """Status for a launch blocked by children that exist under another owner.

    A name this job needs is held by an object that is not its own (a previous job of the
    same name still being garbage-collected, or a user's object): it is never adopted,
    and the launch is tried again later.
    """
    status = existing or SFTJobStatus()
    message = (
        f"not this job's (their controller ownerReference names another uid, or none): "
        f"{', '.join(conflicts)}; the launch waits until they are deleted"
    )
    conditions = cond.set_condition(
        status.conditions, cond.RUNNING, "False", "ChildConflict", message, iso(now), generation
    )
    return {"conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions]}
