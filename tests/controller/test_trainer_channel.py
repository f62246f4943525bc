"""The trainer's channel to the status, exercised with the trainer's real token.

The operator creates a ServiceAccount `<job>-trainer` per job; its pods get a token of it
from the TokenRequest API, as a kubelet asks for one (sftjob_local/node_sa.py). That token
must not be able to write what the operator acts on (phase, restarts, attempts,
conditions) nor anything else of the SFTJob; it may write the job's progress ConfigMap,
whose report the operator validates and copies into status.progress / measuredPlan.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client import ApiException
from operator_harness import GROUP, MERGE, PLURAL, VERSION, Cluster, tiny_job, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def trainer_client(cluster: Cluster, job: str, pod: dict[str, Any], folder: Path) -> Any:
    """An API client holding the token a kubelet would mount into `pod`."""
    request = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "expirationSeconds": 3607,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": pod["metadata"]["name"],
                "uid": pod["metadata"]["uid"],
            },
        },
    }
    issued = cluster.core.create_namespaced_service_account_token(
        f"{job}-trainer", cluster.namespace, request
    )
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    for user in config["users"]:
        user["user"] = {"token": issued.status.token}
    path = folder / "trainer-kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return kubernetes.config.new_client_from_config(str(path))


def refused(call: Callable[[], Any]) -> int:
    try:
        call()
    except ApiException as exc:
        return int(exc.status)
    return 200


def test_trainer_token_cannot_write_the_status_only_its_progress(
    cluster: Cluster, operator_process, tmp_path: Path
) -> None:
    name = "channel"
    cluster.create_job(tiny_job(name))
    pod = wait_for(lambda: cluster.live_pods(name), what="the trainer pod")[0]
    cluster.set_pod(pod["metadata"]["name"], "Running")
    job = wait_for(
        lambda: (j := cluster.job(name)).get("status", {}).get("phase") == "Running" and j,
        what=f"{name} Running",
    )
    uid = job["metadata"]["uid"]
    trainer = trainer_client(cluster, name, pod, tmp_path)
    as_trainer = kubernetes.client.CustomObjectsApi(trainer)
    trainer_core = kubernetes.client.CoreV1Api(trainer)

    def patch_status(status: dict[str, Any]) -> Callable[[], Any]:
        return lambda: as_trainer.patch_namespaced_custom_object_status(
            GROUP, VERSION, cluster.namespace, PLURAL, name, {"status": status},
            _content_type=MERGE,
        )  # fmt: skip

    # Nothing the operator acts on, in any shape of request.
    forged = {
        "phase": {"phase": "Succeeded"},
        "restarts": {"restarts": 99},
        "attempts": {"attempts": 7},
        "conditions": {"conditions": [{"type": "Succeeded", "status": "True", "reason": "X"}]},
        "progress": {"progress": {"step": 8}},
    }
    for field, status in forged.items():
        assert refused(patch_status(status)) == 403, f"the trainer could patch status.{field}"
    # Nor anything else of the job: its spec, metadata, the job itself, or reading it.
    assert refused(
        lambda: as_trainer.patch_namespaced_custom_object(
            GROUP, VERSION, cluster.namespace, PLURAL, name,
            {"metadata": {"labels": {"forged": "yes"}}, "spec": {"suspend": True}},
            _content_type=MERGE,
        )
    ) == 403  # fmt: skip
    assert (
        refused(
            lambda: as_trainer.replace_namespaced_custom_object_status(
                GROUP, VERSION, cluster.namespace, PLURAL, name, job
            )
        )
        == 403
    )
    assert (
        refused(
            lambda: as_trainer.delete_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, PLURAL, name
            )
        )
        == 403
    )
    assert (
        refused(
            lambda: as_trainer.get_namespaced_custom_object(
                GROUP, VERSION, cluster.namespace, PLURAL, name
            )
        )
        == 403
    )
    # Nor the config the pods read (the run's batch sizes), nor any other ConfigMap.
    assert (
        refused(
            lambda: trainer_core.patch_namespaced_config_map(
                f"{name}-config", cluster.namespace, {"data": {"config.json": "{}"}},
                _content_type=MERGE,
            )
        )
        == 403
    )  # fmt: skip
    assert refused(lambda: trainer_core.list_namespaced_config_map(cluster.namespace)) == 403

    # Its own channel: the progress ConfigMap, with a forged phase inside and beside the report.
    progress = {
        "step": 3,
        "totalSteps": 8,
        "percent": 37.5,
        "loss": 1.2345678,
        "summary": "3/8",
        "etaSeconds": 100,
        "eta": "1m40s",
        "updateTime": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "phase": "Succeeded",
    }
    plan = {
        "worldSize": 1,
        "effectiveBatchSize": 8,
        "perDeviceTrainBatchSize": 4,
        "gradientAccumulationSteps": 2,
        "datasetSize": 64,
        "datasetSizeSource": "measured",
        "totalSteps": 8,
        "measured": True,
    }
    speed = {
        "preset": "exact",
        "perDeviceTrainBatchSize": 4,
        "gradientAccumulationSteps": 2,
        "gradientCheckpointing": False,
        "attention": "sdpa",
        "compile": False,
        "levers": [
            {"name": "dataWorkers", "on": True, "reason": "2 DataLoader workers"},
            {"name": "compile", "on": False, "reason": "preset exact: it changes numbers"},
        ],
    }
    report = {
        "jobUid": uid,
        "attempt": "1",
        "progress": json.dumps(progress),
        "measuredPlan": json.dumps(plan),
        "speedPlan": json.dumps(speed),
        "phase": "Succeeded",
        "restarts": "0",
    }
    trainer_core.patch_namespaced_config_map(
        f"{name}-progress", cluster.namespace, {"data": report}, _content_type=MERGE
    )

    folded = wait_for(
        lambda: (s := cluster.job(name)["status"]).get("progress", {}).get("step") == 3 and s,
        what="the report folded into status.progress",
    )
    # The columns' texts are the operator's: step/total (percent), the loss rounded.
    assert folded["progress"]["summary"] == "3/8 (37%)"
    assert folded["progress"]["loss"] == 1.2345678 and folded["progress"]["lossDisplay"] == "1.235"
    assert folded["progress"]["eta"] == "1m40s"  # Running: the ETA shows
    header, row = kubectl_get_sft(cluster, name)
    assert header.split()[:6] == ["NAME", "PHASE", "PROGRESS", "EPOCH", "LOSS", "ETA"]
    assert "Running" in row and "3/8 (37%)" in row and " 1.235 " in row and "1m40s" in row
    assert "phase" not in folded["progress"]
    assert folded["measuredPlan"]["datasetSize"] == 64 and folded["measuredPlan"]["measured"]
    assert folded["speedPlan"] == speed  # what the pod runs, through the CRD's status schema
    # The forged phase went nowhere; what the operator owns is as it was.
    assert folded["phase"] == "Running"
    assert (folded["attempts"], folded.get("restarts", 0)) == (1, 0)
    assert not [c for c in folded["conditions"] if c["type"] in ("Succeeded", "Failed")]

    # A later report replaces the figures; one from another attempt is set aside.
    newer = {**progress, "step": 5, "summary": "5/8"}
    trainer_core.patch_namespaced_config_map(
        f"{name}-progress",
        cluster.namespace,
        {"data": {"progress": json.dumps(newer)}},
        _content_type=MERGE,
    )
    wait_for(
        lambda: cluster.job(name)["status"]["progress"]["step"] == 5,
        what="the newer report folded",
    )
    stale = {**progress, "step": 7, "summary": "7/8"}
    trainer_core.patch_namespaced_config_map(
        f"{name}-progress",
        cluster.namespace,
        {"data": {"attempt": "2", "progress": json.dumps(stale)}},
        _content_type=MERGE,
    )
    time.sleep(1.5)  # several passes of the operator (every 0.3 s here)
    assert cluster.job(name)["status"]["progress"]["step"] == 5
    # The operator's curve of the reports it saw, the set-aside one not among them.
    history = cluster.job(name)["status"]["progress"]["history"]
    assert [(point["step"], point["loss"]) for point in history] == [(3, 1.235), (5, 1.235)]

    # Suspended, the job keeps its progress but promises no time left (the report still has one).
    cluster.patch_job(name, {"spec": {"suspend": True}})
    wait_for(
        lambda: cluster.job(name)["status"].get("phase") == "Suspended", what="the job suspended"
    )
    time.sleep(1.0)  # several passes: none puts the report's ETA back
    suspended = cluster.job(name)["status"]
    assert suspended["progress"]["step"] == 5
    assert "eta" not in suspended["progress"] and "etaSeconds" not in suspended["progress"]
    _, row = kubectl_get_sft(cluster, name)
    assert "Suspended" in row and "5/8 (62%)" in row and "1m40s" not in row


def kubectl_get_sft(cluster: Cluster, name: str) -> tuple[str, str]:
    """The header and the job's row of the real `kubectl get sft` (the printer columns)."""
    result = subprocess.run(
        ["kubectl", "get", "sft", name, "-n", cluster.namespace],
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    header, row = result.stdout.splitlines()
    return header, row
