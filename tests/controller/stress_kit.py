"""Shared pieces of the operator stress tests: crash-restart cycles and create/delete races.

The tests play every part but the operator: the user (create, delete), the kubelet
(bind, run, fail, finish and gracefully stop pods) and the trainer (progress reports
and termination messages). Everything here states behaviour the issue demands, not
the operator's internals, so it holds whatever the operator does inside.

`report_progress` and `recorded_progress` are the one place that knows how a
trainer's progress reaches the SFTJob's status: switch them when that channel moves.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import kubernetes
from operator_harness import GROUP, MERGE, PLURAL, VERSION, Cluster

LABEL_JOB = "sftjob.dev/job-name"
LABEL_RANK = "sftjob.dev/rank"
LABEL_ATTEMPT = "sftjob.dev/attempt"
TERMINAL = ("Succeeded", "Failed")
# Everything the operator creates for a job, by kind.
CHILD_KINDS = ("ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Service", "Pod")
FAKE_NODE = "stress-node"


def seeded_rng(test: str) -> tuple[random.Random, int]:
    """A seeded generator; SFTJOB_STRESS_SEED replays a run. The seed is printed."""
    seed = int(os.environ.get("SFTJOB_STRESS_SEED") or random.SystemRandom().randrange(2**32))
    print(f"{test}: seed {seed} (replay with SFTJOB_STRESS_SEED={seed})")
    return random.Random(seed), seed


# ------------------------------------------------------------------ the trainer's progress


def report_progress(
    cluster: Cluster, job: str, step: int, total_steps: int, attempt: int = 1
) -> None:
    """Report progress as the trainer's rank 0 does: a merge patch of its job's
    `<job>-progress` ConfigMap (trainer_image/sftjob_trainer/progress.py, KubeProgressSink),
    which the operator validates and folds into the status."""
    from sftjob_operator.children import progress_config_map_name
    from sftjob_operator.progress_report import encode_report
    from sftjob_trainer.progress import progress_report

    report = progress_report(
        step=step,
        total_steps=total_steps,
        epoch=None,
        metrics={"loss": 1.0 / (1 + step)},
        steps_per_second=None,
        tokens_per_second=None,
    )
    uid = cluster.job(job)["metadata"]["uid"]
    cluster.core.patch_namespaced_config_map(
        progress_config_map_name(job),
        cluster.namespace,
        {"data": encode_report(job_uid=uid, attempt=attempt, progress=report)},
        _content_type=MERGE,
    )


def recorded_progress(job: dict[str, Any]) -> tuple[int | None, int | None]:
    """(step, totalSteps) of the progress the job's status shows."""
    progress = (job.get("status") or {}).get("progress") or {}
    return progress.get("step"), progress.get("totalSteps")


# ------------------------------------------------------------------ reading the cluster


def owner_uids(obj: dict[str, Any]) -> set[str]:
    return {ref.get("uid") for ref in (obj.get("metadata") or {}).get("ownerReferences") or []}


def listers(cluster: Cluster) -> dict[str, Callable[[str], Any]]:
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api)
    return {
        "ConfigMap": cluster.core.list_namespaced_config_map,
        "ServiceAccount": cluster.core.list_namespaced_service_account,
        "Role": rbac.list_namespaced_role,
        "RoleBinding": rbac.list_namespaced_role_binding,
        "Service": cluster.core.list_namespaced_service,
        "Pod": cluster.core.list_namespaced_pod,
    }


def all_children(cluster: Cluster) -> list[tuple[str, dict[str, Any]]]:
    """(kind, object) for every object of a child kind in the namespace."""
    found = []
    for kind, lister in listers(cluster).items():
        for item in lister(cluster.namespace).items:
            found.append((kind, cluster.plain(item)))
    return found


