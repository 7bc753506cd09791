"""Prometheus metrics of the serving service (scraped on port 9105).

Per-call counts and latency by method and status code come from the shared gRPC edge
(``mlops_grpc_*``); these add what only serving knows: which version and route answered,
how big the batches are, how often answers were degraded, what was not logged.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PREDICTIONS = Counter(
    "mlops_serving_predictions_total",
    "Predictions answered (shadow: scored and logged, not answered), by model version and route",
    ["model_version", "route"],
)
PREDICTION_LATENCY = Histogram(
    "mlops_serving_prediction_seconds",
    "Time from receiving a request to its answer, by model version and route",
    ["model_version", "route"],
    buckets=(0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.1, 0.25, 1.0),
)
ERRORS = Counter(
    "mlops_serving_errors_total", "Requests answered with an error, by gRPC status code", ["code"]
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
FEATURE_BATCH_SIZE = Histogram(
    "mlops_serving_feature_batch_rows",
    "Rows per online-feature read (one Redis round trip)",
    buckets=_BATCH_BUCKETS,
)
TRITON_BATCH_SIZE = Histogram(
    "mlops_serving_triton_batch_rows",
    "Rows per Triton inference call, by route",
    ["route"],
    buckets=_BATCH_BUCKETS,
)
DEGRADED = Counter(
    "mlops_serving_degraded_total", "Answers given with default features (online store down)"
)
FEATURE_STORE_ERRORS = Counter(
    "mlops_serving_feature_store_errors_total", "Online-feature reads that failed or timed out"
)
TRITON_ERRORS = Counter(
    "mlops_serving_triton_errors_total",
    "Triton calls that failed or timed out, by route",
    ["route"],
)
PREDICTION_LOG_DROPPED = Counter(
    "mlops_serving_prediction_log_dropped_total",
    "Prediction records dropped because the predictions.log buffer was full",
)
PREDICTION_LOG_FAILED = Counter(
    "mlops_serving_prediction_log_failed_total",
    "Prediction records the broker did not accept",
)
SHADOW_SKIPPED = Counter(
    "mlops_serving_shadow_skipped_total",
    "Mirrored rows not scored because too many shadow batches were in flight",
)
SHADOW_REPLAYED = Counter(
    "mlops_serving_shadow_replayed_total",
    "Earlier answers scored on a newly set shadow version (their logged model inputs), by "
    "outcome: scored, failed (Triton did not answer; the rest of the replay is given up)",
    ["outcome"],
)
ROUTING = Gauge(
    "mlops_serving_route_traffic_percent",
    "The routing table: traffic share of each served version by alias",
    ["model_version", "alias"],
    multiprocess_mode="max",  # with several workers: they all follow the same table
)
ROUTING_UPDATES = Counter(
    "mlops_serving_routing_updates_total", "Routing tables applied, by source", ["source"]
)
