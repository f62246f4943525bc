"""The real kubectl (no extra flags) against the API: apply, get with printer columns,
describe, logs, delete."""

from __future__ import annotations

import datetime
import json
import os
import secrets
import shutil
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.local,
    pytest.mark.timeout(90),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
]


def crd_yaml(group: str) -> str:
    return textwrap.dedent(
        f"""\
        apiVersion: apiextensions.k8s.io/v1
        kind: CustomResourceDefinition
        metadata:
          name: gadgets.{group}
        spec:
          group: {group}
          scope: Namespaced
          names: {{plural: gadgets, singular: gadget, kind: Gadget, shortNames: [gdg]}}
          versions:
          - name: v1
            served: true
            storage: true
            subresources: {{status: {{}}}}
            additionalPrinterColumns:
            - {{name: Size, type: integer, jsonPath: .spec.size}}
            - {{name: Phase, type: string, jsonPath: .status.phase}}
            - {{name: Age, type: date, jsonPath: .metadata.creationTimestamp}}
            schema:
              openAPIV3Schema:
                type: object
                properties:
                  spec:
                    type: object
                    required: [size]
                    properties:
                      size: {{type: integer, minimum: 1}}
                  status: {{type: object, x-kubernetes-preserve-unknown-fields: true}}
        """
    )


@pytest.fixture
def kubectl(cluster, tmp_path: Path):
    # A private discovery cache: kubectl must find freshly registered CRDs by itself.
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBECACHEDIR": str(tmp_path / "cache"),
    }

    def run(
        *args: str, check: bool = True, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
        )
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    return run


def test_kubectl_apply_get_describe_delete_custom_resource(kubectl, cluster, tmp_path):
    ns = cluster.namespace
    group = f"k{secrets.token_hex(3)}.test.sftjob.dev"
    (tmp_path / "crd.yaml").write_text(crd_yaml(group))
    assert "created" in kubectl("apply", "-f", str(tmp_path / "crd.yaml")).stdout
    try:
        cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
        cr = f"apiVersion: {group}/v1\nkind: Gadget\nmetadata:\n  name: g1\n  namespace: {ns}\nspec:\n  size: 3\n"
        (tmp_path / "cr.yaml").write_text(cr)
        assert (
            f"gadget.{group}/g1 created" in kubectl("apply", "-f", str(tmp_path / "cr.yaml")).stdout
        )
        assert "unchanged" in kubectl("apply", "-f", str(tmp_path / "cr.yaml")).stdout
        (tmp_path / "cr.yaml").write_text(cr.replace("size: 3", "size: 4"))
        assert "configured" in kubectl("apply", "-f", str(tmp_path / "cr.yaml")).stdout

        # Server-side validation through kubectl's default (strict) field validation.
        bad = kubectl(
            "apply",
            "-f",
            "-",
            stdin=cr.replace("g1", "g2").replace("size: 3", "size: 0"),
            check=False,
        )
        assert bad.returncode != 0 and "spec.size" in bad.stderr

        lines = kubectl("get", "gdg", "-n", ns).stdout.splitlines()
        assert lines[0].split() == ["NAME", "SIZE", "PHASE", "AGE"]
        assert lines[1].split()[:2] == ["g1", "4"]

        described = kubectl("describe", "gdg", "g1", "-n", ns).stdout
        assert "Name:" in described and "g1" in described and "Size:" in described

        assert f'gadget.{group} "g1" deleted' in kubectl("delete", "gdg", "g1", "-n", ns).stdout
        assert cluster.request("GET", f"/apis/{group}/v1/namespaces/{ns}/gadgets/g1")[0] == 404
    finally:
        kubectl("delete", "-f", str(tmp_path / "crd.yaml"), "--wait=false", check=False)


