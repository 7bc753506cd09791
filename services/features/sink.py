"""Where feature rows go: the Feast online store (push) and the offline feature log.

``FeatureSink.publish`` takes the rows a batch of events produced, stamps each with its
created_timestamp, pushes the latest row per entity to the online store (one push per view
per batch: a push costs ~1.3 ms however few rows it carries) and queues every row for the
offline log. The offline log is written as one Parquet file per view and event date every
``flush_interval_s`` (or ``flush_max_rows``), and only then are the batch's input events
acknowledged: an input offset is committed only once both stores hold its row, so a crash
loses nothing (the redelivered events re-emit their rows; see windows.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

from services.features import metrics
from services.features.offline_log import CreatedClock, FeatureLogWriter, StampedRow
from services.features.windows import FeatureRow
from services.shared.logging import get_logger

if TYPE_CHECKING:
    import pandas as pd
    from feast import FeatureStore

log = get_logger("features.sink")

Ack = Callable[[], Awaitable[Any]]


class OnlineStore(Protocol):
    def push(self, view: str, rows: Sequence[StampedRow]) -> None:
        """Write rows (at most one per entity) to the online store; blocking."""


def feature_frame(
    entity_key: str, features: Sequence[str], rows: Sequence[StampedRow]
) -> pd.DataFrame:
    import pandas as pd

    data: dict[str, Any] = {entity_key: [r.row.entity_id for r in rows]}
    for name in features:
        data[name] = [r.row.features[name] for r in rows]
    data["event_timestamp"] = pd.to_datetime(
        [r.row.event_time_us for r in rows], unit="us", utc=True
    )
    data["created_timestamp"] = pd.to_datetime([r.created_us for r in rows], unit="us", utc=True)
    return pd.DataFrame(data)


class FeastOnlineStore:
    """Pushes rows through the views' push sources (``<view>_push``) to the online store."""

    def __init__(self, store: FeatureStore, writers: Mapping[str, FeatureLogWriter]) -> None:
        self._store = store
        self._columns = {view: (w.entity_key, list(w.features)) for view, w in writers.items()}

    def push(self, view: str, rows: Sequence[StampedRow]) -> None:
        from feast.data_source import PushMode

        entity_key, features = self._columns[view]
        frame = feature_frame(entity_key, features, rows)
        self._store.push(f"{view}_push", frame, to=PushMode.ONLINE)

    def push_sources_registered(self) -> bool:
        """Whether the registry (applied by the stack) holds every view's push source."""
        from feast.errors import FeastObjectNotFoundException

        try:
            self._store.refresh_registry()
            for view in self._columns:
                self._store.get_data_source(f"{view}_push")
        except (FeastObjectNotFoundException, FileNotFoundError):
            return False
        return True


class FeatureSink:
    def __init__(
        self,
        online: OnlineStore,
        writers: Mapping[str, FeatureLogWriter],
        *,
        flush_interval_s: float,
        flush_max_rows: int,
        clock: CreatedClock | None = None,
    ) -> None:
        self._online = online
        self._writers = dict(writers)
        self._flush_interval_s = flush_interval_s
        self._flush_max_rows = flush_max_rows
        self._clock = clock or CreatedClock()
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-push")
        self._rows: list[StampedRow] = []
        self._acks: list[Ack] = []
        self._oldest: float | None = None
        self._lock = asyncio.Lock()

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    async def publish(self, rows: Sequence[FeatureRow], acks: Sequence[Ack]) -> None:
        """Make ``rows`` visible online now and durable offline soon; then run ``acks``."""
        if rows:
            stamped = [StampedRow(row, self._clock.next()) for row in rows]
            latest: dict[str, dict[str, StampedRow]] = {}
            for item in stamped:  # in processing order: the last row of an entity wins
                latest.setdefault(item.row.view, {})[item.row.entity_id] = item
            loop = asyncio.get_running_loop()
            for view, by_entity in latest.items():
                started = time.perf_counter()
                batch = list(by_entity.values())
                await loop.run_in_executor(self._pusher, self._online.push, view, batch)
                metrics.PUSH_SECONDS.labels(view).observe(time.perf_counter() - started)
                metrics.PUSH_BATCH_ROWS.labels(view).observe(len(batch))
            now_us = time.time_ns() // 1000
            for item in stamped:
                row = item.row
                metrics.FRESHNESS.labels(row.view, "event_time").observe(
                    max(now_us - row.trigger_event_us, 0) / 1e6
                )
                metrics.FRESHNESS.labels(row.view, "ingested").observe(
                    max(now_us - row.trigger_ingested_us, 0) / 1e6
                )
            self._rows.extend(stamped)
        self._acks.extend(acks)
        if self._oldest is None and (self._rows or self._acks):
            self._oldest = time.monotonic()
        if len(self._rows) >= self._flush_max_rows:
            await self.flush()

    async def flush_if_due(self) -> None:
        if self._oldest is not None and time.monotonic() - self._oldest >= self._flush_interval_s:
            await self.flush()

    async def flush(self) -> None:
        """Write the queued rows to the offline log, then acknowledge their events."""
        async with self._lock:
            rows, acks = self._rows, self._acks
            self._rows, self._acks, self._oldest = [], [], None
            try:
                by_view: dict[str, list[StampedRow]] = {}
                for item in rows:
                    by_view.setdefault(item.row.view, []).append(item)
                for view, view_rows in by_view.items():
                    files = await asyncio.to_thread(self._writers[view].write, view_rows)
                    metrics.OFFLINE_ROWS.labels(view).inc(len(view_rows))
                    metrics.OFFLINE_FILES.labels(view).inc(len(files))
            except BaseException:
                # keep everything queued (a partial write only duplicates rows, harmlessly)
                self._rows, self._acks = rows + self._rows, acks + self._acks
                self._oldest = self._oldest or time.monotonic()
                raise
            for ack in acks:
                await ack()

    def close(self) -> None:
        self._pusher.shutdown(wait=True)