def children_of(children: list[tuple[str, dict[str, Any]]], name: str, uid: str) -> list[str]:
    """`Kind/name` of each child that belongs to job `name`/`uid`: by label OR owner uid."""
    return [
        f"{kind}/{obj['metadata']['name']}"
        for kind, obj in children
        if (obj["metadata"].get("labels") or {}).get(LABEL_JOB) == name or uid in owner_uids(obj)
    ]


def job_events(cluster: Cluster, name: str, uid: str) -> list[dict[str, Any]]:
    """core/v1 Events about this job (this uid, not an earlier job of the same name)."""
    items = cluster.core.list_namespaced_event(
        cluster.namespace, field_selector=f"involvedObject.name={name}"
    ).items
    events = [cluster.plain(e) for e in items]
    return [e for e in events if (e.get("involvedObject") or {}).get("uid") in (uid, None)]


def event_count(event: dict[str, Any]) -> int:
    """How many occurrences one Event object stands for (aggregated events carry a count)."""
    series = event.get("series") or {}
    return int(series.get("count") or event.get("count") or 1)


def try_job(cluster: Cluster, name: str) -> dict[str, Any] | None:
    try:
        return cluster.job(name)
    except kubernetes.client.ApiException as exc:
        if exc.status == 404:
            return None
        raise


# ------------------------------------------------------------------ watching


class Watcher(threading.Thread):
    """Streams a namespaced list (pods, SFTJobs) into `on_event`, resuming across timeouts."""

    def __init__(
        self,
        list_call: Callable[..., Any],
        args: tuple[Any, ...],
        on_event: Callable[[str, dict[str, Any]], None],
        **kwargs: Any,
    ):
        super().__init__(daemon=True, name=f"watch-{getattr(list_call, '__name__', '?')}")
        self.list_call, self.args, self.kwargs = list_call, args, kwargs
        self.on_event = on_event
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        reply = self.list_call(*self.args, _preload_content=False, **self.kwargs)
        first = json.loads(reply.data)
        version = first["metadata"]["resourceVersion"]
        for item in first.get("items") or []:
            self.on_event("ADDED", item)
        self.ready.set()
        while not self.stopping.is_set():
            stream = kubernetes.watch.Watch()
            try:
                for event in stream.stream(
                    self.list_call,
                    *self.args,
                    resource_version=version,
                    timeout_seconds=2,
                    allow_watch_bookmarks=True,
                    **self.kwargs,
                ):
                    obj = event["raw_object"]
                    version = obj.get("metadata", {}).get("resourceVersion") or version
                    if event["type"] in ("ADDED", "MODIFIED", "DELETED"):
                        self.on_event(event["type"], obj)
                    if self.stopping.is_set():
                        break
            except Exception as exc:  # a dropped stream: resume from the last version
                self.errors.append(repr(exc))
                time.sleep(0.2)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


@dataclass
class Violation:
    what: str
    job: str
    detail: str

    def __str__(self) -> str:
        return f"{self.job}: {self.what}: {self.detail}"


