"""API refusals of a child create: read as the apiserver words them, then fail, bound or retry."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client import ApiException
from sftjob_operator import refusals
from sftjob_operator.api import SFTJobStatus
from sftjob_operator.refusals import (
    CHILDREN_CREATED,
    CREATE_REFUSED,
    Refusal,
    classify,
    created_status,
    refusal_from_exception,
    refusal_from_status,
    refused_status,
    retry_wait,
)

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)
TIMEOUT = 600


def status_body(code: int, reason: str, message: str, details: dict[str, Any] | None = None) -> str:
    """A v1 Status as the apiserver answers a refused request."""
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    if details is not None:
        body["details"] = details
    return json.dumps(body)


# A multi-node job named 1abc: its rendezvous Service name is no DNS-1035 label.
INVALID_SERVICE = status_body(
    422,
    "Invalid",
    'Service "1abc-rdzv" is invalid: metadata.name: Invalid value: "1abc-rdzv": a DNS-1035 '
    "label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character",
    {
        "name": "1abc-rdzv",
        "kind": "Service",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "1abc-rdzv": a DNS-1035 label must ...',
                "field": "metadata.name",
            }
        ],
    },
)
DUPLICATE_MOUNT = status_body(
    422,
    "Invalid",
    'Pod "x-a1-r0" is invalid: spec.containers[0].volumeMounts[4].mountPath: Invalid value: '
    '"/output": must be unique',
    {
        "name": "x-a1-r0",
        "kind": "Pod",
        "causes": [
            {
                "reason": "FieldValueInvalid",
                "message": 'Invalid value: "/output": must be unique',
                "field": "spec.containers[0].volumeMounts[4].mountPath",
            }
        ],
    },
)


def forbidden(message: str, **details: Any) -> str:
    return status_body(403, "Forbidden", message, {"kind": "pods", **details})


QUOTA_EXCEEDED = forbidden(
    'pods "x-a1-r0" is forbidden: exceeded quota: compute, requested: cpu=4,memory=8Gi, '
    "used: cpu=6,memory=8Gi, limited: cpu=8,memory=32Gi",
    name="x-a1-r0",
)
QUOTA_TOO_SMALL = forbidden(
    'pods "x-a1-r0" is forbidden: exceeded quota: compute, requested: cpu=16, used: cpu=0, '
    "limited: cpu=8",
    name="x-a1-r0",
)
QUOTA_MUST_SPECIFY = forbidden(
    'pods "x-a1-r0" is forbidden: failed quota: compute: must specify limits.cpu for: '
    "trainer; requests.cpu for: trainer",
    name="x-a1-r0",
)
RBAC_DENIED = forbidden(
    'pods is forbidden: User "system:serviceaccount:sftjob-system:sftjob-operator" cannot '
    'create resource "pods" in API group "" in the namespace "team-a"'
)
POD_SECURITY = forbidden(
    'pods "x-a1-r0" is forbidden: violates PodSecurity "restricted:latest": '
    'unrestricted capabilities (container "trainer" must set securityContext.capabilities.drop=["ALL"])',
    name="x-a1-r0",
)
NAMESPACE_TERMINATING = forbidden(
    'pods "x-a1-r0" is forbidden: unable to create new content in namespace team-a because '
    "it is being terminated",
    name="x-a1-r0",
    causes=[{"reason": "NamespaceTerminating", "message": "namespace team-a is being terminated"}],
)


def refusal(code: int, body: str, kind: str = "Pod", name: str = "x-a1-r0") -> Refusal:
    return refusal_from_status(code, body, kind, name)


class TestReading:
    def test_invalid_names_the_field_from_the_causes(self) -> None:
        read = refusal(422, INVALID_SERVICE, "Service", "1abc-rdzv")
        assert (read.code, read.reason, read.fields) == (422, "Invalid", ("metadata.name",))
        assert read.cause_types == ("FieldValueInvalid",)
        text = read.describe()
        assert text.startswith(
            "the API refused to create Service 1abc-rdzv (422 Invalid, field metadata.name): "
            'Service "1abc-rdzv" is invalid'
        )

    def test_kubernetes_client_exception_body_is_the_status(self) -> None:
        error = ApiException(status=422, reason="Unprocessable Entity")
        error.body = DUPLICATE_MOUNT
        manifest = {"kind": "Pod", "metadata": {"name": "x-a1-r0", "namespace": "n"}}
        read = refusal_from_exception(error, manifest)
        assert read is not None
        assert (read.kind, read.name, read.reason) == ("Pod", "x-a1-r0", "Invalid")
        assert read.fields == ("spec.containers[0].volumeMounts[4].mountPath",)

    def test_no_http_answer_is_no_refusal(self) -> None:
        # The client raises ApiException(status=0) when no answer came back.
        assert refusal_from_exception(ApiException(status=0), {"kind": "Pod"}) is None

    def test_body_that_is_no_status_keeps_the_code_and_text(self) -> None:
        read = refusal(503, "upstream connect error")
        assert (read.code, read.reason, read.message) == (
            503,
            "ServiceUnavailable",
            "upstream connect error",
        )

    def test_retry_after_seconds_from_the_details(self) -> None:
        body = status_body(429, "TooManyRequests", "too many requests", {"retryAfterSeconds": 7})
        assert refusal(429, body).retry_after_seconds == 7


class TestClassify:
    @pytest.mark.parametrize(
        "code,body",
        [
            (422, INVALID_SERVICE),
            (422, DUPLICATE_MOUNT),
            (400, status_body(400, "BadRequest", "bad")),
            (403, POD_SECURITY),
            (403, QUOTA_MUST_SPECIFY),
        ],
    )
    def test_same_request_same_answer_fails_now(self, code: int, body: str) -> None:
        assert classify(refusal(code, body)).action == "fail"

    @pytest.mark.parametrize("body", [RBAC_DENIED, QUOTA_TOO_SMALL])
    def test_only_an_admin_can_fix_it_is_bounded(self, body: str) -> None:
        assert classify(refusal(403, body)).action == "bound"

    def test_name_taken_by_another_object_is_bounded(self) -> None:
        body = status_body(409, "AlreadyExists", 'pods "x-a1-r0" already exists')
        assert classify(refusal(409, body)).action == "bound"

    @pytest.mark.parametrize(
        "code,body",
        [
            (403, QUOTA_EXCEEDED),
            (403, NAMESPACE_TERMINATING),
            (
                403,
                forbidden(
                    'pods "x" is forbidden: status unknown for quota: compute, resources: cpu'
                ),
            ),
            (409, status_body(409, "Conflict", "Operation cannot be fulfilled")),
            (429, status_body(429, "TooManyRequests", "too many requests")),
            (
                500,
                status_body(
                    500,
                    "InternalError",
                    'Internal error occurred: failed calling webhook "x": connection refused',
                ),
            ),
            (503, "no body"),
            (504, status_body(504, "Timeout", "the server was unable to return a response")),
        ],
    )
    def test_what_heals_by_itself_retries(self, code: int, body: str) -> None:
        assert classify(refusal(code, body)).action == "retry"

    def test_quota_comparison_reads_quantities(self) -> None:
        assert refusals.quota_never_fits(
            "exceeded quota: q, requested: memory=40Gi, used: memory=0, limited: memory=32Gi"
        )
        assert not refusals.quota_never_fits(
            "exceeded quota: q, requested: cpu=500m, used: cpu=8, limited: cpu=8"
        )


def conditions(patch: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in patch["conditions"]}


def merged(status: SFTJobStatus | None, patch: dict[str, Any]) -> SFTJobStatus:
    base = status.model_dump(mode="json", exclude_none=True) if status else {}
    return SFTJobStatus.model_validate({**base, **patch})


class TestStatus:
    def test_invalid_fails_the_job_naming_kind_name_and_field(self) -> None:
        out = refused_status(
            None, refusal(422, INVALID_SERVICE, "Service", "1abc-rdzv"), NOW, 1, TIMEOUT
        )
        assert out.failed and out.requeue_after is None
        assert out.status["phase"] == "Failed"
        failed = conditions(out.status)["Failed"]
        assert (failed["status"], failed["reason"]) == ("True", CREATE_REFUSED)
        assert "Service 1abc-rdzv" in failed["message"]
        assert "field metadata.name" in failed["message"]
        created = conditions(out.status)[CHILDREN_CREATED]
        assert (created["status"], created["reason"]) == ("False", "Invalid")
        assert out.status["lastFailure"]["reason"] == CREATE_REFUSED
        assert out.event_reason == CREATE_REFUSED

    def test_transient_refusal_is_visible_and_backs_off(self) -> None:
        quota = refusal(403, QUOTA_EXCEEDED)
        status: SFTJobStatus | None = None
        now = NOW
        tries = []
        # Drive the passes every second for 200 s: tries happen only when back-off allows.
        for _ in range(200):
            if retry_wait(status, now, TIMEOUT) is None:
                out = refused_status(status, quota, now, 1, TIMEOUT)
                assert not out.failed and "phase" not in out.status
                created = conditions(out.status)[CHILDREN_CREATED]
                assert (created["status"], created["reason"]) == ("False", "Forbidden")
                assert "exceeded quota" in created["message"]
                status = merged(status, out.status)
                tries.append(int((now - NOW).total_seconds()))
            now += timedelta(seconds=1)
        # 5 s, then each wait as long as the refusals have lasted.
        assert tries == [0, 5, 10, 20, 40, 80, 160]

    def test_backoff_is_capped(self) -> None:
        first = refused_status(None, refusal(429, "busy"), NOW, 1, TIMEOUT)
        status = merged(None, first.status)
        later = NOW + timedelta(hours=2)
        out = refused_status(status, refusal(429, "busy"), later, 1, TIMEOUT)
        assert out.requeue_after == refusals.BACKOFF_CAP_SECONDS

    def test_bounded_refusal_fails_when_the_timeout_ends(self) -> None:
        rbac = refusal(403, RBAC_DENIED)
        status = merged(None, refused_status(None, rbac, NOW, 1, 30).status)
        now = NOW + timedelta(seconds=retry_wait(status, NOW, 30) or 0)
        while True:
            out = refused_status(status, rbac, now, 1, 30)
            if out.failed:
                break
            status = merged(status, out.status)
            now += timedelta(seconds=retry_wait(status, now, 30) or 0)
        # Tries at 5, 10, 20, then right at the bound (not at 40, one back-off later).
        assert now == NOW + timedelta(seconds=30)
        failed = conditions(out.status)["Failed"]
        assert failed["reason"] == CREATE_REFUSED
        assert 'cannot create resource "pods"' in failed["message"]
        assert "still refused after 30s" in failed["message"]

    def test_success_after_a_refusal_sets_children_created(self) -> None:
        status = merged(None, refused_status(None, refusal(429, "busy"), NOW, 1, TIMEOUT).status)
        later = NOW + timedelta(seconds=5)
        patch = created_status(status, {"phase": "Pending"}, later, 1)
        created = conditions(patch)[CHILDREN_CREATED]
        assert (created["status"], created["reason"]) == ("True", "Created")
        assert patch["phase"] == "Pending"
        assert retry_wait(merged(status, patch), later, TIMEOUT) is None

    def test_no_refusal_no_change(self) -> None:
        assert created_status(SFTJobStatus(), {"phase": "Pending"}, NOW, 1) == {"phase": "Pending"}
        assert retry_wait(SFTJobStatus(), NOW, TIMEOUT) is None
