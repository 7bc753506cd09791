"""Where feature rows go: the Feast online store (push) and the offline feature log.

``FeatureSink.publish`` takes the rows a batch of events produced; a pusher task stamps each
with its created_timestamp, pushes the latest current row per entity (not a redelivered
event's earlier row: ``FeatureRow.current``) to the online store (one push per view for
everything queued: a push costs ~1.3 ms however few rows it carries) and queues every row
for the offline log. The offline log is written as one Parquet file per view and event date
every ``flush_interval_s`` (or ``flush_max_rows``), and only then are
the batch's input events acknowledged: an input offset is committed only once both stores
hold its row, so a crash loses nothing (the redelivered events re-emit their rows; see
windows.py).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import TYPE_CHECKING, Any, Protocol

from services.features import metrics
from services.features.offline_log import CreatedClock, FeatureLogWriter, StampedRow
from services.features.windows import FeatureRow
from services.shared.feast_layout import encode_value, entity_redis_key
from services.shared.feast_online import EventTimeRedisOnlineStore
from services.shared.featurestore import ONLINE_STORE_TYPE
from services.shared.logging import get_logger
from services.shared.retry import Backoff, retry

if TYPE_CHECKING:
    from feast import FeatureStore

log = get_logger("features.sink")

Ack = Callable[[], Awaitable[Any]]


class OnlineStore(Protocol):
    def push(self, view: str, rows: Sequence[StampedRow]) -> None:
        """Write rows (at most one per entity) to the online store; blocking."""


_MAX_CACHED_KEYS = 1_000_000  # Redis keys remembered per view (~100 bytes each)


class FeastOnlineStore:
    """Writes rows to the online store through the push sources ``<view>_push``.

    What ``store.push(f"{view}_push", frame, to=PushMode.ONLINE)`` does, minus its detour:
    the same feature views (those whose stream source is the push source, looked up in the
    registry), the same online store (the configured one), the same bytes in Redis and event
    timestamps, but written straight from the rows. ``store.push`` goes DataFrame -> Arrow ->
    protos first: py-spy put that conversion at ~20 % of the service's CPU at 2,000 events/s,
    more than computing the features; the push baseline in loadtests/bench_features.py
    measures ``store.push`` itself. The rows are not even turned into protos: the values are
    encoded directly (``encode_value``) and each entity's Redis key is computed once; building
    a proto per value, an EntityKey and datetimes per row cost ~15 % of the worker's CPU.
    """

    def __init__(self, store: FeatureStore, writers: Mapping[str, FeatureLogWriter]) -> None:
        self._store = store
        self._layout = {view: (w.entity_key, dict(w.features)) for view, w in writers.items()}
        self._views: dict[str, list[Any]] = {}
        self._online: EventTimeRedisOnlineStore | None = None
        self._redis_keys: dict[str, dict[str, bytes]] = {}

    def push_sources_registered(self) -> bool:
        """Whether the registry (applied by the stack) has every push source and its views."""
        from feast.data_source import PushSource
        from feast.infra.online_stores.helpers import get_online_store_from_config

        try:
            self._store.refresh_registry()
            registered = self._store.list_feature_views(allow_cache=True)
        except FileNotFoundError:  # no registry yet
            return False
        views = {
            view: [
                fv
                for fv in registered
                if isinstance(fv.stream_source, PushSource)
                and fv.stream_source.name == f"{view}_push"
            ]
            for view in self._layout
        }
        if not all(views.values()):
            return False
        online = get_online_store_from_config(self._store.config.online_store)
        if not isinstance(online, EventTimeRedisOnlineStore):
            raise TypeError(
                f"the online store must be {ONLINE_STORE_TYPE} (feature_store.yaml), "
                f"not {type(online).__name__}"
            )
        self._views = views
        self._online = online
        return True

    def push(self, view: str, rows: Sequence[StampedRow]) -> None:
        entity_key, features = self._layout[view]
        config = self._store.config
        keys = self._redis_keys.setdefault(view, {})
        encoded_rows = []
        for stamped in rows:
            row = stamped.row
            key = keys.get(row.entity_id)
            if key is None:
                if len(keys) >= _MAX_CACHED_KEYS:  # a bound, not an LRU: refilling is cheap
                    keys.clear()
                key = keys[row.entity_id] = entity_redis_key(config, entity_key, row.entity_id)
            values = row.features
            encoded = [(name, encode_value(kind, values[name])) for name, kind in features.items()]
            encoded_rows.append((key, row.event_time_us, encoded))
        assert self._online is not None, "push before push_sources_registered()"
        for feature_view in self._views[view]:
            self._online.online_write_encoded(config, feature_view.name, encoded_rows)


class FeatureSink:
    """Pushes rows online in a pipeline of its own, then logs them offline and acks.

    ``publish`` only queues a batch (it waits only when ``max_queued_batches`` wait, which
    slows consumption down: backpressure), so the agents go on consuming while a push is in
    flight; the pusher takes every queued batch at once, so a slow push makes the next one
    bigger, not later. A failed push is retried (the rows stay queued, nothing is acked).
    """

    def __init__(
        self,
        online: OnlineStore,
        writers: Mapping[str, FeatureLogWriter],
        *,
        flush_interval_s: float,
        flush_max_rows: int,
        max_queued_batches: int = 64,
        clock: CreatedClock | None = None,
        retry_after_s: float = 1.0,
        before_ack: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._online = online
        self._writers = dict(writers)
        self._flush_interval_s = flush_interval_s
        self._flush_max_rows = flush_max_rows
        self._clock = clock or CreatedClock()
        self._retry = Backoff(retry_after_s)
        self._before_ack = before_ack  # makes what the events produced durable first
        self._pusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="feast-push")
        self._queue: asyncio.Queue[tuple[Sequence[FeatureRow], Sequence[Ack]]] = asyncio.Queue(
            max_queued_batches
        )
        self._rows: list[StampedRow] = []
        self._acks: list[Ack] = []
        self._oldest: float | None = None
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    @property
    def pending_rows(self) -> int:
        return len(self._rows)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._push_forever())

    async def publish(self, rows: Sequence[FeatureRow], acks: Sequence[Ack]) -> None:
        """Queue a batch's rows (online now, offline soon); its ``acks`` run after both."""
        await self._queue.put((rows, acks))

    async def drain(self) -> None:
        """Wait until every queued batch has been pushed online."""
        await self._queue.join()

    async def _push_forever(self) -> None:
        while True:
            batches = [await self._queue.get()]
            while not self._queue.empty():
                batches.append(self._queue.get_nowait())
            rows = [row for batch_rows, _ in batches for row in batch_rows]
            stamped = [StampedRow(row, self._clock.next()) for row in rows]
            # whatever fails (Redis down, a Feast error), the pusher must not die: the rows
            # stay, nothing is acknowledged, the push is retried
            await retry(
                partial(self._push, stamped),
                retryable=(Exception,),
                backoff=self._retry,
                on_retry=partial(_push_failed, len(stamped)),
            )
            self._rows.extend(stamped)
            self._acks.extend(ack for _, acks in batches for ack in acks)
            if self._oldest is None:
                self._oldest = time.monotonic()
            for _ in batches:
                self._queue.task_done()
            if len(self._rows) >= self._flush_max_rows:
                try:
                    await self.flush()
                except OSError as exc:  # kept queued; the flush timer retries
                    log.error("offline_flush_failed", error=str(exc), pending_rows=len(self._rows))

    async def _push(self, stamped: Sequence[StampedRow]) -> None:
        latest: dict[str, dict[str, StampedRow]] = {}
        for item in stamped:  # in processing order: the last current row of an entity wins
            if item.row.current:  # a redelivery's earlier row goes to the offline log only
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
            metrics.labelled(metrics.FRESHNESS, row.view, "event_time").observe(
                max(now_us - row.trigger_event_us, 0) / 1e6
            )
            metrics.labelled(metrics.FRESHNESS, row.view, "ingested").observe(
                max(now_us - row.trigger_ingested_us, 0) / 1e6
            )

    async def flush_if_due(self) -> None:
        if self._oldest is not None and time.monotonic() - self._oldest >= self._flush_interval_s:
            await self.flush()

    async def flush(self) -> None:
        """Write the pushed rows to the offline log, then acknowledge their events.

        Batches without rows (the label join's) are acknowledged here too, after
        ``before_ack``: every input offset is committed only once all it produced is durable.
        """
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
            if self._before_ack is not None:
                try:
                    await self._before_ack()
                except BaseException:
                    self._acks = acks + self._acks  # the rows are logged; the acks wait
                    self._oldest = self._oldest or time.monotonic()
                    raise
            for ack in acks:
                await ack()

    async def close(self, *, drain: bool = True) -> None:
        """Stop the pusher; with ``drain``, first push and log offline what is queued."""
        try:
            if drain:
                if self._task is not None:
                    await self.drain()
                await self.flush()
        finally:
            if self._task is not None:
                self._task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
                self._task = None
            self._pusher.shutdown(wait=False)


def _push_failed(rows: int, error: BaseException, _pause_s: float) -> None:
    log.error("online_push_failed", error=str(error), rows=rows)
