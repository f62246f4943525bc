"""The operator process reconciling SFTJobs on the API emulator (the test plays kubelet)."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest
from operator_harness import Cluster, condition, tiny_job, wait_for
from sftjob_operator.api import parse_sftjob
from sftjob_operator.children import build_pods
from sftjob_operator.kube import Kube
from sftjob_operator.reconciler import OperatorSettings, reconcile

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def phase_of(cluster: Cluster, name: str) -> str | None:
    return (cluster.job(name).get("status") or {}).get("phase")


def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 20) -> dict:
    return wait_for(
        lambda: (
            (job := cluster.job(name)) and (job.get("status") or {}).get("phase") == phase and job
        ),
        timeout,
        f"{name} phase {phase}",
    )


def wait_pods(cluster: Cluster, name: str, count: int, attempt: int) -> list[dict]:
    def ready() -> list[dict] | None:
        pods = [
            p
            for p in cluster.live_pods(name)
            if p["metadata"]["labels"]["sftjob.dev/attempt"] == str(attempt)
        ]
        return pods if len(pods) == count else None

    return wait_for(ready, 20, f"{count} pods of attempt {attempt} for {name}")


def test_valid_job_gets_plan_children_and_pods(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("plain"))
    pods = wait_pods(cluster, "plain", 1, 1)
    job = wait_for(lambda: (j := cluster.job("plain"))["status"].get("plan") and j, what="plan")
    plan = job["status"]["plan"]
    assert (plan["effectiveBatchSize"], plan["stepsPerEpoch"], plan["totalSteps"]) == (8, 8, 8)
    assert condition(job, "Planned")["status"] == "True"
    assert job["status"]["attempts"] == 1 and job["status"]["observedGeneration"] == 1
    pod = pods[0]
    assert pod["spec"]["containers"][0]["image"] == "example.test/trainer:dev"
    assert pod["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    config = cluster.config("plain")
    assert config["plan"]["totalSteps"] == 8 and config["job"]["name"] == "plain"
    role = cluster.api.sanitize_for_serialization(
        __import__("kubernetes")
        .client.RbacAuthorizationV1Api(cluster.api)
        .read_namespaced_role("plain-trainer", cluster.namespace)
    )
    # The trainer may write only its progress ConfigMap (test_trainer_channel.py).
    assert [rule["resourceNames"] for rule in role["rules"]] == [["plain-progress"]]
    assert cluster.core.read_namespaced_config_map("plain-progress", cluster.namespace)
    reasons = [e["reason"] for e in cluster.events("plain")]
    assert "Planned" in reasons and "Launched" in reasons


def test_children_are_created_once_when_reconciled_concurrently(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("twice", resources={"nodes": 2}))
    kube = Kube(cluster.api)
    settings = OperatorSettings(default_image="example.test/trainer:dev")

    async def race() -> None:
        # The running operator plus two more passes at once: still one launch.
        await asyncio.gather(*(reconcile(cluster.job("twice"), kube, settings) for _ in range(2)))
        await reconcile(cluster.job("twice"), kube, settings)

    asyncio.run(race())
    wait_pods(cluster, "twice", 2, 1)
    time.sleep(1.0)
    pods = cluster.pods("twice")
    assert [p["metadata"]["name"] for p in pods] == ["twice-a1-r0", "twice-a1-r1"]
    assert cluster.job("twice")["status"]["attempts"] == 1
    services = cluster.core.list_namespaced_service(cluster.namespace).items
    assert [s.metadata.name for s in services] == ["twice-rdzv"]


def test_pods_named_for_the_job_but_not_owned_by_it_are_never_adopted(
    cluster: Cluster, operator_process
) -> None:
    # Pods of launch 1 exist before the job, owned by nothing (with the ServiceAccount they
    # run as: the API server refuses a pod whose ServiceAccount is missing). Issue 19
    # defect 3: they used to be adopted by name; only a pod whose controller
    # ownerReference names the job's uid is the job's, so the launch reports the conflict.
    manifest = tiny_job("adopt")
    job = parse_sftjob({**manifest, "metadata": {"name": "adopt", "namespace": cluster.namespace}})
    for pod in build_pods(job, attempt=1, default_image="example.test/trainer:dev"):
        pod["metadata"]["ownerReferences"] = []
        account = {"metadata": {"name": pod["spec"]["serviceAccountName"]}}
        cluster.core.create_namespaced_service_account(cluster.namespace, account)
        cluster.core.create_namespaced_pod(cluster.namespace, pod)
    cluster.create_job(manifest)
    conflict = wait_for(
        lambda: (
            (c := condition(cluster.job("adopt"), "Running"))
            and c["reason"] == "ChildConflict"
            and c
        ),
        what="ChildConflict",
    )
    assert "ServiceAccount adopt-trainer" in conflict["message"]
    time.sleep(1.0)
    [pod] = cluster.pods("adopt")
    assert not pod["metadata"].get("ownerReferences")
    assert cluster.job("adopt")["status"]["phase"] == "Pending"


def test_invalid_spec_fails_naming_the_field_and_creates_nothing(
    cluster: Cluster, operator_process
) -> None:
    # A rule the CRD cannot state (extraArgs is free-form), so the API server stores the job
    # and the operator's parse refuses it (the CRD's CEL rules refuse e.g. lora with full).
    cluster.create_job(tiny_job("bad", training={"extraArgs": {"learning_rate": 0.1}}))
    job = wait_phase(cluster, "bad", "Failed")
    failed = condition(job, "Failed")
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training.extraArgs" in failed["message"]
    assert "training.learningRate" in failed["message"]
    time.sleep(1.0)
    assert cluster.pods("bad") == []
    assert cluster.core.list_namespaced_config_map(cluster.namespace).items == []
    assert any(e["reason"] == "InvalidSpec" for e in cluster.events("bad"))


def test_empty_dataloader_is_an_invalid_spec(cluster: Cluster, operator_process) -> None:
    cluster.create_job(
        tiny_job("empty", training={"dataloaderDropLast": True, "perDeviceTrainBatchSize": 128})
    )
    job = wait_phase(cluster, "empty", "Failed")
    assert "spec.training.dataloaderDropLast" in condition(job, "Failed")["message"]
    assert cluster.pods("empty") == []


def test_single_node_phases(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("one"))
    [pod] = wait_pods(cluster, "one", 1, 1)
    cluster.set_pod(pod["metadata"]["name"], "Running")
    job = wait_phase(cluster, "one", "Running")
    assert condition(job, "Running")["status"] == "True" and job["status"]["startTime"]
    cluster.set_pod(pod["metadata"]["name"], "Succeeded")
    job = wait_phase(cluster, "one", "Succeeded")
    assert condition(job, "Succeeded")["reason"] == "TrainingComplete"
    assert condition(job, "Running")["status"] == "False"
    assert job["status"]["completionTime"] and job["status"]["outputPath"] == "/output"


def test_two_nodes_succeed_only_when_every_rank_does(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("pair", resources={"nodes": 2}))
    r0, r1 = wait_pods(cluster, "pair", 2, 1)
    cluster.set_pod(r0["metadata"]["name"], "Running")
    cluster.set_pod(r1["metadata"]["name"], "Running")
    wait_phase(cluster, "pair", "Running")
    cluster.set_pod(r1["metadata"]["name"], "Succeeded")
    time.sleep(1.0)
    assert phase_of(cluster, "pair") == "Running"
    cluster.set_pod(r0["metadata"]["name"], "Succeeded")
    wait_phase(cluster, "pair", "Succeeded")


def test_a_failing_rank_tears_down_the_others_and_data_errors_fail_at_once(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("data", resources={"nodes": 2}))
    r0, r1 = wait_pods(cluster, "data", 2, 1)
    cluster.set_pod(r0["metadata"]["name"], "Running")
    cluster.fail_pod(r1["metadata"]["name"], "DataError", "row 17: messages[1].role is 'bot'")
    job = wait_phase(cluster, "data", "Failed")
    failed = condition(job, "Failed")
    assert failed["reason"] == "DataError" and "row 17" in failed["message"]
    assert job["status"]["lastFailure"]["reason"] == "DataError"
    assert job["status"].get("restarts", 0) == 0
    gone = {r0["metadata"]["name"]}
    wait_for(
        lambda: not gone & {p["metadata"]["name"] for p in cluster.pods("data")},
        what="rank 0 torn down",
    )
    # The failed rank is kept, so its logs and termination message stay readable.
    assert [p["metadata"]["name"] for p in cluster.pods("data")] == [r1["metadata"]["name"]]


def test_oom_auto_shrink_keeps_the_plan(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("oom"))
    [pod] = wait_pods(cluster, "oom", 1, 1)
    plan_before = wait_for(lambda: cluster.job("oom")["status"].get("plan"), what="plan")
    cluster.fail_pod(pod["metadata"]["name"], "OutOfMemory", "CUDA out of memory")
    wait_pods(cluster, "oom", 1, 2)
    job = cluster.job("oom")
    assert job["status"]["effectiveTraining"] == {
        "perDeviceTrainBatchSize": 2,
        "gradientAccumulationSteps": 4,
    }
    assert job["status"]["plan"] == plan_before
    assert condition(job, "Restarting")["reason"] == "OutOfMemoryShrink"
    config = cluster.config("oom")
    assert (
        config["resolved"]["perDeviceTrainBatchSize"],
        config["resolved"]["gradientAccumulationSteps"],
    ) == (2, 4)
    assert (
        config["plan"]["effectiveBatchSize"] == 8
        and config["plan"]["totalSteps"] == plan_before["totalSteps"]
    )
    assert any(e["reason"] == "OutOfMemoryShrink" for e in cluster.events("oom"))


def test_oom_at_batch_one_fails_with_advice(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("oom1", training={"perDeviceTrainBatchSize": 1}))
    [pod] = wait_pods(cluster, "oom1", 1, 1)
    cluster.fail_pod(pod["metadata"]["name"], "OutOfMemory")
    job = wait_phase(cluster, "oom1", "Failed")
    assert condition(job, "Failed")["reason"] == "OutOfMemory"
    assert "already 1" in condition(job, "Failed")["message"]


def test_deleted_pod_is_relaunched(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("lost"))
    [pod] = wait_pods(cluster, "lost", 1, 1)
    cluster.set_pod(pod["metadata"]["name"], "Running")
    wait_phase(cluster, "lost", "Running")
    cluster.core.delete_namespaced_pod(pod["metadata"]["name"], cluster.namespace)
    wait_pods(cluster, "lost", 1, 2)
    job = cluster.job("lost")
    assert job["status"]["restarts"] == 1 and job["status"]["lastFailure"]["reason"] == "PodLost"
    assert "effectiveTraining" not in job["status"]  # same batch for a lost pod


def test_max_restarts_is_honoured(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("flaky", retry={"maxRestarts": 1}))
    [pod] = wait_pods(cluster, "flaky", 1, 1)
    cluster.fail_pod(pod["metadata"]["name"], "InternalError", "NCCL timeout")
    [pod] = wait_pods(cluster, "flaky", 1, 2)
    cluster.fail_pod(pod["metadata"]["name"], "InternalError", "NCCL timeout again")
    job = wait_phase(cluster, "flaky", "Failed")
    assert condition(job, "Failed")["reason"] == "RestartLimitExceeded"
    assert job["status"]["restarts"] == 1 and job["status"]["attempts"] == 2
    time.sleep(1.0)
    assert len(cluster.pods("flaky")) == 2  # no third launch


def test_suspend_and_resume(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("nap"))
    [pod] = wait_pods(cluster, "nap", 1, 1)
    cluster.set_pod(pod["metadata"]["name"], "Running")
    wait_phase(cluster, "nap", "Running")
    cluster.patch_job("nap", {"spec": {"suspend": True}})
    job = wait_phase(cluster, "nap", "Suspended")
    assert condition(job, "Suspended")["status"] == "True"
    wait_for(lambda: cluster.live_pods("nap") == [], what="pods stopped")
    assert job["status"]["plan"]["totalSteps"] == 8  # status kept
    cluster.patch_job("nap", {"spec": {"suspend": False}})
    wait_pods(cluster, "nap", 1, 2)
    job = cluster.job("nap")
    assert (
        job["status"].get("restarts", 0) == 0 and condition(job, "Suspended")["status"] == "False"
    )
    assert condition(job, "SpecChangeIgnored") is None


def test_spec_change_while_running_is_ignored_with_a_condition(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("frozen"))
    wait_pods(cluster, "frozen", 1, 1)
    cluster.patch_job("frozen", {"spec": {"training": {"learningRate": 1e-5}}})
    job = wait_for(
        lambda: (j := cluster.job("frozen")) and condition(j, "SpecChangeIgnored") and j,
        what="SpecChangeIgnored",
    )
    assert "immutable" in condition(job, "SpecChangeIgnored")["message"]
    assert cluster.config("frozen")["resolved"]["learningRate"] == 2e-5
    assert len(cluster.pods("frozen")) == 1


def test_deadline_exceeded(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("slow", activeDeadlineSeconds=2))
    [pod] = wait_pods(cluster, "slow", 1, 1)
    cluster.set_pod(pod["metadata"]["name"], "Running")
    job = wait_phase(cluster, "slow", "Failed", timeout=15)
    assert condition(job, "Failed")["reason"] == "DeadlineExceeded"
    wait_for(lambda: cluster.live_pods("slow") == [], what="pods stopped")


def test_ttl_deletes_the_finished_job_and_its_children(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("ttl", ttlSecondsAfterFinished=1))
    [pod] = wait_pods(cluster, "ttl", 1, 1)
    cluster.set_pod(pod["metadata"]["name"], "Succeeded")
    wait_phase(cluster, "ttl", "Succeeded")
    try:
        wait_for(lambda: cluster.jobs() == [], 15, "TTL deletion")
    except AssertionError:
        import json as _j

        print(
            "DEBUG",
            _j.dumps(
                [
                    {
                        "m": j["metadata"],
                        "s": {
                            k: v for k, v in j["status"].items() if k not in ("plan", "advisories")
                        },
                    }
                    for j in cluster.jobs()
                ],
                indent=1,
            ),
        )
        raise
    wait_for(lambda: cluster.pods("ttl") == [], what="pods garbage-collected")
    assert cluster.core.list_namespaced_config_map(cluster.namespace).items == []


def test_deleting_the_job_removes_every_child(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("gone", resources={"nodes": 2}))
    wait_pods(cluster, "gone", 2, 1)
    cluster.delete_job("gone")
    wait_for(lambda: cluster.pods("gone") == [], what="pods deleted")
    for lister, kept in (
        (cluster.core.list_namespaced_config_map, []),
        (cluster.core.list_namespaced_service, []),
        # Every namespace keeps its `default` ServiceAccount (the ServiceAccount controller's).
        (cluster.core.list_namespaced_service_account, ["default"]),
    ):
        assert [o.metadata.name for o in lister(cluster.namespace).items] == kept


def test_unschedulable_pod_is_reported(cluster: Cluster, operator_process) -> None:
    cluster.create_job(tiny_job("big"))
    [pod] = wait_pods(cluster, "big", 1, 1)
    message = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu."
    cluster.core.patch_namespaced_pod_status(
        pod["metadata"]["name"],
        cluster.namespace,
        {
            "status": {
                "conditions": [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "reason": "Unschedulable",
                        "message": message,
                    }
                ]
            }
        },
        _content_type="application/merge-patch+json",
    )
    job = wait_for(
        lambda: (
            (j := cluster.job("big")) and condition(j, "Running")["reason"] == "Unschedulable" and j
        ),
        what="Unschedulable",
    )
    assert condition(job, "Running")["message"].startswith(message)


def test_scale_many_jobs(cluster: Cluster, emulator, tmp_path: Path, operator_process) -> None:
    """Many jobs at once all get plans and pods (the benchmark with 200 is in bench/)."""
    for index in range(20):
        cluster.create_job(tiny_job(f"many-{index}"))
    wait_for(
        lambda: len([p for p in cluster.pods() if p["metadata"]["name"].startswith("many-")]) == 20,
        60,
        "20 jobs' pods",
    )
    assert all(j["status"].get("plan") for j in cluster.jobs())


def test_metrics_and_liveness_are_served(cluster: Cluster, operator_process) -> None:
    import urllib.request

    from operator_harness import LIVENESS_PORT, METRICS_PORT

    cluster.create_job(tiny_job("scraped"))
    wait_pods(cluster, "scraped", 1, 1)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as r:
            return r.read().decode()

    def phase_count(text: str, phase: str) -> float:
        match = re.search(rf'^sftjob_jobs{{phase="{phase}"}} (\S+)$', text, flags=re.M)
        return float(match.group(1)) if match else -1.0

    text = wait_for(
        lambda: (t := scrape()) and phase_count(t, "Pending") >= 1 and t,
        what="a Pending job in the metrics",
    )
    assert re.search(r"^sftjob_reconcile_seconds_count (\d+)", text, flags=re.M)
    assert int(re.search(r"^sftjob_reconcile_seconds_count (\d+)", text, flags=re.M).group(1)) > 0
    with urllib.request.urlopen(f"http://127.0.0.1:{LIVENESS_PORT}/healthz", timeout=5) as r:
        assert r.status == 200


def _children_of(cluster: Cluster, job: str) -> dict[str, list[str]]:
    """Every ConfigMap, ServiceAccount, Role, RoleBinding, Service and Pod named for `job`."""
    import kubernetes

    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api)
    listers = {
        "ConfigMap": cluster.core.list_namespaced_config_map,
        "ServiceAccount": cluster.core.list_namespaced_service_account,
        "Service": cluster.core.list_namespaced_service,
        "Pod": cluster.core.list_namespaced_pod,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
    }
    found = {
        kind: [o.metadata.name for o in lister(cluster.namespace).items]
        for kind, lister in listers.items()
    }
    return {kind: [n for n in names if n.startswith(f"{job}-")] for kind, names in found.items()}


def _job_is_gone(cluster: Cluster, name: str) -> bool:
    import kubernetes

    try:
        cluster.job(name)
    except kubernetes.client.ApiException as exc:
        return exc.status == 404
    return False


def test_job_deleted_before_the_finalizer_lands_gets_no_children(
    cluster: Cluster, operator_process
) -> None:
    # Deleted after 0 to 0.9 s: some before Kopf sees them at all, some once their timer
    # runs but before Kopf's finalizer lands (those are the ghosts this guards against).
    # Without the guard, a few of 30 got a pod or children here (none of 9 did).
    # The operator must be watching already, or it never sees these jobs at all.
    cluster.create_job(tiny_job("warm"))
    wait_pods(cluster, "warm", 1, 1)
    names = [f"blink{i}" for i in range(30)]
    for i, name in enumerate(names):
        cluster.create_job(tiny_job(name))
        time.sleep((i % 10) * 0.1)
        cluster.delete_job(name)
    for name in names:
        wait_for(lambda name=name: _job_is_gone(cluster, name), what=f"{name} deleted")
    # Many ticks of the operator's 0.3 s timer: a ghost loop would have created by now.
    time.sleep(4)
    for name in names:
        assert _children_of(cluster, name) == {
            kind: []
            for kind in ("ConfigMap", "ServiceAccount", "Service", "Pod", "Role", "RoleBinding")
        }, name


def test_job_recreated_under_the_same_name_is_never_written_by_the_old_one(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("warm"))
    wait_pods(cluster, "warm", 1, 1)
    names = [f"again{i}" for i in range(3)]
    for name in names:
        cluster.create_job(tiny_job(name))  # 8 steps
        cluster.delete_job(name)
        wait_for(lambda name=name: _job_is_gone(cluster, name), what=f"{name} deleted")
        cluster.create_job(tiny_job(name, training={"numTrainEpochs": 2}))  # 16 steps
    for name in names:
        wait_pods(cluster, name, 1, 1)
    # Watch for a few seconds: the old job's plan (8 steps) or phase must never show up.
    deadline = time.monotonic() + 4
    seen: dict[str, set[tuple[object, object]]] = {name: set() for name in names}
    while time.monotonic() < deadline:
        for name in names:
            status = cluster.job(name).get("status") or {}
            seen[name].add(((status.get("plan") or {}).get("totalSteps"), status.get("phase")))
        time.sleep(0.1)
    for name in names:
        job = cluster.job(name)
        # The pods never run in this tier: the new job stays Pending with its own plan.
        assert seen[name] == {(16, "Pending")}, (name, seen[name])
        assert cluster.config(name)["plan"]["totalSteps"] == 16, name
        assert all(
            p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
            for p in cluster.pods(name)
        ), name


def test_a_pass_over_a_stale_body_creates_and_writes_nothing(
    cluster: Cluster, operator_process
) -> None:
    """What a Kopf timer outliving its job runs each tick: `reconcile` on the cached body."""
    kube = Kube(cluster.api)
    settings = OperatorSettings(default_image="example.test/trainer:dev")
    deleted = cluster.create_job(tiny_job("stale"))
    cluster.delete_job("stale")
    wait_for(lambda: _job_is_gone(cluster, "stale"), what="stale deleted")
    outcome = asyncio.run(reconcile(deleted, kube, settings))
    assert _children_of(cluster, "stale") == {
        kind: []
        for kind in ("ConfigMap", "ServiceAccount", "Service", "Pod", "Role", "RoleBinding")
    }
    assert outcome.phase is None  # the job is gone: no phase to report

    # The same name re-created with another spec: the old body must not touch it.
    old = cluster.create_job(tiny_job("reborn"))  # 8 steps
    wait_pods(cluster, "reborn", 1, 1)
    cluster.delete_job("reborn")
    wait_for(lambda: _job_is_gone(cluster, "reborn"), what="reborn deleted")
    cluster.create_job(tiny_job("reborn", training={"numTrainEpochs": 2}))  # 16 steps
    new = wait_for(
        lambda: (j := cluster.job("reborn")).get("status", {}).get("plan") and j, what="new plan"
    )
    outcome = asyncio.run(reconcile(old, kube, settings))
    after = cluster.job("reborn")
    assert after["status"]["plan"]["totalSteps"] == 16
    assert after["status"]["phase"] == new["status"]["phase"]
    assert outcome.phase is None
