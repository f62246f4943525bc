"""The local node: runs Pods of the local control plane as processes on this machine.

`LocalNode` plays kube-scheduler + kubelet for one Node (`local-node`) and talks
to the API only over HTTP, from a kubeconfig, like any client:

* registers the Node (capacity/allocatable cpu, memory, pods and
  `nvidia.com/gpu: N` from the configured GPU count; condition Ready);
* watches Pods (list + watch, resumed from the last resourceVersion, relist on
  410) and binds unscheduled ones (`pods/<name>/binding`) when their GPU
  requests fit: any `<vendor>/gpu` in requests/limits, summed over containers,
  against the GPUs of this node's non-terminal pods. Otherwise the pod stays
  Pending with `PodScheduled=False`, reason `Unschedulable`, message
  `0/1 nodes are available: 1 Insufficient nvidia.com/gpu.` and a
  `FailedScheduling` Event; it is retried on every pod change (GPUs freed).
  cpu/memory requests, nodeSelector, affinity and taints are NOT considered.
  Pods bound to another node, or with another `schedulerName`, are ignored;
* runs each container's `command` + `args` as a local process in the current
  Python environment. **The image is recorded in the status but never pulled**:
  a container needs an explicit `command` (or an entry in `image_commands`);
  `python`/`python3` run as `sys.executable`, and the interpreter's `bin/` is
  first on PATH (so `accelerate`, `torchrun` of this venv are found). Init
  containers run one after the other, then all containers concurrently.
  Each process starts in its own session/process group; stdout+stderr are
  appended to `<log_dir>/<ns>/<pod>/<container>.log`, which the emulator serves
  as `pods/<name>/log`.

Conventions pod processes (trainer, operator) can rely on
---------------------------------------------------------
Environment: the node's own environment (minus PYTEST_CURRENT_TEST and
KUBERNETES_SERVICE_HOST/PORT), then:
  KUBECONFIG                 the local control plane's kubeconfig. There is no
                             in-cluster config (no https service account): code
                             should load KUBECONFIG when in-cluster config is absent.
                             A pod that sets KUBECONFIG itself keeps its value.
  TERMINATION_MESSAGE_PATH   real file behind the container's
                             `terminationMessagePath` (default /dev/termination-log).
  SFTJOB_LOCAL_MOUNTS        JSON {container path: real host path} for every
                             volumeMount, the termination path and workingDir.
  SFTJOB_LOCAL_POD_IP / _POD_NAMESPACE / _NODE / _HOSTS_FILE
  HOSTNAME                   spec.hostname or the pod name.
  GLOO_SOCKET_IFNAME=lo      gloo must use loopback (no other interface is routable).
  TMPDIR                     the real folder of a volume mounted at /tmp, if any.
  SFTJOB_LOCAL_TORCH_HOOK    1 when /etc/hosts is not managed (see node_dns).
  PYTHONUNBUFFERED=1         so `kubectl logs` shows output promptly.
  CUDA_VISIBLE_DEVICES / NVIDIA_VISIBLE_DEVICES  only for pods that request
                             GPUs: the node's device indices assigned to the pod.
  then the pod's env/envFrom (literal, secretKeyRef, configMapKeyRef, fieldRef,
  resourceFieldRef; `$(VAR)` expansion as Kubernetes does), which wins.

Paths: processes cannot see container paths such as `/data`. Every
`volumeMounts[].mountPath` (with subPath), the `terminationMessagePath` and a
`workingDir` are mapped to real folders, and the node rewrites every occurrence
of such a path *as a whole path prefix* (e.g. `/data`, `/data/x`,
`--out=/data/x`, but not `/database` or `/x/data`) in command, args and env
values, longest prefix first. File contents (ConfigMap JSON, ...) are NOT
rewritten: code reading paths from files should map them with
SFTJOB_LOCAL_MOUNTS (longest matching prefix). Volumes:
  configMap / secret / downwardAPI / projected  files under the pod folder
                             (items, keys, defaultMode/mode; written once at start)
  emptyDir                   `<pod folder>/volumes/<name>`, removed with the pod
  hostPath                   the real host path
  persistentVolumeClaim      `<workdir>/pvc/<ns>/<claimName>`, shared by every pod
                             using the claim and kept across pods (checkpoints survive)
Without workingDir a process runs in `<pod folder>/rootfs`. The pod folder is
`<workdir>/pods/<ns>/<name>-<uid[:8]>`.

Network and DNS: each pod gets its own loopback address 127.0.X.Y as
`status.podIP` (hostIP 127.0.0.1; `hostNetwork: true` pods get 127.0.0.1). Code that binds its pod IP (instead of
0.0.0.0) can use the same port in several pods; torch's TCPStore binds every
address, so two rendezvous on one port would still clash. Cluster names are
served as described in `sftjob_local.node_dns` (/etc/hosts block when writable
+ a Python `getaddrinfo` hook from PYTHONPATH).

Not enforced: securityContext (processes run as the node's user), resource
limits (cpu/memory), readOnly mounts, readiness/liveness probes, image pulls.

Status: phase Pending → Running → Succeeded/Failed, containerStatuses (state
running/terminated, exitCode, reason Completed/Error/StartError, started,
ready, restartCount, lastState; a process killed by signal N reports 128+N;
OOMKilled is never reported), `message` from the termination file (≤ 4096
bytes) or, with `FallbackToLogsOnError` on error and an empty file, the log
tail (80 lines / 2048 bytes); conditions PodScheduled, Initialized,
ContainersReady, Ready (ready = running: probes are ignored); podIP(s),
hostIP(s), startTime. Always patched through `pods/<name>/status`.
restartPolicy Always/OnFailure restart the process with an exponential
back-off (0.5 s doubling up to 10 s, state CrashLoopBackOff in between).
A missing ConfigMap/Secret keeps the container waiting with
CreateContainerConfigError and is retried every second.
activeDeadlineSeconds kills the pod: Failed, reason DeadlineExceeded.

Deletion: a pod with `deletionTimestamp` gets SIGTERM on each container's
process group, SIGKILL after `deletionGracePeriodSeconds`, then the node
completes the deletion with `gracePeriodSeconds=0` (uid precondition).

Shutdown (`stop()`): pod processes get SIGTERM, then SIGKILL after
`shutdown_grace` seconds; their pods' status is left as it was (a real node
that disappears leaves its pods too). The /etc/hosts block is removed.

Start after a restart (the API keeps its objects, see cluster.py): pods bound to
this node that are not terminal and that this instance is not running are
handled as a kubelet does after a reboot (`node_reboot`): restartPolicy Never
pods whose containers had started are marked Failed, each such container
terminated with reason ContainerStatusUnknown, exit code 137, "The container
could not be located when the pod was terminated"; Always/OnFailure pods and
pods that never started a container are started again (restartCount starts
over at 0, unlike a kubelet's).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
from pathlib import Path
from typing import Any

from .node_dns import (
    compute_records,
    etc_hosts_writable,
    render_hosts,
    update_etc_hosts,
    write_atomic,
    write_pyhook,
)
from .node_kube import ApiError, Informer, KubeHttp, cancel_and_wait
from .node_pod import PodWorker, now
from .node_reboot import lost_on_reboot, terminated_after_reboot
from .node_spec import gpu_requests, is_terminal, unschedulable_message

__all__ = ["LocalNode", "NODE_NAME"]

log = logging.getLogger("sftjob_local.node")

Obj = dict[str, Any]
NODE_NAME = "local-node"


def _memory_bytes() -> int:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 16 * 2**30


class LocalNode:
    """Scheduler + kubelet for one local Node; see the module docstring.

    `async with LocalNode(kubeconfig, workdir) as node:` or `await start()` /
    `await stop()`. Everything runs on the caller's event loop.
    """

    def __init__(
        self,
        kubeconfig: Path | str,
        workdir: Path | str,
        *,
        log_dir: Path | str | None = None,
        name: str = NODE_NAME,
        gpus: int = 0,
        gpu_resource: str = "nvidia.com/gpu",
        manage_etc_hosts: bool | None = None,
        image_commands: dict[str, list[str]] | None = None,
        restart_backoff: float = 0.5,
        max_restart_backoff: float = 10.0,
        config_retry: float = 1.0,
        shutdown_grace: float = 2.0,
    ) -> None:
        self.kubeconfig = Path(kubeconfig).resolve()
        self.workdir = Path(workdir).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir else self.workdir / "logs"
        self.name = name
        self.gpus = int(gpus)
        self.gpu_resource = gpu_resource
        self.manage_etc_hosts = (
            etc_hosts_writable() if manage_etc_hosts is None else manage_etc_hosts
        )
        self.etc_hosts = Path("/etc/hosts")
        self.image_commands = dict(image_commands or {})
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.config_retry = config_retry
        self.shutdown_grace = shutdown_grace
        self.hosts_file = self.workdir / "hosts"
        self.pyhook_dir = self.workdir / "pyhook"
        cpu = os.cpu_count() or 1
        self.allocatable: dict[str, str] = {
            "cpu": str(cpu),
            "memory": f"{_memory_bytes() // 1024}Ki",
            "pods": "110",
            "ephemeral-storage": "100Gi",
        }
        if self.gpus:
            self.allocatable[gpu_resource] = str(self.gpus)
        self._api: KubeHttp | None = None
        self.workers: dict[str, PodWorker] = {}
        self._assumed: dict[str, int] = {}  # uid → GPUs, bound but not yet seen bound
        self._unschedulable: dict[str, str] = {}  # uid → last reported message
        self._reporting_lost: set[str] = set()  # uids being marked Failed (node_reboot)
        self._ips_used: set[str] = set()
        self._ip_next = random.randrange(256, 254 * 256)
        self._devices_used: set[int] = set()
        self._sched_kick = asyncio.Event()
        self._dns_text: str | None = None
        self.etc_hosts_block_id = f"{name}-{secrets.token_hex(4)}"
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self.pods: Informer | None = None
        self.services: Informer | None = None

    # ----------------------------------------------------------------- public
    @property
    def api(self) -> KubeHttp:
        """The node's API client (after `start()`)."""
        if self._api is None:
            raise RuntimeError("the local node is not started")
        return self._api

    async def __aenter__(self) -> LocalNode:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        write_pyhook(self.pyhook_dir)
        self.refresh_dns(force=True)
        self._api = KubeHttp(self.kubeconfig)
        await self._register()
        self.pods = Informer(self.api, "/api/v1/pods", self._on_pod, name="pods")
        self.services = Informer(self.api, "/api/v1/services", self._on_service, name="services")
        self._tasks = [
            asyncio.create_task(self.pods.run(), name="node pods watch"),
            asyncio.create_task(self.services.run(), name="node services watch"),
            asyncio.create_task(self._scheduler(), name="node scheduler"),
        ]
        await asyncio.wait_for(
            asyncio.gather(self.pods.synced.wait(), self.services.synced.wait()), 30
        )
        log.info("local node %s ready (gpus=%d, /etc/hosts=%s)", self.name, self.gpus, self.manage_etc_hosts)  # fmt: skip

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        workers = list(self.workers.values())
        for worker in workers:
            # The pods' status stays as it was (no "exited 143" from our own SIGTERM): the
            # next start reports them as a kubelet does after a reboot (node_reboot).
            worker.gone = True
        await asyncio.gather(
            *(w.shutdown(self.shutdown_grace) for w in workers), return_exceptions=True
        )
        if self._bg:
            await asyncio.wait(self._bg, timeout=2)
        await cancel_and_wait(*self._bg)
        if self.manage_etc_hosts:
            with contextlib.suppress(OSError):
                update_etc_hosts(self.etc_hosts, self.etc_hosts_block_id, None)
        if self._api is not None:
            await self._api.close()

    def image_command(self, image: str) -> list[str] | None:
        """Default command for an image without `command` (the image is not pulled)."""
        best = None
        for prefix in self.image_commands:
            if image.startswith(prefix) and (best is None or len(prefix) > len(best)):
                best = prefix
        return None if best is None else list(self.image_commands[best])

    # ----------------------------------------------------------------- node object
    def _node_status(self) -> Obj:
        ts = now()
        return {
            "capacity": dict(self.allocatable),
            "allocatable": dict(self.allocatable),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "reason": "KubeletReady",
                    "message": "local node is posting ready status",
                    "lastHeartbeatTime": ts,
                    "lastTransitionTime": ts,
                }
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "operatingSystem": "linux",
                "kubeletVersion": "v1.32.0-sftjob-local",
                "containerRuntimeVersion": "local-process://1",
                "osImage": "local processes",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "machineID": "",
                "systemUUID": "",
                "bootID": "",
            },
        }

    async def _register(self) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.name,
                "labels": {
                    "kubernetes.io/hostname": self.name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "node.kubernetes.io/instance-type": "local",
                },
            },
            "spec": {},
            "status": self._node_status(),
        }
        try:
            await self.api.create("/api/v1/nodes", body)
        except ApiError as exc:
            if exc.status != 409:
                raise
        # status is ignored on create when /status is a subresource: set it there
        await self.api.merge_patch(
            f"/api/v1/nodes/{self.name}/status", {"status": self._node_status()}
        )

    # ----------------------------------------------------------------- events
    def event(
        self,
        pod: Obj,
        reason: str,
        message: str,
        *,
        type_: str = "Normal",
        source: str = "kubelet",
    ) -> None:
        """Record an Event about a pod (fire and forget)."""
        if self._api is None:
            return
        meta = pod["metadata"]
        ns = meta.get("namespace", "default")
        ts = now()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": ns},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "namespace": ns,
                "uid": meta.get("uid"),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": source, "host": self.name},
            "reportingComponent": source,
            "reportingInstance": self.name,
            "firstTimestamp": ts,
            "lastTimestamp": ts,
            "count": 1,
        }
        api = self.api

        async def send() -> None:
            with contextlib.suppress(Exception):
                await api.create(f"/api/v1/namespaces/{ns}/events", body)

        task = asyncio.create_task(send())
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    # ----------------------------------------------------------------- pods
    def _on_pod(self, etype: str, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if etype == "DELETED":
            self._assumed.pop(uid, None)
            self._unschedulable.pop(uid, None)
            worker = self.workers.pop(uid, None)
            if worker is not None:
                worker.object_deleted()
                self._spawn(self._cleanup(worker))
        elif (pod.get("spec") or {}).get("nodeName") == self.name:
            self._assumed.pop(uid, None)
            self._unschedulable.pop(uid, None)
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
            elif meta.get("deletionTimestamp"):
                # bound here but never run by this node instance: nothing to stop
                self._spawn(self._force_delete(pod))
            elif lost_on_reboot(pod):
                # its processes died with an earlier instance of this node
                self._report_lost(pod)
            elif not is_terminal(pod):
                self._start_worker(pod)
        self._sched_kick.set()
        self.refresh_dns()

    def _on_service(self, etype: str, svc: Obj) -> None:
        self.refresh_dns()

    def _start_worker(self, pod: Obj) -> None:
        host_network = bool((pod.get("spec") or {}).get("hostNetwork"))
        ip = "127.0.0.1" if host_network else self._alloc_ip()
        want = sum(gpu_requests(pod).values())
        free = [d for d in range(self.gpus) if d not in self._devices_used]
        devices = free[:want]
        self._devices_used.update(devices)
        worker = PodWorker(self, pod, ip, devices)
        self.workers[worker.uid] = worker
        worker.start()
        worker.update(pod)  # a deletion already requested starts right away

    def release(self, worker: PodWorker) -> None:
        """The worker's processes are gone: free its IP and GPU devices."""
        self._ips_used.discard(worker.ip)
        self._devices_used.difference_update(worker.gpu_devices)
        worker.gpu_devices = []
        self.refresh_dns()

    async def _cleanup(self, worker: PodWorker) -> None:
        await worker.finished.wait()
        worker.cleanup()

    def _report_lost(self, pod: Obj) -> None:
        """Mark Failed a pod whose containers this node cannot find (see node_reboot)."""
        meta = pod["metadata"]
        if meta["uid"] in self._reporting_lost:
            return
        self._reporting_lost.add(meta["uid"])
        ns, name = meta.get("namespace", "default"), meta["name"]
        status = terminated_after_reboot(pod, now())

        async def patch() -> None:
            try:
                await self.api.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status})  # fmt: skip
                log.info("pod %s/%s: containers lost with the previous node instance; Failed", ns, name)  # fmt: skip
            except ApiError as exc:  # a later event of the pod tries again
                log.warning("pod %s/%s: cannot mark it Failed: %s", ns, name, exc)
            finally:
                self._reporting_lost.discard(meta["uid"])

        self._spawn(patch())

    async def _force_delete(self, pod: Obj) -> None:
        meta = pod["metadata"]
        with contextlib.suppress(ApiError):
            await self.api.delete(
                f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta['name']}",
                {"gracePeriodSeconds": 0, "preconditions": {"uid": meta["uid"]}},
            )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    def _alloc_ip(self) -> str:
        """Next free 127.0.X.Y, round-robin: a freed address is reused last, so
        a new pod does not inherit a just-ended pod's sockets or DNS entries."""
        while True:
            n = self._ip_next
            self._ip_next = 256 if n >= 254 * 256 else n + 1
            x, y = divmod(n, 256)
            ip = f"127.0.{x}.{y}"
            if 1 <= y <= 254 and ip not in self._ips_used:
                self._ips_used.add(ip)
                return ip

    # ----------------------------------------------------------------- scheduler
    def _gpus_in_use(self) -> int:
        assert self.pods is not None
        used = sum(self._assumed.values())
        for pod in self.pods.cache.values():
            if (pod.get("spec") or {}).get("nodeName") == self.name and not is_terminal(pod):
                used += sum(gpu_requests(pod).values())
        return used

    async def _scheduler(self) -> None:
        while True:
            await self._sched_kick.wait()
            self._sched_kick.clear()
            try:
                await self._schedule_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduler pass failed")
                await asyncio.sleep(0.5)
                self._sched_kick.set()

    async def _schedule_once(self) -> None:
        assert self.pods is not None
        pending = []
        for pod in self.pods.cache.values():
            spec = pod.get("spec") or {}
            meta = pod["metadata"]
            if spec.get("nodeName") or meta["uid"] in self._assumed:
                continue
            if spec.get("schedulerName") not in (None, "", "default-scheduler"):
                continue
            if is_terminal(pod) or meta.get("deletionTimestamp"):
                continue
            pending.append(pod)
        pending.sort(key=lambda p: (p["metadata"].get("creationTimestamp") or "", p["metadata"]["name"]))  # fmt: skip
        free = self.gpus - self._gpus_in_use()
        for pod in pending:
            asked = gpu_requests(pod)
            lacking = [
                name for name, n in sorted(asked.items()) if name != self.gpu_resource or n > free
            ]
            if lacking:
                await self._mark_unschedulable(pod, lacking)
                continue
            if await self._bind(pod):
                n = sum(asked.values())
                self._assumed[pod["metadata"]["uid"]] = n
                free -= n

    async def _bind(self, pod: Obj) -> bool:
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": self.name},
        }
        try:
            await self.api.create(f"/api/v1/namespaces/{ns}/pods/{name}/binding", body)
            return True
        except ApiError as exc:
            if exc.status == 409:
                return False  # already bound (our own earlier binding, or another scheduler)
            if exc.status not in (404, 405):
                log.warning("binding %s/%s failed: %s", ns, name, exc)
                return False
        # an API without the binding subresource: set spec.nodeName directly
        try:
            await self.api.merge_patch(
                f"/api/v1/namespaces/{ns}/pods/{name}", {"spec": {"nodeName": self.name}}
            )
            return True
        except ApiError as exc:
            log.warning("binding %s/%s failed: %s", ns, name, exc)
            return False

    async def _mark_unschedulable(self, pod: Obj, lacking: list[str]) -> None:
        meta = pod["metadata"]
        message = unschedulable_message(lacking[0]) if len(lacking) == 1 else (
            "0/1 nodes are available: " + ", ".join(f"1 Insufficient {r}" for r in lacking) + "."
        )  # fmt: skip
        if self._unschedulable.get(meta["uid"]) == message:
            return
        self._unschedulable[meta["uid"]] = message
        ns, name = meta.get("namespace", "default"), meta["name"]
        status = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                    "lastProbeTime": None,
                    "lastTransitionTime": now(),
                }
            ],
        }
        with contextlib.suppress(ApiError):
            await self.api.merge_patch(f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status})  # fmt: skip
        self.event(pod, "FailedScheduling", message, type_="Warning", source="default-scheduler")

    # ----------------------------------------------------------------- DNS
    def refresh_dns(self, force: bool = False) -> None:
        """Recompute cluster names from this node's running pods and all Services."""
        pods = []
        for w in self.workers.values():
            if not w.finished.is_set() and not w.deleting:
                phase = "Running" if w.dns_ready else "Pending"
                pods.append({"metadata": w.pod["metadata"], "spec": w.pod.get("spec") or {},
                             "status": {"phase": phase, "podIP": w.ip}})  # fmt: skip
        services = list(self.services.cache.values()) if self.services else []
        text = render_hosts(compute_records(pods, services))
        if text == self._dns_text and not force:
            return
        self._dns_text = text
        write_atomic(self.hosts_file, text)
        if self.manage_etc_hosts:
            try:
                update_etc_hosts(self.etc_hosts, self.etc_hosts_block_id, text)
            except OSError as exc:
                log.warning("cannot update /etc/hosts (%s); Python hook only", exc)
                self.manage_etc_hosts = False
