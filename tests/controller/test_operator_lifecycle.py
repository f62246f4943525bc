"""Issue 19's lifecycle defects on the API emulator: crashes, edits, ownership, relaunches.

The first tests run single passes in-process (no operator: a pass is crashed at a chosen
call, or raced with a delete and re-create) and must stay ahead of the others: the
operator process (a module fixture) starts with the first test that asks for it and
would otherwise reconcile the same jobs. The later tests run the operator and play the
kubelet, as tests/controller/test_operator.py does.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from operator_harness import Cluster, condition, tiny_job, wait_for
from sftjob_operator.kube import Kube
from sftjob_operator.reconciler import OperatorSettings, reconcile

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

SETTINGS = OperatorSettings(default_image="example.test/trainer:dev")


class Crash(Exception):
    """The operator process dying at this call: nothing after it happens."""


class CrashingKube(Kube):
    """Dies right after creating its `pods`-th pod (counted over the passes it serves)."""

    def __init__(self, api: Any, pods: int):
        super().__init__(api)
        self.crash_at = pods
        self.made = 0

    def create_if_absent(self, manifest: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        result = super().create_if_absent(manifest, *args, **kwargs)
        if manifest["kind"] == "Pod":
            self.made += 1
            if self.made == self.crash_at:
                raise Crash(manifest["metadata"]["name"])
        return result


def one_pass(cluster: Cluster, name: str, kube: Kube | None = None) -> Any:
    return asyncio.run(reconcile(cluster.job(name), kube or Kube(cluster.api), SETTINGS))


def crashed_pass(cluster: Cluster, name: str, after_pods: int) -> None:
    with pytest.raises(Crash):
        one_pass(cluster, name, CrashingKube(cluster.api, after_pods))


def pod_names(cluster: Cluster, name: str) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.pods(name)]


def reasons(cluster: Cluster, name: str) -> list[str]:
    return sorted(e["reason"] for e in cluster.events(name))


def test_defect4_half_made_launch_is_completed_not_counted_as_a_lost_pod(
    cluster: Cluster,
) -> None:
    # The operator created rank 0 of 2 and died; with maxRestarts 0 a PodLost would fail it.
    cluster.create_job(tiny_job("half", resources={"nodes": 2}, retry={"maxRestarts": 0}))
    crashed_pass(cluster, "half", after_pods=1)
    assert pod_names(cluster, "half") == ["half-a1-r0"]
    one_pass(cluster, "half")
    status = cluster.job("half")["status"]
    assert status["phase"] == "Pending", status
    assert (status["attempts"], status.get("restarts", 0)) == (1, 0)
    assert "lastFailure" not in status
    assert pod_names(cluster, "half") == ["half-a1-r0", "half-a1-r1"]
    assert condition(cluster.job("half"), "Running")["reason"] == "Launched"


def test_defect12_crash_at_relaunch_counts_the_restart_and_posts_each_event_once(
    cluster: Cluster,
) -> None:
    cluster.create_job(tiny_job("crashy", retry={"maxRestarts": 3}))
    # The first launch dies right after its pod: Launched must still be posted, once.
    crashed_pass(cluster, "crashy", after_pods=1)
    one_pass(cluster, "crashy")
    cluster.fail_pod("crashy-a1-r0", "InternalError", "NCCL watchdog timeout")
    # The relaunch dies right after creating the new pod.
    crashed_pass(cluster, "crashy", after_pods=1)
    assert pod_names(cluster, "crashy") == ["crashy-a1-r0", "crashy-a2-r0"]
    for _ in range(3):  # later passes repeat nothing
        one_pass(cluster, "crashy")
    job = cluster.job("crashy")
    status = job["status"]
    assert (status["attempts"], status["restarts"]) == (2, 1)
    assert status["lastFailure"]["reason"] == "InternalError"
    assert status["lastFailure"]["attempt"] == 1
    assert condition(job, "Restarting")["status"] == "True"
    assert reasons(cluster, "crashy") == ["InternalError", "Launched", "Launched", "Planned"]


def test_uid_race_a_stale_pass_writes_nothing_into_a_new_job_of_the_same_name(
    cluster: Cluster,
) -> None:
    class RacingKube(Kube):
        """Between the pass's read of the job and its launch, the job is re-created."""

        raced = False

        def list_job_pods(self, namespace: str, job_name: str, label: str) -> Any:
            if not self.raced:
                self.raced = True
                cluster.delete_job(job_name)
                wait_for(lambda: not cluster.jobs(), what="old job gone")
                cluster.create_job(tiny_job(job_name, training={"numTrainEpochs": 2}))
            return super().list_job_pods(namespace, job_name, label)

    old = cluster.create_job(tiny_job("reused"))
    outcome = asyncio.run(reconcile(old, RacingKube(cluster.api), SETTINGS))
    new = cluster.job("reused")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    # Nothing of the old job's launch landed in the new one: no status, no pods.
    assert not (new.get("status") or {}), new.get("status")
    assert cluster.pods("reused") == []
    assert outcome.requeue_after is not None  # the conflict asks for a quick pass


