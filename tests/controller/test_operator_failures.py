"""Failure classes end to end: the real trainer's report, through the pod status, to the job.

The test plays the kubelet: it runs the real trainer (`python -m sftjob_trainer`, the
pod's command) on the config the operator put in the job's ConfigMap, with the paths a
node would mount (SFTJOB_MODEL_PATH / SFTJOB_DATASET_PATH, as the local node sets them),
and copies the process's exit code and termination log into the pod's status, as a
kubelet does with terminationMessagePath. Issue 19, defects 8 and 9.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from operator_harness import Cluster, condition, tiny_job, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(180)]

HUB_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def wait_phase(cluster: Cluster, name: str, phase: str, timeout: float = 30) -> dict[str, Any]:
    return wait_for(
        lambda: (
            (job := cluster.job(name)) and (job.get("status") or {}).get("phase") == phase and job
        ),
        timeout,
        f"{name} phase {phase}",
    )


def wait_pods(cluster: Cluster, name: str, count: int, attempt: int, timeout: float = 30) -> list:
    def ready() -> list[dict[str, Any]] | None:
        pods = [
            p
            for p in cluster.live_pods(name)
            if p["metadata"]["labels"]["sftjob.dev/attempt"] == str(attempt)
        ]
        return pods if len(pods) == count else None

    return wait_for(ready, timeout, f"{count} pods of attempt {attempt} for {name}")


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A real tiny model and chat dataset: what the pod's volumes would hold."""
    from sftjob_trainer.tiny import build_tiny_model, write_tiny_datasets

    root = tmp_path_factory.mktemp("tiny")
    return {
        "model": build_tiny_model(root / "model"),
        "chat": write_tiny_datasets(root / "data")["chat"],
    }


def run_trainer_as_kubelet(
    cluster: Cluster,
    job: str,
    pod: dict[str, Any],
    workdir: Path,
    env: dict[str, str],
) -> dict[str, Any]:
    """Run the pod's command on the job's ConfigMap and report its end in the pod status."""
    config = workdir / "config.json"
    config.write_text(json.dumps(cluster.config(job)))
    log = workdir / "termination-log"
    run_env = {k: v for k, v in os.environ.items() if k not in HUB_OFFLINE_VARIABLES}
    run_env.update(env, SFTJOB_TERMINATION_LOG=str(log), HF_HOME=str(workdir / "hf-home"))
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=150,
    )
    assert log.is_file(), result.stderr[-3000:]
    cluster.set_pod(
        pod["metadata"]["name"], "Failed", exit_code=result.returncode, message=log.read_text()
    )
    return {"code": result.returncode, **json.loads(log.read_text())}


class DroppingHub(http.server.BaseHTTPRequestHandler):
    """A hub whose connections break: every request is closed without an answer."""

    def log_message(self, *args: Any) -> None:
        pass

    def drop(self) -> None:
        self.connection.shutdown(socket.SHUT_RDWR)
        self.connection.close()

    do_GET = do_HEAD = drop


@pytest.fixture
def dropping_hub() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), DroppingHub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_config_error_from_the_real_trainer_fails_at_once_without_restarts(
    cluster: Cluster, operator_process, tiny_files: dict[str, Path], tmp_path: Path
) -> None:
    # seed -1 passes the CRD; numpy refuses it when the Trainer seeds. It used to be an
    # InternalError after the model had loaded, relaunched maxRestarts times.
    cluster.create_job(tiny_job("seed", training={"seed": -1}, retry={"maxRestarts": 3}))
    [pod] = wait_pods(cluster, "seed", 1, 1)
    report = run_trainer_as_kubelet(
        cluster,
        "seed",
        pod,
        tmp_path,
        {
            "SFTJOB_MODEL_PATH": str(tiny_files["model"]),
            "SFTJOB_DATASET_PATH": str(tiny_files["chat"]),
        },
    )
    assert (report["code"], report["reason"]) == (12, "ConfigError"), report
    job = wait_phase(cluster, "seed", "Failed")
    failed = condition(job, "Failed")
    assert failed is not None and failed["reason"] == "ConfigError"
    assert "spec.training.seed is -1" in failed["message"]
    assert job["status"].get("restarts", 0) == 0
    assert job["status"]["lastFailure"]["reason"] == "ConfigError"
    time.sleep(1.5)  # several reconcile passes (every 0.3 s here): no relaunch may follow
    assert cluster.job("seed")["status"]["phase"] == "Failed"
    assert [p["metadata"]["labels"]["sftjob.dev/attempt"] for p in cluster.pods("seed")] == ["1"]


