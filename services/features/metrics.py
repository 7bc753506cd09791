"""Prometheus metrics of the features service (prefix ``mlops_features_``)."""

from __future__ import annotations

import functools
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

FRESHNESS_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)

FRESHNESS = Histogram(
    "mlops_features_freshness_seconds",
    "From an event's time (basis=event_time) or its ingestion (basis=ingested) until the "
    "feature row reflecting it is visible in the online store.",
    ["view", "basis"],
    buckets=FRESHNESS_BUCKETS,
)
EVENTS = Counter(
    "mlops_features_events_total",
    "Events the features service consumed, by stream and outcome "
    "(applied, duplicate, late, outside_window, held, undecodable).",
    ["stream", "outcome"],
)
LATE_DROPPED = Counter(
    "mlops_features_late_events_dropped_total",
    "Events older than the allowed lateness behind their entity's latest event time: dropped.",
    ["view"],
)
EVICTED = Counter(
    "mlops_features_history_evicted_total",
    "Facts dropped from an entity's history because it reached its size cap.",
    ["view"],
)
CHANGELOG_REWRITES = Counter(
    "mlops_features_changelog_rewrites_total",
    "Times the tables' facts were written to their changelogs again because the broker lost "
    "its topics (a restart of the in-memory local broker).",
)
TABLE_ENTRIES = Gauge(
    "mlops_features_table_entries",
    "Facts or entries held in each state table of this worker.",
    ["table"],
)
ENTITIES = Gauge("mlops_features_entities", "Entities with state on this worker.", ["view"])
PUSH_BATCH_ROWS = Histogram(
    "mlops_features_push_batch_rows",
    "Rows per push to the Feast online store.",
    ["view"],
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
)
PUSH_SECONDS = Histogram(
    "mlops_features_push_seconds",
    "Duration of one push to the Feast online store.",
    ["view"],
    buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
OFFLINE_ROWS = Counter(
    "mlops_features_offline_rows_total", "Feature rows written to the offline store.", ["view"]
)
OFFLINE_FILES = Counter(
    "mlops_features_offline_files_total", "Parquet files written to the offline store.", ["view"]
)
JOIN_EXPIRED = Counter(
    "mlops_features_label_join_expired_total",
    "Label-join entries expired: transactions past the retention, labels whose transaction "
    "never arrived (kind=unmatched_label) or that were evicted when too many waited.",
    ["kind"],
)
DEAD_LETTERS = Counter(
    "mlops_features_dead_letters_total",
    "Records the features service could not read, sent to the dead-letter topic.",
    ["stream", "reason_code"],
)


@functools.cache
def labelled(metric: Any, *values: str) -> Any:
    """``metric.labels(*values)``, looked up once (it costs ~10 µs; it runs per event)."""
    return metric.labels(*values)