class PodLedger:
    """Every pod state the watch delivers, checked against the issue's pod invariants.

    - no duplicate pod: never two live pods for one rank of one attempt of one job;
    - no overlap: never live pods of two attempts of one job at once.
    A pod is live until it reaches a terminal phase or is removed: a terminating pod
    (deletionTimestamp set) still runs its SIGTERM handler, writing checkpoints into the
    same volume, so it counts.
    """

    def __init__(self) -> None:
        self.pods: dict[str, dict[str, Any]] = {}
        self.violations: list[Violation] = []
        self._seen: set[tuple[str, str, str]] = set()
        self.added = 0
        self.changed = threading.Condition()

    def on_event(self, kind: str, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["name"]
        with self.changed:
            if kind == "DELETED":
                self.pods.pop(name, None)
            else:
                if name not in self.pods and kind == "ADDED":
                    self.added += 1
                self.pods[name] = pod
            self._check()
            self.changed.notify_all()

    def _check(self) -> None:
        live: dict[str, list[dict[str, Any]]] = {}
        for pod in self.pods.values():
            if (pod.get("status") or {}).get("phase") in TERMINAL:
                continue
            job = (pod["metadata"].get("labels") or {}).get(LABEL_JOB, "?")
            live.setdefault(job, []).append(pod)
        for job, pods in live.items():
            by_attempt: dict[str, list[str]] = {}
            by_rank: dict[tuple[str, str], list[str]] = {}
            for pod in pods:
                labels = pod["metadata"].get("labels") or {}
                attempt, rank = labels.get(LABEL_ATTEMPT, "?"), labels.get(LABEL_RANK, "?")
                shown = pod["metadata"]["name"] + (
                    " (terminating)" if pod["metadata"].get("deletionTimestamp") else ""
                )
                by_attempt.setdefault(attempt, []).append(shown)
                by_rank.setdefault((attempt, rank), []).append(shown)
            if len(by_attempt) > 1:
                attempts = ",".join(sorted(by_attempt))
                what = f"pods of attempts {attempts} alive at once"
                self._add(what, job, by_attempt)
            for (attempt, rank), names in by_rank.items():
                if len(names) > 1:
                    self._add(f"duplicate pods for attempt {attempt} rank {rank}", job, names)

    def _add(self, what: str, job: str, detail: Any) -> None:
        # One report per broken promise (the first state that broke it), not per watch event.
        key = (what, job, "")
        if key not in self._seen:
            self._seen.add(key)
            self.violations.append(Violation(what, job, json.dumps(detail, sort_keys=True)))

    def wait_added(self, after: int, timeout: float) -> bool:
        """Wait until a pod beyond the first `after` was created."""
        with self.changed:
            return self.changed.wait_for(lambda: self.added > after, timeout)


class JobLedger:
    """Each SFTJob state the watch delivers: counts status changes (progress aside)."""

    def __init__(self) -> None:
        self.status_changes = 0
        self.history: dict[str, list[dict[str, Any]]] = {}
        self._last: dict[str, str] = {}
        self.changed = threading.Condition()

    def on_event(self, kind: str, job: dict[str, Any]) -> None:
        name = job["metadata"]["name"]
        status = {k: v for k, v in (job.get("status") or {}).items() if k != "progress"}
        signature = json.dumps(status, sort_keys=True)
        with self.changed:
            self.history.setdefault(name, []).append(
                {"type": kind, "uid": job["metadata"].get("uid"), "status": job.get("status") or {}}
            )
            if kind != "DELETED" and self._last.get(name) != signature:
                self._last[name] = signature
                self.status_changes += 1
            self.changed.notify_all()

    def wait_status_change(self, after: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.status_changes > after, timeout)


def watch_pods(cluster: Cluster, ledger: PodLedger) -> Watcher:
    watcher = Watcher(cluster.core.list_namespaced_pod, (cluster.namespace,), ledger.on_event)
    watcher.start()
    watcher.ready.wait(20)
    return watcher


def watch_jobs(
    cluster: Cluster, on_event: Callable[[str, dict[str, Any]], None], **kw: Any
) -> Watcher:
    watcher = Watcher(
        cluster.custom.list_namespaced_custom_object,
        (GROUP, VERSION, cluster.namespace, PLURAL),
        on_event,
        **kw,
    )
    watcher.start()
    watcher.ready.wait(20)
    return watcher


# ------------------------------------------------------------------ the kubelet


@dataclass
class Kubelet:
    """Acts for a node: binds new pods, starts them, stops deleted ones gracefully.

    Bound pods are deleted gracefully by the API server (deletionTimestamp, then the
    kubelet's final delete with grace 0), as on a cluster: a pod the operator deletes
    keeps running for `stop_delay` seconds (the trainer's SIGTERM checkpoint), then
    exits Interrupted and is removed.
    """

    cluster: Cluster
    rng: random.Random
    stop_delay: tuple[float, float] = (0.2, 0.6)
    stopping_since: dict[str, tuple[float, float]] = field(default_factory=dict)

    def bind(self, name: str) -> None:
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": FAKE_NODE},
        }
        self.cluster.core.create_namespaced_pod_binding(
            name, self.cluster.namespace, body, _preload_content=False
        )

    def step(self, pods: list[dict[str, Any]]) -> None:
        now = time.monotonic()
        for pod in pods:
            meta, phase = pod["metadata"], (pod.get("status") or {}).get("phase")
            name = meta["name"]
            try:
                if meta.get("deletionTimestamp"):
                    if phase in TERMINAL:
                        self._remove(name)
                        continue
                    since, delay = self.stopping_since.setdefault(
                        name, (now, self.rng.uniform(*self.stop_delay))
                    )
                    if now - since >= delay:
                        report = json.dumps({"reason": "Interrupted", "message": "SIGTERM"})
                        self.cluster.set_pod(name, "Failed", exit_code=14, message=report)
                        self._remove(name)
                elif not (pod.get("spec") or {}).get("nodeName"):
                    self.bind(name)
                elif phase in (None, "Pending"):
                    self.cluster.set_pod(name, "Running")
            except kubernetes.client.ApiException as exc:
                if exc.status not in (404, 409):  # gone or bound meanwhile: next round
                    raise

    def _remove(self, name: str) -> None:
        try:
            self.cluster.core.delete_namespaced_pod(
                name, self.cluster.namespace, grace_period_seconds=0
            )
        except kubernetes.client.ApiException as exc:
            if exc.status != 404:
                raise
        self.stopping_since.pop(name, None)


