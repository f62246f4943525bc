"""The local control plane in one piece: API emulator + local node + kubeconfig.

    with LocalCluster(workdir=tmp, gpus=2) as cluster:     # background thread
        subprocess.run(["kubectl", "get", "pods"], env={..., "KUBECONFIG": str(cluster.kubeconfig)})

    async with LocalCluster(workdir=tmp) as cluster:        # on the running loop
        ...

`run_local_up()` runs the same in the foreground until Ctrl-C/SIGTERM (what
`sftjob local up` calls). Layout of the workdir (default `./.sftjob-local`):

    kubeconfig                  unless another path is given: the cluster-admin (token + CA)
    state.db (-wal)             the cluster's objects (SQLite; see emulator/statedb.py)
    pki/                        the API's CA and serving certificate (https)
    secrets/                    the admin token and the service-account signing key
                                (persistence.py), kept across restarts with the CA
    logs/<ns>_<pod>_<uid>/<c>/<restart>.log
                                container output (CRI format), served as pods/<name>/log
    pods/<ns>/<pod>-<uid8>/     per-pod volumes, termination files, rootfs, procs/
    pvc/<ns>/<claim>/           PersistentVolumeClaim folders (kept)
    hosts, pyhook/              cluster DNS for pod processes (see node_dns)

State survives a restart, as etcd gives a real cluster: stopping and starting on the
same workdir keeps every object with its uid and resourceVersion. Pod processes do
not survive: the node reports the pods it finds bound to it but not running as a
kubelet does after a reboot (see node.py). `ephemeral=True` (`sftjob local up
--ephemeral`) keeps everything in memory instead: each start is an empty cluster.

Nodes: `nodes=N` registers N `LocalNode`s named `local-node`, `local-node-2`,
... (the first keeps the single-node name that scripts and docs use), every
one with the same capacity (`cpus`, `memory`, `max_pods`, `gpus`, labels,
taints: a node pool of one shape; None takes this machine's values for each
node, so N nodes promise N times this machine). One `LocalScheduler` binds the
pods among them. `cluster.node` is the first node, `cluster.nodes` all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .local_scheduler import LocalScheduler
from .node import NODE_NAME, LocalNode
from .persistence import persistent_secret, state_db_path

DEFAULT_PORT = 8765
DEFAULT_WORKDIR = Path(".sftjob-local")

__all__ = [
    "LocalCluster",
    "run_local_up",
    "node_names",
    "parse_node_labels",
    "parse_node_taints",
    "DEFAULT_PORT",
    "DEFAULT_WORKDIR",
]

TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")


def node_names(count: int) -> list[str]:
    """`local-node`, `local-node-2`, ...: the first keeps the single-node name."""
    return [NODE_NAME if i == 0 else f"{NODE_NAME}-{i + 1}" for i in range(count)]


def parse_node_labels(text: str | None) -> dict[str, str]:
    """`key=value,key2=value2`, the kubelet's --node-labels format."""
    labels: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"invalid node label {item!r}: expected key=value")
        labels[key] = value
    return labels


def parse_node_taints(text: str | None) -> list[dict[str, str]]:
    """`key=value:Effect,key2:Effect`, the kubelet's --register-with-taints format."""
    taints: list[dict[str, str]] = []
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        head, sep, effect = item.rpartition(":")
        key, _, value = head.partition("=")
        if not sep or not key or effect not in TAINT_EFFECTS:
            raise ValueError(
                f"invalid node taint {item!r}: expected key[=value]:{'|'.join(TAINT_EFFECTS)}"
            )
        taint = {"key": key, "effect": effect}
        if value:
            taint["value"] = value
        taints.append(taint)
    return taints


