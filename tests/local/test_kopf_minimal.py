"""A minimal real Kopf operator against the API: finalizer, create once, timer, owned pod,
status patches and deletion — the semantics the SFTJob operator depends on."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(90)]

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

OPERATOR = textwrap.dedent(
    """
    import os
    from pathlib import Path

    import kopf
    import kubernetes

    GROUP = os.environ["WIDGET_GROUP"]
    JOURNAL = Path(os.environ["JOURNAL"])


    def note(line):
        with JOURNAL.open("a") as f:
            f.write(line + "\\n")


    @kopf.on.startup()
    def configure(settings, **_):
        kubernetes.config.load_kube_config()
        settings.persistence.finalizer = "test.sftjob.dev/kopf"
        settings.watching.server_timeout = 20


    @kopf.on.create(GROUP, "v1", "widgets")
    def create_widget(name, namespace, body, patch, **_):
        note(f"create {name}")
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": f"{name}-child"},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]},
        }
        kopf.adopt(pod, owner=body)
        kubernetes.client.CoreV1Api().create_namespaced_pod(namespace, pod)
        # Not "created": Kopf stores handler results under status.<handler id>.
        patch.status["childCreated"] = True
        return {"child": pod["metadata"]["name"]}


    @kopf.timer(GROUP, "v1", "widgets", interval=0.3)
    def tick(status, patch, **_):
        patch.status["ticks"] = int(status.get("ticks") or 0) + 1


    @kopf.on.delete(GROUP, "v1", "widgets")
    def delete_widget(name, **_):
        note(f"delete {name}")
    """
)


def test_kopf_operator_lifecycle(cluster, crd_body, tmp_path: Path):
    group = f"kopf{secrets.token_hex(3)}.test.sftjob.dev"
    cluster.ok("POST", CRDS, crd_body(group))
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
    widgets = f"/apis/{group}/v1/namespaces/{cluster.namespace}/widgets"
    pods = f"/api/v1/namespaces/{cluster.namespace}/pods"
    journal = tmp_path / "journal.txt"
    journal.touch()
    (tmp_path / "operator.py").write_text(OPERATOR)
    env = {
        **os.environ,
        "KUBECONFIG": str(cluster.kubeconfig),
        "WIDGET_GROUP": group,
        "JOURNAL": str(journal),
    }
    log = (tmp_path / "kopf.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "kopf",
            "run",
            "--standalone",
            "--namespace",
            cluster.namespace,
            str(tmp_path / "operator.py"),
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=tmp_path,
    )
    try:
        cluster.ok(
            "POST",
            widgets,
            {
                "apiVersion": f"{group}/v1",
                "kind": "Widget",
                "metadata": {"name": "w1"},
                "spec": {"size": 1},
            },
        )

        def settled():
            obj = cluster.ok("GET", f"{widgets}/w1")
            status = obj.get("status") or {}
            return (
                obj if status.get("childCreated") and int(status.get("ticks") or 0) >= 3 else None
            )

        # Status lands only if Kopf patches through /status (discovery lists widgets/status):
        # writes of .status through the main resource are ignored by the server.
        widget = cluster.wait_for(settled, timeout=40, interval=0.2)
        assert "test.sftjob.dev/kopf" in widget["metadata"]["finalizers"]
        assert widget["status"]["create_widget"] == {"child": "w1-child"}  # the handler result
        child = cluster.ok("GET", f"{pods}/w1-child")
        assert child["metadata"]["ownerReferences"][0]["uid"] == widget["metadata"]["uid"]
        # Many status writes (timer ticks) later, the create handler still ran exactly once.
        assert journal.read_text().splitlines() == ["create w1"]

        cluster.ok("DELETE", f"{widgets}/w1")
        cluster.wait_for(
            lambda: cluster.request("GET", f"{widgets}/w1")[0] == 404, timeout=30, interval=0.2
        )
        assert journal.read_text().splitlines() == ["create w1", "delete w1"]
        cluster.wait_for(lambda: cluster.request("GET", f"{pods}/w1-child")[0] == 404, timeout=30)
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()
        cluster.request("DELETE", f"{CRDS}/widgets.{group}")
    assert process.returncode is not None
