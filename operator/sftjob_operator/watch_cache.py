"""What the watches have shown: the newest SFTJobs and their pods and ConfigMaps, in memory,
and the SFTProfiles and namespace labels a job's policy is resolved from.

Pure state (no API calls): Kopf's watch events go in (`on_job_event`, `on_child_event`), each
answering the key ("namespace/name") of the job that needs a pass; reads come out. Children
are found by the job label (`children.LABEL_JOB`), which every pod and ConfigMap the operator
makes carries (and only those are watched: a server-side label selector).

A cache lags the API by the watch's latency, so a pass could read the world as it was before
its own previous writes (pods it created not yet seen, a status it wrote not yet there) and
do them again. As client-go's ReplicaSet controller does with its "expectations", each write
the operator makes is recorded as an expectation about the cache (`expect_*`); a job with an
unmet expectation is not processed (`unsettled`) until the watch shows it, which queues the
job again, or until the expectation times out (then it is dropped and logged).

Thread-safe: events arrive on the event loop, reads and writes come from API threads.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .children import LABEL_JOB

log = logging.getLogger(__name__)

# How long a write may stay unseen by the watch before the cache is trusted anyway. The watch
# normally shows a write within milliseconds, but seconds behind under a burst (30 s was
# measured on the local control plane with 1,000 jobs at once on 2 shared cores; trusting
# the cache earlier launched some jobs twice, harmlessly but with duplicate events). This
# bounds the stall should it never show (a relist that skipped it). client-go's ReplicaSet
# controller waits 5 minutes.
EXPECTATION_TIMEOUT = 60.0

# Fields nobody here reads, dropped to keep a thousand cached objects small.
_DROPPED_ANNOTATIONS = ("kubectl.kubernetes.io/last-applied-configuration",)

Obj = dict[str, Any]


def job_key(namespace: str, name: str) -> str:
    return f"{namespace}/{name}"


def split_key(key: str) -> tuple[str, str]:
    namespace, _, name = key.partition("/")
    return namespace, name


def slim(obj: Mapping[str, Any]) -> Obj:
    """A copy without managedFields and kubectl's last-applied annotation (never read)."""
    metadata = dict(obj.get("metadata") or {})
    metadata.pop("managedFields", None)
    annotations = metadata.get("annotations")
    if annotations and any(a in annotations for a in _DROPPED_ANNOTATIONS):
        metadata["annotations"] = {
            k: v for k, v in annotations.items() if k not in _DROPPED_ANNOTATIONS
        }
    return {**obj, "metadata": metadata}


