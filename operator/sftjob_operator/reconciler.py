"""One reconcile pass: read the job and its pods, ask the pure core, apply its answer.

The order of writes makes a crash at any point safe to repeat: children first
(create-if-absent), then pods, then the status that records the launch. A pass
that dies after creating pods is adopted by the next one (see lifecycle).
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

from . import lifecycle, refusals
from .api import SFTJob, SFTJobSpec, SFTJobStatus, SpecError, parse_sftjob
from .children import DEFAULT_TRAINER_IMAGE, LABEL_JOB, build_static_children, config_map_name
from .kube import Kube
from .metrics import METRICS
from .pod_state import pod_attempt
from .trainer_config import CONFIG_KEY

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OperatorSettings:
    default_image: str = DEFAULT_TRAINER_IMAGE


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
    metadata = dict(plain.get("metadata") or {})
    plain["metadata"] = {
        k: metadata[k]
        for k in ("name", "namespace", "uid", "generation", "labels", "annotations")
        if k in metadata
    }
    job = parse_sftjob(plain)
    return job.model_copy(update={"status": _status_from(body)})


class JobGone(Exception):
    """The job this pass was handed no longer exists (deleted, or re-created with another uid)."""


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
    and again by every status patch, so a stale body (a Kopf timer outliving its object)
    creates nothing.
    """
    started = time.monotonic()
    try:
        return await _reconcile(body, kube, settings)
    except JobGone:
        return Outcome(None)
    finally:
        METRICS.reconcile_seconds.observe(time.monotonic() - started)


async def _reconcile(body: Mapping[str, Any], kube: Kube, settings: OperatorSettings) -> Outcome:
    metadata = body["metadata"]
    namespace, name = metadata["namespace"], metadata["name"]
    generation = metadata.get("generation")
    live = await asyncio.to_thread(kube.read_job, namespace, name)
    if not lifecycle.is_same_job(metadata.get("uid"), live):
        raise JobGone
    # Decide from the job as it is now, not Kopf's cached body: a pass queued behind
    # another (or a timer tick racing the watch) would otherwise redo what the other
    # already recorded, e.g. retry a create the API refused a moment ago.
    body = live or body
    generation = body["metadata"].get("generation")
    now = datetime.now(UTC)
    existing = _status_from(body)
    try:
        job = job_from_body(body)
    except SpecError as exc:
        if existing and existing.attempts > 0:
            # Already running: an invalid edit must not stop the run it cannot describe.
            return Outcome(existing.phase or "Running")
        if existing is None or existing.observedGeneration != generation:
            await _report_invalid(kube, body, existing, exc, now)
        return Outcome("Failed")

    status = job.status or SFTJobStatus()
    if status.attempts == 0 and status.phase not in ("Failed", "Succeeded"):
        if status.observedGeneration != generation:
            try:
                patch = lifecycle.planned_status(job, now)
            except SpecError as exc:  # e.g. drop_last with an empty dataloader
                await _report_invalid(kube, body, existing, exc, now)
                return Outcome("Failed")
            await _patch_status(kube, namespace, name, patch)
            planned = next(c for c in patch["conditions"] if c["type"] == "Planned")
            await asyncio.to_thread(
                kube.post_event, dict(body), "Normal", "Planned", planned["message"]
            )
            job = job.model_copy(
                update={
                    "status": SFTJobStatus.model_validate(
                        {**status.model_dump(mode="json"), **patch}
                    )
                }
            )
    elif status.observedGeneration != generation:
        await _patch_status(kube, namespace, name, {"observedGeneration": generation})

    pods = await asyncio.to_thread(kube.list_job_pods, namespace, name, LABEL_JOB)
    launched = await _launched_spec(kube, namespace, name) if status.attempts > 0 else None
    actions = lifecycle.reconcile_job(job, pods, now, settings.default_image, launched)
    refused_wait = await _apply(job, body, actions, kube, now)
    phase = actions.status.get("phase") or (job.status.phase if job.status else None) or "Pending"
    METRICS.observe_phase(namespace, name, phase)
    waits = [w for w in (actions.requeue_after, refused_wait) if w is not None]
    return Outcome(phase, min(waits) if waits else None)


async def _patch_status(kube: Kube, namespace: str, name: str, patch: dict[str, Any]) -> None:
    """Patch the job's status; a 404 ends the pass (JobGone) before anything else is made."""
    if not await asyncio.to_thread(kube.patch_job_status, namespace, name, patch):
        raise JobGone


