"""The Kopf wiring's own logic: ending the timer of a job that is gone."""

from __future__ import annotations

import asyncio

import kopf
from kopf._cogs.aiokits import aioenums
from sftjob_operator import handlers


def test_stop_timer_sets_the_flag_kopfs_timer_loop_waits_on() -> None:
    asyncio.run(_stop_timer_sets_the_flag())


async def _stop_timer_sets_the_flag() -> None:
    # Kopf 1.45's timer loop runs `while not stopper.is_set()` (kopf/_core/engines/daemons.py,
    # _timer); the handler's `stopped` kwarg is the waiter over that same stopper.
    stopper: aioenums.FlagSetter[kopf.DaemonStoppingReason] = aioenums.FlagSetter()
    stopped = aioenums.AsyncFlagWaiter(stopper)
    assert not stopper.is_set()
    handlers._stop_timer(stopped)
    assert stopper.is_set()
    assert stopped.reason == kopf.DaemonStoppingReason.RESOURCE_DELETED
