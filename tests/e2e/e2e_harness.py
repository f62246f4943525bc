"""Helpers for the end-to-end tier: one cluster, driven only through kubectl.

The same `E2ECluster` serves both modes:
- local: a `DemoEnvironment` (API emulator + local node + operator process) in a tmp
  folder; `local` is the environment, so tests can also look at host processes and at
  the folders that back PersistentVolumeClaims;
- real: an existing cluster given by a kubeconfig (see conftest.py); `local` is None.

Everything a test asserts on goes through kubectl (the SFTJob status, pods, pod logs),
so the assertions are the same in both modes.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "deploy" / "examples"
DATA_CLAIM = "sftjob-demo-data"
LABEL_JOB = "sftjob.dev/job-name"
LABEL_E2E = "sftjob.dev/e2e-run"
# Where deploy/base/operator.yaml runs the operator, and its metrics port's name.
OPERATOR_NAMESPACE = os.environ.get("SFTJOB_E2E_OPERATOR_NAMESPACE", "sftjob-system")
OPERATOR_SELECTOR = "app.kubernetes.io/name=sftjob-operator"
OPERATOR_METRICS_PORT = "metrics"
T = TypeVar("T")


def wait_for(check: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll `check` until it returns something truthy; AssertionError counts as not yet."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except AssertionError as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f}s waiting for {what}; last: {last!r}"
            )
        time.sleep(interval)


# Where free_port looks: above the local node's rendezvous ports (trainer_config.main_port,
# 20000-29999) and below Linux's ephemeral range (32768-60999). A port handed out by the
# kernel (bind to 0) is in the ephemeral range, where any outgoing connection made before
# the operator binds it (kubectl, the pods) may take it as its own local port: the
# operator's metrics server then cannot listen there.
LISTEN_PORTS = range(30000, 32768)


def free_port() -> int:
    """A port free on this host now that no outgoing connection will take before the
    operator binds it a moment later."""
    import random

    for port in random.sample(LISTEN_PORTS, len(LISTEN_PORTS)):
        with socket.socket() as probe:
            try:
                probe.bind(("0.0.0.0", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {LISTEN_PORTS}")


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep merge; a None value removes the key."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def condition(status: dict[str, Any], ctype: str) -> dict[str, Any]:
    """The condition of type `ctype` in an SFTJob status ({} if absent)."""
    for item in status.get("conditions") or []:
        if item.get("type") == ctype:
            return dict(item)
    return {}


def terminated(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
    return {}


def termination_report(pod: dict[str, Any]) -> dict[str, Any]:
    """The trainer's JSON summary from the pod's termination message ({} if none)."""
    message = str(terminated(pod).get("message") or "")
    try:
        report = json.loads(message)
    except ValueError:
        return {}
    return report if isinstance(report, dict) else {}


def processes_matching(fragment: str) -> list[tuple[int, str]]:
    """Host processes whose command line contains `fragment` (local mode only)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
        if fragment in cmdline and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


