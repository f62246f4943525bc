"""End-to-end tier: the operator, the real trainer and kubectl, on one shared cluster.

Local mode (the default, no cluster needed): one `DemoEnvironment` for the whole
session (API emulator + local node running pods as processes + the operator as its
own process) in a tmp folder, with the tiny model and datasets built once into the
claim `sftjob-demo-data`. Every test uses its own job names.

    .venv/bin/pytest -q tests/e2e

Real-cluster mode: set SFTJOB_E2E_KUBECONFIG. Nothing local is started; the tests
drive that cluster with kubectl and need:

- the operator installed:                 kubectl apply -k deploy/
- SFTJOB_E2E_IMAGE: the trainer image the jobs run (set as spec.image);
- SFTJOB_E2E_NAMESPACE (default `default`): where the jobs run;
- SFTJOB_E2E_STORAGE_CLASS (optional): a ReadWriteMany storage class for the per-job
  output claims the tests create (`<job>-output`, labelled sftjob.dev/e2e-run);
  without it the cluster's default class is used and must support ReadWriteMany;
- SFTJOB_E2E_TIMEOUT_SCALE (optional, default 3): multiplies every wait (image pulls);
- to read the operator's metrics (test_e2e_metrics.py), `get` on pods/proxy in the
  operator's namespace (SFTJOB_E2E_OPERATOR_NAMESPACE, default sftjob-system): the test
  reads the operator pod's `metrics` port through the API server;
- a ReadWriteMany PersistentVolumeClaim `sftjob-demo-data` in that namespace holding the
  tiny model and datasets, readable by uid/gid 1000 (the trainer's user). To prepare it:

    NS=default
    .venv/bin/python -c 'from sftjob_trainer.tiny import build_tiny_model, write_tiny_datasets; build_tiny_model("tiny-data/tiny-model"); write_tiny_datasets("tiny-data")'
    kubectl -n $NS apply -f - <<'EOF'
    apiVersion: v1
    kind: PersistentVolumeClaim
    metadata: {name: sftjob-demo-data}
    spec:
      accessModes: [ReadWriteMany]
      resources: {requests: {storage: 1Gi}}
    EOF
    kubectl -n $NS run sftjob-data-loader --image=busybox --restart=Never --overrides='
      {"spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 1000, "fsGroup": 1000},
       "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "sftjob-demo-data"}}],
       "containers": [{"name": "loader", "image": "busybox", "command": ["sleep", "3600"],
         "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]}}'
    kubectl -n $NS wait --for=condition=Ready pod/sftjob-data-loader
    kubectl -n $NS cp tiny-data/. sftjob-data-loader:/data/
    kubectl -n $NS exec sftjob-data-loader -- ls /data /data/tiny-model
    kubectl -n $NS delete pod sftjob-data-loader

  (`tiny-data/` then holds tiny-model/, chat.jsonl, prompt-completion.jsonl, text.jsonl
  and malformed-chat.jsonl, exactly what `sftjob demo` builds.)

    SFTJOB_E2E_KUBECONFIG=~/.kube/config SFTJOB_E2E_IMAGE=ghcr.io/...:tag \
        .venv/bin/pytest -q tests/e2e

The jobs and claims a run created are deleted at the end in real-cluster mode. Checks
that need the host (trainer processes, the folders behind claims) run in local mode only;
the rest of each test runs in both modes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_harness import E2ECluster, free_port


def _real_cluster() -> E2ECluster | None:
    kubeconfig = os.environ.get("SFTJOB_E2E_KUBECONFIG")
    if not kubeconfig:
        return None
    image = os.environ.get("SFTJOB_E2E_IMAGE")
    if not image:
        raise pytest.UsageError(
            "SFTJOB_E2E_KUBECONFIG is set but SFTJOB_E2E_IMAGE is not: give the trainer image"
        )
    return E2ECluster(
        Path(kubeconfig).expanduser(),
        os.environ.get("SFTJOB_E2E_NAMESPACE", "default"),
        image=image,
        storage_class=os.environ.get("SFTJOB_E2E_STORAGE_CLASS") or None,
        timeout_scale=float(os.environ.get("SFTJOB_E2E_TIMEOUT_SCALE", "3")),
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # The tests' timeouts are sized for the local node; real clusters pull images.
    if not os.environ.get("SFTJOB_E2E_KUBECONFIG"):
        return
    scale = float(os.environ.get("SFTJOB_E2E_TIMEOUT_SCALE", "3"))
    for item in items:
        marker = item.get_closest_marker("timeout")
        if marker is not None and marker.args and item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.timeout(marker.args[0] * scale), append=False)


# Module scope: the local cluster and its operator stop with the tier that uses them.
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[E2ECluster]:
    real = _real_cluster()
    if real is not None:
        if not real.exists("pvc", "sftjob-demo-data"):
            raise pytest.UsageError(
                f"no claim sftjob-demo-data in namespace {real.namespace}: see tests/e2e/"
                "conftest.py for how to prepare it"
            )
        try:
            yield real
        finally:
            real.cleanup()
        return

    from sftjob_local.demo import DemoEnvironment

    workdir = tmp_path_factory.mktemp("e2e") / "cluster"
    # The operator's metrics port, scraped by test_e2e_metrics.py as Prometheus would.
    with DemoEnvironment(workdir, metrics_port=free_port()) as env:
        env.prepare_data()
        local = E2ECluster(env.kubeconfig, env.namespace, local=env)
        try:
            yield local
        finally:
            log = workdir / "operator.log"
            if log.exists():
                # Shown by pytest only when a test failed (-rA shows it always).
                print(f"operator log ({log}), last lines:\n{log.read_text()[-4000:]}")
