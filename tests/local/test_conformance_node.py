"""Conformance probes of what the node side shows: scheduler, kubelet, container runtime.

The same probes run against the local control plane with nodes (`LocalCluster`: the API emulator,
a `LocalNode` and the `LocalScheduler`, with a small explicit capacity so the scheduler's messages
are deterministic) or, with ``SFTJOB_E2E_KUBECONFIG``, against a real cluster in a throwaway
namespace. Pods run ``python -c ...``; the image is ``SFTJOB_E2E_PROBE_IMAGE`` (default
``python:3.12-slim``) so a real node can pull one with python; the local node only records it.

Paths a container uses (an emptyDir file, the service-account token) are passed as whole
arguments: the local node maps a container path to its real folder where it is a whole argument
(see node.py "Paths"), a real container sees it as is.

Waits are bounded: short locally, longer on a real cluster (image pulls, the kubelet's 10 s
restart back-off and its resync of a pod whose container config failed).
"""

from __future__ import annotations

import os
import re
import secrets
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from sftjob_local.cluster import LocalCluster

if TYPE_CHECKING:  # conftest is imported by path: another tier's conftest may be first
    from conftest import Cluster

pytestmark = [pytest.mark.local, pytest.mark.timeout(600)]

PROBE_IMAGE = os.environ.get("SFTJOB_E2E_PROBE_IMAGE", "python:3.12-slim")
SA_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
RBAC = "/apis/rbac.authorization.k8s.io/v1"


# ---------------------------------------------------------------- the cluster with nodes
@pytest.fixture(scope="module")
def nodes(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster with nodes, seen through conftest's `Cluster`: locally a `LocalCluster` (its
    emulator is `.emulator`, as the emulator-only fixture's, so `require_emulator` and
    `cluster.emulator.emulator` mean the same); with SFTJOB_E2E_KUBECONFIG the real cluster.
    Either way a namespace of its own, deleted at the end."""
    namespace = f"sftjob-node-{secrets.token_hex(3)}"
    ClusterClass = type(cluster)
    if not cluster.emulated:
        probe = ClusterClass(cluster.kubeconfig, namespace, None, None)
        yield from _in_namespace(probe)
        return
    workdir = tmp_path_factory.mktemp("local-cluster-with-node")
    with LocalCluster(
        workdir=workdir,
        ephemeral=True,
        cpus=2,
        memory="4Gi",
        max_pods=8,
        restart_backoff=0.2,
        config_retry=0.3,
    ) as local:
        probe = ClusterClass(local.kubeconfig, namespace, local, local.log_dir)
        yield from _in_namespace(probe)


def _in_namespace(probe: Cluster) -> Iterator[Cluster]:
    probe.ok("POST", "/api/v1/namespaces", {"metadata": {"name": probe.namespace}})
    # Pods name the `default` ServiceAccount, which the ServiceAccount controller creates a
    # moment after the namespace; the admission plugin refuses pods until it exists.
    default_sa = f"/api/v1/namespaces/{probe.namespace}/serviceaccounts/default"
    probe.wait_for(lambda: probe.request("GET", default_sa)[0] == 200, timeout=30)
    try:
        yield probe
    finally:
        probe.request("DELETE", f"/api/v1/namespaces/{probe.namespace}")


def patience(cluster: Cluster) -> float:
    """How long a pod may take to get somewhere: a real node pulls images and backs off 10 s."""
    return 30 if cluster.emulated else 180


# ---------------------------------------------------------------- pods
def py_pod(
    name: str, code: str, *args: str, restart: str = "Never", **container: Any
) -> dict[str, Any]:
    """A Pod whose one container `main` runs `python -c code args...` in the probe image."""
    spec_container = {
        "name": "main",
        "image": PROBE_IMAGE,
        "command": ["python", "-c", code, *args],
        **container,
    }
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 5,
            "containers": [spec_container],
        },
    }


def pods(cluster: Cluster, name: str = "", sub: str = "") -> str:
    base = f"/api/v1/namespaces/{cluster.namespace}/pods"
    return base + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def get_pod(cluster: Cluster, name: str) -> dict[str, Any]:
    return cluster.ok("GET", pods(cluster, name))


def wait_pod(cluster: Cluster, name: str, predicate: Any, what: str) -> dict[str, Any]:
    """Poll the pod until `predicate(pod)` holds; on timeout fail with its status."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [get_pod(cluster, name)]
        return bool(predicate(found[0]))

    try:
        cluster.wait_for(check, timeout=patience(cluster), interval=0.1)
    except AssertionError:
        raise AssertionError(f"pod {name}: not {what}: {found[-1].get('status')}") from None
    return found[0]


