"""Prometheus metrics of the ingestion service (prefix ``mlops_ingestion_``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

EVENTS_IN = Counter(
    "mlops_ingestion_events_in_total", "Records read from the product topics", ["topic"]
)
EVENTS_OUT = Counter(
    "mlops_ingestion_events_out_total",
    "Records produced and acknowledged, by output topic (validated streams, DLQ)",
    ["topic"],
)
REJECTED = Counter(
    "mlops_ingestion_events_rejected_total", "Records sent to the DLQ", ["reason_code"]
)
DUPLICATES = Counter(
    "mlops_ingestion_duplicates_total",
    "Valid events not forwarded because their id was already forwarded",
    ["kind"],
)
REDELIVERIES = Counter(
    "mlops_ingestion_redeliveries_total",
    "Records read again after a restart or rebalance and forwarded again (same source position)",
    ["kind"],
)
PROCESSING_SECONDS = Histogram(
    "mlops_ingestion_processing_seconds",
    "From a batch's poll to every output acknowledged",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
EVENT_LAG_SAMPLE = 8  # every 8th forwarded event of a batch is observed (the first always)
EVENT_LAG_SECONDS = Histogram(
    "mlops_ingestion_event_lag_seconds",
    "End-to-end lag: event time to forwarded and acknowledged (1 in 8 events, sampled)",
    ["kind"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600, 86400),
)
CONSUMER_LAG = Gauge(
    "mlops_ingestion_consumer_lag_records",
    "High watermark minus position, per consumed partition",
    ["group", "topic", "partition"],
)
ARCHIVE_ROWS = Counter(
    "mlops_ingestion_archive_rows_total", "Rows written to the offline store", ["dataset"]
)
ARCHIVE_FILES = Counter(
    "mlops_ingestion_archive_files_total", "Parquet files written to the offline store", ["dataset"]
)
ARCHIVE_SKIPPED = Counter(
    "mlops_ingestion_archive_skipped_total",
    "Validated records not archived: id already archived, or unreadable",
    ["dataset", "reason"],
)
RETRIES = Counter(
    "mlops_ingestion_retries_total",
    "Operations retried after a failure of Kafka or Redis",
    ["operation"],
)
