"""`mlops simulate`: publish realistic card-payment traffic."""

from __future__ import annotations


def simulate() -> None:
    """Publish simulated transactions and labels to Kafka."""
    raise SystemExit("mlops simulate: not available yet")
