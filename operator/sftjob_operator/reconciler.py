"""One reconcile pass: read the job and its pods, ask the pure core, apply its answer.

The order of writes makes a crash at any point safe to repeat (see lifecycle.Actions):
events (named so a repeat is a no-op) and the status that records a decision come
first, then pod deletions, then children and pods (create-if-absent, owner checked),
and last the status that records a complete launch. Every status patch carries the
resourceVersion the pass read: a pass acting on a stale view gets 409 and is requeued.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubernetes.client import ApiException
from pydantic import ValidationError

from . import lifecycle, policy, progress_report, refusals
from .api import ObjectMeta, SFTJob, SFTJobSpec, SFTJobStatus, SpecError, parse_sftjob
from .children import (
    DEFAULT_TRAINER_IMAGE,
    LABEL_JOB,
    build_static_children,
    config_map_name,
    progress_config_map_name,
    rendezvous_selector,
)
from .kube import Kube, StaleStatus
from .launch_policy import LaunchPolicy
from .metrics import METRICS
from .profile_api import SFTProfile, parse_profile
from .trainer_config import CONFIG_KEY, POLICY_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorSettings:
    default_image: str = DEFAULT_TRAINER_IMAGE
    # SFTJOB_REQUIRE_PROFILE: a job whose namespace no SFTProfile selects is refused.
    require_profile: bool = False


def _status_from(body: Mapping[str, Any]) -> SFTJobStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return SFTJobStatus.model_validate(dict(raw))
    except ValidationError:
        # A hand-edited status must not wedge the operator: start from what we can read.
        log.warning("unreadable status on %s; ignoring it", body.get("metadata", {}).get("name"))
        return None


def job_from_body(body: Mapping[str, Any]) -> SFTJob:
    """The typed job with its status; raises SpecError for an invalid spec."""
    plain = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}
    plain["metadata"] = _job_metadata(body)
    job = parse_sftjob(plain)
    return job.model_copy(update={"status": _status_from(body)})


class JobGone(Exception):
    """The job this pass was handed no longer exists (deleted, or re-created with another uid)."""


# A pass whose status patch met a newer version of the job runs again this soon.
STALE_REQUEUE_SECONDS = 0.5
# A job whose namespace the watch has not shown yet is resolved again this soon.
NAMESPACE_UNSEEN_REQUEUE_SECONDS = 2.0


def _job_metadata(body: Mapping[str, Any]) -> dict[str, Any]:
    metadata = dict(body.get("metadata") or {})
    keep = ("name", "namespace", "uid", "generation", "labels", "annotations")
    return {k: metadata[k] for k in keep if k in metadata}


def job_on_launched_spec(
    body: Mapping[str, Any], launched: SFTJobSpec, status: SFTJobStatus | None
) -> SFTJob:
    """The job of an invalid edit as it runs: the launched spec, mutable fields from the edit."""
    spec = lifecycle.overlay_mutable_fields(launched, body.get("spec") or {})
    metadata = ObjectMeta.model_validate(_job_metadata(body))
    return SFTJob(metadata=metadata, spec=spec, status=status)


@dataclass(frozen=True)
class Outcome:
    """What one pass leaves: the job's phase and when it next needs a pass of its own.

    `phase` is None when the job is gone (then it never needs another pass);
    `requeue_after` is None when only a change to the job or its pods needs one.
    """

    phase: str | None
    requeue_after: float | None = None


async def reconcile(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> Outcome:
    """Bring one SFTJob a step closer to done.

    The job is gone (phase None) when it was deleted: checked before anything is created,
    and again by every status patch, so a stale body (a pass queued before its job was
    deleted) creates nothing. A status patch refused as stale (409) ends the pass quietly and asks
    for a quick requeue.
    """
    started = time.monotonic()
    try:
        return await _reconcile(body, kube, settings)
    except JobGone:
        return Outcome(None)
    finally:
        METRICS.reconcile_seconds.observe(time.monotonic() - started)


class _StatusWriter:
    """Status patches of one pass, each conditional on the version the pass last saw."""

    def __init__(self, kube: Kube, live: Mapping[str, Any]):
        metadata = live["metadata"]
        self.kube = kube
        self.namespace, self.name = metadata["namespace"], metadata["name"]
        self.resource_version = metadata.get("resourceVersion")

    async def patch(self, patch: dict[str, Any]) -> None:
        """Patch the status; a 404 ends the pass (JobGone) before anything else is made."""
        version = await asyncio.to_thread(
            self.kube.patch_job_status, self.namespace, self.name, patch, self.resource_version
        )
        if version is None:
            raise JobGone
        self.resource_version = version or self.resource_version


async def _reconcile(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> Outcome:
    metadata = body["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    live = await asyncio.to_thread(kube.read_job, namespace, name)
    if not lifecycle.is_same_job(metadata.get("uid"), live):
        raise JobGone
    assert live is not None
    writer = _StatusWriter(kube, live)
    existing = _status_from(live)
    try:
        return await _reconcile_live(live, existing, writer, kube, settings)
    except StaleStatus:
        log.debug("status of %s/%s changed during the pass; requeued", namespace, name)
        phase = (existing.phase if existing else None) or "Pending"
        return Outcome(phase, STALE_REQUEUE_SECONDS)


async def _reconcile_live(
    live: Mapping[str, Any],
    existing: SFTJobStatus | None,
    writer: _StatusWriter,
    kube: Kube,
    settings: OperatorSettings,
) -> Outcome:
    namespace, name = writer.namespace, writer.name
    generation = live["metadata"].get("generation")
    now = datetime.now(UTC)
    launched: SFTJobSpec | None = None
    frozen: LaunchPolicy | None = None
    spec_errors: list[str] = []
    try:
        job = job_from_body(live)
    except SpecError as exc:
        if not lifecycle.runs_on_launched_spec(existing):
            if lifecycle.invalid_spec_is_reported(existing, generation):
                await _report_invalid(kube, writer, live, existing, exc, now)
            return Outcome("Failed")
        # Launched: an invalid edit must not stop the run. It goes on with the spec it
        # was launched with, and a condition names the fields that were refused.
        launched, frozen = await _launched(kube, namespace, name)
        if launched is None:
            log.warning("%s/%s: invalid edit and no launched spec to run on", namespace, name)
            return Outcome(existing.phase or "Pending")
        job = job_on_launched_spec(live, launched, existing)
        spec_errors = [str(e) for e in exc.errors]

    status = job.status or SFTJobStatus()
    if lifecycle.policy_applies(status, generation):
        # Before the first launch only: the profile of the day decides what runs; after it,
        # the verdict frozen in the ConfigMap does (a profile edit never rewrites a run).
        resolution = await _resolve(kube, job, settings)
        if resolution is None:
            # The namespace's labels are not in the cache yet (a namespace made just before
            # the job): deciding now could miss the profile that selects it. Should it never
            # show, the operator cannot watch namespaces (RBAC): nothing launches unchecked.
            log.warning(
                "%s/%s: namespace %s not seen by the watch yet (the operator needs list and "
                "watch on namespaces); its profile is resolved once it is",
                namespace,
                name,
                namespace,
            )
            return Outcome(status.phase or "Pending", NAMESPACE_UNSEEN_REQUEUE_SECONDS)
        if resolution.violations:
            # Once per generation: a reported generation no longer asks (policy_applies).
            await _report_policy_violation(kube, writer, live, existing, resolution, now)
            return Outcome("Failed")
        launched, frozen = resolution.spec, LaunchPolicy.from_resolution(resolution)
        if lifecycle.failed_by_policy(status):
            # Refused before, compliant since this edit: pending again, planned below.
            profile = resolution.profile.metadata.name if resolution.profile else None
            patch = lifecycle.policy_cleared_status(status, profile, now, generation)
            await _post_events(kube, live, lifecycle.patch_condition_events(status, patch))
            await writer.patch(patch)
            status = lifecycle.status_after(status, patch)
            job = job.model_copy(update={"status": status})

    if lifecycle.needs_plan(status, generation):
        try:
            job = await _plan(job, launched, live, writer, kube, now)
        except SpecError as exc:  # e.g. drop_last with an empty dataloader
            await _report_invalid(kube, writer, live, existing, exc, now)
            return Outcome("Failed")

    pods = await asyncio.to_thread(kube.list_job_pods, namespace, name, LABEL_JOB)
    if launched is None and status.attempts > 0:
        launched, frozen = await _launched(kube, namespace, name)
    actions = lifecycle.reconcile_job(
        job, pods, now, settings.default_image, launched, spec_errors, frozen
    )
    attempt = actions.status.get("attempts", status.attempts)
    if attempt > 0:
        # The trainer's report, validated (progress_report); read after the pods, so a pass
        # that sees the run finished also sees its last report.
        report = await asyncio.to_thread(
            kube.read_config_map_data, namespace, progress_config_map_name(name)
        )
        key = (namespace, name, job.metadata.uid)
        phase_after = actions.status.get("phase") or (job.status.phase if job.status else None)
        actions.status = progress_report.merged_patch(
            progress_report.fold(report, key, attempt, job.status, phase_after), actions.status
        )
    requeue_after = await _apply(job, live, actions, kube, writer, now)
    phase = actions.status.get("phase") or (job.status.phase if job.status else None) or "Pending"
    # The job's series follow the status this pass wrote (metrics.job_values).
    METRICS.observe_job(namespace, name, lifecycle.status_after(job.status, actions.status))
    return Outcome(phase, requeue_after)


async def _resolve(kube: Kube, job: SFTJob, settings: OperatorSettings) -> policy.Resolution | None:
    """The job's profile verdict from the profiles and namespace labels the cache holds;
    None while the job's namespace is unknown to it."""
    namespace = job.metadata.namespace or "default"
    labels = await asyncio.to_thread(kube.read_namespace_labels, namespace)
    if labels is None:
        return None
    profiles = await asyncio.to_thread(kube.list_profiles)
    return policy.resolve(
        job.spec,
        namespace,
        labels,
        _parse_profiles(profiles),
        settings.require_profile,
        default_image=settings.default_image,
    )