class LocalCluster:
    """API emulator + `LocalNode`, sync (own thread and loop) or async context manager."""

    def __init__(
        self,
        port: int = 0,
        workdir: Path | str | None = None,
        kubeconfig: Path | str | None = None,
        gpus: int = 0,
        *,
        host: str = "127.0.0.1",
        namespace: str = "default",
        nodes: int = 1,
        ephemeral: bool = False,
        **node_options: Any,
    ) -> None:
        self.port = port
        self.host = host
        self.namespace = namespace
        self.workdir = Path(workdir or DEFAULT_WORKDIR).resolve()
        self.state_path = None if ephemeral else state_db_path(self.workdir)
        self.kubeconfig = Path(kubeconfig).resolve() if kubeconfig else self.workdir / "kubeconfig"
        self.log_dir = self.workdir / "logs"
        self.gpus = gpus
        if nodes < 1:
            raise ValueError("a local cluster needs at least one node")
        self.node_count = nodes
        self.node_options = node_options
        self.url: str = ""
        self.emulator: Any = None
        self.node: LocalNode | None = None
        self.nodes: list[LocalNode] = []
        self.scheduler: LocalScheduler | None = None
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    # ----------------------------------------------------------------- async
    async def start(self) -> None:
        from .emulator import ApiEmulator, write_kubeconfig

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        pki = self.workdir / "pki"
        self.emulator = ApiEmulator(
            host=self.host,
            port=self.port,
            log_dir=self.log_dir,
            pki_dir=pki,
            admin_token=persistent_secret(self.workdir, "admin-token"),
            signing_key=persistent_secret(self.workdir, "service-account-signing-key"),
            state_path=self.state_path,
        )
        try:
            await self.emulator.start()
        except BaseException:
            self.emulator.core.store.close()
            raise
        self.url = self.emulator.url
        self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        write_kubeconfig(
            self.kubeconfig,
            self.url,
            namespace=self.namespace,
            token=self.emulator.admin_token,
            ca_pem=self.emulator.ca_pem,
        )
        for index, name in enumerate(node_names(self.node_count)):
            node = LocalNode(
                self.kubeconfig,
                self.workdir,
                log_dir=self.log_dir,
                name=name,
                gpus=self.gpus,
                gpu_device_offset=index * self.gpus,
                schedule=False,
                **self.node_options,
            )
            if self.nodes:
                node.join(self.nodes[0])
            self.nodes.append(node)
        self.node = self.nodes[0]
        self.scheduler = LocalScheduler(self.kubeconfig)
        try:
            for node in self.nodes:
                await node.start()
            await self.scheduler.start()  # after the nodes: it sees their capacity
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        if self.scheduler is not None:
            await self.scheduler.stop()
            self.scheduler = None
        # the first node last: it writes the DNS of the others' pods until they stop
        for node in reversed(self.nodes):
            await node.stop()
        self.nodes = []
        self.node = None
        if self.emulator is not None:
            await self.emulator.stop()
            self.emulator = None

    async def __aenter__(self) -> LocalCluster:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- thread
    def __enter__(self) -> LocalCluster:
        self._thread = threading.Thread(target=self._thread_main, name="sftjob-local", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            raise RuntimeError("local cluster failed to start") from self._error
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._stop.set)
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _thread_main(self) -> None:
        async def main() -> None:
            self._loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            try:
                await self.start()
            except BaseException as exc:
                self._error = exc
                self._ready.set()
                return
            self._ready.set()
            try:
                await self._stop.wait()
            finally:
                await self.stop()

        asyncio.run(main())


def run_local_up(
    port: int = DEFAULT_PORT,
    kubeconfig: Path | str | None = None,
    workdir: Path | str | None = None,
    gpus: int = 0,
    *,
    nodes: int = 1,
    cpus: float | None = None,
    memory: str | None = None,
    max_pods: int | None = None,
    node_labels: dict[str, str] | None = None,
    node_taints: list[dict[str, str]] | None = None,
    ephemeral: bool = False,
) -> int:
    """Run the local control plane in the foreground until SIGINT/SIGTERM."""

    async def main() -> None:
        cluster = LocalCluster(
            port=port,
            workdir=workdir,
            kubeconfig=kubeconfig,
            gpus=gpus,
            nodes=nodes,
            cpus=cpus,
            memory=memory,
            max_pods=max_pods,
            labels=node_labels,
            taints=node_taints,
            ephemeral=ephemeral,
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await cluster.start()
        try:
            shape = cluster.nodes[0].allocatable
            names = ", ".join(n.name for n in cluster.nodes)
            print(
                f"sftjob local control plane: API {cluster.url}, "
                f"node{'s' if nodes != 1 else ''} {names} (each: cpu {shape['cpu']}, "
                f"memory {shape['memory']}, pods {shape['pods']}, "
                f"{gpus} GPU{'s' if gpus != 1 else ''}), workdir {cluster.workdir}\n"
                f"state: {cluster.state_path or 'in memory (--ephemeral): lost when it stops'}\n"
                f"kubeconfig: {cluster.kubeconfig}\n"
                f"  export KUBECONFIG={cluster.kubeconfig}\n"
                f"  kubectl get pods\n"
                f"Ctrl-C stops it (pod processes are killed).",
                flush=True,
            )
            await stop.wait()
            print("stopping local control plane ...", flush=True)
        finally:
            await cluster.stop()

    try:
        asyncio.run(main())
    except OSError as exc:
        print(f"sftjob local up: {exc}", file=sys.stderr)
        return 1
    return 0
