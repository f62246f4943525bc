"""`sftjob logs` picks the pod of a rank in the current attempt, or says why there is none.

Pods come from the operator's own builder (children.build_pods), so the labels and owner
references read here are the ones the operator writes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from sftjob_operator.api import SFTJob
from sftjob_operator.children import build_pods
from sftjob_operator.documents import sftjobs_in
from sftjob_operator.log_target import (
    TRAINER_CONTAINER,
    NoLogs,
    choose_pod,
    container_started,
    why_no_pod,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
UID = "9a1c0b7e-0000-4000-8000-000000000001"


def example_job() -> SFTJob:
    job = sftjobs_in((EXAMPLES / "tiny-lora-2node.yaml").read_text())[0]
    metadata = job.metadata.model_copy(update={"namespace": "team-a", "uid": UID})
    return job.model_copy(update={"metadata": metadata})


def two_node_job(**status: Any) -> dict[str, Any]:
    """The two-rank example as the API returns it: metadata with a uid, and a status."""
    job = example_job().model_dump(mode="json", exclude_none=True)
    job["status"] = status
    return job


def pods_of(attempt: int, *, started: bool = True) -> list[dict[str, Any]]:
    """The operator's pods of one attempt, running (or not started yet)."""
    pods = build_pods(example_job(), attempt)
    for pod in pods:
        running = {"name": TRAINER_CONTAINER, "state": {"running": {}}}
        pod["status"] = {
            "phase": "Running" if started else "Pending",
            "containerStatuses": [running] if started else [],
        }
    return pods


def test_the_container_read_is_the_one_the_operator_runs_the_trainer_in() -> None:
    for pod in pods_of(1):
        assert [c["name"] for c in pod["spec"]["containers"]] == [TRAINER_CONTAINER]


def test_rank_zero_of_the_current_attempt_by_default() -> None:
    job = two_node_job(attempts=2, launchedAttempt=2, phase="Running")
    # A terminating pod of attempt 1 is still listed: never the one read by default.
    pods = pods_of(1) + pods_of(2)
    target = choose_pod(job, pods)
    assert (target.pod, target.rank, target.ranks, target.attempt) == (
        "tiny-lora-2node-a2-r0",
        0,
        2,
        2,
    )
    assert target.describe() == ("pod tiny-lora-2node-a2-r0 (rank 0 of 2, attempt 2 of 2, Running)")


def test_rank_picks_that_ranks_pod() -> None:
    job = two_node_job(attempts=1, phase="Running")
    assert choose_pod(job, pods_of(1), rank=1).pod == "tiny-lora-2node-a1-r1"


def test_an_earlier_attempt_is_read_while_its_pods_remain() -> None:
    job = two_node_job(attempts=2, launchedAttempt=1, phase="Restarting")
    target = choose_pod(job, pods_of(1) + pods_of(2), rank=1, attempt=1)
    assert target.pod == "tiny-lora-2node-a1-r1" and target.attempt == 1


@pytest.mark.parametrize("rank", [2, 5, -1])
def test_a_rank_out_of_range_says_how_many_ranks(rank: int) -> None:
    job = two_node_job(attempts=1, phase="Running")
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, pods_of(1), rank=rank)
    assert raised.value.message == (
        f"rank {rank} is out of range: job tiny-lora-2node runs 2 rank(s), --rank 0 to 1"
    )
    assert not raised.value.may_come


def test_pods_of_another_job_with_the_same_name_are_not_read() -> None:
    job = two_node_job(attempts=1, phase="Running")
    pods = pods_of(1)
    for pod in pods:  # a deleted job of that name left them, under its own uid
        pod["metadata"]["ownerReferences"][0]["uid"] = "another-uid"
    with pytest.raises(NoLogs, match="is not there yet"):
        choose_pod(job, pods)


def test_no_pod_yet_names_the_phase_and_why() -> None:
    job = two_node_job(
        attempts=0,
        phase="Pending",
        conditions=[
            {
                "type": "ChildrenCreated",
                "status": "False",
                "reason": "Forbidden",
                "message": 'pods "tiny-lora-2node-a1-r0" is forbidden: exceeded quota',
            }
        ],
    )
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, [])
    assert raised.value.message == (
        "job tiny-lora-2node has no pod yet (phase Pending; Forbidden: "
        'pods "tiny-lora-2node-a1-r0" is forbidden: exceeded quota)'
    )
    assert raised.value.may_come


