"""The retry policy per failure class and the cause that wins across ranks (issue 19, 8 and 9)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sftjob_operator.api import SFTJobSpec, SFTJobStatus, parse_sftjob
from sftjob_operator.retry_policy import (
    BACKOFF_BASE_SECONDS,
    BACKOFF_MAX_SECONDS,
    RETRY_POLICY,
    TRAINER_EXIT_CODES,
    Failure,
    backoff_seconds,
    classify_failure,
    decide_retry,
    decisive_failure,
)
from sftjob_trainer import failures as trainer_failures


def spec(
    *, max_restarts: int = 3, per_device: int = 4, accumulation: int = 2, shrink: bool = True
) -> SFTJobSpec:
    return parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "ml", "uid": "u-1"},
            "spec": {
                "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
                "dataset": {"name": "trl-lib/Capybara"},
                "training": {
                    "perDeviceTrainBatchSize": per_device,
                    "gradientAccumulationSteps": accumulation,
                },
                "retry": {"maxRestarts": max_restarts, "oomAutoShrink": shrink},
            },
        }
    ).spec


def failed_pod(rank: int, reason: str, message: str = "", exit_code: int = 1) -> dict[str, Any]:
    """A Failed pod whose trainer wrote its JSON report to the termination log."""
    report = json.dumps({"reason": reason, "message": message or reason, "step": 3})
    return {
        "metadata": {"name": f"demo-a1-r{rank}", "labels": {"sftjob.dev/rank": str(rank)}},
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "trainer",
                    "state": {"terminated": {"exitCode": exit_code, "message": report}},
                }
            ],
        },
    }


def running_pod(rank: int) -> dict[str, Any]:
    return {
        "metadata": {"name": f"demo-a1-r{rank}", "labels": {"sftjob.dev/rank": str(rank)}},
        "status": {"phase": "Running"},
    }


# ------------------------------------------------------------------ one decision per class


@pytest.mark.parametrize("reason", ["ConfigError", "DataError", "ModelLoadError", "StorageFull"])
def test_deterministic_classes_fail_at_once_with_restarts_left(reason: str) -> None:
    decision = decide_retry(Failure(reason, "why"), spec(max_restarts=5), SFTJobStatus())
    assert (decision.relaunch, decision.reason, decision.message) == (False, reason, "why")
    assert decision.backoff_seconds == 0


def test_network_error_is_retried_after_an_exponential_backoff() -> None:
    waits = []
    for restarts in range(3):
        decision = decide_retry(
            Failure("NetworkError", "cannot download model: 503"),
            spec(max_restarts=5),
            SFTJobStatus(restarts=restarts),
        )
        assert (decision.relaunch, decision.reason) == (True, "NetworkError")
        assert (decision.per_device, decision.accumulation) == (4, 2)  # no shrink
        assert f"relaunching in {decision.backoff_seconds:g}s" in decision.message
        waits.append(decision.backoff_seconds)
    assert waits == [BACKOFF_BASE_SECONDS, 2 * BACKOFF_BASE_SECONDS, 4 * BACKOFF_BASE_SECONDS]


def test_backoff_is_capped() -> None:
    assert backoff_seconds(0) == BACKOFF_BASE_SECONDS
    assert backoff_seconds(30) == BACKOFF_MAX_SECONDS
    assert all(backoff_seconds(n) <= backoff_seconds(n + 1) for n in range(40))


def test_network_error_still_counts_against_max_restarts() -> None:
    decision = decide_retry(
        Failure("NetworkError", "hub 503"), spec(max_restarts=2), SFTJobStatus(restarts=2)
    )
    assert (decision.relaunch, decision.reason) == (False, "RestartLimitExceeded")
    assert "NetworkError: hub 503" in decision.message


def test_out_of_memory_shrinks_without_backoff() -> None:
    decision = decide_retry(Failure("OutOfMemory", "CUDA OOM"), spec(), SFTJobStatus())
    assert (decision.relaunch, decision.reason) == (True, "OutOfMemoryShrink")
    assert (decision.per_device, decision.accumulation, decision.backoff_seconds) == (2, 4, 0)


@pytest.mark.parametrize("reason", ["InternalError", "Interrupted", "PodLost"])
def test_resumable_classes_relaunch_at_once_with_the_same_batch(reason: str) -> None:
    decision = decide_retry(Failure(reason, "peer gone"), spec(), SFTJobStatus())
    assert (decision.relaunch, decision.reason, decision.backoff_seconds) == (True, reason, 0)
    assert (decision.per_device, decision.accumulation) == (4, 2)
    assert "resuming from the newest checkpoint" in decision.message


def test_unknown_reason_from_a_newer_trainer_is_treated_as_internal_error() -> None:
    decision = decide_retry(Failure("SomethingNew", "?"), spec(), SFTJobStatus())
    assert (decision.relaunch, decision.backoff_seconds) == (True, 0)


def test_policy_table_covers_every_trainer_reason() -> None:
    # Every reason the trainer can write has a row, and the exit codes agree on both sides.
    trainer_reasons = set(trainer_failures.EXIT_CODES) - {"Completed"}
    assert trainer_reasons <= set(RETRY_POLICY)
    for reason, code in trainer_failures.EXIT_CODES.items():
        if code >= 10:
            assert TRAINER_EXIT_CODES[code] == reason


# ------------------------------------------------------------------ classification


def test_network_error_exit_code_without_a_report_is_classified() -> None:
    pod = failed_pod(0, "x")
    pod["status"]["containerStatuses"][0]["state"]["terminated"] = {
        "exitCode": trainer_failures.EXIT_NETWORK,
        "message": "Traceback ... httpx2.ConnectError",
    }
    assert classify_failure(pod).reason == "NetworkError"


def test_report_reason_wins_over_exit_code() -> None:
    assert classify_failure(failed_pod(0, "NetworkError", "503")).reason == "NetworkError"


# ------------------------------------------------------------------ across ranks


def test_rank_one_oom_beats_rank_zero_internal_error_and_shrinks() -> None:
    current = {
        0: failed_pod(0, "InternalError", "NCCL error: remote process exited"),
        1: failed_pod(1, "OutOfMemory", "CUDA out of memory", exit_code=10),
    }
    failure = decisive_failure(current, range(2))
    assert failure is not None and (failure.reason, failure.rank) == ("OutOfMemory", 1)
    decision = decide_retry(failure, spec(), SFTJobStatus())
    assert (decision.reason, decision.per_device, decision.accumulation) == (
        "OutOfMemoryShrink",
        2,
        4,
    )


@pytest.mark.parametrize(
    ("reasons", "winner"),
    [
        ({0: "InternalError", 1: "ConfigError"}, ("ConfigError", 1)),
        ({0: "InternalError", 1: "DataError"}, ("DataError", 1)),
        ({0: "Interrupted", 1: "InternalError"}, ("InternalError", 1)),
        ({0: "PodLost", 1: "Interrupted", 2: "InternalError"}, ("InternalError", 2)),
        ({0: "InternalError", 1: "NetworkError"}, ("NetworkError", 1)),
        ({0: "NetworkError", 1: "OutOfMemory"}, ("OutOfMemory", 1)),
        # A deterministic error beats an OOM: shrinking would meet the same error again.
        ({0: "OutOfMemory", 1: "ConfigError"}, ("ConfigError", 1)),
        # Same class on several ranks: the lowest rank speaks.
        ({2: "OutOfMemory", 1: "OutOfMemory", 0: "Interrupted"}, ("OutOfMemory", 1)),
    ],
)
def test_most_specific_cause_wins_across_ranks(
    reasons: dict[int, str], winner: tuple[str, int]
) -> None:
    current = {rank: failed_pod(rank, reason) for rank, reason in reasons.items()}
    failure = decisive_failure(current, range(len(reasons)))
    assert failure is not None and (failure.reason, failure.rank) == winner


def test_deleted_pod_is_lost_but_a_failed_rank_explains_more() -> None:
    current = {1: failed_pod(1, "InternalError")}  # rank 0's pod is gone
    failure = decisive_failure(current, range(2))
    assert failure is not None and (failure.reason, failure.rank) == ("InternalError", 1)
    only_lost = decisive_failure({1: running_pod(1)}, range(2))
    assert only_lost is not None and (only_lost.reason, only_lost.rank) == ("PodLost", 0)


def test_no_failure_when_all_ranks_run() -> None:
    assert decisive_failure({0: running_pod(0), 1: running_pod(1)}, range(2)) is None


def test_readme_states_the_policy_of_every_class() -> None:
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Failure classes and their retry policy", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    stated: dict[str, tuple[str, str]] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name, code in re.findall(r"`(\w+)`(?: \((\d+)\))?", cells[0]):
            stated[name] = (cells[1], code)
    assert set(stated) == set(RETRY_POLICY)
    for reason, policy in RETRY_POLICY.items():
        retried, code = stated[reason]
        assert (retried == "never") == (not policy.retry), reason
        assert ("backoff" in retried) == policy.backoff, reason
        if code:
            assert TRAINER_EXIT_CODES.get(int(code), "InternalError") == reason
