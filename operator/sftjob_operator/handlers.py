"""Kopf wiring only: every event and timer tick becomes one reconcile pass.

No finalizer is registered (there is no on.delete handler): children carry
ownerReferences, so the API server's garbage collector removes them with the job.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import kopf

from .api import GROUP, PLURAL, VERSION
from .kube import Kube, load_api_client
from .metrics import METRICS
from .reconciler import OperatorSettings, reconcile

RECONCILE_INTERVAL = float(os.environ.get("SFTJOB_RECONCILE_INTERVAL", "2"))
ANNOTATION_PREFIX = "sftjob.dev"

# A tick that failed (the API unreachable for a moment: a control plane restart, a network
# blip) is retried after this many seconds instead of Kopf's default 60: meanwhile the job's
# pods may have been lost and need relaunching.
FAILED_TICK_BACKOFF = max(RECONCILE_INTERVAL, 5.0)
# Finished jobs only wait for their TTL (or a last teardown): look at them less often.
FINISHED_TICK_EVERY = 10
FINISHED_PHASES = ("Succeeded", "Failed")

_locks: dict[str, asyncio.Lock] = {}
_ticks: dict[str, int] = {}
# uids whose job is gone (deleted, or re-created under the same name): never reconciled again.
_gone: set[str] = set()

log = logging.getLogger(__name__)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix=ANNOTATION_PREFIX
    )
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=ANNOTATION_PREFIX, key="last-handled-configuration"
    )
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    # Kopf keeps its finalizer until the job's timer has exited and re-checks only after
    # this many seconds (60 by default), which would stall every deletion by a minute.
    settings.background.cancellation_polling = 0.5
    settings.batching.worker_limit = int(os.environ.get("SFTJOB_WORKER_LIMIT", "64"))
    # Every API call runs in a worker thread; the default pool (cores + 4) is too small
    # for hundreds of jobs ticking at once.
    asyncio.get_running_loop().set_default_executor(
        ThreadPoolExecutor(max_workers=int(os.environ.get("SFTJOB_API_THREADS", "32")))
    )
    memo.kube = Kube(load_api_client(), on_error=METRICS.api_error)
    memo.settings = OperatorSettings(
        default_image=os.environ.get("SFTJOB_TRAINER_IMAGE") or OperatorSettings().default_image
    )
    metrics_port = os.environ.get("SFTJOB_METRICS_PORT")
    if metrics_port:
        METRICS.serve(int(metrics_port))


async def _reconcile(body: kopf.Body, memo: kopf.Memo) -> str | None:
    """The job's phase after one pass; None when the job is gone (then never again)."""
    uid = body["metadata"]["uid"]
    if uid in _gone:
        return None
    # Events and timer ticks of one job must not interleave their writes.
    lock = _locks.setdefault(uid, asyncio.Lock())
    async with lock:
        phase = (await reconcile(body, memo.kube, memo.settings)).phase
    if phase is None and uid not in _gone:
        _gone.add(uid)
        _locks.pop(uid, None)
        _ticks.pop(uid, None)
        log.info(
            "SFTJob %s/%s (uid %s) no longer exists: its reconcile loop ends",
            body["metadata"]["namespace"],
            body["metadata"]["name"],
            uid,
        )
    return phase


def _stop_timer(stopped: kopf.DaemonStopped) -> None:
    """End this timer for good.

    A job deleted before Kopf's finalizer lands is forgotten by Kopf without its timer
    being stopped, and Kopf 1.45 gives a timer no public way to end itself (after a
    PermanentError it still ticks again). So set the stop flag the handler's `stopped`
    waits on, as Kopf does when the object is deleted. Should that internal ever move,
    `_gone` still answers every later tick without an API call.
    """
    setter = getattr(stopped, "_setter", None)
    if setter is not None:
        setter.set(reason=kopf.DaemonStoppingReason.RESOURCE_DELETED)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
async def on_spec(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    await _reconcile(body, memo)


@kopf.timer(
    GROUP,
    VERSION,
    PLURAL,
    interval=RECONCILE_INTERVAL,
    initial_delay=RECONCILE_INTERVAL,
    backoff=FAILED_TICK_BACKOFF,
)
async def on_tick(body: kopf.Body, memo: kopf.Memo, stopped: kopf.DaemonStopped, **_: Any) -> None:
    uid = body["metadata"]["uid"]
    if uid in _gone:
        _stop_timer(stopped)
        return
    _ticks[uid] = _ticks.get(uid, 0) + 1
    phase = (body.get("status") or {}).get("phase")
    if phase in FINISHED_PHASES and _ticks[uid] % FINISHED_TICK_EVERY:
        return
    if await _reconcile(body, memo) is None:
        _stop_timer(stopped)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def on_delete(body: kopf.Body, **_: Any) -> None:
    # optional=True adds no finalizer; this only drops the job from the phase gauge.
    _locks.pop(body["metadata"]["uid"], None)
    _ticks.pop(body["metadata"]["uid"], None)
    METRICS.forget(body["metadata"]["namespace"], body["metadata"]["name"])
