"""`mlops train`: request or run a training."""

from __future__ import annotations


def train() -> None:
    """Train a model."""
    raise SystemExit("mlops train: not available yet")
