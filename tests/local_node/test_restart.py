"""The local control plane restarted on the same workdir: objects are kept (state.db), pod
processes are not, and the node reports the pods it lost as a kubelet does after a reboot.

The kubelet's statuses are taken from its source: a container it cannot locate is
``terminated {reason: ContainerStatusUnknown, exitCode: 137, message: "The container could
not be located when the pod was terminated"}`` (pkg/kubelet/kubelet_pods.go,
convertToAPIContainerStatuses; pkg/kubelet/status/status_manager.go, TerminatePod), a
terminal pod's Ready/ContainersReady are False with reason PodFailed
(pkg/kubelet/status/generate.go), and pods with restartPolicy Always/OnFailure are started
again (pkg/kubelet/kuberuntime/kuberuntime_manager.go, computePodActions: a changed sandbox
restarts the containers when the policy allows it).
"""

from __future__ import annotations

import asyncio
import copy
import socket
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import alive, py_pod, wait_for
from sftjob_local.cluster import LocalCluster
from sftjob_local.emulator import EmulatorThread
from sftjob_local.node_kube import Informer, KubeHttp, cancel_and_wait
from sftjob_local.node_reboot import (
    UNKNOWN_MESSAGE,
    lost_on_reboot,
    ran_before,
    terminated_after_reboot,
)

pytestmark = [pytest.mark.local, pytest.mark.timeout(120)]

SLEEPER = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(300)"
LOST = {
    "terminated": {
        "reason": "ContainerStatusUnknown",
        "message": "The container could not be located when the pod was terminated",
        "exitCode": 137,
    }
}


def client(cluster: LocalCluster) -> CoreV1Api:
    return CoreV1Api(kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig)))


def pid_of(core: CoreV1Api, name: str) -> int | None:
    try:
        out = core.read_namespaced_pod_log(name, "default")
    except kubernetes.client.ApiException:
        return None
    lines = [line for line in out.splitlines() if line.startswith("PID ")]
    return int(lines[-1].split()[1]) if lines else None


def running_pid(core: CoreV1Api, name: str, other_than: int | None = None) -> int:
    def check() -> int | None:
        pod = core.read_namespaced_pod(name, "default")
        pid = pid_of(core, name)
        if pod.status.phase == "Running" and pid and pid != other_than:
            return pid
        return None

    return int(wait_for(check, timeout=30, interval=0.1, what=f"{name} running"))


# ------------------------------------------------------------------ the whole control plane


def test_restart_keeps_objects_and_fails_the_pods_whose_processes_died(tmp_path: Path) -> None:
    with LocalCluster(workdir=tmp_path, manage_etc_hosts=False) as cluster:
        core = client(cluster)
        core.create_namespaced_config_map("default", {"metadata": {"name": "settings"}, "data": {"k": "v"}})  # fmt: skip
        core.create_namespaced_pod("default", py_pod("never", SLEEPER))
        core.create_namespaced_pod("default", py_pod("always", SLEEPER, restart="Always"))
        never_pid = running_pid(core, "never")
        always_pid = running_pid(core, "always")
        before = core.read_namespaced_pod("never", "default")
        settings = core.read_namespaced_config_map("settings", "default")
    assert (cluster.workdir / "state.db").exists()
    assert not alive(never_pid) and not alive(always_pid)

    with LocalCluster(workdir=tmp_path, manage_etc_hosts=False) as cluster:
        core = client(cluster)
        kept = core.read_namespaced_config_map("settings", "default")
        assert kept.metadata.uid == settings.metadata.uid
        assert kept.metadata.resource_version == settings.metadata.resource_version

        def failed() -> Any:
            pod = core.read_namespaced_pod("never", "default")
            return pod if pod.status.phase == "Failed" else None

        pod = wait_for(failed, timeout=20, what="the lost pod reported Failed")
        assert pod.metadata.uid == before.metadata.uid
        raw = core.api_client.sanitize_for_serialization(pod)
        (container,) = raw["status"]["containerStatuses"]
        assert container["state"] == LOST, container
        assert container["ready"] is False
        conditions = {c["type"]: c for c in raw["status"]["conditions"]}
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Ready"]["reason"] == "PodFailed"
        assert conditions["ContainersReady"]["reason"] == "PodFailed"
        assert pid_of(core, "never") == never_pid, "a Never pod must not run again"

        # restartPolicy Always: the node runs it again, as a kubelet does after a reboot
        assert running_pid(core, "always", other_than=always_pid) != always_pid


def test_ephemeral_control_plane_keeps_nothing(tmp_path: Path) -> None:
    with LocalCluster(workdir=tmp_path, manage_etc_hosts=False, ephemeral=True) as cluster:
        core = client(cluster)
        core.create_namespaced_config_map("default", {"metadata": {"name": "gone"}})
    assert not (tmp_path / "state.db").exists()
    with LocalCluster(workdir=tmp_path, manage_etc_hosts=False, ephemeral=True) as cluster:
        names = [c.metadata.name for c in client(cluster).list_namespaced_config_map("default").items]  # fmt: skip
        assert "gone" not in names


