"""Record the streams ``bench_drift.py`` replays, from a running stack (run once; the
recordings are committed under loadtests/data/).

The world: the bootstrap's history and the live traffic are one process (same users,
merchants, seed and transactions per user and day), 2.4 h of history, live at 5 per second:

    eval "$(mlops stack env)"
    W="--users 400 --transactions-per-user-per-day 1080 --fraud-rate 0.05 --seed 42"
    mlops bootstrap --days 0.1 $W
    mlops simulate $W --duration 1200 --label-delay 20 --concept-drift-at 600 &
    python loadtests/record_drift_streams.py concept --since <simulate start, epoch s> \
        --change-at <epoch s of the drift> --wait 1260

Reads predictions.log (production route) and events.validated.labels from the beginning,
keeps the predictions made since ``--since``, joins each with its label and writes
``loadtests/data/drift_<name>.npz``: ``features`` (rows x MODEL_INPUTS), ``score``,
``flagged``, ``label`` (-1: none came), ``predicted_at``, ``model_version``, ``change_at``; and
the production version's drift reference (``drift_<name>_reference.parquet``) from MLflow.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import numpy as np
from aiokafka import AIOKafkaConsumer

from services.monitoring.references import MlflowReferences
from services.shared.broker_compat import activate as activate_broker_workarounds
from services.shared.proto.mlops.v1 import events_pb2, monitoring_pb2
from services.shared.settings import KafkaSettings, MlflowSettings, RegistryClientSettings
from services.shared.topics import Topics
from services.shared.usecase.features import MODEL_INPUTS

DATA = Path(__file__).resolve().parent / "data"


async def read_all(
    kafka: KafkaSettings, topics: list[str], idle_s: float
) -> list[tuple[str, bytes]]:
    activate_broker_workarounds(kafka)
    consumer = AIOKafkaConsumer(
        *topics, bootstrap_servers=kafka.bootstrap, group_id=None, auto_offset_reset="earliest",
        enable_auto_commit=False,
    )  # fmt: skip
    await consumer.start()
    out: list[tuple[str, bytes]] = []
    last = time.monotonic()
    try:
        while time.monotonic() - last < idle_s:
            batches = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for tp, records in batches.items():
                out += [(tp.topic, r.value) for r in records if r.value]
                last = time.monotonic()
    finally:
        await consumer.stop()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="recording name: concept | data")
    parser.add_argument(
        "--since", type=float, required=True, help="epoch s: keep predictions from then"
    )
    parser.add_argument("--until", type=float, default=float("inf"),
                        help="epoch s: keep predictions until then")  # fmt: skip
    parser.add_argument("--change-at", type=float, required=True, help="epoch s the world changed")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait before reading")
    args = parser.parse_args()
    if args.wait:
        print(f"waiting {args.wait:.0f} s for the run to finish", flush=True)
        time.sleep(args.wait)
    kafka = KafkaSettings()
    topics = Topics.from_settings(kafka)
    records = asyncio.run(read_all(kafka, [topics.predictions, topics.validated_labels], 5.0))
    labels: dict[str, bool] = {}
    predictions: list[monitoring_pb2.PredictionRecord] = []
    for topic, value in records:
        if topic == topics.validated_labels:
            label = events_pb2.ValidatedLabel.FromString(value)
            labels[label.transaction_id] = label.is_fraud
        else:
            p = monitoring_pb2.PredictionRecord.FromString(value)
            at = p.predicted_at.seconds + p.predicted_at.nanos / 1e9
            if (
                p.route == monitoring_pb2.ROUTE_PRODUCTION
                and args.since <= at < args.until
                and not p.degraded
            ):
                predictions.append(p)
    predictions.sort(key=lambda p: (p.predicted_at.seconds, p.predicted_at.nanos))
    features = np.array([[p.features.get(n, np.nan) for n in MODEL_INPUTS] for p in predictions])
    label = np.array([int(labels[p.transaction.transaction_id]) if p.transaction.transaction_id
                      in labels else -1 for p in predictions], dtype=np.int8)  # fmt: skip
    DATA.mkdir(exist_ok=True)
    versions = sorted({p.model_version for p in predictions})
    np.savez_compressed(
        DATA / f"drift_{args.name}.npz",
        features=features.astype(np.float32),
        score=np.array([p.fraud_probability for p in predictions], dtype=np.float32),
        flagged=np.array([p.flagged for p in predictions]),
        label=label,
        predicted_at=np.array(
            [p.predicted_at.seconds + p.predicted_at.nanos / 1e9 for p in predictions]
        ),
        model_version=np.array([p.model_version for p in predictions]),
        change_at=np.array(args.change_at),
        input_names=np.array(MODEL_INPUTS),
    )
    reference = MlflowReferences(MlflowSettings()).load(
        RegistryClientSettings().model_name, versions[-1]
    )
    if reference is not None:
        (DATA / "drift_reference.parquet").write_bytes(reference.to_parquet())
    print(
        f"{len(predictions)} predictions ({(label >= 0).sum()} labelled, "
        f"{(label == 1).sum()} frauds), versions {versions}, reference {reference is not None}"
    )


if __name__ == "__main__":
    main()