# ----------------------------------------------------------------- with the operator


def bind(cluster: Cluster, pod: str, node: str = "node-1") -> None:
    """Act as the scheduler: a bound pod is deleted gracefully, as on a real node."""
    body = {
        "apiVersion": "v1",
        "kind": "Binding",
        "metadata": {"name": pod},
        "target": {"apiVersion": "v1", "kind": "Node", "name": node},
    }
    cluster.core.create_namespaced_pod_binding(pod, cluster.namespace, body, _preload_content=False)


def remove_pod(cluster: Cluster, pod: str) -> None:
    """Act as the kubelet once a terminating pod's containers stopped."""
    cluster.core.delete_namespaced_pod(pod, cluster.namespace, grace_period_seconds=0)


def attempt_pods(cluster: Cluster, name: str, attempt: int) -> list[dict[str, Any]]:
    return [
        p
        for p in cluster.pods(name)
        if p["metadata"]["labels"].get("sftjob.dev/attempt") == str(attempt)
    ]


def test_defect1_invalid_edit_of_a_running_job_keeps_its_lifecycle(
    cluster: Cluster, operator_process: object
) -> None:
    cluster.create_job(tiny_job("edit1"))
    wait_for(lambda: pod_names(cluster, "edit1") == ["edit1-a1-r0"], what="pod")
    cluster.set_pod("edit1-a1-r0", "Running")
    wait_for(lambda: cluster.job("edit1")["status"].get("phase") == "Running", what="Running")
    # Valid for the CRD (extraArgs is free-form) but not for the operator; the TTL is valid.
    cluster.patch_job(
        "edit1",
        # A TTL of 3 s, not 1: the watch-driven operator deletes on time, and the test must
        # still see the Succeeded job before it goes.
        {"spec": {"training": {"extraArgs": {"learning_rate": 0.1}}, "ttlSecondsAfterFinished": 3}},
    )
    job = wait_for(
        lambda: (
            (j := cluster.job("edit1"))
            and (c := condition(j, "SpecChangeIgnored"))
            and c["reason"] == "InvalidSpec"
            and j
        ),
        what="SpecChangeIgnored/InvalidSpec",
    )
    ignored = condition(job, "SpecChangeIgnored")
    assert ignored["status"] == "True" and "spec.training.extraArgs" in ignored["message"]
    assert job["status"]["observedGeneration"] == 2
    cluster.set_pod("edit1-a1-r0", "Succeeded")
    wait_for(lambda: cluster.job("edit1")["status"].get("phase") == "Succeeded", what="Succeeded")
    # The TTL from the invalid edit applies.
    wait_for(lambda: not any(j["metadata"]["name"] == "edit1" for j in cluster.jobs()), 15)


def test_defect2_edit_of_a_finished_job_is_reported(
    cluster: Cluster, operator_process: object
) -> None:
    cluster.create_job(tiny_job("done"))
    wait_for(lambda: pod_names(cluster, "done") == ["done-a1-r0"], what="pod")
    cluster.set_pod("done-a1-r0", "Succeeded")
    wait_for(lambda: cluster.job("done")["status"].get("phase") == "Succeeded", what="done")
    cluster.patch_job("done", {"spec": {"training": {"learningRate": 1e-5}}})
    job = wait_for(
        lambda: (j := cluster.job("done")) and condition(j, "SpecChangeIgnored") and j,
        what="SpecChangeIgnored",
    )
    ignored = condition(job, "SpecChangeIgnored")
    assert (ignored["status"], ignored["reason"]) == ("True", "JobFinished")
    assert "create a new SFTJob" in ignored["message"]
    assert job["status"]["observedGeneration"] == 2
    assert job["status"]["phase"] == "Succeeded"
    wait_for(lambda: "JobFinished" in reasons(cluster, "done"), what="the Event")
    time.sleep(1.0)
    assert reasons(cluster, "done").count("JobFinished") == 1


