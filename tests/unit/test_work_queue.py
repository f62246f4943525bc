"""The work queue: dedupe, per-key serialisation, delayed requeue, forget, failure backoff."""

from __future__ import annotations

import asyncio

import pytest
from sftjob_operator.work_queue import WorkQueue, failure_backoff, run_workers


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_a_key_added_twice_while_waiting_is_processed_once() -> None:
    async def scenario() -> list[str]:
        queue = WorkQueue()
        for key in ("ns/a", "ns/b", "ns/a", "ns/a"):
            queue.add(key)
        assert len(queue) == 2
        got = [await queue.get(), await queue.get()]
        for key in got:
            queue.done(key)
        assert len(queue) == 0
        return got

    assert run(scenario()) == ["ns/a", "ns/b"]


def test_a_key_added_while_processed_is_queued_again_only_after_done() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add("ns/a")
        key = await queue.get()
        queue.add("ns/a")  # an event arrives during the pass
        queue.add("ns/a")
        assert len(queue) == 0, "must not be handed to a second worker while processed"
        queue.done(key)
        assert len(queue) == 1
        assert await queue.get() == "ns/a"
        queue.done("ns/a")
        assert len(queue) == 0

    run(scenario())


def test_workers_never_run_two_passes_of_one_key_at_once() -> None:
    async def scenario() -> tuple[int, int]:
        queue = WorkQueue()
        running: set[str] = set()
        overlaps = passes = 0

        async def process(key: str) -> None:
            nonlocal overlaps, passes
            if key in running:
                overlaps += 1
            running.add(key)
            passes += 1
            await asyncio.sleep(0.01)
            running.discard(key)

        workers = asyncio.create_task(run_workers(queue, 8, process))
        for _ in range(20):
            for key in ("ns/a", "ns/b", "ns/c"):
                queue.add(key)
            await asyncio.sleep(0.003)
        while len(queue) or queue.processing:
            await asyncio.sleep(0.01)
        workers.cancel()
        return overlaps, passes

    overlaps, passes = run(scenario())
    assert overlaps == 0
    assert 3 <= passes < 60  # deduped: far fewer passes than the 60 adds


def test_add_after_queues_later_and_the_earliest_request_wins() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add_after("ns/a", 0.3)
        queue.add_after("ns/a", 5.0)  # later: ignored, the earlier one stands
        await asyncio.sleep(0.1)
        assert len(queue) == 0
        queue.add_after("ns/a", 0.05)  # earlier: replaces
        await asyncio.sleep(0.15)
        assert len(queue) == 1
        assert await queue.get() == "ns/a"
        queue.done("ns/a")
        await asyncio.sleep(0.3)  # the cancelled 0.3 s timer must not queue it again
        assert len(queue) == 0

    run(scenario())


def test_forget_drops_a_queued_and_a_scheduled_key() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add("ns/a")
        queue.add_after("ns/b", 0.05)
        queue.forget("ns/a")
        queue.forget("ns/b")
        assert queue.scheduled("ns/b") is None
        await asyncio.sleep(0.1)
        assert len(queue) == 0
        queue.add("ns/a")  # a new job of that name is queued normally
        assert len(queue) == 1

    run(scenario())


def test_forget_during_a_pass_means_no_pass_after_it() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        queue.add("ns/a")
        key = await queue.get()
        queue.add("ns/a")  # an event during the pass ...
        queue.forget("ns/a")  # ... then the job is deleted
        queue.done(key)
        assert len(queue) == 0

    run(scenario())


def test_failures_back_off_exponentially_and_success_resets() -> None:
    assert [failure_backoff(n) for n in (1, 2, 3, 4)] == [0.5, 1.0, 2.0, 4.0]
    assert failure_backoff(30) == 60.0

    async def scenario() -> None:
        queue = WorkQueue()
        assert queue.failed("ns/a") == 0.5
        assert queue.failed("ns/a") == 1.0
        queue.succeeded("ns/a")
        queue.forget("ns/a")
        assert queue.failed("ns/a") == 0.5

    run(scenario())


def test_get_waits_for_a_key() -> None:
    async def scenario() -> str:
        queue = WorkQueue()
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0.05)
        assert not getter.done()
        queue.add("ns/late")
        return await getter

    assert run(scenario()) == "ns/late"


def test_a_closed_queue_releases_its_workers() -> None:
    async def scenario() -> None:
        queue = WorkQueue()
        getter = asyncio.create_task(queue.get())
        await asyncio.sleep(0.01)
        queue.close()
        with pytest.raises(asyncio.CancelledError):
            await getter

    run(scenario())
