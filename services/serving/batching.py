"""Coalescing concurrent requests into batches.

Each request served alone costs a Redis round trip and a Triton call; their fixed costs
(system calls, protobuf framing, Triton's Python-backend IPC) dominate the work itself. The
``MicroBatcher`` collects the requests that arrive within ``max_delay_s`` of the first (or
until ``max_size`` have arrived) and hands them to one batch handler; each caller awaits its
own result. By default one batch runs at a time (``max_in_flight=1``; serving's
``batch_max_in_flight``): the requests that arrive meanwhile gather into the next batch,
which is what makes batches grow under load. A larger ``max_in_flight`` lets batches overlap,
so that one slow batch does not hold the next back.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from services.shared.logging import get_logger

log = get_logger("serving.batching")

T = TypeVar("T")
R = TypeVar("R")


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError("no result within the time allowed"))


class MicroBatcher(Generic[T, R]):
    """Collects items for up to ``max_delay_s`` or ``max_size`` items, then runs one batch.

    At most ``max_in_flight`` batches run at once. While they do, new items wait and the
    next batch grows: under load batches get bigger on their own (and the fixed cost per
    batch is shared by more items), while at low load an item waits no more than
    ``max_delay_s``.
    """

    def __init__(
        self,
        # answers every item of its batch, in order, with a result or the item's own error
        handler: Callable[[list[T]], Awaitable[Sequence[R | BaseException]]],
        *,
        max_size: int,
        max_delay_s: float,
        max_in_flight: int = 1,
        name: str = "batch",
    ) -> None:
        if max_size < 1:
            raise ValueError("max_size must be at least 1")
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self._handler = handler
        self._max_size = max_size
        self._max_delay_s = max_delay_s
        self._max_in_flight = max_in_flight
        self._name = name
        self._items: list[T] = []
        self._futures: list[asyncio.Future[R]] = []
        self._timer: asyncio.Handle | None = None
        self._due = False  # the oldest waiting item has waited max_delay_s
        self._running: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        return len(self._items)

    async def submit(self, item: T, timeout_s: float | None = None) -> R:
        """The item's result, once its batch has run; its error if it failed.

        With ``timeout_s``, ``TimeoutError`` when no result came in time (the batch goes on
        for the other items).
        """
        if self._closed:
            raise RuntimeError(f"{self._name} batcher is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._items.append(item)
        self._futures.append(future)
        if len(self._items) >= self._max_size:
            self._dispatch()
        elif self._timer is None and not self._due:
            if self._max_delay_s > 0:
                self._timer = loop.call_later(self._max_delay_s, self._on_timer)
            else:
                self._timer = loop.call_soon(self._on_timer)
        if timeout_s is None:
            return await future
        # a timer on the future instead of asyncio.wait_for: no extra task per item
        expiry = loop.call_later(timeout_s, _expire, future)
        try:
            return await future
        finally:
            expiry.cancel()

    def _on_timer(self) -> None:
        self._timer = None
        self._due = True
        self._dispatch()

    def _dispatch(self) -> None:
        """Start batches while there is a free slot and something due (or a full batch)."""
        while (
            self._items
            and len(self._running) < self._max_in_flight
            and (self._due or len(self._items) >= self._max_size or self._closed)
        ):
            self._start(self._max_size)
        if not self._items:
            self._due = False
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

    def _start(self, size: int) -> None:
        items, futures = self._items[:size], self._futures[:size]
        del self._items[:size], self._futures[:size]
        # callers that gave up (cancelled, deadline passed) are not worth a batch slot
        live = [(i, f) for i, f in zip(items, futures, strict=True) if not f.done()]
        if not live:
            return
        task = asyncio.get_running_loop().create_task(self._run(live))
        self._running.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.discard(task)
        self._dispatch()  # what waited for a free slot goes now

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        items = [item for item, _ in batch]
        try:
            results = await self._handler(items)
            if len(results) != len(items):
                raise RuntimeError(
                    f"{self._name} handler answered {len(results)} of {len(items)} items"
                )
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - one failure answers the whole batch, never hangs it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def close(self) -> None:
        """Run what is pending and wait for the batches in flight."""
        self._closed = True
        self._dispatch()
        while self._running:
            await asyncio.gather(*list(self._running), return_exceptions=True)