def test_network_failure_from_the_real_trainer_is_relaunched_with_a_backoff(
    cluster: Cluster, operator_process, dropping_hub: str, tmp_path: Path
) -> None:
    manifest = tiny_job("blip", retry={"maxRestarts": 2})
    manifest["spec"]["dataset"] = {"name": "someone/some-data", "limit": 64}
    cluster.create_job(manifest)
    [pod] = wait_pods(cluster, "blip", 1, 1)
    report = run_trainer_as_kubelet(cluster, "blip", pod, tmp_path, {"HF_ENDPOINT": dropping_hub})
    assert (report["code"], report["reason"]) == (15, "NetworkError"), report

    def restarting() -> dict[str, Any] | None:
        job = cluster.job("blip")
        return job if (job.get("status") or {}).get("restarts") == 1 else None

    job = wait_for(restarting, 30, "one restart")
    assert job["status"]["lastFailure"]["reason"] == "NetworkError"
    assert job["status"]["phase"] == "Restarting"
    restart = condition(job, "Restarting")
    assert restart is not None and restart["reason"] == "NetworkError"
    assert "restart 1/2" in restart["message"] and "relaunching in 10s" in restart["message"]
    # The new attempt comes (no shrink: same batch).
    wait_pods(cluster, "blip", 1, 2, timeout=40)
    assert "effectiveTraining" not in cluster.job("blip")["status"]


def test_relaunch_of_a_transient_class_waits_for_its_backoff(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("later"))
    [pod] = wait_pods(cluster, "later", 1, 1)
    cluster.fail_pod(pod["metadata"]["name"], "NetworkError", "hub answered 503")
    [relaunched] = wait_pods(cluster, "later", 1, 2, timeout=40)
    failed_at = cluster.job("later")["status"]["lastFailure"]["time"]
    waited = datetime.fromisoformat(
        relaunched["metadata"]["creationTimestamp"].replace("Z", "+00:00")
    ) - datetime.fromisoformat(failed_at.replace("Z", "+00:00"))
    assert waited.total_seconds() >= 10 - 1  # timestamps have one-second resolution


def test_rank_one_oom_beats_rank_zero_nccl_error_and_shrinks(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("pair", resources={"nodes": 2}))
    r0, r1 = wait_pods(cluster, "pair", 2, 1)
    # Both ranks end before the operator looks again (as when a kubelet reports both within
    # one resync): hold the operator still while the two statuses land.
    os.kill(operator_process.pid, signal.SIGSTOP)
    try:
        cluster.fail_pod(
            r0["metadata"]["name"],
            "InternalError",
            "DistBackendError: NCCL error: remote process exited or there was a network error",
        )
        cluster.fail_pod(r1["metadata"]["name"], "OutOfMemory", "CUDA out of memory")
    finally:
        os.kill(operator_process.pid, signal.SIGCONT)
    wait_pods(cluster, "pair", 2, 2)
    job = cluster.job("pair")
    assert job["status"]["lastFailure"]["reason"] == "OutOfMemory"
    assert job["status"]["effectiveTraining"] == {
        "perDeviceTrainBatchSize": 2,
        "gradientAccumulationSteps": 4,
    }
    restart = condition(job, "Restarting")
    assert restart is not None and restart["reason"] == "OutOfMemoryShrink"
