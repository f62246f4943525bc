"""The operator watches instead of polling, and deleting a job never needs it (issue 19: 10, 11).

Each test starts its own operator process, authenticated as deploy/'s ServiceAccount under
deploy/'s ClusterRole (so the watch permissions are the ones a cluster would grant), and
counts that ServiceAccount's requests at the API emulator.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from operator_harness import ROOT, Cluster, start_operator, stop_operator, tiny_job, wait_for
from sftjob_local.emulator import EmulatorThread

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

OPERATOR_USER = "system:serviceaccount:sftjob-system:sftjob-operator"
KOPF_FINALIZER = "kopf.zalando.org/KopfFinalizerMarker"  # what a Kopf timer adds
# How the operator ran before issue 19 (a 0.3 s timer in the controller tier): with it,
# polling shows within seconds; with a watch the setting only speeds up a cache-only resync.
FAST_POLL = {"SFTJOB_RECONCILE_INTERVAL": "0.3"}
# A resync so slow it never runs during a test: whatever happens comes from a watch.
NO_RESYNC = {"SFTJOB_RECONCILE_INTERVAL": "3600", "SFTJOB_RESYNC_SECONDS": "3600"}


@pytest.fixture(scope="module")
def operator_token(emulator: tuple[EmulatorThread, Path]) -> str:
    """deploy/'s namespace, ServiceAccount, ClusterRole and binding; a token for the account."""
    _, kubeconfig = emulator
    api = kubernetes.config.new_client_from_config(str(kubeconfig))
    for name in ("namespace.yaml", "rbac.yaml"):
        for obj in yaml.safe_load_all((ROOT / "deploy" / "base" / name).read_text()):
            if obj:
                kubernetes.utils.create_from_dict(api, obj)
    issued = kubernetes.client.CoreV1Api(api).create_namespaced_service_account_token(
        "sftjob-operator",
        "sftjob-system",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    return str(issued.status.token)


class Operator:
    """One operator process at a time, as the deploy/ ServiceAccount."""

    def __init__(self, server: EmulatorThread, token: str, workdir: Path) -> None:
        self.server = server
        self.kubeconfig = server.write_kubeconfig(workdir / "operator-kubeconfig", token=token)
        self.token = token
        self.log = workdir / "operator.log"
        self.process: Any = None

    def start(self, env: dict[str, str]) -> None:
        self.process = start_operator(self.kubeconfig, self.log, env)
        # Ready once its watches have listed: it has then sent its first requests.
        wait_for(lambda: self.requests(), 30, "the operator's first requests")
        time.sleep(1.0)

    def stop(self) -> None:
        if self.process is not None:
            stop_operator(self.process)
            self.process = None

    def requests(self, since: set[int] | None = None) -> list[Any]:
        """The operator's requests the emulator recorded (after the snapshot `since`)."""
        assert self.server.emulator is not None
        records = list(self.server.emulator._requests)  # kmock's request records
        mine = [r for r in records if r.headers.get("Authorization") == f"Bearer {self.token}"]
        return [r for r in mine if since is None or id(r) not in since]

    def snapshot(self) -> set[int]:
        assert self.server.emulator is not None
        return {id(r) for r in self.server.emulator._requests}


@pytest.fixture()
def operator(
    emulator: tuple[EmulatorThread, Path], operator_token: str, tmp_path: Path
) -> Iterator[Operator]:
    server, _ = emulator
    process = Operator(server, operator_token, tmp_path)
    yield process
    process.stop()
    print(process.log.read_text()[-3000:])


def in_namespace(records: list[Any], namespace: str) -> list[str]:
    return [
        f"{r.method} {r.url.path}" for r in records if f"/namespaces/{namespace}/" in r.url.path
    ]


def gone(cluster: Cluster, name: str) -> bool:
    try:
        cluster.job(name)
    except kubernetes.client.ApiException as exc:
        return exc.status == 404
    return False


def pod_names(cluster: Cluster, job: str) -> list[str]:
    return [p["metadata"]["name"] for p in cluster.live_pods(job)]


def test_no_finalizer_so_a_job_deleted_while_the_operator_is_down_goes_at_once(
    cluster: Cluster, operator: Operator
) -> None:
    operator.start(FAST_POLL)
    cluster.create_job(tiny_job("free"))
    wait_for(lambda: pod_names(cluster, "free"), what="free's pod")
    time.sleep(1.0)  # a timer, had one been registered, has long added its finalizer
    assert not cluster.job("free")["metadata"].get("finalizers")
    operator.stop()
    started = time.monotonic()
    cluster.delete_job("free")
    wait_for(lambda: gone(cluster, "free"), 3, "free deleted without the operator")
    assert time.monotonic() - started < 3


def test_a_job_left_with_the_old_finalizer_is_released_on_start(
    cluster: Cluster, operator: Operator
) -> None:
    # What the previous version left on every job: Kopf's finalizer (its timer needed one).
    manifest = tiny_job("legacy")
    manifest["metadata"]["finalizers"] = [KOPF_FINALIZER]
    cluster.create_job(manifest)
    operator.start(FAST_POLL)
    wait_for(
        lambda: not cluster.job("legacy")["metadata"].get("finalizers"),
        10,
        "the old finalizer removed",
    )
    operator.stop()
    cluster.delete_job("legacy")
    wait_for(lambda: gone(cluster, "legacy"), 3, "legacy deleted without the operator")


def test_a_pod_change_is_acted_on_without_polling(cluster: Cluster, operator: Operator) -> None:
    operator.start(NO_RESYNC)
    cluster.create_job(tiny_job("pushed"))
    [pod] = wait_for(lambda: pod_names(cluster, "pushed"), what="pushed's pod")
    cluster.set_pod(pod, "Running")
    wait_for(
        lambda: (cluster.job("pushed").get("status") or {}).get("phase") == "Running",
        5,
        "Running, from the pod's watch event",
    )
    cluster.set_pod(pod, "Succeeded")
    wait_for(
        lambda: (cluster.job("pushed").get("status") or {}).get("phase") == "Succeeded",
        5,
        "Succeeded, from the pod's watch event",
    )


def test_a_finished_job_costs_no_requests_while_idle(cluster: Cluster, operator: Operator) -> None:
    operator.start(FAST_POLL)
    cluster.create_job(tiny_job("idle"))
    [pod] = wait_for(lambda: pod_names(cluster, "idle"), what="idle's pod")
    cluster.set_pod(pod, "Succeeded")
    wait_for(lambda: (cluster.job("idle").get("status") or {}).get("phase") == "Succeeded")
    time.sleep(1.0)  # the last writes of the finishing pass
    before = operator.snapshot()
    time.sleep(5.0)  # more than one 3 s round of the old timer's finished-job ticks
    assert in_namespace(operator.requests(since=before), cluster.namespace) == []


def test_the_operator_learns_of_a_deletion_from_the_watch(
    cluster: Cluster, operator: Operator
) -> None:
    """Jobs deleted right after creation: a second after the deletes, nothing about them is
    ever sent again. (A pass already running may still send a request in that second.) A
    polling operator learns of a deletion only from its next poll: here every 1.5 s, a GET
    answered 404 for each job it had started to handle."""
    operator.start({"SFTJOB_RECONCILE_INTERVAL": "1.5"})
    cluster.create_job(tiny_job("warm"))
    wait_for(lambda: pod_names(cluster, "warm"), what="the operator at work")
    time.sleep(1.0)  # warm is settled: it costs nothing from now on
    for name in [f"blink{i}" for i in range(10)]:
        cluster.create_job(tiny_job(name))
        cluster.delete_job(name)
    time.sleep(1.0)
    settled = operator.snapshot()
    time.sleep(3.0)
    assert in_namespace(operator.requests(since=settled), cluster.namespace) == []


def test_a_restarted_operator_acts_only_once_its_cache_holds_every_kind(
    cluster: Cluster, operator: Operator
) -> None:
    """A pass that ran on a cache holding the jobs but not yet their pods would take every
    running pod for lost and relaunch it: passes wait for every watch's first listing."""
    operator.start(NO_RESYNC)
    names = [f"steady{i}" for i in range(15)]
    for name in names:
        cluster.create_job(tiny_job(name))
    for name in names:
        [pod] = wait_for(lambda name=name: pod_names(cluster, name), what=f"{name}'s pod")
        cluster.set_pod(pod, "Running")
    for name in names:
        wait_for(
            lambda name=name: (cluster.job(name).get("status") or {}).get("phase") == "Running"
        )
    for _ in range(3):
        operator.stop()
        operator.start(NO_RESYNC)
        time.sleep(2.0)
        for name in names:
            status = cluster.job(name)["status"]
            assert (status["phase"], status["attempts"], status.get("restarts", 0)) == (
                "Running",
                1,
                0,
            ), name
            assert pod_names(cluster, name) == [f"{name}-a1-r0"], name
