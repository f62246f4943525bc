"""Both install modes of deploy/overlays, applied with kubectl to a fresh API emulator, and the
operator run as the overlay's ServiceAccount (a token from `kubectl create token`) with the
overlay's own arguments and environment, so the RBAC is the one a cluster would enforce.

Namespaced: the operator reconciles a job in a listed namespace, leaves a job in another
namespace alone, may not create pods there (the API answers 403), and every request it makes
outside its namespaces is a read of a cluster-scoped kind. Cluster: the operator works in
any namespace. No training: a job's pods are created and stay Pending (no node runs here).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from sftjob_local.emulator import EmulatorThread
from test_kubectl_deploy import REPO, Kubectl

pytestmark = [pytest.mark.local, pytest.mark.timeout(120)]

ACCOUNT_USER = "system:serviceaccount:sftjob-system:sftjob-operator"
GROUP, VERSION = "tuning.sftjob.dev", "v1alpha1"


@dataclass
class Install:
    kubectl: Kubectl
    server: EmulatorThread
    workdir: Path
    # (method, path, query) of every request the operator's ServiceAccount made
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)

    def as_operator(self) -> Kubectl:
        """kubectl authenticated as the operator's ServiceAccount."""
        token = self.kubectl("create", "token", "sftjob-operator", "-n", "sftjob-system")
        kubeconfig = self.server.write_kubeconfig(
            self.workdir / "operator-kubeconfig", "sftjob-system", token=token.stdout.strip()
        )
        return Kubectl(self.server, kubeconfig, self.workdir / "operator-cache")


@pytest.fixture
def install(tmp_path: Path) -> Iterator[Install]:
    with EmulatorThread(log_dir=tmp_path / "logs") as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        setup = Install(Kubectl(server, kubeconfig, tmp_path / "cache"), server, tmp_path)
        assert server.emulator is not None

        def observe(user: str, method: str, path: str, query: Any) -> None:
            if user == ACCOUNT_USER:
                setup.requests.append((method, path, dict(query)))

        server.emulator.request_observers.append(observe)
        yield setup


