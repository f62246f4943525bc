"""The local control plane in one piece: API emulator + local node + kubeconfig.

    with LocalCluster(workdir=tmp, gpus=2) as cluster:     # background thread
        subprocess.run(["kubectl", "get", "pods"], env={..., "KUBECONFIG": str(cluster.kubeconfig)})

    async with LocalCluster(workdir=tmp) as cluster:        # on the running loop
        ...

`run_local_up()` runs the same in the foreground until Ctrl-C/SIGTERM (what
`sftjob local up` calls). Layout of the workdir (default `./.sftjob-local`):

    kubeconfig                  unless another path is given
    state.db (-wal)             the cluster's objects (SQLite; see emulator/statedb.py)
    logs/<ns>/<pod>/<c>.log     container output, served as pods/<name>/log
    pods/<ns>/<pod>-<uid8>/     per-pod volumes, termination files, rootfs
    pvc/<ns>/<claim>/           PersistentVolumeClaim folders (kept)
    hosts, pyhook/              cluster DNS for pod processes (see node_dns)

State survives a restart, as etcd gives a real cluster: stopping and starting on the
same workdir keeps every object with its uid and resourceVersion. Pod processes do
not survive: the node reports the pods it finds bound to it but not running as a
kubelet does after a reboot (see node.py). `ephemeral=True` (`sftjob local up
--ephemeral`) keeps everything in memory instead: each start is an empty cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from .node import LocalNode
from .persistence import state_db_path

DEFAULT_PORT = 8765
DEFAULT_WORKDIR = Path(".sftjob-local")

__all__ = ["LocalCluster", "run_local_up", "DEFAULT_PORT", "DEFAULT_WORKDIR"]


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
        self.node_options = node_options
        self.url: str = ""
        self.emulator: Any = None
        self.node: LocalNode | None = None
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
        self.emulator = ApiEmulator(
            host=self.host, port=self.port, log_dir=self.log_dir, state_path=self.state_path
        )
        try:
            await self.emulator.start()
        except BaseException:
            self.emulator.core.store.close()
            raise
        self.url = self.emulator.url
        self.kubeconfig.parent.mkdir(parents=True, exist_ok=True)
        write_kubeconfig(self.kubeconfig, self.url, namespace=self.namespace)
        self.node = LocalNode(
            self.kubeconfig,
            self.workdir,
            log_dir=self.log_dir,
            gpus=self.gpus,
            **self.node_options,
        )
        try:
            await self.node.start()
        except BaseException:
            await self.emulator.stop()
            raise

    async def stop(self) -> None:
        if self.node is not None:
            await self.node.stop()
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
    ephemeral: bool = False,
) -> int:
    """Run the local control plane in the foreground until SIGINT/SIGTERM."""

    async def main() -> None:
        cluster = LocalCluster(
            port=port, workdir=workdir, kubeconfig=kubeconfig, gpus=gpus, ephemeral=ephemeral
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await cluster.start()
        try:
            print(
                f"sftjob local control plane: API {cluster.url}, node local-node "
                f"({gpus} GPU{'s' if gpus != 1 else ''}), workdir {cluster.workdir}\n"
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