def copy_json(value: Any) -> Any:
    """A deep copy of parsed JSON (dicts, lists, scalars): several times cheaper than
    copy.deepcopy, which a pass's reads would otherwise spend most of their time in."""
    if isinstance(value, dict):
        return {k: copy_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [copy_json(v) for v in value]
    return value


def contains_merge_patch(current: Any, patch: Any) -> bool:
    """Whether `current` already shows the JSON merge patch `patch` (RFC 7386) applied
    (its deletions are not checked: the server may default a deleted field again)."""
    if not isinstance(patch, Mapping):
        return bool(current == patch)
    if not isinstance(current, Mapping):
        return False
    for key, value in patch.items():
        if value is None:
            # A null deletes the key, but the API server may default it again (a CRD
            # default, e.g. measuredPlan.estimate: false): the rest of the patch tells.
            continue
        if isinstance(value, Mapping):
            if not contains_merge_patch(current.get(key) or {}, value):
                return False
        elif current.get(key) != value:
            return False
    return True


def is_terminating(obj: Mapping[str, Any] | None) -> bool:
    return obj is None or bool((obj.get("metadata") or {}).get("deletionTimestamp"))


@dataclass
class Expectation:
    what: str
    met: Callable[[], bool]
    deadline: float


class WatchCache:
    def __init__(
        self,
        expectation_timeout: float = EXPECTATION_TIMEOUT,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._lock = threading.RLock()
        self._jobs: dict[str, Obj] = {}
        self._pods: dict[str, dict[str, Obj]] = {}  # job key -> pod name -> pod
        self._config_maps: dict[tuple[str, str], Obj] = {}  # (namespace, name) -> ConfigMap
        self._profiles: dict[str, Obj] = {}  # name -> SFTProfile (cluster-scoped)
        self._namespace_labels: dict[str, dict[str, str]] = {}  # namespace -> its labels
        self._expectations: dict[str, list[Expectation]] = {}
        self._timeout = expectation_timeout
        self._clock = clock

    # ------------------------------------------------------------------ events

    def on_job_event(self, event_type: str | None, obj: Mapping[str, Any]) -> str:
        """Record an SFTJob event (type None: Kopf's initial listing); the job's key."""
        metadata = obj["metadata"]
        key = job_key(metadata["namespace"], metadata["name"])
        with self._lock:
            if event_type == "DELETED":
                current = self._jobs.get(key)
                # A DELETED of an older incarnation must not drop a job re-created since.
                if current is None or current["metadata"].get("uid") == metadata.get("uid"):
                    self._jobs.pop(key, None)
                    self._expectations.pop(key, None)
            else:
                self._jobs[key] = slim(obj)
            self._settle(key)
        return key

    def on_child_event(
        self, kind: str, event_type: str | None, obj: Mapping[str, Any]
    ) -> str | None:
        """Record a Pod or ConfigMap event; the key of the job its label names, if any."""
        metadata = obj.get("metadata") or {}
        job_name = (metadata.get("labels") or {}).get(LABEL_JOB)
        if not job_name:
            return None
        namespace, name = metadata["namespace"], metadata["name"]
        key = job_key(namespace, job_name)
        with self._lock:
            if kind == "ConfigMap":
                if event_type == "DELETED":
                    self._config_maps.pop((namespace, name), None)
                else:
                    self._config_maps[(namespace, name)] = slim(obj)
            else:
                pods = self._pods.setdefault(key, {})
                if event_type == "DELETED":
                    pods.pop(name, None)
                    if not pods:
                        self._pods.pop(key, None)
                else:
                    pods[name] = slim(obj)
            self._settle(key)
        return key

    def on_profile_event(self, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """Record an SFTProfile event. No job is queued: a profile applies to launches
        after it is seen, and never rewrites a job already launched or refused."""
        name = (obj.get("metadata") or {}).get("name")
        if not name:
            return
        with self._lock:
            if event_type == "DELETED":
                self._profiles.pop(name, None)
            else:
                self._profiles[name] = slim(obj)

    def on_namespace_event(self, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """Record a Namespace's labels (all a profile's namespaceSelector reads)."""
        metadata = obj.get("metadata") or {}
        name = metadata.get("name")
        if not name:
            return
        with self._lock:
            if event_type == "DELETED":
                self._namespace_labels.pop(name, None)
            else:
                self._namespace_labels[name] = dict(metadata.get("labels") or {})

    @staticmethod
    def key_of(obj: Mapping[str, Any]) -> str:
        metadata = obj["metadata"]
        return job_key(metadata["namespace"], metadata["name"])

    @staticmethod
    def job_key_of_child(obj: Mapping[str, Any]) -> str | None:
        metadata = obj.get("metadata") or {}
        job_name = (metadata.get("labels") or {}).get(LABEL_JOB)
        return job_key(metadata["namespace"], job_name) if job_name else None

    # ------------------------------------------------------------------ reads (copies)

    def job(self, key: str) -> Obj | None:
        with self._lock:
            found = self._jobs.get(key)
            return copy_json(found) if found is not None else None

    def has_job(self, key: str) -> bool:
        return key in self._jobs

    def job_uid_at(self, key: str) -> str | None:
        found = self._jobs.get(key)
        return found["metadata"].get("uid") if found is not None else None

    def job_uid(self, namespace: str, name: str) -> str | None:
        with self._lock:
            found = self._jobs.get(job_key(namespace, name))
            return found["metadata"].get("uid") if found is not None else None

    def job_keys(self) -> list[str]:
        with self._lock:
            return list(self._jobs)

    def job_pods(self, namespace: str, job_name: str) -> list[Obj]:
        with self._lock:
            pods = self._pods.get(job_key(namespace, job_name), {})
            return [copy_json(p) for _, p in sorted(pods.items())]

    def config_map(self, namespace: str, name: str) -> Obj | None:
        with self._lock:
            found = self._config_maps.get((namespace, name))
            return copy_json(found) if found is not None else None

    def profiles(self) -> list[Obj]:
        with self._lock:
            return [copy_json(p) for _, p in sorted(self._profiles.items())]

    def namespace_labels(self, namespace: str) -> dict[str, str] | None:
        """The namespace's labels; None for a namespace the watch has not shown."""
        with self._lock:
            found = self._namespace_labels.get(namespace)
            return dict(found) if found is not None else None

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "jobs": len(self._jobs),
                "pods": sum(len(p) for p in self._pods.values()),
                "configMaps": len(self._config_maps),
                "profiles": len(self._profiles),
                "namespaces": len(self._namespace_labels),
                "expectations": sum(len(e) for e in self._expectations.values()),
            }

    # ------------------------------------------------------------------ expectations

    def expect_job_status(self, namespace: str, name: str, status_patch: Mapping[str, Any]) -> None:
        key = job_key(namespace, name)
        patch = copy.deepcopy(dict(status_patch))

        def met() -> bool:
            job = self._jobs.get(key)
            return job is None or contains_merge_patch(job.get("status") or {}, patch)

        self._expect(key, f"status {sorted(patch)}", met)

    def expect_child(self, manifest: Mapping[str, Any]) -> None:
        """A Pod or ConfigMap the operator created (or found existing) is to be seen."""
        metadata = manifest["metadata"]
        job_name = (metadata.get("labels") or {}).get(LABEL_JOB)
        if not job_name or manifest.get("kind") not in ("Pod", "ConfigMap"):
            return
        namespace, name = metadata["namespace"], metadata["name"]
        key = job_key(namespace, job_name)
        if manifest["kind"] == "Pod":
            self._expect(key, f"pod {name}", lambda: name in self._pods.get(key, {}))
        else:
            self._expect(key, f"ConfigMap {name}", lambda: (namespace, name) in self._config_maps)

    def expect_config_map_data(self, namespace: str, name: str, data: Mapping[str, str]) -> None:
        config_map = self._config_maps.get((namespace, name))
        job_name = ((config_map or {}).get("metadata", {}).get("labels") or {}).get(LABEL_JOB)
        if not job_name:
            return
        wanted = dict(data)

        def met() -> bool:
            current = self._config_maps.get((namespace, name))
            return current is None or contains_merge_patch(current.get("data") or {}, wanted)

        self._expect(job_key(namespace, job_name), f"ConfigMap {name} data", met)

    def expect_pod_gone(self, namespace: str, name: str) -> None:
        with self._lock:
            key = next(
                (
                    k
                    for k, pods in self._pods.items()
                    if k.startswith(f"{namespace}/") and name in pods
                ),
                None,
            )
        if key is None:
            return

        def met() -> bool:
            return is_terminating(self._pods.get(key, {}).get(name))

        self._expect(key, f"pod {name} deleted", met)

    def _expect(self, key: str, what: str, met: Callable[[], bool]) -> None:
        with self._lock:
            if met():
                return
            self._expectations.setdefault(key, []).append(
                Expectation(what, met, self._clock() + self._timeout)
            )

    def _settle(self, key: str) -> None:
        pending = self._expectations.get(key)
        if pending:
            pending[:] = [e for e in pending if not e.met()]
            if not pending:
                del self._expectations[key]

    def unsettled(self, key: str) -> float | None:
        """Seconds until the job's unmet expectations time out; None when it may be processed."""
        with self._lock:
            self._settle(key)
            pending = self._expectations.get(key)
            if not pending:
                return None
            now = self._clock()
            expired = [e for e in pending if e.deadline <= now]
            if expired:
                log.warning(
                    "%s: the watch never showed %s after %.0f s; reading the cache anyway",
                    key,
                    ", ".join(e.what for e in expired),
                    self._timeout,
                )
                pending[:] = [e for e in pending if e.deadline > now]
                if not pending:
                    del self._expectations[key]
                    return None
            return min(e.deadline for e in pending) - now
