"""Pure handling of the API refusing to create a child: what it said, and what to do.

A create the API server refuses comes back as a `v1 Status` (the kubernetes client's
`ApiException.body` is that JSON): an HTTP code, a `reason` (Invalid, Forbidden,
TooManyRequests, ...), a message and, for Invalid, `details.causes` naming each field.
`refusal_from_status` reads it; `classify` decides, per case, whether the job fails now,
retries until spec.retry.podStartTimeoutSeconds, or retries for as long as it takes;
`refused_status` writes it into the job's status as conditions and `lastFailure`;
`retry_wait` spaces the tries out (exponential back-off) from what that status records,
so the spacing holds whatever drives the passes (watch events, a resync, a restart).

Nothing here talks to the API; reconciler.py catches the exception and applies the answer.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from . import conditions as cond
from .api import FailureInfo, SFTJobStatus

# The condition that says whether the current launch's children could all be created.
# False (reason: the API's own reason) while a create is refused; True once a later try
# created them. Positive polarity, as a ReplicaSet's ReplicaFailure is its negative twin.
CHILDREN_CREATED = "ChildrenCreated"
# The Failed condition's reason (and lastFailure.reason) when a refusal ends the job.
CREATE_REFUSED = "CreateRefused"

# Tries after a refusal: 5 s, then doubling (each wait as long as the refusals have lasted),
# up to 300 s (the kubelet's image pull back-off cap). client-go's work queue uses the same
# shape (per-item exponential back-off) for controllers whose creates fail.
BACKOFF_BASE_SECONDS = 5.0
BACKOFF_CAP_SECONDS = 300.0

# What a refusal leads to:
#   fail  - the same request can only get the same answer: fail the job now;
#   bound - only an admin's change can heal it: retry with back-off, and fail once
#           spec.retry.podStartTimeoutSeconds has passed since the first refusal;
#   retry - it heals by itself (load, quota freed by other jobs): retry with back-off,
#           visible in the status, for as long as it takes (as a Job or ReplicaSet does).
Action = Literal["fail", "bound", "retry"]

_RBAC_DENIAL = re.compile(r'\bcannot \S+ resource "')
# plugin/pkg/admission/resourcequota/controller.go checkRequest:
# "exceeded quota: %s, requested: %s, used: %s, limited: %s" (resources "name=qty,...").
_QUOTA_EXCEEDED = re.compile(
    r"exceeded quota: (?P<quota>[^,]+), requested: (?P<requested>\S+), "
    r"used: (?P<used>\S+), limited: (?P<limited>\S+)"
)
# The same plugin's other refusals: a pod without a request the quota tracks
# ("failed quota: %s: must specify ...") and a quota whose usage is not computed yet
# ("status unknown for quota: %s, resources: %s", which the quota controller fixes).
_QUOTA_MUST_SPECIFY = "failed quota:"
_QUOTA_STATUS_UNKNOWN = "status unknown for quota:"
# k8s.io/api/core/v1 NamespaceTerminatingCause; the namespace lifecycle admission plugin
# refuses creates in a terminating namespace (the job goes with it).
NAMESPACE_TERMINATING = "NamespaceTerminating"


@dataclass(frozen=True)
class Refusal:
    """One refused request, in the API's own words."""

    kind: str
    name: str
    code: int
    reason: str
    message: str
    fields: tuple[str, ...] = ()
    cause_types: tuple[str, ...] = ()
    retry_after_seconds: float | None = None
    verb: str = "create"

    def describe(self) -> str:
        fields = f", field {', '.join(self.fields)}" if self.fields else ""
        return (
            f"the API refused to {self.verb} {self.kind} {self.name} "
            f"({self.code} {self.reason}{fields}): {self.message}"
        )


@dataclass(frozen=True)
class Verdict:
    action: Action
    why: str


