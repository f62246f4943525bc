"""The watch-driven loop: cache events queue job keys, a few workers run one pass per key.

The shape of controller-runtime's controllers, with Kopf as the watch:

    watch events ──▶ WatchCache ──key──▶ WorkQueue ──▶ N workers ──▶ reconcile(cached body)
                                              ▲                          │
                                              └── requeue_after / TTL / deadline / failures

- Any event about a job, its pods or its ConfigMaps queues the job's key; the pass reads the
  newest cached state, so a burst of events is one pass.
- A pass is scheduled again only when the job needs one at a known time (its Outcome's
  `requeue_after`, a deadline or TTL coming due) or after a failure (exponential backoff).
- A slow safety resync queues every cached job (`resync_seconds`): a pass over an unchanged
  job reads only the cache and writes nothing, so it costs CPU, not API requests.
- A job the watch saw deleted leaves cache and queue at once; a pass answering "gone"
  (Outcome.phase None) forgets it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .cached_kube import PASS_JOB, CachedKube, PassJob
from .metrics import METRICS
from .pass_schedule import earliest, next_timed_pass
from .reconciler import OperatorSettings, reconcile
from .watch_cache import WatchCache, split_key
from .work_queue import WorkQueue, run_workers

log = logging.getLogger(__name__)


@dataclass
class ControllerCounters:
    passes: int = 0
    failed_passes: int = 0
    deferred_passes: int = 0  # waited for the watch to show the operator's own writes


class Controller:
    def __init__(
        self,
        cache: WatchCache,
        kube: CachedKube,
        settings: OperatorSettings,
        workers: int,
        resync_seconds: float,
    ) -> None:
        self.cache = cache
        self.kube = kube
        self.settings = settings
        self.workers = workers
        self.resync_seconds = resync_seconds
        self.queue = WorkQueue()
        self.counters = ControllerCounters()
        self._tasks: list[asyncio.Task[None]] = []

    # ----------------------------------------------------------------- events

    def job_event(self, event_type: str | None, obj: Mapping[str, Any]) -> None:
        """Queue the job of an event. The cache already holds the object (Kopf's index
        handlers fill it first, see handlers.py) except for a deletion, recorded here."""
        key = self.cache.on_job_event(event_type, obj) if event_type == "DELETED" else None
        key = key or self.cache.key_of(obj)
        if event_type == "DELETED" and not self.cache.has_job(key):
            self.queue.forget(key)
            namespace, name = split_key(key)
            METRICS.forget(namespace, name)
        else:
            self.queue.add(key)

    def child_event(self, kind: str, event_type: str | None, obj: Mapping[str, Any]) -> None:
        if event_type == "DELETED":
            key = self.cache.on_child_event(kind, event_type, obj)
        else:
            key = self.cache.job_key_of_child(obj)
        if key is not None and self.cache.has_job(key):
            self.queue.add(key)

    # ----------------------------------------------------------------- running

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(run_workers(self.queue, self.workers, self.process)),
            asyncio.create_task(self._resync_forever()),
        ]

    async def stop(self) -> None:
        self.queue.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _resync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.resync_seconds)
            for key in self.cache.job_keys():
                self.queue.add(key)

    async def process(self, key: str) -> None:
        body = self.cache.job(key)
        if body is None:
            self.queue.forget(key)
            return
        wait = self.cache.unsettled(key)
        if wait is not None:
            # The event that shows our last write queues the key again; this is the fallback.
            self.counters.deferred_passes += 1
            self.queue.add_after(key, wait)
            return
        self.counters.passes += 1
        namespace, name = split_key(key)
        uid = body["metadata"].get("uid")
        current = PASS_JOB.set(PassJob(namespace, name, uid))
        try:
            outcome = await reconcile(body, self.kube, self.settings)
        except Exception:
            self.counters.failed_passes += 1
            delay = self.queue.failed(key)
            log.exception("pass over SFTJob %s failed; retrying in %.1f s", key, delay)
            return
        finally:
            PASS_JOB.reset(current)
        self.queue.succeeded(key)
        if not self.cache.has_job(key):
            # Deleted while this pass ran: its series, set at the pass's end, outlive the
            # DELETED event's forget otherwise.
            METRICS.forget(namespace, name)
        if outcome.phase is None:
            now_uid = self.cache.job_uid_at(key)
            if now_uid is not None and now_uid != uid:
                self.queue.add(key)  # re-created under the same name: the new job's turn
            else:
                self.queue.forget(key)
                log.info("SFTJob %s (uid %s) no longer exists: nothing more to do", key, uid)
            return
        latest = self.cache.job(key) or body
        delay = earliest(outcome.requeue_after, next_timed_pass(latest, datetime.now(UTC)))
        if delay is not None:
            self.queue.add_after(key, delay)

    def snapshot(self) -> dict[str, Any]:
        """Counters for logs and benchmarks."""
        return {
            **self.counters.__dict__,
            **self.cache.sizes(),
            "queued": len(self.queue),
            "at": time.time(),
        }
