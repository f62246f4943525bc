"""Helpers shared by the local-node tests (Pod builders and waits)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import kubernetes
from kubernetes.client import CoreV1Api


def py_pod(
    name: str,
    code: str,
    *args: str,
    restart: str = "Never",
    env: list[dict[str, Any]] | None = None,
    **container: Any,
) -> dict[str, Any]:
    """A Pod whose single container runs `python -c code args...`."""
    c: dict[str, Any] = {
        "name": "main",
        "image": "example.invalid/never-pulled:1",
        "command": ["python", "-c", code, *args],
    }
    if env:
        c["env"] = env
    c.update(container)
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": {"app": name}},
        "spec": {"restartPolicy": restart, "containers": [c]},
    }


def ensure_claim(core: CoreV1Api, ns: str, name: str) -> None:
    """A PersistentVolumeClaim `name` in `ns`: the scheduler keeps a pod whose claim is
    missing Pending, as kube-scheduler's VolumeBinding does."""
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    try:
        core.create_namespaced_persistent_volume_claim(ns, claim)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise


def wait_for(
    fn: Callable[[], Any], timeout: float = 15, interval: float = 0.05, what: str = ""
) -> Any:
    """Poll `fn` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out waiting for {what or fn}: last={last!r}")


def wait_phase(core: CoreV1Api, ns: str, name: str, *phases: str, timeout: float = 15) -> Any:
    def check() -> Any:
        pod = core.read_namespaced_pod(name, ns)
        return pod if pod.status and pod.status.phase in phases else None

    try:
        return wait_for(check, timeout, what=f"pod {ns}/{name} in {phases}")
    except AssertionError:
        pod = core.read_namespaced_pod(name, ns)
        raise AssertionError(f"pod {ns}/{name} not in {phases}: {pod.status}") from None


def pod_gone(core: CoreV1Api, ns: str, name: str) -> bool:
    try:
        core.read_namespaced_pod(name, ns)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


def alive(pid: int) -> bool:
    """Whether a process still exists and is not a zombie (an orphan killed by
    the node is reparented to init, which reaps it a moment later)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")
