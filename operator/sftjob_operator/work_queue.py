"""A work queue of job keys, as client-go's workqueue: dedupe, per-key serialisation, delays.

Watch events only say *which* job needs a pass (its key, "namespace/name"); the pass itself
always starts from the newest cached state, so ten events for one job while it waits are one
pass, not ten. The rules (each checked in tests/unit/test_work_queue.py):

- a key added while it waits is queued once (dedupe);
- a key added while a worker processes it is queued again only when that pass is done, so two
  passes of one job never run at once (per-key serialisation) and no change is missed;
- `add_after(key, seconds)` queues the key later (the earliest of several requests wins);
- `forget(key)` drops it from the queue and cancels its timer (the job is gone);
- `failed(key)` queues it again after an exponential backoff, `succeeded(key)` resets that.

Pure asyncio state: no API calls, no Kopf.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

# A pass that raised (the API unreachable for a moment, a 5xx) is retried after 0.5 s,
# doubling per consecutive failure up to a minute: quick after a blip, gentle on an outage.
FAILURE_BACKOFF_BASE = 0.5
FAILURE_BACKOFF_MAX = 60.0


def failure_backoff(failures: int) -> float:
    """Seconds before the next try after `failures` consecutive failed passes (>= 1)."""
    return min(FAILURE_BACKOFF_BASE * 2 ** max(failures - 1, 0), FAILURE_BACKOFF_MAX)


class WorkQueue:
    def __init__(self) -> None:
        self._queue: deque[str] = deque()
        self._dirty: set[str] = set()  # needs a pass (queued, or queued again once done)
        self._processing: set[str] = set()
        self._timers: dict[str, tuple[float, asyncio.TimerHandle]] = {}
        self._failures: dict[str, int] = {}
        self._ready = asyncio.Event()
        self._closed = False

    def __len__(self) -> int:
        return len(self._queue)

    @property
    def processing(self) -> frozenset[str]:
        return frozenset(self._processing)

    def scheduled(self, key: str) -> float | None:
        """The loop time at which `key` is to be queued by `add_after`, if it is."""
        timer = self._timers.get(key)
        return timer[0] if timer else None

    def add(self, key: str) -> None:
        if self._closed or key in self._dirty:
            return
        self._dirty.add(key)
        if key not in self._processing:
            self._queue.append(key)
            self._wake()

    def add_after(self, key: str, seconds: float) -> None:
        if self._closed:
            return
        if seconds <= 0:
            self.add(key)
            return
        loop = asyncio.get_running_loop()
        when = loop.time() + seconds
        current = self._timers.get(key)
        if current is not None:
            if current[0] <= when:
                return  # an earlier pass is already scheduled; it will decide again
            current[1].cancel()
        self._timers[key] = (when, loop.call_at(when, self._fire, key))

    def _fire(self, key: str) -> None:
        self._timers.pop(key, None)
        self.add(key)

    def forget(self, key: str) -> None:
        """Drop every trace of `key`: queued, scheduled, dirty and its failure count."""
        self._dirty.discard(key)
        if key in self._queue:
            self._queue.remove(key)
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer[1].cancel()
        self._failures.pop(key, None)

    def failed(self, key: str) -> float:
        """Queue `key` again after its backoff; returns the delay."""
        self._failures[key] = self._failures.get(key, 0) + 1
        delay = failure_backoff(self._failures[key])
        self.add_after(key, delay)
        return delay

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    async def get(self) -> str:
        """The next key to process; the caller must call `done(key)` when its pass ends."""
        while not self._queue:
            if self._closed:
                raise asyncio.CancelledError("work queue closed")
            self._ready.clear()
            await self._ready.wait()
        key = self._queue.popleft()
        self._processing.add(key)
        self._dirty.discard(key)
        return key

    def done(self, key: str) -> None:
        self._processing.discard(key)
        if key in self._dirty:
            self._queue.append(key)
            self._wake()

    def close(self) -> None:
        self._closed = True
        for _, handle in self._timers.values():
            handle.cancel()
        self._timers.clear()
        self._wake()

    def _wake(self) -> None:
        self._ready.set()


async def run_workers(
    queue: WorkQueue, count: int, process: Callable[[str], Awaitable[None]]
) -> None:
    """`count` workers taking keys from `queue` until cancelled; `process` handles one key."""

    async def work() -> None:
        while True:
            key = await queue.get()
            try:
                await process(key)
            finally:
                queue.done(key)

    await asyncio.gather(*(work() for _ in range(count)))
