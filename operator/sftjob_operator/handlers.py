"""Kopf wiring only: watch events of SFTJobs and of their pods and ConfigMaps feed the controller;
those of SFTProfiles and Namespaces (labels) feed the cache a job's policy is resolved from.

Only `@kopf.index` and `@kopf.on.event` handlers are registered: they need no finalizer
(kopf/on.py registers event handlers with `requires_finalizer=None` and index handlers in a
registry that never asks for one; only timers, daemons and non-optional on.delete handlers
add one) and Kopf keeps no progress or diff-base annotations for them. So deleting an SFTJob
never waits for the operator: children carry ownerReferences and the API server's garbage
collector removes them with the job. A job still carrying the finalizer of a version that
ran a Kopf timer loses it on the operator's first look: with no handler requiring it, Kopf
removes its own finalizer (kopf/_core/reactor/processing.py, "no handlers requiring it").

Passes are run by `controller.Controller` (work queue, workers, resync); see its docstring.

Environment:
- SFTJOB_RESYNC_SECONDS (default 300): the safety resync of every cached job. The old name
  SFTJOB_RECONCILE_INTERVAL is read when the new one is unset.
- SFTJOB_WORKER_LIMIT (default 16): passes running at once.
- SFTJOB_API_THREADS (default 32): threads for the synchronous API client, and the size of
  its connection pool (one connection per thread: no "Connection pool is full").
- SFTJOB_REQUIRE_PROFILE (default false): a job whose namespace no SFTProfile selects is
  refused (Failed/PolicyViolation) instead of running without a profile.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from .api import GROUP, PLURAL, VERSION
from .cached_kube import CachedKube
from .children import LABEL_JOB
from .controller import Controller
from .kube import load_api_client
from .metrics import METRICS
from .profile_api import PROFILE_PLURAL
from .reconciler import OperatorSettings
from .watch_cache import WatchCache

# A safety net, not the way changes arrive (the watch is): it catches an event lost to a
# bug or a watch gap within five minutes, and costs no API request (passes read the cache).
DEFAULT_RESYNC_SECONDS = 300.0


def require_profile() -> bool:
    return os.environ.get("SFTJOB_REQUIRE_PROFILE", "").strip().lower() in ("1", "true", "yes")


def resync_seconds() -> float:
    value = os.environ.get("SFTJOB_RESYNC_SECONDS") or os.environ.get("SFTJOB_RECONCILE_INTERVAL")
    return float(value) if value else DEFAULT_RESYNC_SECONDS


log = logging.getLogger(__name__)


class NoDiffBase(kopf.DiffBaseStorage):
    """Kopf compares an object with its last handled state only for change handlers, timers
    and daemons; with on.event handlers alone nothing reads the diff, yet the stock storage
    deep-copies every body of every event to compute it."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> kopf.BodyEssence:
        return kopf.BodyEssence()

    def fetch(self, *, body: kopf.Body) -> kopf.BodyEssence | None:
        return None

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        return None


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.posting.level = logging.WARNING
    settings.persistence.diffbase_storage = NoDiffBase()
    settings.watching.server_timeout = 300
    # Kopf's per-object workers only hand an event to the cache, but each holds its slot for
    # `idle_timeout` after its last event: with a limit, a thousand new jobs would be taken
    # in waves of that limit every 5 s. The work queue below bounds the real work instead.
    settings.queueing.worker_limit = None
    settings.queueing.idle_timeout = 1.0
    # Only the operator's own children, filtered by the API server (not by Kopf after the
    # fact): a cluster's other pods and ConfigMaps never reach this process.
    settings.watching.label_selectors["pods"] = LABEL_JOB
    settings.watching.label_selectors["configmaps"] = LABEL_JOB
    api_threads = int(os.environ.get("SFTJOB_API_THREADS", "32"))
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=api_threads))
    cache = WatchCache()
    kube = CachedKube(load_api_client(pool_size=api_threads), cache, on_error=METRICS.api_error)
    controller = Controller(
        cache,
        kube,
        OperatorSettings(
            default_image=os.environ.get("SFTJOB_TRAINER_IMAGE")
            or OperatorSettings().default_image,
            require_profile=require_profile(),
        ),
        workers=int(os.environ.get("SFTJOB_WORKER_LIMIT", "16")),
        resync_seconds=resync_seconds(),
    )
    controller.start()
    memo.controller = controller
    metrics_port = os.environ.get("SFTJOB_METRICS_PORT")
    if metrics_port:
        METRICS.serve(int(metrics_port))


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    controller = getattr(memo, "controller", None)
    if controller is not None:
        await controller.stop()


# Two handlers per kind, because of when Kopf calls them. Index handlers run for every
# event except DELETED as soon as it arrives, and Kopf holds every other handler until the
# first listing of every indexed kind is in ("operator_indexed" in kopf/_core/reactor/
# processing.py): so the cache is filled by the index handlers, and passes are queued by the
# event handlers, which thus never start while the cache has the jobs but not yet their pods
# (a pass then would take every running pod for lost). The index handlers return None:
# Kopf stores nothing for them.


@kopf.index(GROUP, VERSION, PLURAL)
async def cache_job(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_job_event(None, dict(body))


@kopf.index("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def cache_pod(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_child_event("Pod", None, dict(body))


@kopf.index("v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
async def cache_config_map(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_child_event("ConfigMap", None, dict(body))


# Profiles and namespaces only fill the cache: no pass is queued for them (a profile applies
# to launches after it is seen). Being indexed, their first listing is in before any job's
# first pass, so no job is launched on an empty cache. The event handlers only see the
# deletions (index handlers are not called for DELETED).
@kopf.index(GROUP, VERSION, PROFILE_PLURAL)
async def cache_profile(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_profile_event(None, dict(body))


@kopf.index("v1", "namespaces")
async def cache_namespace(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_namespace_event(None, dict(body))


@kopf.on.event(GROUP, VERSION, PROFILE_PLURAL)
async def on_profile_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_profile_event(event["type"], event["object"])


@kopf.on.event("v1", "namespaces")
async def on_namespace_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.cache.on_namespace_event(event["type"], event["object"])


@kopf.on.event(GROUP, VERSION, PLURAL)
async def on_job_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.job_event(event["type"], event["object"])


@kopf.on.event("v1", "pods", labels={LABEL_JOB: kopf.PRESENT})
async def on_pod_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.child_event("Pod", event["type"], event["object"])


@kopf.on.event("v1", "configmaps", labels={LABEL_JOB: kopf.PRESENT})
async def on_config_map_event(event: kopf.RawEvent, memo: kopf.Memo, **_: Any) -> None:
    memo.controller.child_event("ConfigMap", event["type"], event["object"])
