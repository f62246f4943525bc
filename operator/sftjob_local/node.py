"""The local node: runs Pods of the local control plane as processes on this machine.

`LocalNode` plays the kubelet for one Node (`local-node` by default) and talks
to the API only over HTTP, from a kubeconfig, like any client:

* registers the Node like a kubelet: capacity = allocatable `cpu` (default
  `os.cpu_count()`), `memory` (default MemTotal of /proc/meminfo),
  `ephemeral-storage` (the size of the workdir's filesystem), `pods` (default
  `default_max_pods`: 4 per CPU, not the kubelet's 110, so a big job cannot
  start a hundred trainer processes on a laptop) and `nvidia.com/gpu: N` from
  the configured GPU count; labels `kubernetes.io/hostname`, `kubernetes.io/os`,
  `kubernetes.io/arch`, `node.kubernetes.io/instance-type` plus any given;
  `spec.taints` as given; condition Ready;
* scheduling is `sftjob_local.local_scheduler.LocalScheduler` (kube-scheduler's
  filters and messages, see `sftjob_local.node_scheduler`): unbound pods are
  bound to a node that fits their cpu/memory/ephemeral-storage/extended
  resource requests and pod count, nodeSelector, required node affinity and
  taints; the others stay Pending with `PodScheduled=False`/`Unschedulable`,
  the scheduler's message and a `FailedScheduling` Event, and no process is
  started for them. A `LocalNode` on its own runs one (`schedule=True`);
  `LocalCluster` runs one scheduler for all of its nodes (`--nodes N`);
* watches Pods (list + watch, resumed from the last resourceVersion, relist on
  410) and runs those bound to it (`spec.nodeName`). Pods bound to another
  node are ignored. Before running a pod the node admits it as the kubelet
  does (`node_scheduler.kubelet_admission`): a pod bound here directly
  (`spec.nodeName` set by its creator, bypassing the scheduler) that does not
  fit the resources left, the node's labels or its NoExecute taints is failed
  with reason `OutOfcpu`/`OutOfmemory`/`OutOfpods`/..., `NodeAffinity` or
  `TaintToleration`, message `Pod was rejected: ...` and a Warning Event, and
  no process is started;
* runs each container's `command` + `args` as a local process in the current
  Python environment. **The image is recorded in the status but never pulled**:
  a container needs an explicit `command` (or an entry in `image_commands`);
  `python`/`python3` run as `sys.executable`, and the interpreter's `bin/` is
  first on PATH (so `accelerate`, `torchrun` of this venv are found). Init
  containers run one after the other, then all containers concurrently.
  Each container run has a small supervisor process (`node_supervisor.py`, the
  part of a runtime shim) that starts it in its own session/process group and
  writes its stdout/stderr in the CRI log format to
  `<log_dir>/<ns>_<pod>_<uid>/<container>/<restartCount>.log` (as the kubelet's
  /var/log/pods), which the emulator serves as `pods/<name>/log` with
  previous, tailLines, sinceSeconds/sinceTime, timestamps, limitBytes and
  follow (see `sftjob_local.node_logs`).

Conventions pod processes (trainer, operator) can rely on
---------------------------------------------------------
Environment: the node's own environment (minus PYTEST_CURRENT_TEST and
KUBERNETES_SERVICE_HOST/PORT), then:
  KUBECONFIG                 a kubeconfig of the local control plane that
                             authenticates as the pod's ServiceAccount (the token
                             below), or without credentials when automount is off;
                             never the node's admin kubeconfig. There is no in-cluster
                             config: code should load KUBECONFIG when in-cluster config
                             is absent. A pod that sets KUBECONFIG itself keeps its value.
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

ServiceAccount token (node_sa): as a kubelet does, unless automountServiceAccountToken
is false (on the pod, else on its ServiceAccount), the node requests a token bound to
the pod (TokenRequest) and maps `/var/run/secrets/kubernetes.io/serviceaccount`
(token, ca.crt, namespace) to `<pod folder>/serviceaccount`; a missing ServiceAccount
keeps the pod waiting (CreateContainerConfigError), retried like a missing Secret.

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
                             using the claim and kept across pods (checkpoints survive);
                             the claim object must exist: the scheduler keeps a pod
                             naming a missing one Pending (see local_scheduler)
Without workingDir a process runs in `<pod folder>/rootfs`. The pod folder is
`<workdir>/pods/<ns>/<name>-<uid[:8]>`.

Network and DNS: each pod gets its own loopback address 127.0.X.Y as
`status.podIP` (hostIP 127.0.0.1; `hostNetwork: true` pods get 127.0.0.1). Code that binds its pod IP (instead of
0.0.0.0) can use the same port in several pods; torch's TCPStore binds every
address, so two rendezvous on one port would still clash. Cluster names are
served as described in `sftjob_local.node_dns` (/etc/hosts block when writable
+ a Python `getaddrinfo` hook from PYTHONPATH).

Several nodes in one process (`LocalCluster(nodes=N)`): every node after the
first `join()`s the first, which then allocates the pod IPs and writes the
cluster DNS for the pods of all of them (one hosts file, one /etc/hosts
block). They share the workdir and log dir; node k hands out GPU device
indices k*gpus .. k*gpus+gpus-1, so no two nodes give a pod the same device.

Memory limits: the supervisor sums the resident set (RSS from /proc) of the
container's whole process tree every `memory_poll` seconds (0.25 s) and kills
the tree with SIGKILL above `resources.limits.memory`: terminated, reason
OOMKilled, exit code 137 (lastState after a restart). Limits of this polling:
memory allocated and touched within one interval is not seen until the next
poll (the machine can briefly hold more), RSS counts shared pages once per
process (a cgroup counts them once) and page cache is not counted.

Not enforced: securityContext (processes run as the node's user), cpu limits,
readOnly mounts, readiness/liveness probes, image pulls (an image reference is
only parsed, with the docker reference grammar).

Status: phase Pending → Running → Succeeded/Failed, containerStatuses (state
running/terminated, exitCode, reason Completed/Error/StartError, started,
ready, restartCount, lastState; a process killed by signal N reports 128+N;
OOMKilled with 137 over the memory limit), `message` from the termination file (≤ 4096
bytes) or, with `FallbackToLogsOnError` on error and an empty file, the log
tail (80 lines / 2048 bytes); conditions PodScheduled, Initialized,
ContainersReady, Ready (ready = running: probes are ignored); podIP(s),
hostIP(s), startTime. Always patched through `pods/<name>/status`.
restartPolicy Always/OnFailure restart the process with an exponential
back-off (0.5 s doubling up to 10 s, state CrashLoopBackOff in between).
What the kubelet reports before a container starts, retried every
`config_retry` seconds (1 s) until it works (the pod stays Pending):
  a volume whose Secret/ConfigMap (or item key) is missing: every container
    waits in ContainerCreating, Warning event FailedMount `MountVolume.SetUp
    failed for volume "v" : secret "x" not found`;
  an image reference that does not parse: waiting InvalidImageName with
    `Failed to apply default image tag "i": couldn't parse image name "i": ...`,
    events InspectFailed (that message) and Failed `Error: InvalidImageName`;
  env/envFrom referencing a missing Secret/ConfigMap or key (not optional):
    waiting CreateContainerConfigError (`secret "x" not found`, `couldn't find
    key k in Secret ns/x`), Warning event Failed `Error: <message>`;
  runAsNonRoot (pod or container) with runAsUser 0, or with no runAsUser and an
    image whose USER is root or a name (verifyRunAsNonRoot): waiting
    CreateContainerConfigError (`container has runAsNonRoot and image will run
    as root (pod: "p_ns(uid)", container: c)`, ...). Images are never pulled, so
    an image's USER is known only from `image_users` ({image prefix: USER as the
    Dockerfile writes it, "" for none = root}); for any other image only the
    pod's own runAsUser is checked.
(Only the failing container shows the reason; the pod starts no container until
all are ready, where a kubelet would start the others.) Events are sent when a
problem appears or changes. Normal path events, from `kubelet`: Pulled
(`Container image "i" already present on machine`), Created (`Created
container: c`), Started (`Started container c`), BackOff, Killing.
activeDeadlineSeconds kills the pod: Failed, reason DeadlineExceeded.

Deletion (also by `pods/<name>/eviction`, which the emulator serves with the
DisruptionTarget condition): a pod with `deletionTimestamp` gets a Killing event
and SIGTERM on each container's process group, SIGKILL on the whole tree after
`deletionGracePeriodSeconds`, then the node completes the deletion with
`gracePeriodSeconds=0` (uid precondition). Conditions the node does not own
(DisruptionTarget) are kept in its status updates, as the kubelet's status
manager does. The pod keeps its phase while terminating.

Shutdown (`stop()`): pod processes get SIGTERM, then SIGKILL after
`shutdown_grace` seconds; their pods' status is left as it was (a real node
that disappears leaves its pods too), unless `graceful_shutdown=True` (a
kubelet with shutdownGracePeriod): then each pod is first reported Failed,
reason Terminated, message `Pod was terminated in response to imminent node
shutdown.`, with DisruptionTarget=True reason TerminationByKubelet. The
/etc/hosts block is removed.

A node that dies (even SIGKILL) takes its pods' processes with it: each
supervisor holds a pipe from the node (its stdin) and kills its tree with
SIGKILL when the pipe closes; the container's main process also has
PR_SET_PDEATHSIG=SIGKILL. On start the node kills the processes recorded in
`<pod folder>/procs/*.pid` (pid + start time, so a reused pid is spared) and,
once the pod list is synced, removes the folders of pods that no longer exist
(`sftjob_local.node_reaper`). Log folders are kept.

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
import shutil
from pathlib import Path
from typing import Any, TypeVar

from . import node_reaper
from .local_scheduler import LocalScheduler
from .node_dns import (
    compute_records,
    etc_hosts_writable,
    render_hosts,
    update_etc_hosts,
    write_atomic,
    write_pyhook,
)
from .node_kube import ApiError, Informer, KubeHttp, cancel_and_wait, post_event
from .node_pod import PodWorker, now
from .node_reboot import lost_on_reboot, terminated_after_reboot
from .node_scheduler import kubelet_admission
from .node_spec import gpu_requests, is_terminal, pod_event

__all__ = ["LocalNode", "NODE_NAME", "default_max_pods", "machine_cpus", "machine_memory_bytes"]

log = logging.getLogger("sftjob_local.node")

Obj = dict[str, Any]
NODE_NAME = "local-node"


def machine_memory_bytes() -> int:
    """This machine's memory (MemTotal of /proc/meminfo), what a kubelet reports."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 16 * 2**30