async def _report_invalid(
    kube: Kube,
    body: Mapping[str, Any],
    existing: SFTJobStatus | None,
    error: SpecError,
    now: datetime,
) -> None:
    """Failed/InvalidSpec in the status and a Warning event, each naming every bad field."""
    metadata = body["metadata"]
    messages = [str(e) for e in error.errors]
    patch = lifecycle.invalid_status(existing, messages, now, metadata.get("generation"))
    await _patch_status(kube, metadata["namespace"], metadata["name"], patch)
    await asyncio.to_thread(
        kube.post_event, dict(body), "Warning", "InvalidSpec", "; ".join(messages)
    )


async def _launched_spec(kube: Kube, namespace: str, name: str) -> SFTJobSpec | None:
    """The spec the running pods were built from, as recorded in the job's ConfigMap."""
    data = await asyncio.to_thread(kube.read_config_map_data, namespace, config_map_name(name))
    if not data or CONFIG_KEY not in data:
        return None
    try:
        return SFTJobSpec.model_validate(json.loads(data[CONFIG_KEY])["spec"])
    except (ValueError, KeyError, ValidationError):
        log.warning("ConfigMap of %s/%s is unreadable; using the current spec", namespace, name)
        return None


class ChildRefused(Exception):
    """The API refused to create a child; `refusal` is its answer, in its own words."""

    def __init__(self, refusal: refusals.Refusal):
        super().__init__(refusal.describe())
        self.refusal = refusal


async def _create(kube: Kube, manifest: dict[str, Any]) -> bool:
    try:
        return await asyncio.to_thread(kube.create_if_absent, manifest)
    except ApiException as exc:
        refusal = refusals.refusal_from_exception(exc, manifest)
        if refusal is None:
            raise
        raise ChildRefused(refusal) from exc


async def _apply(
    job: SFTJob, body: Mapping[str, Any], actions: lifecycle.Actions, kube: Kube, now: datetime
) -> float | None:
    """Apply `actions`; seconds until a refused create may be tried again, if one was."""
    namespace = job.metadata.namespace or "default"
    name = job.metadata.name
    timeout = job.spec.retry.podStartTimeoutSeconds
    creates = actions.trainer_config is not None or bool(actions.create_pods)
    if creates and (wait := refusals.retry_wait(job.status, now, timeout)) is not None:
        actions.status = {}  # nothing of this pass happens: a refused create waits its back-off
        return wait
    try:
        await _create_children(job, actions, kube)
    except ChildRefused as refused:
        attempt = pod_attempt(actions.create_pods[0]) if actions.create_pods else None
        outcome = refusals.refused_status(
            job.status, refused.refusal, now, job.metadata.generation, timeout, attempt
        )
        log.warning("%s/%s: %s", namespace, name, outcome.event_message)
        # Only the refusal is recorded: the next pass computes the same launch again.
        actions.status = outcome.status
        actions.events = [lifecycle.Event("Warning", outcome.event_reason, outcome.event_message)]
        actions.delete_job = False
        await _finish_apply(job, body, actions, kube)
        return outcome.requeue_after
    if creates:
        actions.status = refusals.created_status(
            job.status, actions.status, now, job.metadata.generation
        )
    await _finish_apply(job, body, actions, kube)
    return None


async def _create_children(job: SFTJob, actions: lifecycle.Actions, kube: Kube) -> None:
    namespace = job.metadata.namespace or "default"
    name = job.metadata.name
    if actions.trainer_config is not None:
        for child in build_static_children(job, actions.trainer_config):
            created = await _create(kube, child)
            if not created and child["kind"] == "ConfigMap":
                # A relaunch (OOM shrink) changes the batch sizes the ranks must read.
                await asyncio.to_thread(
                    kube.patch_config_map_data,
                    namespace,
                    config_map_name(name),
                    {CONFIG_KEY: child["data"][CONFIG_KEY]},
                )
    for pod_name in dict.fromkeys(actions.delete_pods):
        await asyncio.to_thread(kube.delete_pod, namespace, pod_name)
    for pod in actions.create_pods:
        await _create(kube, pod)


async def _finish_apply(
    job: SFTJob, body: Mapping[str, Any], actions: lifecycle.Actions, kube: Kube
) -> None:
    namespace = job.metadata.namespace or "default"
    name = job.metadata.name
    if actions.status:
        await _patch_status(kube, namespace, name, actions.status)
    for event in actions.events:
        await asyncio.to_thread(
            kube.post_event, dict(body), event.type, event.reason, event.message
        )
    if actions.delete_job:
        await asyncio.to_thread(kube.delete_job, namespace, name)
        METRICS.forget(namespace, name)
