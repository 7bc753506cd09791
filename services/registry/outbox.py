"""The registry's pending lifecycle events: published in order, retried until acknowledged.

A change is durable in MLflow and Triton before its events exist, so an event the broker
refuses must not be lost: it waits here (in memory) and is retried, with the events queued
after it, in order, until the broker acknowledges it. Each batch (the events of one change)
has a future that completes on acknowledgement and an optional callback run at that moment
(the registry starts retiring versions only once consumers can know about the switch).

Events still pending when the process stops are lost; the next start announces the current
routing table (``ROUTING_ANNOUNCED``), so a consumer that missed them converges.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from services.registry import metrics
from services.registry.records import LifecycleEvent
from services.shared.logging import get_logger
from services.shared.retry import Backoff

log = get_logger("registry.outbox")


class EventSink(Protocol):
    async def publish(self, events: Sequence[LifecycleEvent]) -> None: ...


@dataclass(eq=False)
class _Batch:
    events: list[LifecycleEvent]
    delivered: asyncio.Future[None]
    on_delivered: Callable[[], None] | None
    sent: int = 0  # events of the batch the broker has acknowledged
    attempts: int = field(default=0)


def _ids(events: Sequence[LifecycleEvent]) -> str:
    return ",".join(e.event_id for e in events)


class LifecycleOutbox:
    """FIFO of event batches and the task that publishes them (``run``)."""

    def __init__(self, sink: EventSink, *, retry_s: float = 1.0, max_retry_s: float = 10.0) -> None:
        self.sink = sink
        self.backoff = Backoff(retry_s, max_retry_s)
        self._queue: collections.deque[_Batch] = collections.deque()
        self._queued = asyncio.Event()
        self._emptied = asyncio.Event()
        self._emptied.set()
        self.failures = 0  # publish attempts the broker refused (or that timed out)

    @property
    def pending(self) -> int:
        """Events not acknowledged yet."""
        return sum(len(b.events) - b.sent for b in self._queue)

    def put(
        self,
        events: Sequence[LifecycleEvent],
        on_delivered: Callable[[], None] | None = None,
    ) -> asyncio.Future[None]:
        """Queue one change's events; the future completes once all are acknowledged (after
        every batch queued before them)."""
        batch = _Batch(list(events), asyncio.get_running_loop().create_future(), on_delivered)
        self._queue.append(batch)
        self._emptied.clear()
        self._queued.set()
        metrics.LIFECYCLE_PENDING.set(self.pending)
        return batch.delivered

    async def drain(self, timeout_s: float) -> bool:
        """Wait until every queued event is acknowledged; False if ``timeout_s`` passed."""
        try:
            await asyncio.wait_for(self._emptied.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def run(self) -> None:
        """Publish batches in order until cancelled; a refused event is retried (with the
        ones after it waiting), pausing ``retry_s`` doubling up to ``max_retry_s``."""
        try:
            while True:
                if not self._queue:
                    self._queued.clear()
                    await self._queued.wait()
                    continue
                batch = self._queue[0]
                if not await self._publish(batch):
                    await asyncio.sleep(self.backoff.delay(batch.attempts))
                    continue
                self._queue.popleft()
                metrics.LIFECYCLE_PENDING.set(self.pending)
                if batch.attempts > 1:
                    log.info("lifecycle_published_late", event_ids=_ids(batch.events))
                if batch.on_delivered is not None:
                    try:
                        batch.on_delivered()
                    except Exception:  # the queue must outlive a failing callback
                        log.exception("lifecycle_delivered_callback_failed")
                if not batch.delivered.done():
                    batch.delivered.set_result(None)
                if not self._queue:
                    self._emptied.set()
        finally:
            if self._queue:
                lost = [e for b in self._queue for e in b.events[b.sent :]]
                log.error(
                    "lifecycle_events_not_published",
                    event_ids=_ids(lost),
                    note="the next start announces the routing table",
                )

    async def _publish(self, batch: _Batch) -> bool:
        batch.attempts += 1
        try:
            while batch.sent < len(batch.events):
                # one at a time: a retry never repeats an event the broker acknowledged
                await self.sink.publish(batch.events[batch.sent : batch.sent + 1])
                batch.sent += 1
                metrics.LIFECYCLE_PENDING.set(self.pending)
        except Exception as exc:  # noqa: BLE001 - broker down, timeouts: keep the events, retry
            log.warning(
                "lifecycle_publish_failed",
                event_ids=_ids(batch.events[batch.sent :]),
                attempt=batch.attempts,
                error=f"{type(exc).__name__}: {exc}",
            )
            self.failures += 1
            metrics.LIFECYCLE_PUBLISH_FAILURES.inc()
            return False
        return True