def rendered_operator(overlay: str) -> tuple[list[str], dict[str, str]]:
    """The operator container's args and literal env, as the overlay renders them."""
    text = subprocess.run(
        ["kubectl", "kustomize", str(REPO / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (deployment,) = [d for d in yaml.safe_load_all(text) if d and d["kind"] == "Deployment"]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    return list(container["args"]), env


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
def run_operator(install: Install) -> Iterator[Callable[[str], subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    log_path = install.workdir / "operator.log"

    def start(overlay: str) -> subprocess.Popen[bytes]:
        args, env = rendered_operator(overlay)
        # The Deployment's liveness endpoint, on a free loopback port instead of 0.0.0.0:8080.
        args = [a for a in args if not a.startswith("--liveness=")]
        args.append(f"--liveness=http://127.0.0.1:{free_port()}/healthz")
        operator_kubeconfig = install.as_operator().env["KUBECONFIG"]
        process = subprocess.Popen(
            [sys.executable, "-m", "sftjob_operator.cli", *args],
            env={
                **os.environ,
                **{k: v for k, v in env.items() if k != "SFTJOB_METRICS_PORT"},
                "KUBECONFIG": operator_kubeconfig,
                "SFTJOB_TRAINER_IMAGE": "example.test/trainer:dev",
                "POD_ID": "sftjob-operator-test",
            },
            stdout=log_path.open("wb"),
            stderr=subprocess.STDOUT,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    if log_path.exists():
        print(log_path.read_text()[-4000:])


def tiny_job(name: str, namespace: str) -> str:
    job = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"path": "/data/tiny-model"},
            "dataset": {"path": "/data/chat.jsonl", "limit": 64},
            "method": "full",
            "resources": {"nodes": 1, "gpusPerNode": 0},
        },
    }
    return json.dumps(job)


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def job_pods(kubectl: Kubectl, name: str, namespace: str) -> list[str]:
    out = kubectl(
        "get", "pods", "-n", namespace, "-l", f"sftjob.dev/job-name={name}", "-o", "name"
    ).stdout
    return out.split()


def job_status(kubectl: Kubectl, name: str, namespace: str) -> dict[str, Any]:
    out = kubectl("get", "sftjob", name, "-n", namespace, "-o", "json").stdout
    return dict(json.loads(out).get("status") or {})


def can_i(kubectl: Kubectl, command: str) -> str:
    result = kubectl("auth", "can-i", *shlex.split(command), check=False)
    return result.stdout.strip()


def resource_of(path: str) -> tuple[str | None, str] | None:
    """(namespace or None, plural) of a resource URL; None for discovery and the like."""
    parts = urllib.parse.urlsplit(path).path.strip("/").split("/")
    rest = parts[2:] if parts[0] == "api" else parts[3:] if parts[0] == "apis" else []
    if not rest:
        return None
    if rest[0] == "namespaces" and len(rest) >= 3:
        return rest[1], rest[2]
    return None, rest[0]


def test_namespaced_overlay_confines_the_operator_to_its_namespaces(
    install: Install, run_operator: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    kubectl = install.kubectl
    kubectl("create", "namespace", "elsewhere")
    # The README's install-mode commands (For platform teams), as written.
    for command in (
        "kubectl create namespace team-a",
        "kubectl create namespace team-b",
        "kubectl apply -k deploy/overlays/namespaced",
    ):
        applied = kubectl(*shlex.split(command)[1:])
    assert "role.rbac.authorization.k8s.io/sftjob-operator created" in applied.stdout
    assert "kopfpeering.kopf.dev/sftjob-operator created" in applied.stdout

    operator = install.as_operator()
    for namespace in ("team-a", "team-b"):
        assert can_i(operator, f"create pods -n {namespace}") == "yes"
    assert can_i(operator, "create pods -n elsewhere") == "no"
    assert can_i(operator, "create pods --all-namespaces") == "no"
    for kind in ("configmaps", "services", "secrets", "events", "roles", "sftjobs"):
        assert can_i(operator, f"create {kind} --all-namespaces") == "no", kind
    assert can_i(operator, "list namespaces") == "yes"
    # The API itself refuses the operator's identity a pod outside its namespaces.
    pod = '{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "probe"}, '
    pod += '"spec": {"containers": [{"name": "c", "image": "busybox"}]}}'
    refused = operator("create", "-n", "elsewhere", "-f", "-", stdin=pod, check=False)
    assert refused.returncode != 0
    assert (
        f'pods is forbidden: User "{ACCOUNT_USER}" cannot create resource "pods" in API group "" '
        'in the namespace "elsewhere"'
    ) in refused.stderr

    kubectl("apply", "-f", "-", stdin=tiny_job("outside", "elsewhere"))
    kubectl("apply", "-f", "-", stdin=tiny_job("inside", "team-b"))
    install.requests.clear()  # from here on, the operator's own requests only
    process = run_operator("namespaced")
    wait_for(lambda: job_pods(kubectl, "inside", "team-b"), 60, "the team-b job's pod")
    wait_for(lambda: job_status(kubectl, "inside", "team-b").get("phase"), 30, "a status")
    assert process.poll() is None, "the operator exited"
    # The job in an unlisted namespace got nothing: no status, no pods.
    assert job_status(kubectl, "outside", "elsewhere") == {}
    assert job_pods(kubectl, "outside", "elsewhere") == []

    log = (install.workdir / "operator.log").read_text()
    assert "Forbidden" not in log and " 403" not in log, log[-3000:]
    assert "Not enough permissions" not in log, log[-3000:]  # Kopf's fallbacks on a 403
    touched = [(m, resource_of(p)) for m, p, _ in install.requests if resource_of(p)]
    written = {where for method, where in touched if method != "GET"}
    assert written, "the operator wrote nothing"
    assert {namespace for namespace, _ in written} <= {"team-a", "team-b"}, written
    # Outside its namespaces: only reads (list, watch, get) of the cluster-scoped kinds.
    cluster_wide = {(m, where[1]) for m, where in touched if where and where[0] is None}
    assert cluster_wide, "Kopf lists namespaces and CRDs when given namespaces"
    assert cluster_wide <= {
        ("GET", kind) for kind in ("namespaces", "customresourcedefinitions", "sftprofiles")
    }, cluster_wide


def test_cluster_overlay_works_in_any_namespace(
    install: Install, run_operator: Callable[[str], subprocess.Popen[bytes]]
) -> None:
    kubectl = install.kubectl
    kubectl("create", "namespace", "anywhere")
    kubectl(*shlex.split("kubectl apply -k deploy/overlays/cluster")[1:])
    operator = install.as_operator()
    assert can_i(operator, "create pods -n anywhere") == "yes"
    assert can_i(operator, "create pods --all-namespaces") == "yes"

    kubectl("apply", "-f", "-", stdin=tiny_job("tiny", "anywhere"))
    process = run_operator("cluster")
    wait_for(lambda: job_pods(kubectl, "tiny", "anywhere"), 60, "the job's pod")
    assert process.poll() is None, "the operator exited"
    log = (install.workdir / "operator.log").read_text()
    assert "Forbidden" not in log, log[-3000:]
