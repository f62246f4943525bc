"""The trainer's reading of S3 errors (Arrow's OSError text) and its bounded retries."""

from __future__ import annotations

import pytest
from sftjob_trainer.object_store import Retries, S3Uri, failure_kind, with_retries

# Messages as Arrow 26 prints them (seen against the tests' S3 server).
UNREACHABLE = (
    "When reading information for key 'a/x.txt' in bucket 'bkt': AWS Error NETWORK_CONNECTION "
    "during HeadObject operation: curlCode: 7, Could not connect to server"
)
NO_BUCKET = (
    "When listing objects under key 'a/' in bucket 'nobucket': AWS Error NO_SUCH_BUCKET during "
    "ListObjectsV2 operation: The specified bucket does not exist"
)
DENIED = "When creating bucket 'bkt': AWS Error ACCESS_DENIED during HeadBucket operation"


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (OSError(UNREACHABLE), "network"),
        (OSError("AWS Error UNKNOWN (HTTP status 503) during PutObject operation: x"), "network"),
        (OSError(NO_BUCKET), "missing"),
        (FileNotFoundError("Path does not exist 'bkt/a'"), "missing"),
        (OSError(DENIED), "credentials"),
        (OSError("AWS Error SIGNATURE_DOES_NOT_MATCH during GetObject operation"), "credentials"),
        (OSError("AWS Error UNKNOWN (HTTP status 403) during GetObject operation"), "credentials"),
        (OSError("AWS Error UNKNOWN (HTTP status 400) during GetObject operation"), None),
        (OSError("No space left on device"), None),
        (ValueError("AWS Error NETWORK_CONNECTION"), None),
    ],
)
def test_failure_kind(error: BaseException, kind: str | None) -> None:
    assert failure_kind(error) == kind


def test_network_failures_are_retried_up_to_the_bound() -> None:
    calls: list[int] = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise OSError(UNREACHABLE)
        return "done"

    assert with_retries(flaky, "x", Retries(attempts=3, first_backoff=0.0)) == "done"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(OSError, match="NETWORK_CONNECTION"):
        with_retries(flaky, "x", Retries(attempts=2, first_backoff=0.0))
    assert len(calls) == 2


def test_other_failures_are_not_retried() -> None:
    calls: list[int] = []

    def denied() -> None:
        calls.append(1)
        raise OSError(DENIED)

    with pytest.raises(OSError, match="ACCESS_DENIED"):
        with_retries(denied, "x", Retries(attempts=5, first_backoff=0.0))
    assert len(calls) == 1


def test_uri_parts() -> None:
    assert S3Uri.parse("s3://models/run-1/").path == "models/run-1"
    assert S3Uri.parse("s3://models/run-1/").child("_SUCCESS") == "models/run-1/_SUCCESS"
    assert S3Uri.parse("s3://data/chat.jsonl") == S3Uri("data", "chat.jsonl")
    assert S3Uri.parse("s3://data").path == "data"