def machine_cpus() -> int:
    return os.cpu_count() or 1


def default_max_pods(cpus: float) -> int:
    """Pod capacity when none is given: 4 per CPU (at least 4). A real kubelet
    says 110 whatever the machine, but here every pod is a process of this
    machine: 110 trainer processes on 2 cores is what the cap must prevent."""
    return max(4, int(4 * cpus))


def _format_cpus(cpus: float) -> str:
    return str(int(cpus)) if float(cpus).is_integer() else f"{round(float(cpus) * 1000)}m"


def _disk_bytes(path: Path) -> int:
    """Size of the filesystem that holds `path` (the kubelet reports its root fs)."""
    for folder in (path, *path.parents):
        with contextlib.suppress(OSError):
            return shutil.disk_usage(folder).total
    return 100 * 2**30


T = TypeVar("T")


def _by_image_prefix(table: dict[str, T], image: str) -> T | None:
    """The entry of the longest image-name prefix in `table` that `image` starts with."""
    best = max((prefix for prefix in table if image.startswith(prefix)), key=len, default=None)
    return None if best is None else table[best]


class LocalNode:
    """Kubelet for one local Node (plus, with `schedule=True`, a scheduler); see
    the module docstring.

    `async with LocalNode(kubeconfig, workdir) as node:` or `await start()` /
    `await stop()`. Everything runs on the caller's event loop. Capacity:
    `cpus` (number), `memory` (bytes or a quantity such as "8Gi"), `max_pods`,
    `gpus`; None takes this machine's values (see the module docstring).
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
        image_users: dict[str, str] | None = None,
        restart_backoff: float = 0.5,
        max_restart_backoff: float = 10.0,
        config_retry: float = 1.0,
        shutdown_grace: float = 2.0,
        cpus: float | None = None,
        memory: int | str | None = None,
        max_pods: int | None = None,
        labels: dict[str, str] | None = None,
        taints: list[dict[str, str]] | None = None,
        gpu_device_offset: int = 0,
        schedule: bool = True,
        memory_poll: float = 0.25,
        graceful_shutdown: bool = False,
    ) -> None:
        self.kubeconfig = Path(kubeconfig).resolve()
        self.workdir = Path(workdir).resolve()
        self.log_dir = Path(log_dir).resolve() if log_dir else self.workdir / "logs"
        self.name = name
        self.gpus = int(gpus)
        self.gpu_resource = gpu_resource
        self._manage_etc_hosts = (
            etc_hosts_writable() if manage_etc_hosts is None else manage_etc_hosts
        )
        self.etc_hosts = Path("/etc/hosts")
        self.image_commands = dict(image_commands or {})
        self.image_users = dict(image_users or {})
        self.restart_backoff = restart_backoff
        self.max_restart_backoff = max_restart_backoff
        self.config_retry = config_retry
        self.shutdown_grace = shutdown_grace
        self.memory_poll = memory_poll
        self.graceful_shutdown = graceful_shutdown
        self.hosts_file = self.workdir / "hosts"
        self.pyhook_dir = self.workdir / "pyhook"
        cpus = machine_cpus() if cpus is None else cpus
        memory_text = f"{machine_memory_bytes() // 1024}Ki" if memory is None else str(memory)
        self.allocatable: dict[str, str] = {
            "cpu": _format_cpus(cpus),
            "memory": memory_text,
            "pods": str(default_max_pods(cpus) if max_pods is None else int(max_pods)),
            "ephemeral-storage": str(_disk_bytes(self.workdir)),
        }
        if self.gpus:
            self.allocatable[gpu_resource] = str(self.gpus)
        self.labels = dict(labels or {})
        self.taints = [dict(t) for t in taints or []]
        self.gpu_device_offset = int(gpu_device_offset)
        self.scheduler: LocalScheduler | None = (
            LocalScheduler(self.kubeconfig) if schedule else None
        )
        self._api: KubeHttp | None = None
        self.workers: dict[str, PodWorker] = {}
        self._group: LocalNode = self  # the node that owns pod IPs and DNS (see join)
        self._members: list[LocalNode] = [self]
        self._reporting_lost: set[str] = set()  # uids being marked Failed (node_reboot)
        self._ips_used: set[str] = set()
        self._ip_next = random.randrange(256, 254 * 256)
        self._devices_used: set[int] = set()
        self._dns_text: str | None = None
        self.etc_hosts_block_id = f"{name}-{secrets.token_hex(4)}"
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()
        self.pods: Informer | None = None
        self.services: Informer | None = None
        self.nodes: Informer | None = None
        self._node_body: Obj = {}  # the Node as registered (until the watch has it)
        self._rejected: set[str] = set()  # uids failed by admission

    # ----------------------------------------------------------------- public
    @property
    def api(self) -> KubeHttp:
        """The node's API client (after `start()`)."""
        if self._api is None:
            raise RuntimeError("the local node is not started")
        return self._api

    @property
    def manage_etc_hosts(self) -> bool:
        """Whether /etc/hosts carries the cluster names (the group's first node decides)."""
        return self._group._manage_etc_hosts

    @manage_etc_hosts.setter
    def manage_etc_hosts(self, value: bool) -> None:
        self._manage_etc_hosts = value

    def join(self, first: LocalNode) -> None:
        """Share `first`'s pod IPs and cluster DNS (several nodes in one process);
        call before `start()`."""
        self._group = first
        self._ips_used = first._ips_used
        self.hosts_file = first.hosts_file
        self.pyhook_dir = first.pyhook_dir
        first._members.append(self)

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
        # what an earlier run of the node left: nothing of it may keep running
        for pod_dir in node_reaper.pod_dirs(self.workdir / "pods"):
            node_reaper.kill_recorded(pod_dir)
        self._api = KubeHttp(self.kubeconfig)
        await self._register()
        self.pods = Informer(self.api, "/api/v1/pods", self._on_pod, name="pods")
        self.services = Informer(self.api, "/api/v1/services", self._on_service, name="services")
        self.nodes = Informer(self.api, "/api/v1/nodes", lambda *_: None, name="nodes")
        self._tasks = [
            asyncio.create_task(self.pods.run(), name="node pods watch"),
            asyncio.create_task(self.services.run(), name="node services watch"),
            asyncio.create_task(self.nodes.run(), name="node nodes watch"),
        ]
        await asyncio.wait_for(
            asyncio.gather(
                self.pods.synced.wait(), self.services.synced.wait(), self.nodes.synced.wait()
            ),
            30,
        )
        if self.scheduler is not None:
            await self.scheduler.start()
        self._remove_orphaned_pod_dirs()
        log.info("local node %s ready (gpus=%d, /etc/hosts=%s)", self.name, self.gpus, self.manage_etc_hosts)  # fmt: skip

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        workers = list(self.workers.values())
        if self.graceful_shutdown:
            await asyncio.gather(*(w.mark_node_shutdown() for w in workers), return_exceptions=True)
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
        if self._group is self and self.manage_etc_hosts:
            with contextlib.suppress(OSError):
                update_etc_hosts(self.etc_hosts, self.etc_hosts_block_id, None)
        if self._api is not None:
            await self._api.close()

    def _remove_orphaned_pod_dirs(self) -> None:
        """Remove `<workdir>/pods/<ns>/<name>-<uid8>` of pods that no longer exist
        (the kubelet's cleanupOrphanedPodDirs)."""
        assert self.pods is not None
        live = {
            (p["metadata"].get("namespace", "default"), f"{p['metadata']['name']}-{p['metadata']['uid'][:8]}")
            for p in self.pods.cache.values()
        }  # fmt: skip
        for pod_dir in node_reaper.pod_dirs(self.workdir / "pods"):
            if node_reaper.is_orphaned(pod_dir, live):
                shutil.rmtree(pod_dir, ignore_errors=True)

    def image_command(self, image: str) -> list[str] | None:
        """Default command for an image without `command` (the image is not pulled)."""
        command = _by_image_prefix(self.image_commands, image)
        return None if command is None else list(command)

    def image_user(self, image: str) -> str | None:
        """The image's USER as its Dockerfile sets it ("" is root), from `image_users`; None
        when unknown: the image is never pulled, so the node cannot read it."""
        return _by_image_prefix(self.image_users, image)

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
                    **self.labels,
                },
            },
            "spec": {"taints": self.taints} if self.taints else {},
            "status": self._node_status(),
        }
        try:
            self._node_body = body
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
        ts = now()
        event = pod_event(
            pod,
            reason,
            message,
            type_,
            source={"component": source, "host": self.name},
            reportingComponent=source,
            reportingInstance=self.name,
            firstTimestamp=ts,
            lastTimestamp=ts,
            count=1,
        )
        post_event(self.api, self._bg, event)

    # ----------------------------------------------------------------- pods
    def _on_pod(self, etype: str, pod: Obj) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if etype == "DELETED":
            self._rejected.discard(uid)
            worker = self.workers.pop(uid, None)
            if worker is not None:
                worker.object_deleted()
                self._spawn(self._cleanup(worker))
        elif (pod.get("spec") or {}).get("nodeName") == self.name:
            worker = self.workers.get(uid)
            if worker is not None:
                worker.update(pod)
            elif meta.get("deletionTimestamp"):
                # bound here but never run by this node instance: nothing to stop
                self._spawn(self._force_delete(pod))
            elif lost_on_reboot(pod):
                # its processes died with an earlier instance of this node
                self._report_lost(pod)
            elif not is_terminal(pod) and uid not in self._rejected:
                rejection = self._admit(pod)
                if rejection is None:
                    self._start_worker(pod)
                else:
                    self._rejected.add(uid)
                    self._spawn(self._reject(pod, *rejection))
        self.refresh_dns()

    def _on_service(self, etype: str, svc: Obj) -> None:
        self.refresh_dns()

    def _start_worker(self, pod: Obj) -> None:
        host_network = bool((pod.get("spec") or {}).get("hostNetwork"))
        ip = "127.0.0.1" if host_network else self._alloc_ip()
        want = sum(gpu_requests(pod).values())
        own = range(self.gpu_device_offset, self.gpu_device_offset + self.gpus)
        free = [d for d in own if d not in self._devices_used]
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

    def _admit(self, pod: Obj) -> tuple[str, str] | None:
        """The kubelet's admission (node_scheduler.kubelet_admission) against the
        pods this node runs: a pod bound here without the scheduler (spec.nodeName
        set by its creator) that does not fit is failed, not run."""
        node = self._node_body
        for obj in self.nodes.cache.values() if self.nodes else []:
            if obj["metadata"]["name"] == self.name:
                node = {**obj, "status": {**(obj.get("status") or {}), "allocatable": self.allocatable}}  # fmt: skip
        active = [
            w.pod
            for w in self.workers.values()
            if not w.finished.is_set() and w.phase not in ("Succeeded", "Failed")
        ]
        if not node:
            return None
        if not (node.get("status") or {}).get("allocatable"):
            node = {**node, "status": {"allocatable": self.allocatable}}
        return kubelet_admission(pod, node, active)

    async def _reject(self, pod: Obj, reason: str, message: str) -> None:
        """Fail a pod the node cannot admit, as the kubelet's rejectPod does."""
        meta = pod["metadata"]
        self.event(pod, reason, message, type_="Warning")
        status = {"phase": "Failed", "reason": reason, "message": f"Pod was rejected: {message}"}
        with contextlib.suppress(ApiError):
            await self.api.merge_patch(
                f"/api/v1/namespaces/{meta.get('namespace', 'default')}/pods/{meta['name']}/status",
                {"status": status},
            )

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
        if self._group is not self:
            return self._group._alloc_ip()
        while True:
            n = self._ip_next
            self._ip_next = 256 if n >= 254 * 256 else n + 1
            x, y = divmod(n, 256)
            ip = f"127.0.{x}.{y}"
            if 1 <= y <= 254 and ip not in self._ips_used:
                self._ips_used.add(ip)
                return ip

    # ----------------------------------------------------------------- DNS
    def refresh_dns(self, force: bool = False) -> None:
        """Recompute cluster names from the running pods of this node (and of the
        nodes that joined it) and all Services."""
        if self._group is not self:
            self._group.refresh_dns(force)
            return
        pods = []
        for w in (w for node in self._members for w in node.workers.values()):
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