class KubeletThread(threading.Thread):
    """A `Kubelet` stepping over every pod of the namespace, ten times a second."""

    def __init__(self, kubelet: Kubelet):
        super().__init__(daemon=True, name="stress-kubelet")
        self.kubelet = kubelet
        self.stopping = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.kubelet.step(self.kubelet.cluster.pods())
            except Exception as exc:  # noqa: BLE001  (reported by the test)
                self.errors.append(repr(exc))
            time.sleep(0.1)

    def stop(self) -> None:
        self.stopping.set()
        self.join(10)


# ------------------------------------------------------------------ the operator process


def wait_ready(port: int, timeout: float) -> bool:
    """Whether the operator's liveness endpoint answered within `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as reply:
                if reply.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.05)
    return False


# ------------------------------------------------------------------ API requests, as sent


@dataclass(frozen=True)
class Request:
    at: float  # time.monotonic() when the request arrived
    method: str
    path: str
    body: Any
    status: int

    @property
    def parts(self) -> list[str]:
        return self.path.strip("/").split("/")

    def sftjob(self) -> tuple[str, str] | None:
        """(name, subresource or '') when this request addresses one SFTJob."""
        parts = self.parts
        if PLURAL in parts:
            rest = parts[parts.index(PLURAL) + 1 :]
            if rest:
                return rest[0], (rest[1] if len(rest) > 1 else "")
        return None


class RequestTap:
    """Records every write request the API emulator serves (time, method, path, body, code).

    A write to a job that is gone answers 404 and changes nothing a watch could see, so
    ghost activity is counted where it arrives: at the API server.
    """

    def __init__(self, server: Any):
        self.emulator = server.emulator
        self.records: list[Request] = []

    def __enter__(self) -> RequestTap:
        original = self.emulator._handle

        async def tapped(request: Any) -> Any:
            arrived = time.monotonic()
            response = await original(request)
            if request.method not in ("GET", "HEAD", "OPTIONS"):
                method = str(getattr(request.method, "value", request.method)).upper()
                self.records.append(
                    Request(arrived, method, request.url.path, request.data, response.status)
                )
            return response

        self.emulator._handle = tapped
        return self

    def __exit__(self, *exc: object) -> None:
        del self.emulator._handle  # the class's own method again

    def since(self, moment: float) -> Iterator[Request]:
        return (r for r in list(self.records) if r.at >= moment)
