"""Pod networking on the local node: per-pod loopback IPs and cluster DNS names."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import kubernetes
import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import py_pod, wait_phase
from sftjob_local.cluster import LocalCluster
from sftjob_local.emulator import EmulatorThread
from sftjob_local.node import LocalNode
from sftjob_local.node_dns import etc_hosts_writable

pytestmark = pytest.mark.local

# Each rank joins through the rank-0 pod's DNS name under the headless Service,
# exactly what the operator's trainer pods do; torch's C++ TCPStore resolves
# it with glibc, so this proves the names reach non-Python resolvers too.
GLOO = """
import os, sys, torch, torch.distributed as dist
rank = int(os.environ["RANK"])
dist.init_process_group(
    "gloo", init_method=f"tcp://{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}",
    rank=rank, world_size=2,
    timeout=__import__("datetime").timedelta(seconds=40),
)
x = torch.tensor([float(rank + 1)])
dist.all_reduce(x)
print("ALLREDUCE", rank, x.item(), flush=True)
print("STORE", dist.TCPStore.__module__, flush=True)  # which resolver path was used
dist.destroy_process_group()
"""


def headless_service(name: str, selector: dict[str, str]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "None",
            "selector": selector,
            "ports": [{"name": "rdzv", "port": 29500}],
        },
    }


def free_port() -> int:
    # TCPStore binds every address, so a fixed port (29500) would clash with
    # other torch.distributed runs on this machine (e.g. trainer tests).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_gloo_pair(core: CoreV1Api, ns: str) -> list[str]:
    core.create_namespaced_service(ns, headless_service("workers", {"job": "gloo"}))
    port = str(free_port())
    master = f"rank-0.workers.{ns}.svc.cluster.local"
    for rank in (1, 0):  # rank 1 first: it must wait for rank 0's name and port
        pod = py_pod(
            f"rank-{rank}",
            GLOO,
            env=[
                {"name": "RANK", "value": str(rank)},
                {"name": "MASTER_ADDR", "value": master},
                {"name": "MASTER_PORT", "value": port},
            ],
        )
        pod["metadata"]["labels"]["job"] = "gloo"
        pod["spec"]["hostname"] = f"rank-{rank}"
        pod["spec"]["subdomain"] = "workers"
        core.create_namespaced_pod(ns, pod)
    pods = [wait_phase(core, ns, f"rank-{r}", "Succeeded", "Failed", timeout=45) for r in (0, 1)]
    logs = [core.read_namespaced_pod_log(f"rank-{r}", ns) for r in (0, 1)]
    assert [p.status.phase for p in pods] == ["Succeeded", "Succeeded"], logs
    assert "ALLREDUCE 0 3.0" in logs[0] and "ALLREDUCE 1 3.0" in logs[1]
    assert pods[0].status.pod_ip != pods[1].status.pod_ip
    return logs


@pytest.mark.skipif(not etc_hosts_writable(), reason="needs a writable /etc/hosts (root)")
def test_two_pods_rendezvous_with_gloo_through_the_headless_service_name(
    core: CoreV1Api, ns: str
) -> None:
    """Names served through the node's /etc/hosts block (root, as here and in CI)."""
    logs = run_gloo_pair(core, ns)
    # torch's own TCPStore resolved the name: glibc found it in /etc/hosts
    assert all("STORE torch._C._distributed_c10d" in text for text in logs)


def test_gloo_rendezvous_without_etc_hosts_uses_the_python_hook(tmp_path: Path) -> None:
    """A laptop without root: /etc/hosts untouched, the pods' sitecustomize
    hands torch's C++ TCPStore the rank-0 pod IP. (Measured: without the hook
    this rendezvous times out, glibc cannot resolve the name.)"""
    with LocalCluster(workdir=tmp_path, manage_etc_hosts=False) as cluster:
        core = CoreV1Api(kubernetes.config.new_client_from_config(str(cluster.kubeconfig)))
        logs = run_gloo_pair(core, "default")
        assert all("STORE sitecustomize" in text for text in logs)
        assert cluster.node is not None and not cluster.node.manage_etc_hosts
        assert cluster.node.etc_hosts_block_id not in Path("/etc/hosts").read_text()


async def test_python_resolves_service_names_without_etc_hosts(tmp_path: Path) -> None:
    """Where /etc/hosts is read-only (a laptop), the node's sitecustomize hook
    answers Python lookups: a client pod reaches a server pod by Service name
    (bare, within its namespace, and fully qualified).

    Also the node on its own: an `EmulatorThread` (other thread, other loop)
    and a `LocalNode` on this test's loop that knows only the kubeconfig."""
    with EmulatorThread(log_dir=tmp_path / "logs") as srv:
        kubeconfig = srv.write_kubeconfig(tmp_path / "kubeconfig")
        node = LocalNode(
            kubeconfig, tmp_path / "wd", log_dir=tmp_path / "logs", manage_etc_hosts=False
        )
        async with node:
            core = CoreV1Api(kubernetes.config.new_client_from_config(str(kubeconfig)))
            server = py_pod(
                "server",
                "import os, socket\n"
                "s = socket.socket(); s.bind((os.environ['SFTJOB_LOCAL_POD_IP'], 7000)); s.listen()\n"
                "for _ in range(2):\n"
                "    c, _ = s.accept(); c.sendall(b'pong'); c.close()\n",
            )
            svc = headless_service("echo", {"app": "server"})
            del svc["spec"]["clusterIP"]  # a normal Service: its first ready pod
            client = py_pod(
                "client",
                "import socket, time\n"
                "for name in ('echo', 'echo.default.svc.cluster.local'):\n"
                "    deadline = time.monotonic() + 30\n"
                "    while True:\n"
                "        try:\n"
                "            c = socket.create_connection((name, 7000), timeout=2); break\n"
                "        except OSError:\n"
                "            if time.monotonic() > deadline: raise\n"
                "            time.sleep(0.05)\n"
                "    print(name, c.recv(4).decode(), flush=True)\n",
            )
            # blocking client calls run in threads: the node shares this loop
            await asyncio.to_thread(core.create_namespaced_pod, "default", server)
            await asyncio.to_thread(core.create_namespaced_service, "default", svc)
            await asyncio.to_thread(wait_phase, core, "default", "server", "Running")
            await asyncio.to_thread(core.create_namespaced_pod, "default", client)
            pod = await asyncio.to_thread(
                wait_phase, core, "default", "client", "Succeeded", "Failed", timeout=40
            )
            logs = await asyncio.to_thread(core.read_namespaced_pod_log, "client", "default")
            # (other nodes, e.g. parallel test runs, may keep blocks there; never this one)
            assert node.etc_hosts_block_id not in Path("/etc/hosts").read_text()
            assert pod.status.phase == "Succeeded", logs
            assert "echo pong" in logs and "echo.default.svc.cluster.local pong" in logs
