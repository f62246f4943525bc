"""The real kubectl (no extra flags) against the API: apply, get with printer columns,
describe, logs, delete."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import textwrap
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
