"""Prometheus metrics of the registry (scraped on port 9104).

Per-call counts and latency come from the shared gRPC edge (``mlops_grpc_*``); these add the
state of switches in progress: announcements not yet acknowledged, versions in their grace
period.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge

LIFECYCLE_PENDING = Gauge(
    "mlops_registry_lifecycle_events_pending",
    "Lifecycle events of durable changes not yet acknowledged by the broker (retried)",
)
VERSIONS_RETIRING = Gauge(
    "mlops_registry_versions_retiring",
    "Versions no longer routed that Triton keeps serving until their grace period ends",
)
LIFECYCLE_PUBLISH_FAILURES = Counter(
    "mlops_registry_lifecycle_publish_failures_total",
    "Attempts to publish a lifecycle event that failed (the event is kept and retried)",
)