def _parse_profiles(bodies: list[dict[str, Any]]) -> list[SFTProfile]:
    """The profiles that parse; one the API server stored but that does not parse is skipped
    (logged), so it selects nothing rather than stopping every job."""
    parsed = []
    for body in bodies:
        try:
            parsed.append(parse_profile(body))
        except SpecError as exc:
            name = (body.get("metadata") or {}).get("name")
            log.warning("SFTProfile %s is unreadable and ignored: %s", name, exc.errors[:1])
    return parsed


async def _report_refusal(
    kube: Kube,
    writer: _StatusWriter,
    live: Mapping[str, Any],
    reason: str,
    messages: list[str],
    patch: dict[str, Any],
) -> None:
    """A refused generation: a Warning event naming every problem, once per generation
    (its name is keyed by it), then the status patch that says the same."""
    key = f"g{live['metadata'].get('generation')}"
    await asyncio.to_thread(
        kube.post_event, dict(live), "Warning", reason, "; ".join(messages), key
    )
    await writer.patch(patch)


async def _report_policy_violation(
    kube: Kube,
    writer: _StatusWriter,
    live: Mapping[str, Any],
    existing: SFTJobStatus | None,
    resolution: policy.Resolution,
    now: datetime,
) -> None:
    """Failed/PolicyViolation and a Warning event, each naming every rule and field."""
    messages = [str(v) for v in resolution.violations]
    generation = live["metadata"].get("generation")
    patch = lifecycle.policy_violation_status(existing, messages, now, generation)
    await _report_refusal(kube, writer, live, lifecycle.POLICY_VIOLATION, messages, patch)


