"""The local control plane's scheduler: binds Pods to the local nodes, over HTTP.

`LocalScheduler` plays kube-scheduler for every Node of the cluster (it reads
Nodes from the API, so it decides among however many `LocalNode`s registered):
it watches Pods and Nodes and, on any change, runs one scheduling cycle per
pod that needs one (`node_scheduler.needs_scheduling`, in PrioritySort order).
The rules and messages are those of `sftjob_local.node_scheduler`.

* fits somewhere: `pods/<name>/binding` to the best node (a pod it bound
  counts on that node at once, before the watch reports `spec.nodeName`,
  like the scheduler cache's assumed pods);
* fits nowhere: the pod stays Pending with condition `PodScheduled=False`,
  reason `Unschedulable` and the scheduler's message (patched through
  `pods/<name>/status`), and a Warning Event `FailedScheduling` with that
  message, written as kube-scheduler's event recorder writes it
  (reportingController `default-scheduler`, action `Scheduling`). Both are
  written again only when the message changes; the pod is retried whenever a
  Pod or Node changes (a pod finished or was deleted, a node was added).
* PersistentVolumeClaims: a pod whose claim is missing, Lost or being deleted
  fits nowhere (VolumeBinding, see `node_scheduler.claim_problem`) and is
  retried when a claim changes; a claim without a volume binds when its first
  pod is bound (WaitForFirstConsumer, as a local-path provisioner does):
  `spec.volumeName: pvc-<claim uid>`, the `pv.kubernetes.io/bind-completed` and
  `volume.kubernetes.io/selected-node` annotations, `status.phase: Bound` with
  the requested capacity. No PersistentVolume object is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .node_kube import ApiError, Informer, KubeHttp, cancel_and_wait, post_event
from .node_scheduler import (
    NodeState,
    claims_to_bind,
    is_terminal,
    needs_scheduling,
    queue_order,
    schedule,
)
from .node_spec import pod_event

__all__ = ["LocalScheduler", "SCHEDULER_NAME"]

log = logging.getLogger("sftjob_local.scheduler")

Obj = dict[str, Any]
SCHEDULER_NAME = "default-scheduler"
# Coalesce bursts of watch events (a job creating many pods) into one pass.
KICK_DELAY = 0.05


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LocalScheduler:
    """kube-scheduler for the local nodes; `await start()` / `await stop()`."""

    def __init__(self, kubeconfig: Path | str, *, name: str = SCHEDULER_NAME) -> None:
        self.kubeconfig = Path(kubeconfig).resolve()
        self.name = name
        self.instance = f"{name}-{socket.gethostname()}"
        self._api: KubeHttp | None = None
        self.pods: Informer | None = None
        self.nodes: Informer | None = None
        self.claims: Informer | None = None
        self._kick = asyncio.Event()
        self._assumed: dict[
            str, tuple[str, Obj]
        ] = {}  # uid → (node, pod) bound, not yet seen bound
        self._reported: dict[str, str] = {}  # uid → last FailedScheduling message
        self._tasks: list[asyncio.Task[Any]] = []
        self._bg: set[asyncio.Task[Any]] = set()

    @property
    def api(self) -> KubeHttp:
        if self._api is None:
            raise RuntimeError("the local scheduler is not started")
        return self._api

    async def start(self) -> None:
        self._api = KubeHttp(self.kubeconfig)
        self.pods = Informer(self.api, "/api/v1/pods", self._on_pod, name="scheduler pods")
        self.nodes = Informer(self.api, "/api/v1/nodes", self._on_node, name="scheduler nodes")
        self.claims = Informer(
            self.api, "/api/v1/persistentvolumeclaims", self._on_node, name="scheduler claims"
        )
        informers = (self.pods, self.nodes, self.claims)
        self._tasks = [asyncio.create_task(i.run(), name=f"{i.name} watch") for i in informers]
        await asyncio.wait_for(asyncio.gather(*(i.synced.wait() for i in informers)), 30)
        self._tasks.append(asyncio.create_task(self._loop(), name="scheduler loop"))
        self._kick.set()

    async def stop(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        if self._bg:
            await asyncio.wait(self._bg, timeout=2)
        await cancel_and_wait(*self._bg)
        if self._api is not None:
            await self._api.close()

    async def __aenter__(self) -> LocalScheduler:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # ----------------------------------------------------------------- loop
    def _on_pod(self, etype: str, pod: Obj) -> None:
        uid = pod["metadata"]["uid"]
        if etype == "DELETED" or (pod.get("spec") or {}).get("nodeName"):
            self._assumed.pop(uid, None)
        if etype == "DELETED" or not needs_scheduling(pod, self.name):
            self._reported.pop(uid, None)
        self._kick.set()

    def _on_node(self, etype: str, obj: Obj) -> None:
        # A node or a claim changed: pods that fitted nowhere may fit now.
        self._kick.set()

    async def _loop(self) -> None:
        while True:
            await self._kick.wait()
            await asyncio.sleep(KICK_DELAY)
            self._kick.clear()
            try:
                await self.schedule_pending()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("scheduling pass failed")
                await asyncio.sleep(0.5)
                self._kick.set()

    def _node_states(self) -> list[NodeState]:
        assert self.pods is not None and self.nodes is not None
        nodes = sorted(self.nodes.cache.values(), key=lambda n: _natural(n["metadata"]["name"]))
        states = {n["metadata"]["name"]: NodeState(n) for n in nodes}
        for pod in self.pods.cache.values():
            node = (pod.get("spec") or {}).get("nodeName")
            if node in states and not is_terminal(pod):
                states[node].pods.append(pod)
        for _uid, (node, pod) in self._assumed.items():
            if node in states:
                states[node].pods.append(pod)
        return list(states.values())

    async def schedule_pending(self) -> None:
        """One pass: a scheduling cycle for every pod waiting for a node."""
        assert self.pods is not None
        pending = [
            p
            for p in self.pods.cache.values()
            if needs_scheduling(p, self.name) and p["metadata"]["uid"] not in self._assumed
        ]
        if not pending:
            return
        states = self._node_states()
        by_name = {s.name: s for s in states}
        claims = self._claims_by_namespace()
        for pod in sorted(pending, key=queue_order):
            in_namespace = claims.get(pod["metadata"].get("namespace", "default"), {})
            decision = schedule(pod, states, in_namespace)
            if decision.node is None:
                await self._unschedulable(pod, decision.message)
            elif await self._bind(pod, decision.node):
                self._assumed[pod["metadata"]["uid"]] = (decision.node, pod)
                by_name[decision.node].pods.append(pod)
                for claim in claims_to_bind(pod, in_namespace):
                    await self._bind_claim(in_namespace[claim], decision.node)

    def _claims_by_namespace(self) -> dict[str, dict[str, Obj]]:
        assert self.claims is not None
        out: dict[str, dict[str, Obj]] = {}
        for claim in self.claims.cache.values():
            meta = claim["metadata"]
            out.setdefault(meta.get("namespace", "default"), {})[meta["name"]] = claim
        return out

    # ----------------------------------------------------------------- API writes
    async def _bind(self, pod: Obj, node: str) -> bool:
        meta = pod["metadata"]
        ns, name = meta.get("namespace", "default"), meta["name"]
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name, "namespace": ns, "uid": meta["uid"]},
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        try:
            await self.api.create(f"/api/v1/namespaces/{ns}/pods/{name}/binding", body)
            return True
        except ApiError as exc:
            if exc.status not in (404, 409):
                log.warning("binding %s/%s to %s failed: %s", ns, name, node, exc)
            return False  # 409: already bound; 404: the pod is gone

    async def _bind_claim(self, claim: Obj, node: str) -> None:
        """Bind a claim to the node's folder, as a WaitForFirstConsumer provisioner would."""
        meta = claim["metadata"]
        path = f"/api/v1/namespaces/{meta.get('namespace', 'default')}/persistentvolumeclaims/{meta['name']}"  # fmt: skip
        spec = claim.get("spec") or {}
        annotations = {
            "pv.kubernetes.io/bind-completed": "yes",
            "pv.kubernetes.io/bound-by-controller": "yes",
            "volume.kubernetes.io/selected-node": node,
        }
        status = {
            "phase": "Bound",
            "accessModes": spec.get("accessModes") or [],
            "capacity": dict((spec.get("resources") or {}).get("requests") or {}),
        }
        try:
            await self.api.merge_patch(
                path,
                {
                    "metadata": {"annotations": annotations},
                    "spec": {"volumeName": f"pvc-{meta['uid']}"},
                },
            )
            await self.api.merge_patch(f"{path}/status", {"status": status})
        except ApiError as exc:  # deleted or bound meanwhile: its next pod retries
            log.warning("binding claim %s failed: %s", meta["name"], exc)

    async def _unschedulable(self, pod: Obj, message: str) -> None:
        meta = pod["metadata"]
        uid = meta["uid"]
        if self._reported.get(uid) == message:
            return
        self._reported[uid] = message
        ns, name = meta.get("namespace", "default"), meta["name"]
        previous = next(
            (
                c
                for c in (pod.get("status") or {}).get("conditions") or []
                if c.get("type") == "PodScheduled" and c.get("status") == "False"
            ),
            {},
        )
        status = {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": message,
                    "lastProbeTime": None,
                    # only a change of status moves the transition time
                    "lastTransitionTime": previous.get("lastTransitionTime") or _now(),
                }
            ],
        }
        with contextlib.suppress(ApiError):
            await self.api.merge_patch(
                f"/api/v1/namespaces/{ns}/pods/{name}/status", {"status": status}
            )
        self._event(pod, "FailedScheduling", message)

    def _event(self, pod: Obj, reason: str, message: str) -> None:
        """A Warning Event as kube-scheduler's events.k8s.io recorder writes it,
        in its core/v1 form (reportingController → reportingComponent; no
        `source`, no `count`: `eventTime` instead of first/lastTimestamp)."""
        event = pod_event(
            pod,
            reason,
            message,
            "Warning",
            resource_version=True,
            action="Scheduling",
            eventTime=_micro_now(),
            reportingComponent=self.name,
            reportingInstance=self.instance,
        )
        post_event(self.api, self._bg, event)


def _natural(name: str) -> tuple[Any, ...]:
    """`local-node`, `local-node-2`, ..., `local-node-10` in that order."""
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))