def test_kubectl_pods_get_describe_logs_delete(kubectl, cluster, tmp_path):
    cluster.require_emulator("the pod's log file is dropped into the local node's log_dir")
    ns = cluster.namespace
    name = f"kp-{secrets.token_hex(3)}"
    pod = f"apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n  containers:\n  - name: main\n    image: busybox\n"
    assert f"pod/{name} created" in kubectl("apply", "-f", "-", stdin=pod).stdout
    lines = kubectl("get", "pods", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert any(line.split()[:3] == [name, "0/1", "Pending"] for line in lines[1:])

    described = kubectl("describe", "pod", name, "-n", ns).stdout
    assert name in described and "busybox" in described

    # the local node's files: <ns>_<pod>_<uid>/<container>/<run>.log in the CRI format,
    # found through the container ID it reports (see sftjob_local.node_logs)
    uid = cluster.ok("GET", f"/api/v1/namespaces/{ns}/pods/{name}")["metadata"]["uid"]
    running = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
    status = {"name": "main", "image": "busybox", "imageID": "", "ready": True,
              "restartCount": 0, "containerID": f"local://{uid}/main/0", "state": running}  # fmt: skip
    cluster.ok(
        "PATCH",
        f"/api/v1/namespaces/{ns}/pods/{name}/status",
        {"status": {"containerStatuses": [status]}},
        content_type="application/merge-patch+json",
    )
    log = cluster.log_dir / f"{ns}_{name}_{uid}" / "main" / "0.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(
        "2026-01-01T00:00:01Z stdout F hello from the pod\n2026-01-01T00:00:02Z stdout F second line\n"
    )
    assert kubectl("logs", name, "-n", ns).stdout == "hello from the pod\nsecond line\n"
    assert kubectl("logs", name, "-n", ns, "--tail=1").stdout == "second line\n"

    assert f'pod "{name}" deleted' in kubectl("delete", "pod", name, "-n", ns).stdout
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/{name}")[0] == 404


def test_kubectl_create_builtins_with_typed_clients(kubectl, cluster):
    """``kubectl create secret|configmap|namespace|serviceaccount`` send protobuf bodies
    (client-go's typed clients, with no fallback to JSON on 415): the server must read them."""
    ns = cluster.namespace
    suffix = secrets.token_hex(3)
    secret, configmap, namespace, account = (
        f"s-{suffix}",
        f"cm-{suffix}",
        f"ns-{suffix}",
        f"sa-{suffix}",
    )
    out = kubectl("create", "secret", "generic", secret, "--from-literal=a=b", "-n", ns).stdout
    assert f"secret/{secret} created" in out
    out = kubectl(
        "create", "configmap", configmap, "--from-literal=k=v", "--from-literal=k2=", "-n", ns
    ).stdout
    assert f"configmap/{configmap} created" in out
    assert f"namespace/{namespace} created" in kubectl("create", "ns", namespace).stdout
    try:
        out = kubectl("create", "serviceaccount", account, "-n", ns).stdout
        assert f"serviceaccount/{account} created" in out

        stored = cluster.ok("GET", f"/api/v1/namespaces/{ns}/secrets/{secret}")
        assert stored["data"] == {"a": "Yg=="} and stored["type"] == "Opaque"
        stored = cluster.ok("GET", f"/api/v1/namespaces/{ns}/configmaps/{configmap}")
        assert stored["data"] == {"k": "v", "k2": ""}
        stored = cluster.ok("GET", f"/api/v1/namespaces/{namespace}")
        assert stored["status"]["phase"] == "Active"
        stored = cluster.ok("GET", f"/api/v1/namespaces/{ns}/serviceaccounts/{account}")
        assert stored["metadata"]["name"] == account

        lines = kubectl("get", "serviceaccount", account, "-n", ns).stdout.splitlines()
        assert lines[0].split() == ["NAME", "SECRETS", "AGE"]
        assert lines[1].split()[:2] == [account, "0"]

        # RBAC objects come the same way (the RBAC rules of the issue are set up with these).
        role, binding = f"r-{suffix}", f"rb-{suffix}"
        kubectl("create", "role", role, "--verb=get,list", "--resource=pods", "-n", ns)
        kubectl(
            "create", "rolebinding", binding, f"--role={role}",
            f"--serviceaccount={ns}:{account}", "--user=jane", "-n", ns,
        )  # fmt: skip
        rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}"
        stored = cluster.ok("GET", f"{rbac}/roles/{role}")
        assert stored["rules"] == [
            {"verbs": ["get", "list"], "apiGroups": [""], "resources": ["pods"]}
        ]
        stored = cluster.ok("GET", f"{rbac}/rolebindings/{binding}")
        assert stored["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role,
        }
        assert {"kind": "ServiceAccount", "name": account, "namespace": ns} in stored["subjects"]
        lines = kubectl("get", "rolebinding", binding, "-n", ns, "-o", "wide").stdout.splitlines()
        assert lines[0].split() == ["NAME", "ROLE", "AGE", "USERS", "GROUPS", "SERVICEACCOUNTS"]
        assert lines[1].split()[:2] == [binding, f"Role/{role}"]
        assert lines[1].split()[-2:] == ["jane", f"{ns}/{account}"]
    finally:
        kubectl("delete", "ns", namespace, "--wait=false", check=False)