async def _plan(
    job: SFTJob,
    effective: SFTJobSpec | None,
    live: Mapping[str, Any],
    writer: _StatusWriter,
    kube: Kube,
    now: datetime,
) -> SFTJob:
    """The plan, advice and Planned condition of a generation not launched yet, made from
    the `effective` spec (job over profile) when a profile was resolved."""
    planned = job if effective is None else job.model_copy(update={"spec": effective})
    patch = lifecycle.planned_status(planned, now)
    condition = next(c for c in patch["conditions"] if c["type"] == "Planned")
    key = f"g{job.metadata.generation}"
    await asyncio.to_thread(
        kube.post_event, dict(live), "Normal", "Planned", condition["message"], key
    )
    await writer.patch(patch)
    return job.model_copy(update={"status": lifecycle.status_after(job.status, patch)})


async def _report_invalid(
    kube: Kube,
    writer: _StatusWriter,
    live: Mapping[str, Any],
    existing: SFTJobStatus | None,
    error: SpecError,
    now: datetime,
) -> None:
    """Failed/InvalidSpec in the status and a Warning event, each naming every bad field."""
    messages = [str(e) for e in error.errors]
    patch = lifecycle.invalid_status(existing, messages, now, live["metadata"].get("generation"))
    await _report_refusal(kube, writer, live, "InvalidSpec", messages, patch)


