"""Small, generated card-payment histories in the offline store's exact formats (tests only).

``write_fraud_history(offline_dir)`` writes what ingestion and the features service would have
archived for a few days of traffic:

- ``transactions/event_date=*/part-*.parquet`` and ``labels/event_date=*/part-*.parquet``
  (with a few at-least-once duplicates, as the archive may hold),
- ``features/user_activity/...`` and ``features/merchant_activity/...``: one feature-log row per
  transaction, computed from the events up to and including that transaction, stamped with its
  event time (what the streaming features service logs).

Fraud depends on things the features and the request-time transform can see (amount against
the user's mean, a foreign country, web channel, night hours, bursts, risky merchants), so a
model can learn it; ``shuffle_labels_before`` makes deliberately worse training data.
"""

from __future__ import annotations

import math
import random
from collections import Counter, deque
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

COUNTRIES = ("DE", "FR", "NL", "ES", "IT", "GB", "US", "PL")
TS = pa.timestamp("us", tz="UTC")

TRANSACTION_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("user_id", pa.string()),
        ("merchant_id", pa.string()),
        ("amount", pa.float64()),
        ("currency", pa.string()),
        ("channel", pa.string()),
        ("country", pa.string()),
        ("event_time", TS),
        ("ingested_at", TS),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
    ]
)
LABEL_SCHEMA = pa.schema(
    [
        ("transaction_id", pa.string()),
        ("is_fraud", pa.bool_()),
        ("event_time", TS),
        ("ingested_at", TS),
        ("source_topic", pa.string()),
        ("source_partition", pa.int32()),
        ("source_offset", pa.int64()),
    ]
)
USER_SCHEMA = pa.schema(
    [
        ("user_id", pa.string()),
        ("user_txn_count_1h", pa.int64()),
        ("user_txn_count_24h", pa.int64()),
        ("user_amount_sum_24h", pa.float64()),
        ("user_amount_mean_7d", pa.float64()),
        ("user_distinct_merchants_24h", pa.int64()),
        ("user_last_txn_epoch", pa.float64()),
        ("user_home_country", pa.string()),
        ("event_timestamp", TS),
        ("created_timestamp", TS),
    ]
)
MERCHANT_SCHEMA = pa.schema(
    [
        ("merchant_id", pa.string()),
        ("merchant_txn_count_24h", pa.int64()),
        ("merchant_fraud_rate_7d", pa.float64()),
        ("merchant_labels_7d", pa.int64()),
        ("event_timestamp", TS),
        ("created_timestamp", TS),
    ]
)


@dataclass(frozen=True)
class FraudHistory:
    transactions: int
    frauds: int
    start: datetime
    end: datetime


@dataclass
class _Txn:
    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    channel: str
    country: str
    event_time: datetime
    is_fraud: bool