def test_kubectl_get_events_prints_the_event_columns(kubectl, cluster):
    """Columns and cells of printers.go's printEvent (server-side Table)."""
    ns = cluster.namespace
    name = f"ev-{secrets.token_hex(3)}"
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    cluster.ok(
        "POST",
        f"/api/v1/namespaces/{ns}/events",
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name},
            "involvedObject": {"kind": "Pod", "name": "web-0", "namespace": ns},
            "reason": "Pulled",
            "message": "Container image already present on machine",
            "type": "Normal",
            "source": {"component": "kubelet", "host": "node-1"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 2,
        },
    )
    lines = kubectl("get", "events", "-n", ns).stdout.splitlines()
    assert lines[0].split() == ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    row = next(line for line in lines[1:] if "pod/web-0" in line)
    assert row.split()[1:4] == ["Normal", "Pulled", "pod/web-0"]
    assert row.endswith("Container image already present on machine")

    lines = kubectl("get", "events", "-n", ns, "-o", "wide").stdout.splitlines()
    assert lines[0].split() == [
        "LAST", "SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE",
        "FIRST", "SEEN", "COUNT", "NAME",
    ]  # fmt: skip
    row = next(line for line in lines[1:] if "pod/web-0" in line)
    assert "kubelet, node-1" in row and row.split()[-2:] == ["2", name]


def test_kubectl_auth_can_i_whoami_and_create_token(kubectl, cluster, tmp_path):
    """``kubectl create token`` (TokenRequest), ``kubectl auth whoami`` (SelfSubjectReview)
    and ``kubectl auth can-i`` (SelfSubjectAccessReview) with plain kubectl: a
    ServiceAccount's token is that account (``system:serviceaccount:<ns>:<name>``, groups
    system:serviceaccounts, system:serviceaccounts:<ns>, system:authenticated — the
    ServiceAccount authenticator's user info, pkg/serviceaccount/util.go) and may do what its
    RoleBinding grants and nothing else ("yes"/"no", exit 0/1, as kubectl's can-i prints)."""
    ns = cluster.namespace
    suffix = secrets.token_hex(3)
    account, role = f"sa-{suffix}", f"r-{suffix}"
    kubectl("create", "serviceaccount", account, "-n", ns)
    kubectl("create", "role", role, "--verb=get,list", "--resource=configmaps", "-n", ns)
    kubectl(
        "create", "rolebinding", role, f"--role={role}", f"--serviceaccount={ns}:{account}",
        "-n", ns,
    )  # fmt: skip
    token = kubectl("create", "token", account, "-n", ns).stdout.strip()
    assert token.count(".") == 2, token  # a JWT, as the apiserver issues

    user = f"system:serviceaccount:{ns}:{account}"
    assert kubectl("auth", "can-i", "list", "configmaps", "-n", ns).stdout.strip() == "yes"
    as_account = ("--token", token)
    whoami = kubectl("auth", "whoami", "-o", "json", *as_account).stdout
    info = json.loads(whoami)["status"]["userInfo"]
    assert info["username"] == user
    assert set(info["groups"]) >= {
        "system:serviceaccounts",
        f"system:serviceaccounts:{ns}",
        "system:authenticated",
    }

    def can_i(*args: str) -> tuple[int, str]:
        # RBAC changes reach a real server's authorizer through informers: allow a moment.
        result = kubectl("auth", "can-i", *args, "-n", ns, *as_account, check=False)
        return result.returncode, result.stdout.strip()

    deadline = time.monotonic() + 10
    while can_i("list", "configmaps") != (0, "yes") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert can_i("list", "configmaps") == (0, "yes")
    assert can_i("get", "configmaps") == (0, "yes")
    assert can_i("delete", "configmaps") == (1, "no")
    assert can_i("list", "secrets") == (1, "no")
    denied = kubectl("get", "secrets", "-n", ns, *as_account, check=False)
    assert denied.returncode != 0
    assert (
        f'User "{user}" cannot list resource "secrets" in API group "" in the namespace "{ns}"'
        in denied.stderr
    ), denied.stderr
