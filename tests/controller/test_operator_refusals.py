"""API refusals and pods that cannot start, with the operator as a real process.

The operator runs as deploy/'s ServiceAccount under deploy/'s ClusterRole (not as the
admin), so taking a permission away answers its creates with the API server's own 403.
The emulator stores ResourceQuotas but does not enforce them (no quota admission), so the
quota case is covered by the unit tests with the apiserver's message; RBAC gives the 403
here. The test plays the kubelet: it writes the waiting reasons into the pod status.

A multi-node job whose name starts with a digit (its rendezvous Service would be no
DNS-1035 label) is refused before any create, as InvalidSpec (api.ObjectMeta), so the
422 case here is a pod the API server refuses: a volume mounted at the output path.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from operator_harness import (
    Cluster,
    condition,
    start_operator,
    stop_operator,
    tiny_job,
    wait_for,
)
from sftjob_local.demo import install_operator_account
from sftjob_local.emulator import EmulatorThread

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

OPERATOR_ACCOUNT = "sftjob-operator"  # deploy/base/rbac.yaml's ServiceAccount and ClusterRole
CREATED_KINDS = ("configmaps", "serviceaccounts", "services", "pods", "roles", "rolebindings")


@pytest.fixture(scope="module")
def operator_process(
    emulator: tuple[EmulatorThread, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    """The operator authenticated as deploy/'s ServiceAccount, under deploy/'s ClusterRole."""
    server, kubeconfig = emulator
    workdir = tmp_path_factory.mktemp("operator")
    operator_kubeconfig = install_operator_account(kubeconfig, workdir / "kubeconfig")
    log_path = workdir / "operator.log"
    process = start_operator(operator_kubeconfig, log_path)
    yield process
    stop_operator(process)
    print(log_path.read_text()[-5000:])


def creates(server: EmulatorThread, namespace: str) -> list[Any]:
    """Every create of a child the emulator has served in `namespace` (newest last)."""
    return [
        r
        for r in list(server.emulator)
        if r.method == "POST"
        and r.namespace == namespace
        and r.resource is not None
        and r.resource.plural in CREATED_KINDS
    ]


def creates_during(server: EmulatorThread, namespace: str, seconds: float) -> int:
    before = {id(r) for r in creates(server, namespace)}
    time.sleep(seconds)
    new = [r for r in creates(server, namespace) if id(r) not in before]
    print("creates:", [(r.resource.plural, r.name) for r in new])
    return len(new)


def wait_failed(cluster: Cluster, name: str, timeout: float = 20) -> dict[str, Any]:
    return wait_for(
        lambda: (j := cluster.job(name)) and (j.get("status") or {}).get("phase") == "Failed" and j,
        timeout,
        f"{name} Failed",
    )


def test_duplicate_mount_path_fails_the_job_naming_the_field(
    cluster: Cluster, emulator, operator_process
) -> None:
    server, _ = emulator
    volume = {"name": "extra", "claimName": "data", "mountPath": "/output"}
    cluster.create_job(tiny_job("dup-mount", volumes=[volume]))
    job = wait_failed(cluster, "dup-mount")
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "CreateRefused"
    assert "Pod dup-mount-a1-r0 (422 Invalid" in failed["message"]
    assert "mountPath" in failed["message"] and "must be unique" in failed["message"]
    assert job["status"]["lastFailure"]["reason"] == "CreateRefused"
    created = condition(job, "ChildrenCreated")
    assert created is not None and (created["status"], created["reason"]) == ("False", "Invalid")
    assert "CreateRefused" in [e["reason"] for e in cluster.events("dup-mount")]
    assert cluster.pods("dup-mount") == []
    # No retry storm: the operator ticks every 0.3 s, and creates nothing more.
    assert creates_during(server, cluster.namespace, 3) == 0


def _set_pod_create(cluster: Cluster, allowed: bool) -> None:
    """Grant or take away `create` on pods in the operator's ClusterRole (as the admin)."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api)
    role = cluster.plain(rbac.read_cluster_role(OPERATOR_ACCOUNT))
    for rule in role["rules"]:
        if rule.get("resources") == ["pods"]:
            verbs = [v for v in rule["verbs"] if v != "create"]
            rule["verbs"] = (["create"] if allowed else []) + verbs
    rbac.patch_cluster_role(OPERATOR_ACCOUNT, {"rules": role["rules"]})


@pytest.fixture()
def no_pod_create(cluster: Cluster) -> Iterator[None]:
    _set_pod_create(cluster, allowed=False)
    try:
        yield
    finally:
        _set_pod_create(cluster, allowed=True)


