"""One Pod on the local node: volumes, env, processes, restarts, status, deletion.

A `PodWorker` is the local node's equivalent of the kubelet's pod worker. It
owns the pod's folder `<workdir>/pods/<ns>/<name>-<uid8>/`, runs the containers
as process groups and reports everything through `pods/<name>/status`.
See `sftjob_local.node` for the conventions (paths, env, DNS).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from . import node_logs
from .node_kube import ApiError, KubeHttp
from .node_sa import MOUNT_PATH as SA_MOUNT
from .node_sa import PodCredentials, TokenUnavailable, pod_credentials
from .node_spec import (
    FieldError,
    MountMap,
    container_path_default,
    expand,
    field_ref,
    image_reference_problem,
    memory_limit_bytes,
    resource_field_ref,
    run_as_non_root_error,
    termination_message,
)


class PodHost(Protocol):
    """What a pod's worker needs from the node that runs it (`node.LocalNode` is one).

    A protocol rather than an import: the node imports the worker, never the reverse.
    """

    name: str
    workdir: Path
    log_dir: Path
    kubeconfig: Path
    hosts_file: Path
    pyhook_dir: Path
    allocatable: dict[str, str]
    config_retry: float
    restart_backoff: float
    max_restart_backoff: float
    memory_poll: float

    @property
    def api(self) -> KubeHttp: ...

    @property
    def manage_etc_hosts(self) -> bool: ...

    def event(
        self, pod: Obj, reason: str, message: str, *, type_: str = ..., source: str = ...
    ) -> None: ...

    def image_command(self, image: str) -> list[str] | None: ...

    def image_user(self, image: str) -> str | None: ...

    def refresh_dns(self, force: bool = False) -> None: ...

    def release(self, worker: PodWorker) -> None: ...


log = logging.getLogger("sftjob_local.node")

Obj = dict[str, Any]
PYTHON_NAMES = ("python", "python3", f"python3.{sys.version_info.minor}")
SUPERVISOR = str(Path(__file__).with_name("node_supervisor.py"))


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class ConfigError(Exception):
    """A referenced ConfigMap/Secret/key is missing: the kubelet's CreateContainerConfigError."""


class MountError(Exception):
    """A volume cannot be set up (its Secret/ConfigMap is missing): the kubelet's
    FailedMount; the pod stays ContainerCreating and the mount is retried."""

    def __init__(self, volume: str, message: str) -> None:
        super().__init__(message)
        self.volume = volume


class ImageError(Exception):
    """The image reference does not parse: the kubelet's InvalidImageName."""


@dataclass
class Container:
    spec: Obj
    init: bool
    restart_count: int = 0
    state: Obj = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Obj = field(default_factory=dict)
    started: bool = False
    proc: asyncio.subprocess.Process | None = None  # the container's supervisor
    pid: int | None = None  # the container's main process (= its process group)
    argv: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cwd: str = ""
    term_file: Path | None = None
    log_file: Path | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return "running" in self.state

    @property
    def exit_code(self) -> int | None:
        term = self.state.get("terminated")
        return None if term is None else int(term["exitCode"])

    def status(self, pod_uid: str) -> Obj:
        out: Obj = {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "ready": self.running and not self.init,
            "restartCount": self.restart_count,
            "started": self.running,
            "state": self.state,
            "lastState": self.last_state,
        }
        if self.pid is not None:
            out["containerID"] = node_logs.container_id(pod_uid, self.name, self.restart_count)
        if self.init:
            out["ready"] = self.exit_code == 0
        return out