def test_a_pod_that_cannot_be_scheduled_says_so() -> None:
    job = two_node_job(attempts=1, launchedAttempt=1, phase="Pending")
    pods = pods_of(1, started=False)
    pods[0]["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ]
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, pods)
    assert raised.value.message == (
        "pod tiny-lora-2node-a1-r0 has not started yet (pod phase Pending; Unschedulable: "
        "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.)"
    )
    assert raised.value.may_come


def test_a_pod_not_started_without_a_pod_reason_gives_the_jobs_condition() -> None:
    job = two_node_job(
        attempts=1,
        phase="Pending",
        conditions=[{"type": "Running", "status": "False", "reason": "ContainerCreating"}],
    )
    with pytest.raises(NoLogs, match=r"\(pod phase Pending; phase Pending; ContainerCreating\)"):
        choose_pod(job, pods_of(1, started=False))


def test_an_earlier_attempt_whose_pods_were_deleted_says_how_it_ended() -> None:
    job = two_node_job(
        attempts=3,
        phase="Running",
        lastFailure={"reason": "PodLost", "message": "node went away", "attempt": 2},
    )
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, pods_of(3), attempt=2)
    message = raised.value.message
    assert message.startswith(
        "the pods of attempt 2 of job tiny-lora-2node were deleted when attempt 3 launched; "
        "it ended with PodLost: node went away."
    ), message
    assert "`sftjob logs tiny-lora-2node` reads attempt 3" in message
    assert not raised.value.may_come


@pytest.mark.parametrize("attempt", [0, 3])
def test_an_attempt_that_never_was(attempt: int) -> None:
    job = two_node_job(attempts=2, phase="Running")
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, pods_of(2), attempt=attempt)
    assert raised.value.message == (
        f"job tiny-lora-2node has no attempt {attempt}: it has had 2 attempt(s), --attempt 1 to 2"
    )


def test_a_launch_under_way_waits_for_the_backoff() -> None:
    job = two_node_job(
        attempts=2,
        launchedAttempt=1,
        phase="Restarting",
        nextAttemptTime="2026-01-01T00:01:00Z",
        conditions=[{"type": "Restarting", "status": "True", "reason": "OutOfMemory"}],
    )
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, [])
    assert raised.value.message == (
        "attempt 2 of job tiny-lora-2node is being launched (phase Restarting; OutOfMemory): "
        "its pods are created once the previous attempt's pods are gone and the retry "
        "backoff ends at 2026-01-01T00:01:00Z"
    )
    assert raised.value.may_come


def test_a_finished_job_whose_pods_are_gone() -> None:
    job = two_node_job(
        attempts=1,
        phase="Failed",
        conditions=[{"type": "Failed", "status": "True", "reason": "DeadlineExceeded"}],
    )
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, [], rank=1)
    assert raised.value.message == (
        "rank 1 of job tiny-lora-2node (attempt 1) is gone; the job finished (phase Failed; "
        "DeadlineExceeded) and its pods were deleted"
    )
    assert not raised.value.may_come


def test_a_restarted_container_has_a_log_while_it_waits() -> None:
    pod = pods_of(1, started=False)[0]
    assert not container_started(pod)
    restarted = copy.deepcopy(pod)
    restarted["status"]["containerStatuses"] = [
        {
            "name": TRAINER_CONTAINER,
            "state": {"waiting": {"reason": "CrashLoopBackOff"}},
            "lastState": {"terminated": {"exitCode": 1}},
        }
    ]
    assert container_started(restarted)


def test_why_no_pod_prefers_the_condition_that_explains_most() -> None:
    job = two_node_job(
        conditions=[
            {"type": "Running", "status": "False", "reason": "Unschedulable", "message": "m1"},
            {"type": "Failed", "status": "True", "reason": "PolicyViolation", "message": "m2"},
        ]
    )
    assert why_no_pod(job) == "PolicyViolation: m2"
    assert why_no_pod(two_node_job()) == ""


def test_a_job_refused_before_its_launch_will_never_have_a_pod() -> None:
    job = two_node_job(
        attempts=0,
        phase="Failed",
        conditions=[
            {"type": "Failed", "status": "True", "reason": "PolicyViolation", "message": "m"}
        ],
    )
    with pytest.raises(NoLogs) as raised:
        choose_pod(job, [])
    assert raised.value.message == (
        "job tiny-lora-2node never ran a pod (phase Failed; PolicyViolation: m)"
    )
    # `sftjob logs -f` must not wait for it.
    assert not raised.value.may_come


def test_a_pod_not_started_of_a_finished_job_is_not_waited_for() -> None:
    job = two_node_job(attempts=1, phase="Failed")
    with pytest.raises(NoLogs, match="has not started yet") as raised:
        choose_pod(job, pods_of(1, started=False))
    assert not raised.value.may_come