def test_rbac_refusal_is_visible_then_fails_after_the_bound(
    cluster: Cluster, emulator, operator_process, no_pod_create
) -> None:
    server, _ = emulator
    cluster.create_job(tiny_job("no-rbac", retry={"podStartTimeoutSeconds": 6}))
    started = time.monotonic()
    job = wait_for(
        lambda: (
            (j := cluster.job("no-rbac"))
            and (c := condition(j, "ChildrenCreated"))
            and c["status"] == "False"
            and j
        ),
        10,
        "ChildrenCreated=False",
    )
    waiting = condition(job, "ChildrenCreated")
    assert waiting is not None and waiting["reason"] == "Forbidden"
    assert 'cannot create resource "pods"' in waiting["message"]
    assert "retrying with back-off" in waiting["message"]
    assert job["status"]["phase"] != "Failed"
    job = wait_failed(cluster, "no-rbac", 15)
    assert time.monotonic() - started >= 4  # not before the bound (6 s from the first try)
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "CreateRefused"
    assert "still refused after" in failed["message"]
    pod_creates = [r for r in creates(server, cluster.namespace) if r.resource.plural == "pods"]
    # Tried at 0, 5 and at the 6 s bound, not every 0.3 s tick.
    assert 2 <= len(pod_creates) <= 4, len(pod_creates)


def test_rbac_refusal_heals_when_the_permission_comes_back(
    cluster: Cluster, emulator, operator_process
) -> None:
    _set_pod_create(cluster, allowed=False)
    try:
        cluster.create_job(tiny_job("heals"))
        wait_for(
            lambda: (
                (c := condition(cluster.job("heals"), "ChildrenCreated")) and c["status"] == "False"
            ),
            10,
            "ChildrenCreated=False",
        )
    finally:
        _set_pod_create(cluster, allowed=True)
    wait_for(lambda: cluster.live_pods("heals"), 20, "the pod once allowed")
    job = wait_for(
        lambda: (
            (j := cluster.job("heals"))
            and (c := condition(j, "ChildrenCreated"))
            and c["status"] == "True"
            and j.get("status", {}).get("attempts") == 1
            and j
        ),
        10,
        "ChildrenCreated=True",
    )
    assert job["status"]["phase"] == "Pending"


def _kubelet_waiting(cluster: Cluster, pod: str, reason: str, message: str, bound: str) -> None:
    """Act as the kubelet: the pod is bound and its container waits with `reason`."""
    status = {
        "phase": "Pending",
        "conditions": [{"type": "PodScheduled", "status": "True", "lastTransitionTime": bound}],
        "containerStatuses": [
            {
                "name": "trainer",
                "ready": False,
                "restartCount": 0,
                "image": "example.test/trainer:dev",
                "imageID": "",
                "state": {"waiting": {"reason": reason, "message": message}},
            }
        ],
    }
    cluster.core.patch_namespaced_pod_status(
        pod, cluster.namespace, {"status": status}, _content_type="application/merge-patch+json"
    )


def test_image_pull_failure_fails_after_the_pod_start_timeout(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("no-image", retry={"podStartTimeoutSeconds": 6}))
    [pod] = wait_for(lambda: cluster.live_pods("no-image"), 20, "the pod")
    name = pod["metadata"]["name"]
    bound = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    started = time.monotonic()
    pull = 'failed to pull and unpack image "example.test/trainer:dev": not found'
    _kubelet_waiting(cluster, name, "ErrImagePull", pull, bound)

    def running_reason(reason: str) -> dict[str, Any] | None:
        job = cluster.job("no-image")
        running = condition(job, "Running")
        return job if running and running["reason"] == reason else None

    job = wait_for(lambda: running_reason("ErrImagePull"), 10, "Running=False ErrImagePull")
    running = condition(job, "Running")
    assert running is not None and running["status"] == "False"
    assert running["message"].startswith(pull + f" (pod {name} container trainer;")
    backoff = 'Back-off pulling image "example.test/trainer:dev"'
    _kubelet_waiting(cluster, name, "ImagePullBackOff", backoff, bound)
    wait_for(lambda: running_reason("ImagePullBackOff"), 10, "Running=False ImagePullBackOff")
    assert cluster.job("no-image")["status"]["phase"] == "Pending"

    job = wait_failed(cluster, "no-image", 15)
    assert time.monotonic() - started >= 4  # the 6 s count from the binding (1 s stamps)
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "ImagePullBackOff"
    assert backoff in failed["message"] and "podStartTimeoutSeconds is 6" in failed["message"]
    wait_for(lambda: cluster.live_pods("no-image") == [], 10, "the pod deleted")
