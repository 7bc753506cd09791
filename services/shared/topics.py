"""The Kafka topics of the contract (docs/architecture.md), with the configured prefix."""

from __future__ import annotations

from dataclasses import dataclass, fields

from services.shared.settings import KafkaSettings


@dataclass(frozen=True)
class Topics:
    """Topic names; ``Topics.from_settings`` applies ``MLOPS_KAFKA_TOPIC_PREFIX``."""

    transactions: str = "events.transactions"  # product services -> ingestion (JSON/protobuf)
    labels: str = "events.labels"  # product services -> ingestion
    validated: str = "events.validated"  # ValidatedTransaction, keyed by user_id
    validated_labels: str = "events.validated.labels"  # ValidatedLabel, keyed by transaction_id
    dlq: str = "events.dlq"  # DeadLetter
    predictions: str = "predictions.log"  # PredictionRecord
    drift: str = "monitoring.drift"  # DriftEvent
    training_requests: str = "training.requests"  # RetrainRequest
    training_results: str = "training.results"  # TrainingResult, keyed by model_name
    lifecycle: str = "models.lifecycle"  # ModelEvent

    @classmethod
    def from_settings(cls, kafka: KafkaSettings) -> Topics:
        return cls(**{f.name: kafka.topic_prefix + f.default for f in fields(cls)})  # type: ignore[operator]

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]