def _generate(
    rng: random.Random, start: datetime, days: int, n_users: int, n_merchants: int, per_day: float
) -> list[_Txn]:
    merchants = [f"m{i:03d}" for i in range(n_merchants)]
    risky = set(rng.sample(merchants, max(1, n_merchants // 8)))
    txns: list[_Txn] = []
    seconds = days * 86400
    for u in range(n_users):
        user = f"u{u:04d}"
        home = rng.choice(COUNTRIES)
        mean_amount = math.exp(rng.gauss(3.5, 0.6))
        favourites = rng.sample(merchants, 4)
        count = max(2, int(rng.gauss(per_day * days, per_day)))
        for _ in range(count):
            when = start + timedelta(seconds=rng.uniform(0, seconds))
            merchant = rng.choice(favourites) if rng.random() < 0.8 else rng.choice(merchants)
            score = -4.2 + (1.6 if merchant in risky else 0.0)
            fraud = rng.random() < 1 / (1 + math.exp(-score))
            if fraud:
                amount = mean_amount * rng.uniform(1.2, 8.0)
                country = rng.choice(COUNTRIES) if rng.random() < 0.5 else home
                channel = "web" if rng.random() < 0.5 else rng.choice(("pos", "app"))
                if rng.random() < 0.4:  # card testing happens at night
                    when = when.replace(hour=rng.randint(0, 4))
                burst = rng.randint(0, 2)
            else:
                amount = mean_amount * math.exp(rng.gauss(0, 0.4))
                country = home if rng.random() < 0.97 else rng.choice(COUNTRIES)
                channel = rng.choice(("pos", "pos", "app", "web"))
                burst = 0
            for b in range(burst + 1):
                moment = when + timedelta(seconds=b * rng.uniform(20, 300))
                txns.append(
                    _Txn(
                        transaction_id=f"tx-{len(txns):06d}",
                        user_id=user,
                        merchant_id=merchant,
                        amount=round(amount * (1 + 0.1 * b), 2),
                        channel=channel,
                        country=country,
                        event_time=moment,
                        is_fraud=fraud,
                    )
                )
    txns.sort(key=lambda t: (t.event_time, t.transaction_id))
    return [t for t in txns if t.event_time < start + timedelta(days=days)]


def _user_rows(txns: list[_Txn], created: datetime) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    history: dict[str, deque[_Txn]] = {}
    for t in txns:  # sorted by event time
        window = history.setdefault(t.user_id, deque())
        window.append(t)
        while window[0].event_time < t.event_time - timedelta(days=7):
            window.popleft()
        day = [x for x in window if x.event_time > t.event_time - timedelta(hours=24)]
        hour = [x for x in day if x.event_time > t.event_time - timedelta(hours=1)]
        rows.append(
            {
                "user_id": t.user_id,
                "user_txn_count_1h": len(hour),
                "user_txn_count_24h": len(day),
                "user_amount_sum_24h": sum(x.amount for x in day),
                "user_amount_mean_7d": sum(x.amount for x in window) / len(window),
                "user_distinct_merchants_24h": len({x.merchant_id for x in day}),
                "user_last_txn_epoch": t.event_time.timestamp(),
                "user_home_country": Counter(x.country for x in window).most_common(1)[0][0],
                "event_timestamp": t.event_time,
                "created_timestamp": created,
            }
        )
    return rows


def _merchant_rows(
    txns: list[_Txn], labels: list[tuple[_Txn, datetime]], created: datetime
) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    seen: dict[str, deque[datetime]] = {}
    labelled: dict[str, list[tuple[datetime, bool]]] = {}
    for txn, at in labels:
        labelled.setdefault(txn.merchant_id, []).append((at, txn.is_fraud))
    for t in txns:
        window = seen.setdefault(t.merchant_id, deque())
        window.append(t.event_time)
        while window[0] <= t.event_time - timedelta(hours=24):
            window.popleft()
        known = [
            fraud
            for at, fraud in labelled.get(t.merchant_id, [])
            if t.event_time - timedelta(days=7) < at <= t.event_time
        ]
        rows.append(
            {
                "merchant_id": t.merchant_id,
                "merchant_txn_count_24h": len(window),
                "merchant_fraud_rate_7d": (sum(known) / len(known)) if known else 0.0,
                "merchant_labels_7d": len(known),
                "event_timestamp": t.event_time,
                "created_timestamp": created,
            }
        )
    return rows


def _write_partitioned(
    directory: Path, rows: list[dict[str, object]], schema: pa.Schema, time_column: str
) -> None:
    by_date: dict[str, list[dict[str, object]]] = {}
    for row in rows:
        moment = row[time_column]
        assert isinstance(moment, datetime)
        by_date.setdefault(f"{moment:%Y-%m-%d}", []).append(row)
    for date, part in sorted(by_date.items()):
        target = directory / f"event_date={date}"
        target.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(part, schema=schema)
        pq.write_table(table, target / f"part-{len(list(target.iterdir())):05d}.parquet")


def write_fraud_history(
    offline_dir: Path,
    *,
    start: datetime = datetime(2026, 3, 2, tzinfo=UTC),
    days: int = 8,
    n_users: int = 200,
    n_merchants: int = 40,
    txns_per_user_per_day: float = 2.0,
    seed: int = 7,
    shuffle_labels_before: datetime | None = None,
    duplicates: int = 5,
) -> FraudHistory:
    """Write a generated history under ``offline_dir``; returns what was written.

    ``shuffle_labels_before`` permutes the fraud labels of the transactions before that moment:
    the same fraud rate with no relation to the features. A model trained on that period is
    deliberately worse, while the latest period (its held-out test set) keeps true labels.
    """
    rng = random.Random(seed)
    txns = _generate(rng, start, days, n_users, n_merchants, txns_per_user_per_day)
    if shuffle_labels_before is not None:
        early = [t for t in txns if t.event_time < shuffle_labels_before]
        outcomes = [t.is_fraud for t in early]
        random.Random(seed + 1).shuffle(outcomes)
        for txn, outcome in zip(early, outcomes, strict=True):
            txn.is_fraud = outcome
    created = start + timedelta(days=days, hours=1)
    label_times = [(t, t.event_time + timedelta(hours=rng.uniform(1, 30))) for t in txns]

    tx_rows = [
        {
            "transaction_id": t.transaction_id,
            "user_id": t.user_id,
            "merchant_id": t.merchant_id,
            "amount": t.amount,
            "currency": "EUR",
            "channel": t.channel,
            "country": t.country,
            "event_time": t.event_time,
            "ingested_at": t.event_time + timedelta(seconds=1),
            "source_topic": "events.transactions",
            "source_partition": i % 4,
            "source_offset": i,
        }
        for i, t in enumerate(txns)
    ]
    label_rows = [
        {
            "transaction_id": t.transaction_id,
            "is_fraud": t.is_fraud,
            "event_time": at,
            "ingested_at": at + timedelta(seconds=1),
            "source_topic": "events.labels",
            "source_partition": i % 4,
            "source_offset": i,
        }
        for i, (t, at) in enumerate(label_times)
    ]
    # at-least-once delivery: the archive may hold a record twice
    tx_rows += [dict(r, source_offset=-1) for r in rng.sample(tx_rows, duplicates)]
    label_rows += [dict(r, source_offset=-1) for r in rng.sample(label_rows, duplicates)]

    _write_partitioned(offline_dir / "transactions", tx_rows, TRANSACTION_SCHEMA, "event_time")
    _write_partitioned(offline_dir / "labels", label_rows, LABEL_SCHEMA, "event_time")
    _write_partitioned(
        offline_dir / "features" / "user_activity",
        _user_rows(txns, created),
        USER_SCHEMA,
        "event_timestamp",
    )
    _write_partitioned(
        offline_dir / "features" / "merchant_activity",
        _merchant_rows(txns, label_times, created),
        MERCHANT_SCHEMA,
        "event_timestamp",
    )
    return FraudHistory(
        transactions=len(txns),
        frauds=sum(t.is_fraud for t in txns),
        start=start,
        end=start + timedelta(days=days),
    )
