"""Garbage-collector policy for a process that holds a large, long-lived state.

CPython's cyclic collector scans every tracked object of the oldest generation on each full
collection. A worker whose state is millions of long-lived, acyclic containers (the features
service's fact histories) pays for that with pauses that grow with the state and find
nothing: at 2,000 events/s the features worker stopped 200-400 ms every 3-4 s in full
collections that collected 0-80 objects, which was most of its freshness p99.

``HeapFreezer.tick`` (called every few seconds) runs a young collection, so short-lived cycles
are still collected, and then moves the survivors to the permanent generation
(``gc.freeze``), which no automatic collection scans. Frozen objects are still freed by
reference counting the moment nothing refers to them (an evicted fact is freed at once); only
a reference cycle that dies after it was frozen is not reclaimed, so every ``full_every_s`` a
tick unfreezes everything and runs one full collection (one pause of the old kind, bounded
by the interval instead of every few seconds).
"""

from __future__ import annotations

import asyncio
import gc
import time
from typing import TYPE_CHECKING

from services.shared.logging import get_logger
from services.shared.retry import pause

if TYPE_CHECKING:
    from services.shared.settings import HeapSettings

log = get_logger("shared.heap")


class HeapFreezer:
    def __init__(self, full_every_s: float = 3600.0) -> None:
        if full_every_s <= 0:
            raise ValueError("full_every_s must be positive")
        self._full_every_s = full_every_s
        self._last_full = time.monotonic()

    def tick(self) -> None:
        """Collect the young generations, then freeze what survived (or, when due, unfreeze
        and collect everything once)."""
        now = time.monotonic()
        if now - self._last_full >= self._full_every_s:
            self.full_collection()
        else:
            gc.collect(1)
        gc.freeze()

    def full_collection(self) -> int:
        """Unfreeze and collect every generation; returns the objects collected."""
        started = time.perf_counter()
        gc.unfreeze()
        collected = gc.collect()
        self._last_full = time.monotonic()
        log.info(
            "heap_full_collection",
            collected=collected,
            seconds=round(time.perf_counter() - started, 3),
        )
        return collected


async def freeze_periodically(settings: HeapSettings, stop: asyncio.Event) -> None:
    """``HeapFreezer.tick`` now (the start-up heap) and every ``gc_freeze_interval_s`` until
    ``stop``; nothing when the interval is 0."""
    if settings.gc_freeze_interval_s <= 0:
        return
    heap = HeapFreezer(settings.gc_full_interval_s)
    while not stop.is_set():
        heap.tick()
        await pause(stop, settings.gc_freeze_interval_s)