# ------------------------------------------------------------------ the node's informer


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_informer_follows_the_api_across_a_restart(tmp_path: Path) -> None:
    """The node's list+watch cache survives the API going away and coming back on the same
    address with its state: it resumes or relists (410) and misses nothing."""
    port, state = free_port(), tmp_path / "state.db"
    path = "/api/v1/namespaces/default/configmaps"
    # The same address, state, CA and credentials, as `sftjob local up` keeps them in its workdir.
    same = {"port": port, "state_path": state, "pki_dir": tmp_path / "pki"}
    same |= {"admin_token": "admin-token", "signing_key": "signing-key"}
    server = EmulatorThread(**same).start()
    api = KubeHttp(server.write_kubeconfig(tmp_path / "kubeconfig"))
    seen: list[tuple[str, str]] = []
    informer = Informer(api, path, lambda t, o: seen.append((t, o["metadata"]["name"])))
    task = asyncio.create_task(informer.run())
    try:
        await asyncio.wait_for(informer.synced.wait(), 5)
        await api.create(path, {"metadata": {"name": "before"}})
        await asyncio.sleep(0.3)
        await asyncio.to_thread(server.stop)
        await asyncio.sleep(0.5)  # the informer's watch fails and it retries meanwhile
        server = await asyncio.to_thread(EmulatorThread(**same).start)
        await api.create(path, {"metadata": {"name": "after"}})
        for _ in range(200):
            if ("ADDED", "after") in seen:
                break
            await asyncio.sleep(0.05)
        assert seen == [("ADDED", "before"), ("ADDED", "after")], seen
        names = sorted(o["metadata"]["name"] for o in informer.cache.values())
        assert names == ["after", "before"]
    finally:
        await cancel_and_wait(task)
        await api.close()
        await asyncio.to_thread(server.stop)


# ------------------------------------------------------------------ node_reboot, pure


def pod_with(status: dict[str, Any], restart: str = "Never", inits: int = 0) -> dict[str, Any]:
    spec: dict[str, Any] = {"restartPolicy": restart, "containers": [{"name": "main"}]}
    if inits:
        spec["initContainers"] = [{"name": f"init{i}"} for i in range(inits)]
    return {"metadata": {"name": "p", "uid": "u"}, "spec": spec, "status": status}


RUNNING = {"running": {"startedAt": "2026-01-01T00:00:00Z"}}
WAITING = {"waiting": {"reason": "PodInitializing"}}
DONE = {"terminated": {"exitCode": 0, "reason": "Completed"}}


def cs(name: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "state": state, "ready": "running" in state, **extra}


def test_only_started_never_pods_are_lost() -> None:
    running = {"phase": "Running", "containerStatuses": [cs("main", RUNNING)]}
    assert lost_on_reboot(pod_with(running))
    assert not lost_on_reboot(pod_with(running, restart="Always"))
    assert not lost_on_reboot(pod_with(running, restart="OnFailure"))
    pending = {"phase": "Pending", "containerStatuses": [cs("main", {"waiting": {"reason": "ContainerCreating"}})]}  # fmt: skip
    assert not ran_before(pod_with(pending)) and not lost_on_reboot(pod_with(pending))
    assert not lost_on_reboot(pod_with({**running, "phase": "Failed"}))
    assert not lost_on_reboot(pod_with({"phase": "Pending"}))


def test_terminated_after_reboot_follows_terminate_pod() -> None:
    status = {
        "phase": "Running",
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": "t0"},
            {"type": "Ready", "status": "True", "lastTransitionTime": "t1"},
        ],
        "containerStatuses": [cs("main", RUNNING, restartCount=0, started=True)],
    }
    pod = pod_with(status)
    original = copy.deepcopy(pod)
    out = terminated_after_reboot(pod, "t2")
    assert pod == original, "the input must not be changed"
    assert out["phase"] == "Failed"
    (main,) = out["containerStatuses"]
    assert main["state"] == {"terminated": {"reason": "ContainerStatusUnknown", "message": UNKNOWN_MESSAGE, "exitCode": 137}}  # fmt: skip
    assert (main["ready"], main["started"], main["restartCount"]) == (False, False, 0)
    conditions = {c["type"]: c for c in out["conditions"]}
    assert conditions["PodScheduled"] == status["conditions"][0]
    assert conditions["Ready"]["status"] == "False" and conditions["Ready"]["reason"] == "PodFailed"
    assert conditions["Ready"]["lastTransitionTime"] == "t2"
    assert conditions["ContainersReady"]["reason"] == "PodFailed"


def test_terminated_after_reboot_keeps_finished_containers_and_unstarted_init_ones() -> None:
    # init0 finished, init1 was running, init2 never started: main containers stay waiting
    # (the pod never initialized) and only init1 gets the unknown state.
    status = {
        "phase": "Pending",
        "initContainerStatuses": [cs("init0", DONE), cs("init1", RUNNING), cs("init2", WAITING)],
        "containerStatuses": [cs("main", WAITING)],
    }
    out = terminated_after_reboot(pod_with(status, inits=3), "t")
    inits = {c["name"]: c["state"] for c in out["initContainerStatuses"]}
    assert inits == {"init0": DONE, "init1": LOST, "init2": WAITING}
    assert out["containerStatuses"][0]["state"] == WAITING
    assert out["phase"] == "Failed"
