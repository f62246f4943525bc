"""The operator as a real process against the API emulator, over real HTTP.

These tests play the kubelet themselves: no node runs the pods, the test patches
each pod's status through the `/status` subresource (phase, exit code, the
trainer's termination message), so every lifecycle branch can be driven exactly.
The trainer-in-pods path is covered by the e2e tier.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
from kubernetes.client import ApiClient

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"
MERGE = "application/merge-patch+json"
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float = 20, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


class Cluster:
    """Small helpers over the `kubernetes` client for one test namespace."""

    def __init__(self, api: ApiClient, namespace: str, kubeconfig: Path):
        self.api = api
        self.namespace = namespace
        self.kubeconfig = kubeconfig
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)

    def plain(self, obj: Any) -> Any:
        return self.api.sanitize_for_serialization(obj)

    def create_job(self, manifest: dict[str, Any]) -> dict[str, Any]:
        body = {**manifest, "metadata": {**manifest["metadata"], "namespace": self.namespace}}
        return self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, body
        )

    def job(self, name: str) -> dict[str, Any]:
        return self.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name
        )

    def patch_job(self, name: str, patch: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, patch, _content_type=MERGE
        )

    def delete_job(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL, name)

    def jobs(self) -> list[dict[str, Any]]:
        return self.custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, PLURAL)[
            "items"
        ]

    def pods(self, job: str | None = None) -> list[dict[str, Any]]:
        selector = f"sftjob.dev/job-name={job}" if job else None
        items = self.core.list_namespaced_pod(self.namespace, label_selector=selector).items
        return sorted((self.plain(p) for p in items), key=lambda p: p["metadata"]["name"])

    def live_pods(self, job: str) -> list[dict[str, Any]]:
        return [p for p in self.pods(job) if not p["metadata"].get("deletionTimestamp")]

    def config(self, job: str) -> dict[str, Any]:
        import json

        cm = self.core.read_namespaced_config_map(f"{job}-config", self.namespace)
        return json.loads(cm.data["config.json"])

    def events(self, job: str) -> list[dict[str, Any]]:
        items = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={job}"
        ).items
        return [self.plain(e) for e in items]

    def set_pod(
        self,
        name: str,
        phase: str,
        *,
        exit_code: int | None = None,
        message: str = "",
        reason: str | None = None,
        pod_reason: str | None = None,
    ) -> None:
        """Act as the kubelet: report a phase (and a container exit) for one pod."""
        status: dict[str, Any] = {"phase": phase}
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        if phase == "Running":
            status["startTime"] = now
            status["containerStatuses"] = [
                {
                    "name": "trainer",
                    "ready": True,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {"running": {"startedAt": now}},
                }
            ]
        if phase in ("Succeeded", "Failed"):
            code = exit_code if exit_code is not None else (0 if phase == "Succeeded" else 1)
            status["containerStatuses"] = [
                {
                    "name": "trainer",
                    "ready": False,
                    "restartCount": 0,
                    "image": "x",
                    "imageID": "",
                    "state": {
                        "terminated": {
                            "exitCode": code,
                            "reason": reason or ("Completed" if code == 0 else "Error"),
                            "message": message,
                            "finishedAt": now,
                        }
                    },
                }
            ]
        if pod_reason:
            status["reason"] = pod_reason
        self.core.patch_namespaced_pod_status(
            name, self.namespace, {"status": status}, _content_type=MERGE
        )

    def fail_pod(self, name: str, reason: str, message: str = "boom", step: int = 3) -> None:
        import json

        report = json.dumps({"reason": reason, "message": message, "step": step})
        codes = {
            "OutOfMemory": 10,
            "DataError": 11,
            "ConfigError": 12,
            "ModelLoadError": 13,
            "Interrupted": 14,
        }
        self.set_pod(name, "Failed", exit_code=codes.get(reason, 1), message=report)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Where the session's operator serves its metrics and liveness probe.
METRICS_PORT = free_port()
LIVENESS_PORT = free_port()


def start_operator(
    kubeconfig: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The operator process; passes come from its watches (no fast resync: a test that needs
    a pass no event brings would hide a watch that misses changes)."""
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "SFTJOB_TRAINER_IMAGE": "example.test/trainer:dev",
        "SFTJOB_METRICS_PORT": str(METRICS_PORT),
        **(env or {}),
    }
    liveness = f"--liveness=http://127.0.0.1:{LIVENESS_PORT}/healthz"
    return subprocess.Popen(
        [sys.executable, "-m", "sftjob_operator.cli", "operator", "-A", "--standalone", liveness],
        env=env,
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )


def stop_operator(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def tiny_job(name: str, **spec_changes: Any) -> dict[str, Any]:
    """An SFTJob whose spec is valid; the pods never really run in this tier."""
    spec: dict[str, Any] = {
        "model": {"path": "/data/tiny-model"},
        "dataset": {"path": "/data/chat.jsonl", "limit": 64},
        "method": "full",
        "training": {
            "perDeviceTrainBatchSize": 4,
            "gradientAccumulationSteps": 2,
            "numTrainEpochs": 1,
            "learningRate": 2e-5,
        },
        "resources": {"nodes": 1, "gpusPerNode": 0},
    }
    for key, value in spec_changes.items():
        if isinstance(value, dict) and isinstance(spec.get(key), dict):
            spec[key] = {**spec[key], **value}
        else:
            spec[key] = value
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": spec,
    }


def condition(job: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for item in (job.get("status") or {}).get("conditions") or []:
        if item["type"] == kind:
            return item
    return None