class E2ECluster:
    """One namespace of a cluster with the operator running, driven through kubectl."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        *,
        local: Any = None,
        image: str | None = None,
        storage_class: str | None = None,
        timeout_scale: float = 1.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.namespace = namespace
        self.local = local
        self.image = image
        self.storage_class = storage_class
        self.timeout_scale = timeout_scale
        # A letter first: a hex id like "12e45" is a number to kubectl's YAML parser, and
        # label values must be strings.
        self.run_id = "r" + uuid.uuid4().hex[:5]
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig)}

    # ------------------------------------------------------------------ kubectl

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", "-n", self.namespace, *args],
            env=self.env,
            capture_output=True,
            text=True,
            input=stdin,
            timeout=120,
        )

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        if result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr.strip()}")
        return result.stdout

    def get_json(self, *args: str) -> dict[str, Any]:
        return dict(json.loads(self.kubectl("get", *args, "-o", "json")))

    def apply(self, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        return self.run("apply", "-f", "-", stdin=yaml.safe_dump(obj))

    def seconds(self, local_seconds: float) -> float:
        """A timeout: generous on the local node, scaled for real clusters (image pulls)."""
        return local_seconds * self.timeout_scale

    # ------------------------------------------------------------------ jobs

    def name(self, base: str) -> str:
        return f"{base}-{self.run_id}"

    def job_manifest(
        self, example: str, name: str, overrides: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """An example of deploy/examples, renamed, with its own output claim and `overrides`."""
        job = yaml.safe_load((EXAMPLES / example).read_text())
        job["metadata"] = {
            "name": name,
            "namespace": self.namespace,
            "labels": {LABEL_E2E: self.run_id},
        }
        job["spec"]["output"] = {"claimName": f"{name}-output"}
        if self.image:
            job["spec"]["image"] = self.image
        return merge(job, overrides or {})

    def create_output_claim(self, job: dict[str, Any]) -> None:
        claim = (job["spec"].get("output") or {}).get("claimName")
        if not claim:
            return
        spec: dict[str, Any] = {
            # Every rank mounts the output claim; rank 0 writes checkpoints and the model.
            "accessModes": ["ReadWriteMany"],
            "resources": {"requests": {"storage": "1Gi"}},
        }
        if self.storage_class:
            spec["storageClassName"] = self.storage_class
        pvc = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {
                "name": claim,
                "namespace": self.namespace,
                "labels": {LABEL_E2E: self.run_id},
            },
            "spec": spec,
        }
        result = self.apply(pvc)
        assert result.returncode == 0, result.stderr

    def submit(self, job: dict[str, Any]) -> str:
        self.create_output_claim(job)
        result = self.apply(job)
        assert result.returncode == 0, f"kubectl apply failed: {result.stderr}"
        return str(job["metadata"]["name"])

    def job(self, name: str) -> dict[str, Any]:
        return self.get_json("sftjob", name)

    def status(self, name: str) -> dict[str, Any]:
        return dict(self.job(name).get("status") or {})

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.kubectl("patch", "sftjob", name, "--type", "merge", "-p", json.dumps({"spec": spec}))

    def pods(self, name: str) -> list[dict[str, Any]]:
        items = self.get_json("pods", "-l", f"{LABEL_JOB}={name}")["items"]
        return sorted(items, key=lambda p: p["metadata"]["name"])

    def pod_names(self, name: str) -> list[str]:
        return [p["metadata"]["name"] for p in self.pods(name)]

    def pod(self, pod_name: str) -> dict[str, Any]:
        return self.get_json("pod", pod_name)

    def logs(self, pod_name: str) -> str:
        return self.kubectl("logs", pod_name)

    def exists(self, kind: str, name: str) -> bool:
        result = self.run("get", kind, name, "-o", "name")
        if result.returncode == 0:
            return True
        assert "NotFound" in result.stderr or "not found" in result.stderr, result.stderr
        return False

    def describe(self, name: str) -> str:
        """Status, pods and log tails: what a failed wait shows."""
        lines = []
        try:
            status = self.status(name)
            lines.append("status: " + json.dumps(status, indent=1, sort_keys=True))
        except AssertionError as exc:
            lines.append(f"job: {exc}")
        try:
            for pod in self.pods(name):
                pod_name = pod["metadata"]["name"]
                phase = (pod.get("status") or {}).get("phase")
                lines.append(f"pod {pod_name} {phase} {terminated(pod)}")
                result = self.run("logs", pod_name, "--tail", "15")
                lines.append(result.stdout[-3000:])
        except AssertionError as exc:
            lines.append(f"pods: {exc}")
        return "\n".join(lines)

    def wait_job(
        self,
        name: str,
        check: Callable[[dict[str, Any]], Any],
        timeout: float,
        what: str,
        interval: float = 0.5,
    ) -> dict[str, Any]:
        """Wait until `check(status)` is truthy; returns that status."""
        seen: dict[str, Any] = {}

        def probe() -> bool:
            seen.clear()
            seen.update(self.status(name))
            return bool(check(seen))

        try:
            wait_for(probe, self.seconds(timeout), f"{name}: {what}", interval)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.describe(name)}") from None
        return dict(seen)

    def wait_phase(self, name: str, phase: str, timeout: float) -> dict[str, Any]:
        def done(status: dict[str, Any]) -> bool:
            current = status.get("phase")
            if current in ("Succeeded", "Failed") and current != phase:
                raise AssertionError(f"{name} ended {current}, expected {phase}")
            return current == phase

        try:
            return self.wait_job(name, done, timeout, f"phase {phase}")
        except AssertionError as exc:
            if "ended" in str(exc).splitlines()[0]:
                raise AssertionError(f"{exc}\n{self.describe(name)}") from None
            raise

    def wait_step(self, name: str, step: int, timeout: float) -> dict[str, Any]:
        return self.wait_job(
            name,
            lambda s: ((s.get("progress") or {}).get("step") or 0) >= step,
            timeout,
            f"progress.step >= {step}",
            interval=0.25,
        )

    def wait_no_pods(self, name: str, timeout: float) -> None:
        wait_for(
            lambda: not self.pod_names(name),
            self.seconds(timeout),
            f"the pods of {name} to be gone",
        )

    def output_dir(self, name: str) -> Path | None:
        """The folder backing the job's output claim (local mode only)."""
        if self.local is None:
            return None
        return Path(self.local.data_dir(f"{name}-output"))

    def operator_metrics(self) -> str:
        """The operator's /metrics page: on the local control plane from its metrics port
        (DemoEnvironment(metrics_port=...)); on a real cluster through the API server's
        proxy to each running pod of the operator Deployment (deploy/base/operator.yaml,
        port `metrics`), which needs `get` on pods/proxy in its namespace."""
        if self.local is not None:
            url = f"http://127.0.0.1:{self.local.metrics_port}/metrics"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return str(reply.read().decode())
        pods = self.get_json(
            "pods", "-n", OPERATOR_NAMESPACE, "-l", OPERATOR_SELECTOR, "--field-selector",
            "status.phase=Running",
        )["items"]  # fmt: skip
        assert pods, f"no running operator pod ({OPERATOR_SELECTOR}) in {OPERATOR_NAMESPACE}"
        pages = []
        for pod in pods:  # only the active replica (Kopf peering) has the jobs' series
            # The pod proxy takes a port number, not its name.
            port = next(
                p["containerPort"]
                for c in pod["spec"]["containers"]
                for p in c.get("ports") or []
                if p.get("name") == OPERATOR_METRICS_PORT
            )
            path = f"/api/v1/namespaces/{OPERATOR_NAMESPACE}/pods/{pod['metadata']['name']}"
            pages.append(self.kubectl("get", "--raw", f"{path}:{port}/proxy/metrics"))
        return "".join(pages)

    def cleanup(self) -> None:
        """Delete what this run created (jobs, then output claims): for real clusters."""
        self.run("delete", "sftjobs", "-l", f"{LABEL_E2E}={self.run_id}", "--wait=false")
        self.run("delete", "pvc", "-l", f"{LABEL_E2E}={self.run_id}", "--wait=false")