async def _launched(
    kube: Kube, namespace: str, name: str
) -> tuple[SFTJobSpec | None, LaunchPolicy | None]:
    """The spec the running pods were built from and the profile's verdict frozen with it,
    as recorded in the job's ConfigMap (no policy key: launched before profiles, none)."""
    data = await asyncio.to_thread(kube.read_config_map_data, namespace, config_map_name(name))
    if not data or CONFIG_KEY not in data:
        return None, None
    try:
        spec = SFTJobSpec.model_validate(json.loads(data[CONFIG_KEY])["spec"])
        return spec, LaunchPolicy.from_json(data.get(POLICY_KEY))
    except (ValueError, KeyError, TypeError, ValidationError):
        log.warning("ConfigMap of %s/%s is unreadable; using the current spec", namespace, name)
        return None, None


async def _post_events(kube: Kube, live: Mapping[str, Any], events: list[lifecycle.Event]) -> None:
    for event in events:
        await asyncio.to_thread(
            kube.post_event, dict(live), event.type, event.reason, event.message, event.key
        )


class ChildRefused(Exception):
    """The API refused to create a child; `refusal` is its answer, in its own words."""

    def __init__(self, refusal: refusals.Refusal):
        super().__init__(refusal.describe())
        self.refusal = refusal


async def _create(kube: Kube, manifest: dict[str, Any]) -> str:
    """`kube.create_if_absent`, with an API refusal turned into ChildRefused."""
    try:
        return await asyncio.to_thread(kube.create_if_absent, manifest)
    except ApiException as exc:
        refusal = refusals.refusal_from_exception(exc, manifest)
        if refusal is None:
            raise
        raise ChildRefused(refusal) from exc


