"""Pods that can never start, end to end: the real local node reports the kubelet's reason.

A job whose HF token Secret does not exist: the node keeps the pod waiting in
CreateContainerConfigError (`secret "..." not found`), as a kubelet does, and the job
says so, then fails after spec.retry.podStartTimeoutSeconds with that reason, its pods
deleted.
"""

from __future__ import annotations

from datetime import datetime

import pytest
from e2e_harness import E2ECluster, condition, merge

pytestmark = pytest.mark.e2e


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


@pytest.mark.timeout(180)
def test_missing_secret_fails_after_the_pod_start_timeout(cluster: E2ECluster) -> None:
    name = cluster.name("no-secret")
    secret = f"{name}-hf-token"  # never created
    spec = {
        "dataset": {"limit": 32},
        "secrets": {"hfToken": {"name": secret, "key": "token"}},
        "retry": {"podStartTimeoutSeconds": 10},
    }
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, merge({}, {"spec": spec})))

    def waiting(status: dict) -> bool:
        running = condition(status, "Running") if status.get("conditions") else {}
        return running.get("reason") == "CreateContainerConfigError"

    status = cluster.wait_job(name, waiting, 60, "Running=False CreateContainerConfigError")
    running = condition(status, "Running")
    assert running["status"] == "False"
    assert f'secret "{secret}" not found' in running["message"], running
    assert "podStartTimeoutSeconds is 10" in running["message"]
    assert status["phase"] == "Pending"

    status = cluster.wait_phase(name, "Failed", timeout=60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "CreateContainerConfigError", failed
    assert f'secret "{secret}" not found' in failed["message"], failed
    # Not before the bound: 10 s from the pod's binding, which follows the job's creation.
    created = parse(cluster.job(name)["metadata"]["creationTimestamp"])
    assert (parse(failed["lastTransitionTime"]) - created).total_seconds() >= 9, failed
    cluster.wait_no_pods(name, timeout=60)
    assert status["attempts"] == 1 and status.get("restarts", 0) == 0


@pytest.mark.timeout(120)
def test_unparsable_image_fails_at_once(cluster: E2ECluster) -> None:
    name = cluster.name("bad-image")
    image = "example.test/Trainer:dev"  # upper case: no valid image reference
    # A day-long timeout: InvalidImageName never heals, so the job must not wait for it.
    spec = {"image": image, "retry": {"podStartTimeoutSeconds": 86400}}
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, {"spec": spec}))

    status = cluster.wait_phase(name, "Failed", timeout=60)
    failed = condition(status, "Failed")
    assert failed["reason"] == "InvalidImageName", failed
    assert image in failed["message"] and "never heals" in failed["message"], failed
    cluster.wait_no_pods(name, timeout=60)