def test_defect3_a_new_job_never_adopts_the_previous_same_named_jobs_pod(
    cluster: Cluster, operator_process: object
) -> None:
    first = cluster.create_job(tiny_job("again"))
    wait_for(lambda: pod_names(cluster, "again") == ["again-a1-r0"], what="pod")
    bind(cluster, "again-a1-r0")
    cluster.set_pod("again-a1-r0", "Running")
    wait_for(lambda: cluster.job("again")["status"].get("phase") == "Running", what="Running")
    cluster.delete_job("again")
    # The garbage collector deletes the old pod gracefully: it terminates, still Running.
    wait_for(
        lambda: all(p["metadata"].get("deletionTimestamp") for p in cluster.pods("again")),
        what="old pod terminating",
    )
    wait_for(lambda: not cluster.jobs(), what="old job gone")
    second = cluster.create_job(tiny_job("again"))
    # The old run finishes now: it is not the new job's.
    cluster.set_pod("again-a1-r0", "Succeeded")
    job = wait_for(
        lambda: (
            (j := cluster.job("again"))
            and (c := condition(j, "Running"))
            and c["reason"] == "ChildConflict"
            and j
        ),
        what="ChildConflict",
    )
    assert "Pod again-a1-r0" in condition(job, "Running")["message"]
    time.sleep(1.0)
    assert cluster.job("again")["status"]["phase"] == "Pending"
    remove_pod(cluster, "again-a1-r0")
    pod = wait_for(
        lambda: next(
            (p for p in cluster.pods("again") if not p["metadata"].get("deletionTimestamp")),
            None,
        ),
        what="the new job's own pod",
    )
    assert pod["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
    assert pod["metadata"]["ownerReferences"][0]["uid"] != first["metadata"]["uid"]
    wait_for(
        lambda: condition(cluster.job("again"), "Running")["reason"] == "Launched",
        what="launch recorded",
    )


def test_defect5_relaunch_waits_for_the_old_attempt_and_rendezvous_follows_it(
    cluster: Cluster, operator_process: object
) -> None:
    cluster.create_job(tiny_job("overlap", resources={"nodes": 2}))
    wait_for(lambda: len(attempt_pods(cluster, "overlap", 1)) == 2, what="attempt 1")
    for rank in (0, 1):
        bind(cluster, f"overlap-a1-r{rank}", f"node-{rank}")
        cluster.set_pod(f"overlap-a1-r{rank}", "Running")
    wait_for(lambda: cluster.job("overlap")["status"].get("phase") == "Running", what="Running")
    cluster.fail_pod("overlap-a1-r1", "InternalError", "NCCL timeout")
    # The decision is recorded at once; rank 0 of attempt 1 gets its grace period.
    wait_for(lambda: cluster.job("overlap")["status"].get("restarts") == 1, what="restart")
    wait_for(
        lambda: (
            cluster.core.read_namespaced_pod(
                "overlap-a1-r0", cluster.namespace
            ).metadata.deletion_timestamp
        ),
        what="rank 0 terminating",
    )
    time.sleep(2.0)
    assert attempt_pods(cluster, "overlap", 2) == [], "attempt 2 overlaps attempt 1"
    remove_pod(cluster, "overlap-a1-r0")
    wait_for(lambda: len(attempt_pods(cluster, "overlap", 2)) == 2, what="attempt 2")
    service = cluster.core.read_namespaced_service("overlap-rdzv", cluster.namespace)
    assert service.spec.selector == {
        "sftjob.dev/job-name": "overlap",
        "sftjob.dev/rank": "0",
        "sftjob.dev/attempt": "2",
    }
    status = cluster.job("overlap")["status"]
    assert (status["attempts"], status["restarts"]) == (2, 1)