def refusal_from_status(
    code: int, body: str | bytes | None, kind: str, name: str, verb: str = "create"
) -> Refusal:
    """The refusal an HTTP answer describes; a body that is not a Status keeps the code."""
    status: dict[str, Any] = {}
    if body:
        try:
            parsed = json.loads(body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            status = parsed
    details = status.get("details") or {}
    causes = [c for c in details.get("causes") or [] if isinstance(c, dict)]
    retry_after = details.get("retryAfterSeconds")
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else (body or "")
    return Refusal(
        kind=kind,
        name=name,
        code=int(status.get("code") or code),
        reason=str(status.get("reason") or _REASON_BY_CODE.get(code, "Unknown")),
        message=str(status.get("message") or text.strip() or f"HTTP {code}"),
        fields=tuple(dict.fromkeys(str(c["field"]) for c in causes if c.get("field"))),
        cause_types=tuple(dict.fromkeys(str(c["reason"]) for c in causes if c.get("reason"))),
        retry_after_seconds=float(retry_after) if retry_after else None,
        verb=verb,
    )


def refusal_from_exception(error: Any, manifest: dict[str, Any]) -> Refusal | None:
    """The refusal of creating `manifest` carried by a client ApiException, else None.

    None for an exception that is no API answer (status 0 or missing: the connection
    failed), which stays an error of the pass.
    """
    code = getattr(error, "status", None)
    if not isinstance(code, int) or code < 400:
        return None
    metadata = manifest.get("metadata") or {}
    return refusal_from_status(
        code, getattr(error, "body", None), str(manifest.get("kind")), str(metadata.get("name"))
    )


# The apiserver's reason for each code (k8s.io/apimachinery/pkg/apis/meta/v1 StatusReason*),
# for answers without a Status body (a proxy in between).
_REASON_BY_CODE = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _quantity(text: str) -> float | None:
    """A resource.Quantity as a number (enough to compare two of the same resource)."""
    match = re.fullmatch(r"([0-9.]+)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?", text.strip())
    if not match:
        return None
    scale = {
        None: 1,
        "m": 1e-3,
        "k": 1e3,
        "M": 1e6,
        "G": 1e9,
        "T": 1e12,
        "P": 1e15,
        "E": 1e18,
        "Ki": 2**10,
        "Mi": 2**20,
        "Gi": 2**30,
        "Ti": 2**40,
        "Pi": 2**50,
        "Ei": 2**60,
    }[match.group(2)]
    return float(match.group(1)) * scale


def _resources(listing: str) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for part in listing.split(","):
        if "=" in part:
            key, value = part.split("=", 1)
            out[key] = _quantity(value)
    return out


def quota_never_fits(message: str) -> bool:
    """An exceeded quota whose limit is below what this one object requests: no amount of
    other jobs finishing frees enough; only raising the quota does."""
    match = _QUOTA_EXCEEDED.search(message)
    if not match:
        return False
    requested = _resources(match.group("requested"))
    limited = _resources(match.group("limited"))
    return any(
        (want := requested.get(key)) is not None and limit is not None and want > limit
        for key, limit in limited.items()
    )


def classify(refusal: Refusal) -> Verdict:
    """Fail now, retry until the bound, or retry: see `Action`. Each case says why."""
    code, message = refusal.code, refusal.message
    if code in (400, 413, 422):
        return Verdict(
            "fail",
            "the object is built from the job's spec, which cannot change during the run: "
            "every try would send the same invalid object",
        )
    if code == 403:
        if NAMESPACE_TERMINATING in refusal.cause_types:
            return Verdict("retry", "the namespace is being deleted, and the job with it")
        if _QUOTA_STATUS_UNKNOWN in message:
            return Verdict("retry", "the quota controller has not computed the quota's usage yet")
        if _QUOTA_EXCEEDED.search(message):
            if quota_never_fits(message):
                return Verdict(
                    "bound",
                    "the quota is smaller than one pod of the job: only raising it helps",
                )
            return Verdict("retry", "the quota frees up as other workloads finish")
        if _QUOTA_MUST_SPECIFY in message:
            return Verdict(
                "fail",
                "the quota requires a resource request the pods do not set: set "
                "spec.resources.cpu/memory in a new job",
            )
        if _RBAC_DENIAL.search(message):
            return Verdict(
                "bound",
                "the operator lacks an RBAC permission: an admin can grant it (a ClusterRole "
                "applied after the operator started heals within seconds)",
            )
        return Verdict(
            "fail",
            "an admission policy refused the object, which the job's spec determines: "
            "every try would send the same object",
        )
    if code == 409 and refusal.reason == "AlreadyExists":
        return Verdict(
            "bound",
            "an object of that name belongs to something else: it must be removed first",
        )
    return Verdict("retry", "the API server may answer differently on the next try")


# --------------------------------------------------------------------- the status


def _time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _backoff(first: datetime, last: datetime, retry_after: float | None = None) -> float:
    """Wait as long as the refusals have lasted: 5, 5, 10, 20, ... capped at 300 s."""
    lasted = (last - first).total_seconds()
    delay = min(max(lasted, BACKOFF_BASE_SECONDS), BACKOFF_CAP_SECONDS)
    return max(delay, retry_after or 0.0)


def _refused_since(status: SFTJobStatus) -> datetime | None:
    condition = cond.find(status.conditions, CHILDREN_CREATED)
    if condition is None or condition.status != "False":
        return None
    return _time(condition.lastTransitionTime)


def retry_wait(status: SFTJobStatus | None, now: datetime, timeout_seconds: float) -> float | None:
    """Seconds until the next create may be tried after a refusal; None when it may now.

    The first refusal is the ChildrenCreated=False transition; the latest try is
    lastFailure.time (reason CreateRefused). The next try waits as long as the refusals
    have lasted (exponential), but never past the end of the bounded wait, so a refusal
    that only an admin can fix is tried (and failed) right when the bound ends.
    """
    if status is None:
        return None
    first = _refused_since(status)
    failure = status.lastFailure
    last = _time(failure.time) if failure and failure.reason == CREATE_REFUSED else None
    if first is None or last is None:
        return None
    due = last + timedelta(seconds=_backoff(first, last))
    due = min(due, first + timedelta(seconds=timeout_seconds))
    wait = (due - now).total_seconds()
    return wait if wait > 0 else None


@dataclass
class RefusalOutcome:
    """The status patch, the Warning event and the next pass a refusal leads to."""

    status: dict[str, Any]
    event_reason: str
    event_message: str
    failed: bool
    requeue_after: float | None = None
    verdict: Verdict = field(default_factory=lambda: Verdict("retry", ""))


def refused_status(
    status: SFTJobStatus | None,
    refusal: Refusal,
    now: datetime,
    generation: int | None,
    timeout_seconds: float,
    attempt: int | None = None,
) -> RefusalOutcome:
    """What the job's status says after `refusal`, given its status before this pass.

    Only the refusal is recorded, never the launch the pass was making: the next pass
    computes the same launch again and tries it when the back-off allows.
    """
    current = (status or SFTJobStatus()).model_copy(deep=True)
    stamp = _iso(now)
    verdict = classify(refusal)
    first = _refused_since(current) or now
    waited = (now - first).total_seconds()
    failed = verdict.action == "fail" or (verdict.action == "bound" and waited >= timeout_seconds)
    text = refusal.describe()
    conditions = cond.set_condition(
        current.conditions, CHILDREN_CREATED, "False", refusal.reason, text, stamp, generation
    )
    patch: dict[str, Any] = {
        "lastFailure": FailureInfo(
            reason=CREATE_REFUSED, message=text[:1000], time=stamp, attempt=attempt
        ).model_dump(mode="json", exclude_none=True)
    }
    if failed:
        if verdict.action == "bound":
            message = f"{text} (still refused after {int(waited)}s: {verdict.why})"
        else:
            message = f"{text} ({verdict.why})"
        conditions = cond.set_exclusive(
            conditions, cond.FAILED, CREATE_REFUSED, message, stamp, generation
        )
        patch.update(phase="Failed", completionTime=stamp)
        patch["conditions"] = [c.model_dump(mode="json", exclude_none=True) for c in conditions]
        return RefusalOutcome(patch, CREATE_REFUSED, message, True, None, verdict)
    delay = _backoff(first, now, refusal.retry_after_seconds)
    if verdict.action == "bound":
        delay = min(delay, max(timeout_seconds - waited, 0.0))
        until = f"; the job fails at {_iso(first + timedelta(seconds=timeout_seconds))}"
    else:
        until = ""
    message = f"{text} (retrying with back-off: {verdict.why}{until})"
    conditions = cond.set_condition(
        conditions, CHILDREN_CREATED, "False", refusal.reason, message, stamp, generation
    )
    patch["conditions"] = [c.model_dump(mode="json", exclude_none=True) for c in conditions]
    return RefusalOutcome(patch, refusal.reason, message, False, delay, verdict)


def created_status(
    status: SFTJobStatus | None,
    patch: dict[str, Any],
    now: datetime,
    generation: int | None,
) -> dict[str, Any]:
    """`patch` (a pass's status changes) plus ChildrenCreated=True when a refusal healed."""
    if status is None or _refused_since(status) is None:
        return patch
    base = patch.get("conditions")
    current = (
        SFTJobStatus.model_validate({"conditions": base}).conditions
        if base is not None
        else status.conditions
    )
    conditions = cond.set_condition(
        current,
        CHILDREN_CREATED,
        "True",
        "Created",
        "every child of the launch was created",
        _iso(now),
        generation,
    )
    return {
        **patch,
        "conditions": [c.model_dump(mode="json", exclude_none=True) for c in conditions],
    }
