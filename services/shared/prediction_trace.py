"""The story of one prediction: ``mlops trace TRANSACTION_ID`` and the dashboard's trace.

``PredictionTracer.trace`` gathers, for one transaction id:

- every answer serving logged for it (predictions.log: production or canary, and shadow
  copies): probability, decision, model version and route, latency, and the exact model
  inputs serving used. Records are keyed by transaction id, so only the key's partition is
  read (its last ``max_scan_records`` records);
- its label, if one arrived (events.validated.labels, keyed by transaction id the same way;
  then the ingestion archive of labels in the offline store);
- the answering version's lineage from the registry (training run, dataset snapshot,
  feature definitions hash, code commit) and whether the feature definitions changed since;
- the features recomputed offline, point in time (services/shared/feature_recompute.py),
  and each difference from what serving used: the training-serving skew of this request.

Each part that cannot be had says why (``*_status``); the trace itself fails only when no
prediction of that id is found (``NotFound``).
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any

import pyarrow.compute as pc
import pyarrow.dataset as pads
from aiokafka import TopicPartition
from aiokafka.errors import KafkaError
from google.protobuf.json_format import MessageToDict
from pydantic import BaseModel, Field

from services.shared.codecs import decode_protobuf
from services.shared.datasets import LABELS
from services.shared.errors import NotFound, PlatformError, Unavailable
from services.shared.feature_recompute import OfflineFeatureRecomputer, ServedRow
from services.shared.featurestore import definitions_sha256
from services.shared.kafka import create_consumer
from services.shared.model_aliases import ROUTE_NAMES
from services.shared.partitioning import partition_for
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.registry_client import RegistryClient
from services.shared.settings import (
    FeastSettings,
    KafkaSettings,
    RedisSettings,
    RegistryClientSettings,
    StorageSettings,
)
from services.shared.topics import Topics


class ServedAnswer(BaseModel):
    request_id: str
    route: str = Field(description="production | canary | shadow (logged, never returned)")
    model_name: str
    model_version: int
    fraud_probability: float
    decision: str = Field(description="decline (flagged) or approve")
    degraded: bool = Field(description="Answered with default features.")
    latency_ms: float
    predicted_at: str
    features: dict[str, float] = Field(description="The exact model inputs serving used.")
    partition: int
    offset: int


class LabelInfo(BaseModel):
    is_fraud: bool
    event_time: str
    ingested_at: str
    source: str


class LineageInfo(BaseModel):
    model_name: str
    version: int
    run_id: str
    experiment_id: str
    dataset_snapshot_id: str
    dataset_sha256: str
    feature_service: str
    feature_definitions_sha256: str
    code_commit: str
    training_request_id: str
    artifact_sha256: str
    feature_definitions_changed: bool = Field(
        description="The feature definitions deployed now differ from the version's."
    )


class InputComparison(BaseModel):
    name: str
    served: float | None
    offline: float
    difference: float | None
    skewed: bool


class Recomputation(BaseModel):
    as_of: str = Field(description="The point in time (just before the event time).")
    streaming_features: dict[str, Any] = Field(
        description="The offline streaming features as of then (null: entity unknown)."
    )
    inputs: list[InputComparison]
    skewed: list[str] = Field(description="Model inputs that differ from what serving used.")


class PredictionTrace(BaseModel):
    transaction_id: str
    transaction: dict[str, Any]
    answers: list[ServedAnswer]
    label: LabelInfo | None = None
    label_status: str
    lineage: LineageInfo | None = None
    lineage_status: str
    recomputation: Recomputation | None = None
    recomputation_status: str


def _iso(timestamp: Any) -> str:
    return timestamp.ToDatetime(tzinfo=UTC).isoformat() if timestamp.seconds else ""


def _event_time(text: str, fallback: datetime) -> datetime:
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return fallback
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class PredictionTracer:
    """Traces predictions; one per process (it holds nothing but settings)."""

    def __init__(
        self,
        kafka: KafkaSettings,
        storage: StorageSettings,
        feast: FeastSettings,
        redis: RedisSettings,
        registry: RegistryClientSettings,
        *,
        max_scan_records: int = 2_000_000,
        timeout_s: float = 60.0,
    ) -> None:
        self.kafka = kafka
        self.topics = Topics.from_settings(kafka)
        self.storage = storage
        self.feast = feast
        self.registry = registry
        self.recomputer = OfflineFeatureRecomputer(feast, redis, storage)
        self.max_scan_records = max_scan_records
        self.timeout_s = timeout_s

    async def trace(self, transaction_id: str) -> PredictionTrace:
        try:
            return await asyncio.wait_for(self._trace(transaction_id), self.timeout_s)
        except TimeoutError:
            raise Unavailable(
                f"tracing {transaction_id} took longer than {self.timeout_s:g} s"
            ) from None

    async def _trace(self, transaction_id: str) -> PredictionTrace:
        found = await self._scan(self.topics.predictions, transaction_id)
        if not found:
            raise NotFound(
                f"no prediction of transaction {transaction_id!r} in {self.topics.predictions} "
                f"(the last {self.max_scan_records:,} records of its partition)"
            )
        records = [(p, o, decode_protobuf(v, monitoring_pb2.PredictionRecord)) for p, o, v in found]
        answers = [_answer(p, o, r) for p, o, r in records]
        # the answer the caller got (not a shadow copy) is the one to explain
        main = next((r for _, _, r in records if r.route != monitoring_pb2.ROUTE_SHADOW), None)
        record = main or records[0][2]
        label, label_status = await self._label(transaction_id)
        lineage, lineage_status = await self._lineage(record.model_name, record.model_version)
        recomputation, recomputation_status = await self._recompute(record)
        return PredictionTrace(
            transaction_id=transaction_id,
            transaction=MessageToDict(record.transaction, preserving_proto_field_name=True),
            answers=answers,
            label=label,
            label_status=label_status,
            lineage=lineage,
            lineage_status=lineage_status,
            recomputation=recomputation,
            recomputation_status=recomputation_status,
        )

    # --------------------------------------------------------------- Kafka
    async def _scan(self, topic: str, key: str) -> list[tuple[int, int, bytes]]:
        """(partition, offset, value) of the records keyed ``key`` in its partition."""
        wanted = key.encode()
        consumer = create_consumer(
            self.kafka, group_id=None, client_id="trace", max_poll_records=5000
        )
        try:
            await consumer.start()
            partitions = sorted(consumer.partitions_for_topic(topic) or ())
            if not partitions:
                await consumer.topics()
                partitions = sorted(consumer.partitions_for_topic(topic) or ())
            if not partitions:
                return []
            tp = TopicPartition(topic, partition_for(wanted, partitions))
            consumer.assign([tp])
            begin = (await consumer.beginning_offsets([tp]))[tp]
            end = (await consumer.end_offsets([tp]))[tp]
            start = max(begin, end - self.max_scan_records)
            consumer.seek(tp, start)
            found = []
            position = start
            while position < end:
                batches = await consumer.getmany(tp, timeout_ms=1000)
                for record in batches.get(tp, []):
                    if record.offset >= end:
                        break
                    if record.key == wanted and record.value:
                        found.append((record.partition, record.offset, record.value))
                position = await consumer.position(tp)
            return found
        except KafkaError as exc:
            raise Unavailable(f"Kafka at {self.kafka.bootstrap}: {exc!r}") from None
        finally:
            with contextlib.suppress(KafkaError):
                await consumer.stop()

    # --------------------------------------------------------------- label
    async def _label(self, transaction_id: str) -> tuple[LabelInfo | None, str]:
        try:
            found = await self._scan(self.topics.validated_labels, transaction_id)
        except Unavailable as exc:
            found, note = [], f" ({exc})"
        else:
            note = ""
        if found:
            label = decode_protobuf(found[-1][2], events_pb2.ValidatedLabel)  # a correction wins
            return (
                LabelInfo(
                    is_fraud=label.is_fraud,
                    event_time=_iso(label.event_time),
                    ingested_at=_iso(label.ingested_at),
                    source=f"{self.topics.validated_labels} offset {found[-1][1]}",
                ),
                "arrived",
            )
        archived = await asyncio.to_thread(self._archived_label, transaction_id)
        if archived is not None:
            return archived, "arrived"
        return None, f"no label has arrived yet{note}"

    def _archived_label(self, transaction_id: str) -> LabelInfo | None:
        directory = self.storage.offline_dir / LABELS
        if not directory.exists():
            return None
        dataset = pads.dataset(directory, format="parquet", partitioning="hive")
        table = dataset.to_table(
            columns=["is_fraud", "event_time", "ingested_at"],
            filter=pc.field("transaction_id") == transaction_id,
        )
        if table.num_rows == 0:
            return None
        rows = sorted(table.to_pylist(), key=lambda r: r["ingested_at"])
        last = rows[-1]
        return LabelInfo(
            is_fraud=bool(last["is_fraud"]),
            event_time=last["event_time"].isoformat(),
            ingested_at=last["ingested_at"].isoformat(),
            source="offline archive (labels)",
        )

    # --------------------------------------------------------------- lineage
    async def _lineage(self, model_name: str, version: int) -> tuple[LineageInfo | None, str]:
        settings = self.registry.model_copy(update={"model_name": model_name})

        def read() -> Any:
            with RegistryClient(settings, actor="trace", timeout_s=10.0) as client:
                return client.lineage(version)

        try:
            lineage = await asyncio.to_thread(read)
        except PlatformError as exc:
            return None, f"the registry could not say: {exc}"
        current = await asyncio.to_thread(definitions_sha256, self.feast)
        return (
            LineageInfo(
                model_name=lineage.model_name,
                version=lineage.version,
                run_id=lineage.run_id,
                experiment_id=lineage.experiment_id,
                dataset_snapshot_id=lineage.dataset_snapshot_id,
                dataset_sha256=lineage.dataset_sha256,
                feature_service=lineage.feature_service,
                feature_definitions_sha256=lineage.feature_definitions_sha256,
                code_commit=lineage.code_commit,
                training_request_id=lineage.training_request_id,
                artifact_sha256=lineage.artifact_sha256,
                feature_definitions_changed=bool(lineage.feature_definitions_sha256)
                and lineage.feature_definitions_sha256 != current,
            ),
            "found",
        )

    # --------------------------------------------------------------- skew
    async def _recompute(
        self, record: monitoring_pb2.PredictionRecord
    ) -> tuple[Recomputation | None, str]:
        row = served_row(record)
        try:
            [result] = await asyncio.to_thread(self.recomputer.recompute, [row])
        except PlatformError as exc:
            return None, f"could not recompute: {exc}"
        except (OSError, ValueError, KeyError) as exc:  # no feature log yet, unreadable files
            return None, f"could not recompute from the offline feature log: {exc!r}"
        status = (
            f"{len(result.skewed)} of {len(result.inputs)} model inputs differ: "
            + ", ".join(result.skewed)
            if result.skewed
            else f"no skew: all {len(result.inputs)} model inputs equal"
        )
        return (
            Recomputation(
                as_of=result.as_of.isoformat(),
                streaming_features=result.streaming,
                inputs=[InputComparison(**vars(c)) for c in result.inputs],
                skewed=result.skewed,
            ),
            status,
        )


def served_row(record: monitoring_pb2.PredictionRecord) -> ServedRow:
    """What the recomputation needs of a logged prediction."""
    t = record.transaction
    predicted = (
        record.predicted_at.ToDatetime(tzinfo=UTC)
        if record.HasField("predicted_at")
        else datetime.now(UTC)
    )
    return ServedRow(
        transaction_id=t.transaction_id,
        user_id=t.user_id,
        merchant_id=t.merchant_id,
        amount=t.amount,
        channel=t.channel,
        country=t.country,
        event_time=_event_time(t.event_time, predicted),
        served=dict(record.features),
    )


def _answer(partition: int, offset: int, record: monitoring_pb2.PredictionRecord) -> ServedAnswer:
    return ServedAnswer(
        request_id=record.request_id,
        route=ROUTE_NAMES.get(record.route, "unspecified"),
        model_name=record.model_name,
        model_version=record.model_version,
        fraud_probability=record.fraud_probability,
        decision="decline" if record.flagged else "approve",
        degraded=record.degraded,
        latency_ms=record.latency_ms,
        predicted_at=_iso(record.predicted_at),
        features=dict(record.features),
        partition=partition,
        offset=offset,
    )