def wait_phase(cluster: Cluster, name: str, *phases: str) -> dict[str, Any]:
    return wait_pod(
        cluster, name, lambda p: p.get("status", {}).get("phase") in phases, f"in {phases}"
    )


def main_status(pod: dict[str, Any]) -> dict[str, Any]:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return next((s for s in statuses if s["name"] == "main"), {})


def waiting(pod: dict[str, Any]) -> dict[str, Any]:
    return main_status(pod).get("state", {}).get("waiting") or {}


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any]:
    conditions = pod.get("status", {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def pod_events(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    listed = cluster.ok("GET", f"/api/v1/namespaces/{cluster.namespace}/events")
    return [
        e
        for e in listed["items"]
        if e["involvedObject"].get("kind") == "Pod" and e["involvedObject"].get("name") == name
    ]


def log(cluster: Cluster, name: str, **query: str) -> str:
    status, text = cluster.request("GET", pods(cluster, name, "log"), query=query, accept="*/*")
    assert status == 200, (status, text)
    return str(text)


def delete_now(cluster: Cluster, name: str) -> None:
    cluster.request("DELETE", pods(cluster, name), query={"gracePeriodSeconds": "0"})


# ---------------------------------------------------------------- scheduler
# The scheduler's FitError message is "0/<nodes> nodes are available: <n> <reason>, ...
# preemption: ..." (pkg/scheduler/framework/types.go FitError.Error); node count, the order of
# reasons and the preemption tail depend on the cluster (control-plane taints, other pools) and
# the version, so the probes assert the head and the reason they cause.
FIT_ERROR_HEAD = re.compile(r"^0/(\d+) nodes are available: ")


def assert_unschedulable(cluster: Cluster, name: str, reason_text: str) -> None:
    pod = wait_pod(
        cluster,
        name,
        lambda p: condition(p, "PodScheduled").get("reason") == "Unschedulable",
        "Unschedulable",
    )
    scheduled = condition(pod, "PodScheduled")
    assert scheduled["status"] == "False", scheduled
    assert FIT_ERROR_HEAD.match(scheduled["message"]), scheduled
    assert reason_text in scheduled["message"], scheduled
    assert pod["status"]["phase"] == "Pending", pod["status"]
    assert "nodeName" not in pod["spec"], pod["spec"]
    assert not pod["status"].get("containerStatuses"), pod["status"]

    def failed_scheduling() -> list[dict[str, Any]]:
        return [e for e in pod_events(cluster, name) if e["reason"] == "FailedScheduling"]

    event = cluster.wait_for(failed_scheduling, timeout=patience(cluster))[0]
    assert event["type"] == "Warning", event
    assert FIT_ERROR_HEAD.match(event["message"]) and reason_text in event["message"], event


def test_a_pod_larger_than_every_node_stays_pending_unschedulable(nodes: Cluster) -> None:
    """pkg/scheduler/framework/plugins/noderesources/fit.go (`Insufficient <resource>`);
    pkg/scheduler/schedule_one.go handleSchedulingFailure: event FailedScheduling (Warning) and
    the condition PodScheduled=False reason Unschedulable (v1.PodReasonUnschedulable) with the
    FitError message; an unbound pod has no container statuses (nothing ran). Docs:
    https://kubernetes.io/docs/tasks/debug/debug-application/debug-pods/#my-pod-stays-pending"""
    name = f"huge-{secrets.token_hex(3)}"
    pod = py_pod(name, "print(1)", resources={"requests": {"cpu": "1000"}})
    nodes.ok("POST", pods(nodes), pod)
    try:
        assert_unschedulable(nodes, name, "Insufficient cpu")
    finally:
        delete_now(nodes, name)


def test_a_node_selector_no_node_matches_is_unschedulable(nodes: Cluster) -> None:
    """pkg/scheduler/framework/plugins/nodeaffinity/node_affinity.go ErrReasonPod
    `node(s) didn't match Pod's node affinity/selector` (nodeSelector and required node affinity
    are one filter); reported as in the probe above."""
    name = f"nowhere-{secrets.token_hex(3)}"
    pod = py_pod(name, "print(1)")
    pod["spec"]["nodeSelector"] = {"probe.sftjob.dev/no-such-node": "anywhere"}
    nodes.ok("POST", pods(nodes), pod)
    try:
        assert_unschedulable(nodes, name, "didn't match Pod's node affinity/selector")
    finally:
        delete_now(nodes, name)


# ---------------------------------------------------------------- kubelet before the start
def test_env_from_a_missing_secret_waits_until_the_secret_exists(nodes: Cluster) -> None:
    """pkg/kubelet/kubelet_pods.go makeEnvironmentVariables: a secretKeyRef whose Secret is
    missing fails with the secret manager's NotFound (pkg/kubelet/secret/secret_manager.go
    registers the group resource `secret`: `secret "<name>" not found`);
    pkg/kubelet/kuberuntime/kuberuntime_container.go startContainer reports it as waiting
    reason CreateContainerConfigError (the pod stays Pending); the pod worker retries, so the
    pod runs once the Secret exists. Docs: https://kubernetes.io/docs/tasks/inject-data-application/distribute-credentials-secure/"""
    uniq = secrets.token_hex(3)
    name, secret = f"cfg-{uniq}", f"later-{uniq}"
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]
    nodes.ok("POST", pods(nodes), py_pod(name, "import os; print(os.environ['TOKEN'])", env=env))
    try:
        pod = wait_pod(nodes, name, lambda p: waiting(p).get("message"), "waiting with a message")
        assert waiting(pod) == {
            "reason": "CreateContainerConfigError",
            "message": f'secret "{secret}" not found',
        }, waiting(pod)
        assert pod["status"]["phase"] == "Pending", pod["status"]

        nodes.ok(
            "POST",
            f"/api/v1/namespaces/{nodes.namespace}/secrets",
            {"metadata": {"name": secret}, "stringData": {"token": "abc"}},
        )
        pod = wait_phase(nodes, name, "Succeeded", "Failed")
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        assert log(nodes, name) == "abc\n"
    finally:
        delete_now(nodes, name)


@pytest.mark.parametrize(
    "image",
    ["python:3.12 slim", "Python:3"],
    ids=["inner-space", "uppercase"],
)
def test_an_image_name_the_apiserver_accepts_but_cannot_parse_is_invalid_image_name(
    nodes: Cluster, image: str
) -> None:
    """The apiserver refuses only an empty image or one padded with whitespace
    (pkg/apis/core/validation/validation.go validateContainerCommon); the kubelet parses it
    (pkg/kubelet/images/image_manager.go EnsureImageExists → applyDefaultImageTag, with
    github.com/distribution/reference ParseNormalizedNamed) and reports waiting reason
    InvalidImageName (images.ErrInvalidImageName) with `Failed to apply default image tag
    "<image>": couldn't parse image name "<image>": invalid reference format...`. Older kubelets
    said `couldn't parse image reference`, and the parser's tail (`: repository name
    (library/Python) must be lowercase`, before that without the name) changed between versions
    of the reference library, so the head and `"<image>": invalid reference format` are
    asserted."""
    name = f"img-{secrets.token_hex(3)}"
    nodes.ok("POST", pods(nodes), py_pod(name, "print(1)", image=image))
    try:
        pod = wait_pod(nodes, name, lambda p: waiting(p).get("message"), "waiting with a message")
        state = waiting(pod)
        assert state["reason"] == "InvalidImageName", state
        assert state["message"].startswith(
            f'Failed to apply default image tag "{image}": couldn\'t parse image '
        ), state
        assert f'"{image}": invalid reference format' in state["message"], state
        assert pod["status"]["phase"] == "Pending", pod["status"]
    finally:
        delete_now(nodes, name)


# ---------------------------------------------------------------- the runtime
ALLOCATE = (
    "import time\n"
    "data = b'x' * (300 * 2**20)  # written, so resident\n"
    "print('allocated', flush=True)\n"
    "time.sleep(30)\n"
)


def test_a_container_over_its_memory_limit_is_oom_killed(nodes: Cluster) -> None:
    """Docs https://kubernetes.io/docs/tasks/configure-pod-container/assign-memory-resource/
    #exceed-a-container-s-memory-limit: the container is terminated with reason OOMKilled
    and exit code 137 (128 + SIGKILL; the runtime's OOM event, pkg/kubelet/kuberuntime
    kuberuntime_container.go toKubeContainerStatus); under restartPolicy Never the pod is
    Failed. It never gets to print `allocated` on a real node (the cgroup kills at the
    allocation); the local node polls the tree's RSS, so it may, and that is not asserted."""
    name = f"hog-{secrets.token_hex(3)}"
    pod = py_pod(name, ALLOCATE, resources={"limits": {"memory": "64Mi"}})
    nodes.ok("POST", pods(nodes), pod)
    try:
        pod = wait_phase(nodes, name, "Failed", "Succeeded")
        terminated = main_status(pod)["state"].get("terminated") or {}
        assert (pod["status"]["phase"], terminated.get("reason"), terminated.get("exitCode")) == (
            "Failed",
            "OOMKilled",
            137,
        ), pod["status"]
    finally:
        delete_now(nodes, name)


COUNT_RUNS = (
    "import os, sys\n"
    "path = sys.argv[1]\n"
    "run = int(open(path).read()) + 1 if os.path.exists(path) else 1\n"
    "open(path, 'w').write(str(run))\n"
    "print(f'run {run}', flush=True)\n"
    "sys.exit(1 if run == 1 else 0)\n"
)


def test_on_failure_restarts_and_the_previous_log_is_the_first_run(nodes: Cluster) -> None:
    """restartPolicy OnFailure restarts a container that exits non-zero in place (the emptyDir
    survives; docs https://kubernetes.io/docs/concepts/workloads/pods/pod-lifecycle/
    #restart-policy), restartCount 1, lastState.terminated exit code 1 reason Error; the log
    of the current run is the plain `pods/<name>/log`, the terminated one `?previous=true`
    (pkg/kubelet/kubelet_pods.go GetContainerLogs/validateContainerLogStatus;
    https://kubernetes.io/docs/reference/kubectl/generated/kubectl_logs/ `--previous`)."""
    name = f"flaky-{secrets.token_hex(3)}"
    pod = py_pod(
        name,
        COUNT_RUNS,
        "/scratch/runs",
        restart="OnFailure",
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    nodes.ok("POST", pods(nodes), pod)
    try:
        pod = wait_phase(nodes, name, "Succeeded", "Failed")
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        status = main_status(pod)
        assert status["restartCount"] == 1, status
        last = status["lastState"]["terminated"]
        assert (last["exitCode"], last["reason"]) == (1, "Error"), last
        assert status["state"]["terminated"]["exitCode"] == 0, status
        assert log(nodes, name, previous="true") == "run 1\n"
        assert log(nodes, name) == "run 2\n"
    finally:
        delete_now(nodes, name)


SERVE_UNTIL_TERM = (
    "import signal, sys, time\n"
    "def stop(*_):\n"
    "    print('SIGTERM', flush=True)\n"
    "    time.sleep(2)  # stay terminating for a moment: the probe reads the pod then\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, stop)  # PID 1 in a container: no default action\n"
    "print('up', flush=True)\n"
    "while True:\n"
    "    time.sleep(0.1)\n"
)


def test_eviction_of_a_running_pod_marks_it_and_the_pod_goes_away(nodes: Cluster) -> None:
    """pkg/registry/core/pod/storage/eviction.go EvictionREST.Create → 201 Status Success;
    addConditionAndDeletePod adds DisruptionTarget=True reason EvictionByEvictionAPI message
    `Eviction API: evicting` (GA with PodDisruptionConditions, 1.31; on by default since 1.26)
    and deletes gracefully; the kubelet sends SIGTERM, the container exits, the pod is removed.
    Docs: https://kubernetes.io/docs/concepts/scheduling-eviction/api-eviction/ and
    https://kubernetes.io/docs/concepts/workloads/pods/disruptions/#pod-disruption-conditions"""
    name = f"evictee-{secrets.token_hex(3)}"
    nodes.ok("POST", pods(nodes), py_pod(name, SERVE_UNTIL_TERM, restart="Always"))
    try:
        wait_phase(nodes, name, "Running")
        started = (200, "up\n")  # a log read before the container started is a 400
        nodes.wait_for(
            lambda: nodes.request("GET", pods(nodes, name, "log"), accept="*/*") == started,
            timeout=patience(nodes),
        )
        eviction = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": name, "namespace": nodes.namespace},
        }
        status, answer = nodes.request("POST", pods(nodes, name, "eviction"), eviction)
        assert status == 201, answer
        assert (answer["kind"], answer["status"]) == ("Status", "Success"), answer
        pod = get_pod(nodes, name)
        assert pod["metadata"].get("deletionTimestamp"), pod["metadata"]
        target = condition(pod, "DisruptionTarget")
        assert (target.get("status"), target.get("reason"), target.get("message")) == (
            "True",
            "EvictionByEvictionAPI",
            "Eviction API: evicting",
        ), pod["status"]
        nodes.wait_for(
            lambda: nodes.request("GET", pods(nodes, name))[0] == 404, timeout=patience(nodes)
        )
    finally:
        delete_now(nodes, name)


# ---------------------------------------------------------------- the pod's identity
PRINT_TOKEN = "import sys; print(open(sys.argv[1]).read().strip())"


def with_token(cluster: Cluster, token: str, path: Path) -> Cluster:
    """A client of the same server (URL, CA) that authenticates with `token` only."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    context_name = config["current-context"]
    context = next(c for c in config["contexts"] if c["name"] == context_name)["context"]
    users = [u for u in config["users"] if u["name"] != context["user"]]
    config["users"] = [*users, {"name": context["user"], "user": {"token": token}}]
    path.write_text(yaml.safe_dump(config))
    return type(cluster)(path, cluster.namespace, None, None)


def test_the_mounted_token_acts_as_the_pods_service_account(nodes: Cluster) -> None:
    """The kubelet mounts a token bound to the pod at
    /var/run/secrets/kubernetes.io/serviceaccount/token (docs
    https://kubernetes.io/docs/tasks/configure-pod-container/configure-service-account/
    #launch-a-pod-using-service-account-token-projection; pkg/kubelet/token, the
    ServiceAccount admission plugin's projected volume); it authenticates as
    system:serviceaccount:<ns>:<name> and RBAC applies (a Role of `list configmaps`;
    secrets: 403 Forbidden, message of
    staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go
    forbiddenMessage). The pod prints its token and the probe uses it from outside with the
    cluster's own URL and CA: a real pod would reach the API at KUBERNETES_SERVICE_HOST, a
    local one through its KUBECONFIG, and the probe image has no client library; the token,
    the identity and RBAC are what is probed. The token stays valid while the pod exists."""
    uniq = secrets.token_hex(3)
    ns, account, name = nodes.namespace, f"prober-{uniq}", f"whoami-{uniq}"
    nodes.ok("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", {"metadata": {"name": account}})
    rules = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}]
    nodes.ok("POST", f"{RBAC}/namespaces/{ns}/roles", {"metadata": {"name": account}, "rules": rules})  # fmt: skip
    nodes.ok(
        "POST",
        f"{RBAC}/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        },
    )
    pod = py_pod(name, PRINT_TOKEN, f"{SA_MOUNT}/token")
    pod["spec"]["serviceAccountName"] = account
    nodes.ok("POST", pods(nodes), pod)
    try:
        pod = wait_phase(nodes, name, "Succeeded", "Failed")
        assert pod["status"]["phase"] == "Succeeded", pod["status"]
        token = log(nodes, name).strip()
        assert token.count(".") == 2, "a JWT"
        with tempfile.TemporaryDirectory() as tmp:
            as_pod = with_token(nodes, token, Path(tmp) / "kubeconfig")
            listed = as_pod.ok("GET", f"/api/v1/namespaces/{ns}/configmaps")
            assert listed["kind"] == "ConfigMapList", listed
            status, body = as_pod.request("GET", f"/api/v1/namespaces/{ns}/secrets")
        assert status == 403 and body["reason"] == "Forbidden", body
        assert body["message"].startswith(
            f'secrets is forbidden: User "system:serviceaccount:{ns}:{account}" cannot list '
            f'resource "secrets" in API group "" in the namespace "{ns}"'
        ), body
    finally:
        delete_now(nodes, name)
