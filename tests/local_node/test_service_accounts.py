"""Pods run as their ServiceAccount: the node mounts a pod-bound token (as a kubelet does) and
the pod's KUBECONFIG authenticates with it, so RBAC applies to what pods do."""

from __future__ import annotations

import json

import pytest
from kubernetes.client import CoreV1Api, RbacAuthorizationV1Api
from local_node_kit import py_pod, wait_phase

pytestmark = pytest.mark.local

MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"

# Reports what the pod sees: the mounted files, who the API says it is, and what it may read.
PROBE = """
import json, os, sys
import kubernetes
mount, secret, configmap = sys.argv[1:4]
out = {"mounted": sorted(os.listdir(mount)) if os.path.isdir(mount) else None}
if out["mounted"]:
    out["namespace"] = open(os.path.join(mount, "namespace")).read()
    out["token_is_file"] = os.path.getsize(os.path.join(mount, "token")) > 0
api = kubernetes.config.new_client_from_config(os.environ["KUBECONFIG"])
def status(call):
    try:
        call()
        return 200
    except kubernetes.client.ApiException as exc:
        return exc.status
try:
    review = kubernetes.client.AuthenticationV1Api(api).create_self_subject_review(
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"})
    out["user"] = review.status.user_info.username
except kubernetes.client.ApiException as exc:
    out["user"] = "refused: %s" % exc.status
core = kubernetes.client.CoreV1Api(api)
ns = open(os.path.join(mount, "namespace")).read() if out["mounted"] else os.environ["NS"]
out["get_configmap"] = status(lambda: core.read_namespaced_config_map(configmap, ns))
out["get_secret"] = status(lambda: core.read_namespaced_secret(secret, ns))
out["list_pods"] = status(lambda: core.list_namespaced_pod(ns))
print(json.dumps(out))
"""


def run_probe(core: CoreV1Api, ns: str, name: str, **spec: object) -> dict[str, object]:
    pod = py_pod(name, PROBE, MOUNT, "s", "readable", env=[{"name": "NS", "value": ns}])
    pod["spec"].update(spec)
    core.create_namespaced_pod(ns, pod)
    wait_phase(core, ns, name, "Succeeded", "Failed", timeout=60)
    log = core.read_namespaced_pod_log(name, ns)
    return dict(json.loads(log.strip().splitlines()[-1]))


def test_a_pod_runs_as_its_service_account_and_rbac_applies(core: CoreV1Api, ns: str) -> None:
    rbac = RbacAuthorizationV1Api(core.api_client)
    core.create_namespaced_service_account(ns, {"metadata": {"name": "runner"}})
    core.create_namespaced_config_map(ns, {"metadata": {"name": "readable"}, "data": {"a": "b"}})
    core.create_namespaced_secret(ns, {"metadata": {"name": "s"}, "stringData": {"a": "b"}})
    rbac.create_namespaced_role(
        ns,
        {
            "metadata": {"name": "runner"},
            "rules": [
                {
                    "apiGroups": [""],
                    "resources": ["configmaps"],
                    "resourceNames": ["readable"],
                    "verbs": ["get"],
                }
            ],
        },
    )
    rbac.create_namespaced_role_binding(
        ns,
        {
            "metadata": {"name": "runner"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "runner"},
            "subjects": [{"kind": "ServiceAccount", "name": "runner", "namespace": ns}],
        },
    )
    seen = run_probe(core, ns, "as-runner", serviceAccountName="runner")
    assert seen["mounted"] == ["ca.crt", "namespace", "token"], seen
    assert seen["namespace"] == ns and seen["token_is_file"]
    assert seen["user"] == f"system:serviceaccount:{ns}:runner", seen
    # Exactly its Role: the one ConfigMap, nothing else.
    assert seen["get_configmap"] == 200, seen
    assert seen["get_secret"] == 403 and seen["list_pods"] == 403, seen


def test_without_automount_a_pod_has_no_credentials(core: CoreV1Api, ns: str) -> None:
    seen = run_probe(core, ns, "no-token", automountServiceAccountToken=False)
    assert seen["mounted"] is None, seen
    # No token: the API sees an anonymous client, which may not even ask who it is.
    assert seen["user"] == "refused: 403", seen
    assert seen["get_configmap"] == 403 and seen["get_secret"] == 403, seen


def test_a_service_account_can_turn_automount_off(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_service_account(
        ns, {"metadata": {"name": "quiet"}, "automountServiceAccountToken": False}
    )
    seen = run_probe(core, ns, "quiet", serviceAccountName="quiet")
    assert seen["mounted"] is None, seen
    # The pod's own setting wins over its ServiceAccount's.
    seen = run_probe(
        core, ns, "loud", serviceAccountName="quiet", automountServiceAccountToken=True
    )
    assert seen["user"] == f"system:serviceaccount:{ns}:quiet", seen