async def _create_children(job: SFTJob, actions: lifecycle.Actions, kube: Kube) -> list[str]:
    """Static children, then pods; the `Kind/name`s held by another owner (never adopted).

    Raises ChildRefused when the API refuses one (the rest of the launch is not tried).
    """
    namespace = job.metadata.namespace or "default"
    name = job.metadata.name
    conflicts: list[str] = []
    assert actions.trainer_config is not None
    attempt = actions.trainer_config.get("attempt")
    frozen = actions.launch_policy.to_json()
    for child in build_static_children(job, actions.trainer_config, frozen):
        result = await _create(kube, child)
        if result == "foreign":
            conflicts.append(f"{child['kind']} {child['metadata']['name']}")
        elif result == "ours" and child["metadata"]["name"] == config_map_name(name):
            # A relaunch (OOM shrink) changes the batch sizes the ranks must read.
            await asyncio.to_thread(
                kube.patch_config_map_data,
                namespace,
                config_map_name(name),
                {CONFIG_KEY: child["data"][CONFIG_KEY]},
            )
        elif result == "ours" and child["kind"] == "Service":
            # Rendezvous at rank 0 of this attempt, never at a terminating earlier one.
            await asyncio.to_thread(
                kube.patch_service_selector,
                namespace,
                child["metadata"]["name"],
                rendezvous_selector(job, attempt),
            )
    if conflicts:
        return conflicts  # pods would run without their own config or RBAC
    for pod in actions.create_pods:
        if await _create(kube, pod) == "foreign":
            conflicts.append(f"Pod {pod['metadata']['name']}")
    return conflicts


def _sooner(first: float | None, second: float | None) -> float | None:
    waits = [w for w in (first, second) if w is not None]
    return min(waits) if waits else None


async def _apply(
    job: SFTJob,
    live: Mapping[str, Any],
    actions: lifecycle.Actions,
    kube: Kube,
    writer: _StatusWriter,
    now: datetime,
) -> float | None:
    """Apply the actions in their crash-safe order; the pass's requeue_after."""
    namespace = job.metadata.namespace or "default"
    name = job.metadata.name
    generation = job.metadata.generation
    requeue_after = actions.requeue_after
    await _post_events(kube, live, actions.events)
    if actions.status:
        await writer.patch(actions.status)
    for pod_name in dict.fromkeys(actions.delete_pods):
        await asyncio.to_thread(kube.delete_pod, namespace, pod_name)
    launch_status = actions.launch_status
    if actions.trainer_config is not None:
        # The status as this pass left it: what a refusal or a conflict is recorded on.
        status = lifecycle.status_after(job.status, actions.status)
        timeout = job.spec.retry.podStartTimeoutSeconds
        wait = refusals.retry_wait(status, now, timeout)
        if wait is not None:
            # A refused create waits its back-off; a later pass completes the launch.
            return _sooner(requeue_after, wait)
        try:
            conflicts = await _create_children(job, actions, kube)
        except ChildRefused as refused:
            attempt = actions.trainer_config.get("attempt")
            outcome = refusals.refused_status(
                status, refused.refusal, now, generation, timeout, attempt
            )
            log.warning("%s/%s: %s", namespace, name, outcome.event_message)
            event = lifecycle.Event("Warning", outcome.event_reason, outcome.event_message)
            await _post_events(kube, live, [event])
            # Only the refusal is recorded, not the launch: a later pass tries it again.
            await writer.patch(outcome.status)
            return _sooner(requeue_after, outcome.requeue_after)
        if conflicts:
            patch = lifecycle.child_conflict_status(status, conflicts, now, generation)
            await _post_events(kube, live, lifecycle.patch_condition_events(status, patch))
            log.info("%s/%s: %s held by another owner; launch retried", namespace, name, conflicts)
            await writer.patch(patch)
            return _sooner(requeue_after, lifecycle.CHILD_CONFLICT_RETRY_SECONDS)
        healed = refusals.created_status(status, launch_status, now, generation)
        # ChildrenCreated=True once a refusal healed: its transition is told like the pass's.
        actions.launch_events += lifecycle.patch_condition_events(
            lifecycle.status_after(status, launch_status), healed, actions.launch_events
        )
        launch_status = healed
    await _post_events(kube, live, actions.launch_events)
    if launch_status:
        await writer.patch(launch_status)
    if actions.delete_job:
        await asyncio.to_thread(kube.delete_job, namespace, name)
        METRICS.forget(namespace, name)
    return requeue_after