class PodWorker:
    def __init__(self, node: PodHost, pod: Obj, ip: str, gpu_devices: list[int]) -> None:
        self.node = node
        self.pod = pod
        self.ip = ip
        self.gpu_devices = gpu_devices
        meta = pod["metadata"]
        self.uid: str = meta["uid"]
        self.ns: str = meta.get("namespace", "default")
        self.name: str = meta["name"]
        spec = pod.get("spec") or {}
        self.restart_policy: str = spec.get("restartPolicy") or "Always"
        self.dir = node.workdir / "pods" / self.ns / f"{self.name}-{self.uid[:8]}"
        self.init = [Container(c, True) for c in spec.get("initContainers") or []]
        self.main = [Container(c, False) for c in spec.get("containers") or []]
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.start_time: str | None = None
        self.conditions: dict[str, Obj] = {}
        self._set_cond("PodScheduled", True)
        self._set_cond("Initialized", not self.init)
        self._set_cond("ContainersReady", False, "ContainersNotReady")
        self._set_cond("Ready", False, "ContainersNotReady")
        self.stopping = asyncio.Event()
        self.deleting = False
        self.dns_ready = False
        self.gone = False
        self.finished = asyncio.Event()  # processes are all gone (phase final or killed)
        self._status_lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._terminate_task: asyncio.Task[None] | None = None
        self._deadline_task: asyncio.Task[None] | None = None
        self._config_error: str | None = None
        self.credentials: PodCredentials | None = None  # the pod's ServiceAccount (node_sa)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"pod {self.ns}/{self.name}")

    def update(self, pod: Obj) -> None:
        """A newer version of the pod from the watch."""
        self.pod = pod
        meta = pod.get("metadata") or {}
        if meta.get("deletionTimestamp") and not self.deleting:
            self.deleting = True
            grace = meta.get("deletionGracePeriodSeconds")
            if grace is None:
                grace = (pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            self._terminate_task = asyncio.create_task(self._delete(float(grace)))

    def object_deleted(self) -> None:
        """The pod is gone from the API (force delete, or deleted once terminal)."""
        self.gone = True
        if not self.finished.is_set():
            self._terminate_task = asyncio.create_task(self._kill_all(grace=0))

    async def shutdown(self, grace: float) -> None:
        """Node shutdown: stop processes, leave the pod's status as it is."""
        await self._kill_all(grace)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for task in (self._deadline_task, self._terminate_task):
            if task is not None and task is not asyncio.current_task():
                task.cancel()

    async def mark_node_shutdown(self) -> None:
        """Graceful node shutdown (pkg/kubelet/nodeshutdown, killPods): the pod is
        reported Failed, reason Terminated, with DisruptionTarget=True, reason
        TerminationByKubelet, before its processes are stopped."""
        if self.finished.is_set() or self.deleting:
            return
        message = "Pod was terminated in response to imminent node shutdown."
        self.phase, self.reason, self.message = "Failed", "Terminated", message
        self.conditions["DisruptionTarget"] = {
            "type": "DisruptionTarget",
            "status": "True",
            "reason": "TerminationByKubelet",
            "message": message,
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }
        self.stopping.set()
        await self._publish()

    def cleanup(self) -> None:
        """Remove the pod's folder (emptyDir, materialized volumes); logs stay."""
        shutil.rmtree(self.dir, ignore_errors=True)

    async def _run(self) -> None:
        try:
            await self._lifecycle()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("pod %s/%s: worker crashed", self.ns, self.name)
            self.phase, self.reason, self.message = "Failed", "NodeError", "local node error"
            await self._publish()
        finally:
            self.finished.set()
            self.node.release(self)

    async def _lifecycle(self) -> None:
        self.start_time = now()
        self.dir.mkdir(parents=True, exist_ok=True)
        deadline = (self.pod.get("spec") or {}).get("activeDeadlineSeconds")
        if deadline:
            self._deadline_task = asyncio.create_task(self._deadline(float(deadline)))
        if not await self._prepare_until_ready():
            return  # stopped while waiting for config
        await self._publish()
        self.node.event(self.pod, "Scheduled", f"Successfully assigned {self.ns}/{self.name} to {self.node.name}", source="default-scheduler")  # fmt: skip
        for c in self.init:
            ok = await self._supervise(c)
            if not ok:
                if not self.stopping.is_set():
                    self.phase = "Failed"
                await self._finish()
                return
        if self.init:
            self._set_cond("Initialized", True)
        self.phase = "Running"
        # publish this pod's cluster names before its processes start resolving peers
        self.dns_ready = True
        self.node.refresh_dns()
        await asyncio.gather(*(self._supervise(c) for c in self.main))
        await self._finish()

    async def _finish(self) -> None:
        codes = [c.exit_code for c in self.main]
        # a pod being deleted keeps its phase: the object goes away anyway
        if self.phase != "Failed" and not (self.deleting or self.gone):
            if codes and all(code == 0 for code in codes):
                self.phase = "Succeeded"
            elif all(code is not None for code in codes):
                self.phase = "Failed"
        if self.phase in ("Succeeded", "Failed"):
            reason = "PodCompleted"
            self._set_cond("ContainersReady", False, reason)
            self._set_cond("Ready", False, reason)
        await self._publish()

    async def _deadline(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        if self.finished.is_set() or self.stopping.is_set():
            return
        self.phase = "Failed"
        self.reason = "DeadlineExceeded"
        self.message = "Pod was active on the node longer than the specified deadline"
        self.node.event(self.pod, "DeadlineExceeded", self.message, type_="Warning")
        grace = (self.pod.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
        await self._kill_all(float(grace))

    async def _delete(self, grace: float) -> None:
        """Graceful deletion: SIGTERM, wait up to the grace period, SIGKILL, then
        finish the deletion with gracePeriodSeconds=0 (as the kubelet does)."""
        for c in self.init + self.main:
            if c.running:
                self.node.event(self.pod, "Killing", f"Stopping container {c.name}")
        await self._kill_all(grace)
        await self.finished.wait()
        await self._publish()
        with contextlib.suppress(ApiError):
            await self.node.api.delete(
                f"/api/v1/namespaces/{self.ns}/pods/{self.name}",
                {
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "gracePeriodSeconds": 0,
                    "preconditions": {"uid": self.uid},
                },
            )

    async def _kill_all(self, grace: float) -> None:
        """SIGTERM to each container's process group, SIGKILL to the whole tree
        after `grace` seconds (the kubelet's killContainer with the grace period)."""
        self.stopping.set()
        procs = [c for c in self.init + self.main if c.proc and c.proc.returncode is None]
        for c in procs:
            if c.pid is None:
                self._kill_now(c)  # not started yet: nothing to ask politely
            else:
                _signal_group(c.pid, signal.SIGTERM)
        if procs:
            waits = [asyncio.ensure_future(c.proc.wait()) for c in procs if c.proc]
            _, pending = await asyncio.wait(waits, timeout=max(grace, 0.0))
            for c in procs:
                self._kill_now(c)
            if pending:
                await asyncio.wait(pending, timeout=5)
        if self._task is not None and self._task is not asyncio.current_task():
            # let the lifecycle notice the exits before the caller moves on
            await asyncio.wait({self._task}, timeout=5)

    # ----------------------------------------------------------------- config
    async def _prepare_until_ready(self) -> bool:
        """Set up volumes, then each container (image reference, env), as the
        kubelet's SyncPod does; what fails is reported as the kubelet does and
        retried every `config_retry` seconds until it works or the pod stops:
        a volume → FailedMount events, containers stay ContainerCreating;
        an unparsable image → InvalidImageName (events InspectFailed, Failed);
        a missing ConfigMap/Secret/key in env → CreateContainerConfigError
        (event Failed). Events are sent when a problem first appears or changes."""
        reported: set[tuple[str, str]] = set()
        while not self.stopping.is_set():
            events: list[tuple[str, str]] = []
            try:
                if self.credentials is None:
                    try:
                        self.credentials = await pod_credentials(
                            self.node.api, self.node.kubeconfig, self.pod, self.dir
                        )
                    except TokenUnavailable as exc:
                        raise ConfigError(str(exc)) from exc
                volumes = await self._materialize_volumes()
            except MountError as exc:
                volumes = None
                msg = f'MountVolume.SetUp failed for volume "{exc.volume}" : {exc}'
                events.append(("FailedMount", msg))
            if volumes is not None:
                for c in self.init + self.main:
                    try:
                        await self._container_setup(c, volumes)
                    except ImageError as exc:
                        c.state = {"waiting": {"reason": "InvalidImageName", "message": str(exc)}}
                        events += [
                            ("InspectFailed", str(exc)),
                            ("Failed", "Error: InvalidImageName"),
                        ]
                    except ConfigError as exc:
                        c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(exc)}}  # fmt: skip
                        events.append(("Failed", f"Error: {exc}"))
                    else:
                        c.state = {"waiting": {"reason": "ContainerCreating"}}
                    if events and c.init:
                        break  # init containers run in order: the next one is not looked at yet
            if not events:
                return True
            for reason, msg in events:
                if (reason, msg) not in reported:
                    self.node.event(self.pod, reason, msg, type_="Warning")
            reported = set(events)
            await self._publish()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.node.config_retry)
        return False

    async def _get(self, kind: str, name: str, optional: bool) -> Obj | None:
        plural = {"ConfigMap": "configmaps", "Secret": "secrets"}[kind]
        try:
            obj: Obj = await self.node.api.get(f"/api/v1/namespaces/{self.ns}/{plural}/{name}")
            return obj
        except ApiError as exc:
            if exc.status == 404:
                if optional:
                    return None
                raise ConfigError(f'{kind.lower()} "{name}" not found') from exc
            raise

    @staticmethod
    def _data(kind: str, obj: Obj | None) -> dict[str, bytes]:
        if obj is None:
            return {}
        out: dict[str, bytes] = {}
        if kind == "Secret":
            for key, value in (obj.get("data") or {}).items():
                out[key] = base64.b64decode(value or "")
            for key, value in (obj.get("stringData") or {}).items():
                out[key] = str(value).encode()
        else:
            for key, value in (obj.get("data") or {}).items():
                out[key] = str(value).encode()
            for key, value in (obj.get("binaryData") or {}).items():
                out[key] = base64.b64decode(value or "")
        return out

    async def _materialize_volumes(self) -> dict[str, Path]:
        base = self.dir / "volumes"
        out: dict[str, Path] = {}
        for vol in (self.pod.get("spec") or {}).get("volumes") or []:
            name = vol["name"]
            target = base / name
            if "hostPath" in vol:
                hp = vol["hostPath"]
                path = Path(hp["path"])
                if hp.get("type") in ("DirectoryOrCreate", None, "") and not path.exists():
                    path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            elif "persistentVolumeClaim" in vol:
                claim = vol["persistentVolumeClaim"]["claimName"]
                path = self.node.workdir / "pvc" / self.ns / claim
                path.mkdir(parents=True, exist_ok=True)
                out[name] = path
            elif "emptyDir" in vol:
                target.mkdir(parents=True, exist_ok=True)
                out[name] = target
            elif (
                "configMap" in vol or "secret" in vol or "downwardAPI" in vol or "projected" in vol
            ):
                try:
                    files = await self._volume_files(vol)
                except ConfigError as exc:
                    raise MountError(name, str(exc)) from exc
                if target.exists():
                    shutil.rmtree(target)
                target.mkdir(parents=True)
                for rel, (content, mode) in files.items():
                    path = target / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                    os.chmod(path, mode)
                out[name] = target
            else:
                self.node.event(self.pod, "FailedMount", f"volume {name}: type not supported by the local node; an empty folder is mounted", type_="Warning")  # fmt: skip
                target.mkdir(parents=True, exist_ok=True)
                out[name] = target
        return out

    async def _volume_files(self, vol: Obj) -> dict[str, tuple[bytes, int]]:
        files: dict[str, tuple[bytes, int]] = {}
        sources: list[tuple[str, Obj, int]] = []
        if "projected" in vol:
            default = vol["projected"].get("defaultMode", 0o644)
            for src in vol["projected"].get("sources") or []:
                for kind in ("configMap", "secret", "downwardAPI"):
                    if kind in src:
                        sources.append((kind, src[kind], default))
        else:
            for kind in ("configMap", "secret", "downwardAPI"):
                if kind in vol:
                    sources.append((kind, vol[kind], vol[kind].get("defaultMode", 0o644)))
        for kind, src, default_mode in sources:
            if kind == "downwardAPI":
                for item in src.get("items") or []:
                    if "fieldRef" in item:
                        value = self._field(item["fieldRef"]["fieldPath"])
                    else:
                        ref = item.get("resourceFieldRef") or {}
                        value = resource_field_ref(
                            self._container(ref.get("containerName")), ref, self.node.allocatable
                        )
                    files[item["path"]] = (value.encode(), item.get("mode", default_mode))
                continue
            k = "ConfigMap" if kind == "configMap" else "Secret"
            name = (
                src.get("name") if kind == "configMap" else src.get("secretName", src.get("name"))
            )
            obj = await self._get(k, str(name), bool(src.get("optional")))
            data = self._data(k, obj)
            items = src.get("items")
            if items:
                for item in items:
                    if item["key"] not in data:
                        if src.get("optional"):
                            continue
                        # pkg/volume/configmap, pkg/volume/secret MakePayload
                        raise ConfigError(
                            f"configmap references non-existent config key: {item['key']}"
                            if k == "ConfigMap"
                            else f"references non-existent secret key: {item['key']}"
                        )
                    files[item["path"]] = (data[item["key"]], item.get("mode", default_mode))
            else:
                for key, content in data.items():
                    files[key] = (content, default_mode)
        return files

    def _container(self, name: str | None) -> Obj | None:
        for c in self.init + self.main:
            if name is None or c.name == name:
                return c.spec
        return None

    def _field(self, path: str) -> str:
        try:
            return field_ref(self.pod, path, self.node.name, self.ip)
        except FieldError as exc:
            raise ConfigError(str(exc)) from exc

    async def _container_setup(self, c: Container, volumes: dict[str, Path]) -> None:
        spec = c.spec
        image = str(spec.get("image") or "")
        problem = image_reference_problem(image)
        if problem is not None:
            # pkg/kubelet/images/image_manager.go EnsureImageExists → applyDefaultImageTag
            raise ImageError(
                f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": {problem}'
            )
        mounts = MountMap()
        for vm in spec.get("volumeMounts") or []:
            real = volumes.get(vm["name"])
            if real is None:
                raise ConfigError(f'volumeMount "{vm["name"]}": no such volume')
            if vm.get("subPath"):
                real = real / vm["subPath"]
                if not real.exists():
                    real.mkdir(parents=True, exist_ok=True)
            mounts.add(vm["mountPath"], str(real))
        if self.credentials and self.credentials.folder and mounts.resolve(SA_MOUNT) is None:
            mounts.add(SA_MOUNT, str(self.credentials.folder))
        term = self.dir / "termination" / c.name
        term.parent.mkdir(parents=True, exist_ok=True)
        mounts.add(container_path_default(spec), str(term))
        c.term_file = term
        workdir = spec.get("workingDir")
        if workdir:
            real_wd = mounts.resolve(workdir)
            if real_wd is None:
                real_wd = str(self.dir / "rootfs" / workdir.lstrip("/"))
                mounts.add(workdir, real_wd)
            cwd = real_wd
        else:
            cwd = str(self.dir / "rootfs")
        Path(cwd).mkdir(parents=True, exist_ok=True)
        env = await self._env(c, mounts)
        # kuberuntime generateContainerConfig: after the env, before the container is made.
        refusal = run_as_non_root_error(self.pod, spec, self.node.image_user(image))
        if refusal is not None:
            raise ConfigError(refusal)
        command = list(spec.get("command") or [])
        if not command:
            command = list(self.node.image_command(spec.get("image", "")) or [])
            if not command:
                raise ConfigError(
                    f'container "{c.name}" has no command: the local node does not pull '
                    "images, so it cannot use the image entrypoint"
                )
        argv = [mounts.rewrite(expand(str(a), env)) for a in command + list(spec.get("args") or [])]
        if argv[0] in PYTHON_NAMES:
            argv[0] = sys.executable
        c.argv, c.cwd = argv, cwd
        c.env = self._process_env(c, env, mounts)

    async def _env(self, c: Container, mounts: MountMap) -> dict[str, str]:
        """The container's own env (envFrom, then env with $(VAR) expansion),
        with mount paths rewritten to the real folders."""
        env: dict[str, str] = {}
        for src in c.spec.get("envFrom") or []:
            prefix = src.get("prefix", "")
            for kind, key in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                if key in src:
                    ref = src[key]
                    obj = await self._get(kind, ref["name"], bool(ref.get("optional")))
                    for k, v in self._data(kind, obj).items():
                        env[prefix + k] = v.decode("utf-8", errors="replace")
        for item in c.spec.get("env") or []:
            name = item["name"]
            if "valueFrom" not in item:
                env[name] = expand(str(item.get("value", "")), env)
                continue
            vf = item["valueFrom"]
            if "secretKeyRef" in vf or "configMapKeyRef" in vf:
                kind, ref = (
                    ("Secret", vf["secretKeyRef"])
                    if "secretKeyRef" in vf
                    else ("ConfigMap", vf["configMapKeyRef"])
                )
                optional = bool(ref.get("optional"))
                data = self._data(kind, await self._get(kind, ref["name"], optional))
                if ref["key"] in data:
                    env[name] = data[ref["key"]].decode("utf-8", errors="replace")
                elif not optional:
                    raise ConfigError(f"couldn't find key {ref['key']} in {kind} {self.ns}/{ref['name']}")  # fmt: skip
            elif "fieldRef" in vf:
                env[name] = self._field(vf["fieldRef"]["fieldPath"])
            elif "resourceFieldRef" in vf:
                ref = vf["resourceFieldRef"]
                env[name] = resource_field_ref(
                    self._container(ref.get("containerName") or c.name), ref, self.node.allocatable
                )
        return {k: mounts.rewrite(v) for k, v in env.items()}

    def _process_env(self, c: Container, env: dict[str, str], mounts: MountMap) -> dict[str, str]:
        node = self.node
        spec = self.pod.get("spec") or {}
        out = dict(os.environ)
        # The node's own test/kube settings must not leak into pods.
        for key in ("PYTEST_CURRENT_TEST", "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"):
            out.pop(key, None)
        bindir = os.path.dirname(sys.executable)
        out["PATH"] = bindir + os.pathsep + out.get("PATH", "/usr/bin:/bin")
        out.update(
            {
                "HOSTNAME": spec.get("hostname") or self.name,
                # The pod's ServiceAccount, not the node's admin credentials (node_sa).
                "KUBECONFIG": str(
                    self.credentials.kubeconfig if self.credentials else node.kubeconfig
                ),
                "PYTHONUNBUFFERED": "1",
                "GLOO_SOCKET_IFNAME": "lo",
                "SFTJOB_LOCAL_NODE": node.name,
                "SFTJOB_LOCAL_POD_IP": self.ip,
                "SFTJOB_LOCAL_POD_NAMESPACE": self.ns,
                "SFTJOB_LOCAL_HOSTS_FILE": str(node.hosts_file),
                "SFTJOB_LOCAL_MOUNTS": json.dumps(mounts.paths, sort_keys=True),
                "TERMINATION_MESSAGE_PATH": str(c.term_file),
                # without /etc/hosts, torch's C++ resolver needs the Python hook's help
                "SFTJOB_LOCAL_TORCH_HOOK": "0" if node.manage_etc_hosts else "1",
            }
        )
        if self.gpu_devices:
            out["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in self.gpu_devices)
            out["NVIDIA_VISIBLE_DEVICES"] = out["CUDA_VISIBLE_DEVICES"]
        if "/tmp" in mounts.paths:  # a volume on /tmp (read-only root fs pattern)
            out["TMPDIR"] = mounts.paths["/tmp"]
        out.update(env)  # the pod's own env wins (KUBECONFIG included)
        # the DNS hook goes first; the pod's (else the node's) PYTHONPATH follows
        rest = env.get("PYTHONPATH") or os.environ.get("PYTHONPATH")
        out["PYTHONPATH"] = os.pathsep.join(p for p in (str(node.pyhook_dir), rest) if p)
        return out

    # ----------------------------------------------------------------- processes
    async def _supervise(self, c: Container) -> bool:
        """Run one container until it is done under the restart policy. Returns
        True when it finally exited 0 (init containers must)."""
        backoff = self.node.restart_backoff
        while not self.stopping.is_set():
            code = await self._run_once(c)
            if self.stopping.is_set():
                return code == 0
            restart = self.restart_policy == "Always" or (
                self.restart_policy == "OnFailure" and code != 0
            )
            if c.init and code == 0:
                return True
            if not restart:
                return code == 0
            c.last_state = c.state
            c.state = {
                "waiting": {
                    "reason": "CrashLoopBackOff",
                    "message": f"back-off {backoff:g}s restarting failed container={c.name} pod={self.name}",
                }
            }
            self._readiness()
            await self._publish()
            self.node.event(self.pod, "BackOff", f"Back-off restarting failed container {c.name}", type_="Warning")  # fmt: skip
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), backoff)
            backoff = min(backoff * 2, self.node.max_restart_backoff)
            c.restart_count += 1
        return c.exit_code == 0

    async def _run_once(self, c: Container) -> int:
        """One run of a container under its supervisor (node_supervisor.py):
        the supervisor writes the CRI log, enforces the memory limit and kills
        the tree when the node goes away; it reports the main pid and the exit."""
        assert c.term_file is not None
        c.term_file.write_bytes(b"")
        c.log_file = node_logs.container_log_path(
            self.node.log_dir, self.ns, self.name, self.uid, c.name, c.restart_count
        )
        c.log_file.parent.mkdir(parents=True, exist_ok=True)
        procs = self.dir / "procs"
        procs.mkdir(parents=True, exist_ok=True)
        config = {
            "argv": c.argv,
            "cwd": c.cwd,
            "log": str(c.log_file),
            "pidfile": str(procs / f"{c.name}-{c.restart_count}.pid"),
            "memory_limit": memory_limit_bytes(c.spec),
            "poll": self.node.memory_poll,
        }
        # images are never pulled: the kubelet's message for an image already there
        image = c.spec.get("image", "")
        self.node.event(self.pod, "Pulled", f'Container image "{image}" already present on machine')  # fmt: skip
        started_at = now()
        c.pid = None
        c.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", SUPERVISOR, json.dumps(config),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=self.dir,
            env=c.env,
            start_new_session=True,  # terminal signals to the node do not reach it
        )  # fmt: skip
        assert c.proc.stdout is not None
        first = (await c.proc.stdout.readline()).decode().split(" ", 1)
        if first[0] != "started":
            error = json.loads(first[1]) if first[0] == "error" else "the supervisor failed"
            await c.proc.wait()
            c.state = {
                "terminated": {
                    "exitCode": 128,
                    "reason": "StartError",
                    "message": error,
                    "startedAt": started_at,
                    "finishedAt": now(),
                }
            }
            self.node.event(self.pod, "Failed", f"Error: {error}", type_="Warning")
            await self._publish()
            return 128
        c.pid = int(first[1])
        self.node.event(self.pod, "Created", f"Created container: {c.name}")
        if self.stopping.is_set():  # stopped while we were spawning: nobody else will kill it
            self._kill_now(c)
        c.state = {"running": {"startedAt": started_at}}
        c.started = True
        self._readiness()
        if not c.init:
            self.phase = "Running"
        await self._publish()
        self.node.event(self.pod, "Started", f"Started container {c.name}")
        words = (await c.proc.stdout.readline()).decode().split()
        sup_code = await c.proc.wait()
        if c.proc.stdin is not None:
            c.proc.stdin.close()  # the lifeline of an ended run
        _signal_group(c.pid, signal.SIGKILL)  # the supervisor did; in case it could not
        reason = "Error"
        if words[:1] == ["exit"]:
            code = int(words[1])
            if words[2:] == ["OOMKilled"]:
                reason = "OOMKilled"
        else:  # the supervisor itself died: report that signal like a runtime would
            code = 128 - sup_code if sup_code < 0 else (sup_code or 137)
        if code == 0:
            reason = "Completed"
        file_bytes = c.term_file.read_bytes()[-8192:] if c.term_file.exists() else b""
        tail = b""
        with contextlib.suppress(OSError), open(c.log_file, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(0, size - 256 * 1024))
            raw = fh.read()
            if size > 256 * 1024:
                raw = raw.split(b"\n", 1)[-1]
            tail = node_logs.render(raw, node_logs.LogOptions())
        message = termination_message(file_bytes, tail, c.spec.get("terminationMessagePolicy"), code)  # fmt: skip
        terminated: Obj = {
            "exitCode": code,
            "reason": reason,
            "startedAt": started_at,
            "finishedAt": now(),
            "containerID": node_logs.container_id(self.uid, c.name, c.restart_count),
        }
        if message:
            terminated["message"] = message
        c.state = {"terminated": terminated}
        self._readiness()
        if not self.stopping.is_set():
            await self._publish()
        return code

    @staticmethod
    def _kill_now(c: Container) -> None:
        """SIGKILL the container's tree: its group here, everything through the supervisor."""
        _signal_group(c.pid, signal.SIGKILL)
        if c.proc is not None and c.proc.stdin is not None and not c.proc.stdin.is_closing():
            with contextlib.suppress(Exception):
                c.proc.stdin.write(b"kill\n")

    # ----------------------------------------------------------------- status
    def _set_cond(self, ctype: str, status: bool, reason: str | None = None) -> None:
        value = "True" if status else "False"
        old = self.conditions.get(ctype)
        cond: Obj = {
            "type": ctype,
            "status": value,
            "lastProbeTime": None,
            "lastTransitionTime": old["lastTransitionTime"]
            if old and old["status"] == value
            else now(),
        }
        if reason and not status:
            cond["reason"] = reason
        self.conditions[ctype] = cond

    def _readiness(self) -> None:
        ready = bool(self.main) and all(c.running for c in self.main)
        self._set_cond("ContainersReady", ready, "ContainersNotReady")
        self._set_cond("Ready", ready, "ContainersNotReady")

    def status(self) -> Obj:
        own = ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        # conditions others set (DisruptionTarget from an eviction) are kept, as the
        # kubelet's status manager does (mergePodStatus)
        theirs = [
            cond
            for cond in (self.pod.get("status") or {}).get("conditions") or []
            if cond.get("type") not in own and cond.get("type") not in self.conditions
        ]
        status: Obj = {
            "phase": self.phase,
            "conditions": [self.conditions[t] for t in own]
            + [self.conditions[t] for t in self.conditions if t not in own]
            + theirs,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "startTime": self.start_time,
            "containerStatuses": [c.status(self.uid) for c in self.main],
            "qosClass": "BestEffort",
        }
        if self.init:
            status["initContainerStatuses"] = [c.status(self.uid) for c in self.init]
        if self.reason:
            status["reason"] = self.reason
        if self.message:
            status["message"] = self.message
        return status

    async def _publish(self) -> None:
        if self.gone:
            return
        async with self._status_lock:
            try:
                await self.node.api.merge_patch(
                    f"/api/v1/namespaces/{self.ns}/pods/{self.name}/status",
                    {"status": self.status()},
                )
            except ApiError as exc:
                if exc.status != 404:
                    log.warning("pod %s/%s: status patch failed: %s", self.ns, self.name, exc)
            except Exception as exc:  # the API may be going away during shutdown
                log.debug("pod %s/%s: status patch failed: %r", self.ns, self.name, exc)


def _signal_group(pid: int | None, sig: int) -> None:
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
