"""Waiting and trying again until a service is asked to stop: the one place for it.

Every long-running loop of the platform waits in one of three ways, and each lives here:

- ``pause(stop, seconds)``: sleep, but return at once when ``stop`` is set (a graceful stop
  never waits out a back-off or a timer); ``ticks(stop, seconds)`` is a timer built on it;
- ``Backoff``: the pauses between attempts, ``initial_s`` doubling up to ``max_s`` (a fixed
  pause when they are equal);
- ``retry(operation, ...)``: call until it succeeds, pausing per ``Backoff`` after each
  failure of the kinds given; ``Stopping`` when asked to stop meanwhile.

Written here rather than taken from tenacity (which the lock file carries only as a
transitive dependency): every loop here must wake on the service's stop event, and the
operations that report failure in their result (a sender's report) rather than by raising
use ``Backoff`` directly; the whole module is smaller than the adapter would be.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


class Stopping(Exception):
    """The service was asked to stop while an operation was waiting to be tried again."""


async def pause(stop: asyncio.Event | None, seconds: float) -> bool:
    """Sleep ``seconds``, or less if ``stop`` is set meanwhile; True if ``stop`` is set.

    Without a stop event it is a plain sleep (a task that ends by being cancelled)."""
    if stop is None:
        await asyncio.sleep(seconds)
        return False
    if not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


async def ticks(stop: asyncio.Event, interval_s: float) -> AsyncIterator[None]:
    """Yield every ``interval_s`` (the first after one interval) until ``stop`` is set."""
    while not await pause(stop, interval_s):
        yield


@dataclass(frozen=True)
class Backoff:
    """Pauses between attempts: ``initial_s`` after the first failure, doubling up to
    ``max_s`` (default: ``initial_s``, a fixed pause)."""

    initial_s: float
    max_s: float | None = None

    @property
    def cap_s(self) -> float:
        return self.initial_s if self.max_s is None else max(self.max_s, self.initial_s)

    def delays(self) -> Iterator[float]:
        """The pause after the first, second, ... failure (endless)."""
        delay = self.initial_s
        while True:
            yield delay
            delay = min(delay * 2, self.cap_s)

    def delay(self, failures: int) -> float:
        """The pause after the ``failures``-th failure in a row (1 = the first)."""
        doublings = min(max(failures - 1, 0), 64)  # 2**64 * any sane pause is past the cap
        return min(self.initial_s * 2**doublings, self.cap_s)

    async def wait(self, stop: asyncio.Event | None, delay: float) -> None:
        """``pause`` for ``delay``; ``Stopping`` if ``stop`` is set meanwhile."""
        if await pause(stop, delay):
            raise Stopping


OnRetry = Callable[[BaseException, float], None]


async def retry(
    operation: Callable[[], Awaitable[T]],
    *,
    retryable: tuple[type[BaseException], ...],
    backoff: Backoff,
    stop: asyncio.Event | None = None,
    on_retry: OnRetry | None = None,
) -> T:
    """``await operation()`` until it returns; after an exception of ``retryable`` call
    ``on_retry(error, pause)`` and pause per ``backoff``. Other exceptions propagate;
    ``Stopping`` if ``stop`` is set while pausing."""
    delays = backoff.delays()
    while True:
        try:
            return await operation()
        except retryable as exc:
            delay = next(delays)
            if on_retry is not None:
                on_retry(exc, delay)
            if await pause(stop, delay):
                raise Stopping from exc
