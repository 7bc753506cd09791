"""The micro-batcher: when batches go, how big they get, and what each caller gets back."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from services.serving.batching import MicroBatcher


class Recorder:
    """A batch handler that records its batches and can be held until released."""

    def __init__(self, hold: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        if not hold:
            self.release.set()

    async def __call__(self, items: list[int]) -> Sequence[int | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        return [i * 10 if i >= 0 else ValueError(f"negative {i}") for i in items]


async def test_items_that_arrive_together_go_in_one_batch() -> None:
    handler = Recorder()
    batcher = MicroBatcher(handler, max_size=100, max_delay_s=0.005)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(20)))
    assert results == [i * 10 for i in range(20)]
    assert handler.batches == [list(range(20))]


async def test_a_full_batch_goes_without_waiting_for_the_delay() -> None:
    handler = Recorder()
    batcher = MicroBatcher(handler, max_size=4, max_delay_s=60.0)
    results = await asyncio.wait_for(asyncio.gather(*(batcher.submit(i) for i in range(8))), 5)
    assert results == [i * 10 for i in range(8)]
    assert handler.batches == [[0, 1, 2, 3], [4, 5, 6, 7]]


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    handler = Recorder()
    batcher = MicroBatcher(handler, max_size=100, max_delay_s=0.0)
    assert await asyncio.wait_for(batcher.submit(7), 5) == 70
    assert handler.batches == [[7]]


async def test_batches_grow_while_the_in_flight_limit_is_reached() -> None:
    handler = Recorder(hold=True)
    batcher = MicroBatcher(handler, max_size=100, max_delay_s=0.0, max_in_flight=1)
    first = asyncio.ensure_future(batcher.submit(0))
    await asyncio.wait_for(handler.started.wait(), 5)
    waiting = [asyncio.ensure_future(batcher.submit(i)) for i in range(1, 30)]
    for _ in range(5):
        await asyncio.sleep(0)
    assert handler.batches == [[0]]  # the others wait for the slot
    assert batcher.waiting == 29
    handler.release.set()
    assert await first == 0
    assert await asyncio.gather(*waiting) == [i * 10 for i in range(1, 30)]
    assert handler.batches == [[0], list(range(1, 30))]


async def test_each_item_gets_its_own_error() -> None:
    batcher = MicroBatcher(Recorder(), max_size=10, max_delay_s=0.001)
    results = await asyncio.gather(
        batcher.submit(1), batcher.submit(-2), batcher.submit(3), return_exceptions=True
    )
    assert results[0] == 10 and results[2] == 30
    assert isinstance(results[1], ValueError)


async def test_a_failing_handler_fails_its_batch_only() -> None:
    calls = 0

    async def handler(items: list[int]) -> Sequence[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(handler, max_size=2, max_delay_s=0.001)
    with pytest.raises(RuntimeError, match="boom"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))
    assert await batcher.submit(3) == 3


async def test_a_handler_answering_too_few_items_is_an_error() -> None:
    async def handler(items: list[int]) -> Sequence[int]:
        return items[:-1]

    batcher: MicroBatcher[int, int] = MicroBatcher(handler, max_size=2, max_delay_s=0.001)
    with pytest.raises(RuntimeError, match="answered 1 of 2"):
        await asyncio.gather(batcher.submit(1), batcher.submit(2))


async def test_a_timeout_answers_the_caller_while_the_batch_goes_on() -> None:
    handler = Recorder(hold=True)
    batcher = MicroBatcher(handler, max_size=10, max_delay_s=0.0)
    slow = asyncio.ensure_future(batcher.submit(5))
    with pytest.raises(TimeoutError):
        await batcher.submit(6, timeout_s=0.01)
    handler.release.set()
    assert await slow == 50


async def test_callers_that_gave_up_take_no_batch_slot() -> None:
    handler = Recorder()
    batcher = MicroBatcher(handler, max_size=10, max_delay_s=0.01)
    gone = asyncio.ensure_future(batcher.submit(1))
    await asyncio.sleep(0)
    gone.cancel()
    assert await batcher.submit(2) == 20
    assert handler.batches == [[2]]


async def test_close_runs_what_is_waiting() -> None:
    handler = Recorder()
    batcher = MicroBatcher(handler, max_size=10, max_delay_s=60.0)
    pending = asyncio.ensure_future(batcher.submit(4))
    await asyncio.sleep(0)
    await batcher.close()
    assert await pending == 40
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(1)
