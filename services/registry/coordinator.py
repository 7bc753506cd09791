"""Carries every change of the registry through its steps, one change at a time.

``ModelRegistryService`` (blocking) makes a change durable: Triton serves the old and the new
versions, MLflow records the new aliases. Here, around it, on the event loop:

- one lock: mutations, reconcile passes and retirements never interleave;
- the change's events go to the ``LifecycleOutbox`` (in order, retried until acknowledged);
  a mutating call waits for the acknowledgement at most ``publish_wait_s``, then answers
  anyway (the change is applied; its events follow when the broker takes them);
- once a switch's events are acknowledged, the grace period of the versions it retired starts
  (``start_grace``); a background task unloads them when it ends (``retire_due``) and queues
  their UNPUBLISHED events. A failed retirement is tried again after ``publish_retry_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence

from services.registry import metrics
from services.registry.outbox import EventSink, LifecycleOutbox
from services.registry.records import LifecycleEvent, VersionRecord
from services.registry.retirement import Retirement
from services.registry.service import ModelRegistryService, ReconcileReport, Transition
from services.shared.errors import PlatformError
from services.shared.logging import get_logger

log = get_logger("registry.coordinator")


class RegistryCoordinator:
    def __init__(
        self,
        service: ModelRegistryService,
        sink: EventSink,
        *,
        publish_wait_s: float,
        retry_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.outbox = LifecycleOutbox(sink, retry_s=retry_s)
        self.lock = asyncio.Lock()
        self.publish_wait_s = publish_wait_s
        self.retry_s = retry_s
        self._clock = clock  # the service's clock: retirement deadlines are on it
        self._grace_started = asyncio.Event()
        self._outbox_task: asyncio.Task[None] | None = None
        self._retire_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._outbox_task = asyncio.create_task(self.outbox.run(), name="registry-outbox")
        self._retire_task = asyncio.create_task(self._retire_loop(), name="registry-retire")

    async def stop_retiring(self) -> None:
        """No more unloads from here on (first step of a shutdown): a version in its grace
        period stays loaded, and the next start retires it after announcing the table."""
        if self._retire_task is not None:
            self._retire_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._retire_task
            self._retire_task = None

    async def stop(self, drain_s: float | None = None) -> None:
        """Stop retiring; give pending events ``drain_s`` (default ``publish_wait_s``) to be
        acknowledged, then stop publishing."""
        await self.stop_retiring()
        if self._outbox_task is None:
            return
        if self.outbox.pending:
            await self.outbox.drain(self.publish_wait_s if drain_s is None else drain_s)
        self._outbox_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._outbox_task
        self._outbox_task = None

    # ------------------------------------------------------------------ changes

    def _announce(
        self, events: Sequence[LifecycleEvent], retiring: Sequence[Retirement]
    ) -> asyncio.Future[None]:
        def announced() -> None:
            if retiring:
                self.service.start_grace(retiring)
                self._grace_started.set()

        metrics.VERSIONS_RETIRING.set(len(self.service.retiring()))
        return self.outbox.put(events, announced)

    async def mutate(self, call: Callable[[], Transition]) -> VersionRecord:
        """Run one mutation, queue its events, wait (bounded) for their acknowledgement."""
        async with self.lock:
            transition = await asyncio.to_thread(call)
            delivered = self._announce(transition.events, transition.retiring)
        if not delivered.done():
            await asyncio.wait({delivered}, timeout=self.publish_wait_s)
        if not delivered.done():
            log.warning(
                "lifecycle_publish_pending",
                version=transition.version.version,
                event_ids=",".join(e.event_id for e in transition.events),
                note="the change is applied; its events are retried until the broker takes them",
            )
        return transition.version

    async def reconcile(self, *, announce: bool = False) -> ReconcileReport:
        async with self.lock:
            report = await asyncio.to_thread(self.service.reconcile, announce=announce)
            self._announce(report.events, report.retiring)
        return report

    # ------------------------------------------------------------------ retirement

    async def retire_due(self) -> list[LifecycleEvent]:
        """Unload the versions whose grace period is over (under the lock); queue their
        UNPUBLISHED events."""
        async with self.lock:
            events = await asyncio.to_thread(self.service.retire_due)
            self._announce(events, [])
        return events

    async def _retire_loop(self) -> None:
        while True:
            self._grace_started.clear()
            due_at = self.service.next_retirement_at()
            wait_s = None if due_at is None else max(0.0, due_at - self._clock())
            if wait_s is None or wait_s > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._grace_started.wait(), wait_s)
                continue  # a new grace period may end sooner: look again
            try:
                await self.retire_due()
            except PlatformError as exc:
                log.warning("retire_failed", error=type(exc).__name__, detail=exc.message)
                await asyncio.sleep(self.retry_s)
            except Exception as exc:  # the loop must outlive any one failure
                log.exception("retire_crashed", error=type(exc).__name__)
                await asyncio.sleep(self.retry_s)
