"""Helpers for the features service's integration tests.

- ``Txn`` / ``Label`` and ``publish``: validated events written straight to the validated
  topics (as the ingestion service would: protobuf, keyed by user_id / transaction_id).
- ``FeaturesWorker``: the real worker, ``python -m services.features``, as a subprocess.
- ``Reference``: the streaming features computed independently, in plain Python, from the
  same events in the same processing order: the final state per entity and every row the
  service logged, for point-in-time expectations.
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families
from service_env import settings_environment

from services.cli import localinfra
from services.shared.kafka import create_producer, ensure_topics
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.settings import FeastSettings, KafkaSettings, RedisSettings, StorageSettings
from services.shared.topics import Topics
from services.shared.usecase.features import MERCHANT_FEATURES, USER_FEATURES

US = 1_000_000
HOUR_US = 3600 * US
DAY_US = 24 * HOUR_US
WEEK_US = 7 * DAY_US
T0 = 1_767_225_600_000_000  # 2026-01-01T00:00:00Z


@dataclass(frozen=True)
class Txn:
    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    country: str
    event_time_us: int

    def message(self) -> events_pb2.ValidatedTransaction:
        message = events_pb2.ValidatedTransaction(
            transaction_id=self.transaction_id,
            user_id=self.user_id,
            merchant_id=self.merchant_id,
            amount=self.amount,
            currency="EUR",
            channel="web",
            country=self.country,
        )
        message.event_time.FromMicroseconds(self.event_time_us)
        message.ingested_at.GetCurrentTime()
        return message


@dataclass(frozen=True)
class Label:
    transaction_id: str
    is_fraud: bool
    event_time_us: int

    def message(self) -> events_pb2.ValidatedLabel:
        message = events_pb2.ValidatedLabel(
            transaction_id=self.transaction_id, is_fraud=self.is_fraud
        )
        message.event_time.FromMicroseconds(self.event_time_us)
        message.ingested_at.GetCurrentTime()
        return message


Event = Txn | Label


async def create_input_topics(kafka: KafkaSettings) -> None:
    """What the ingestion service does at start-up: the validated topics, all partitions."""
    topics = Topics.from_settings(kafka)
    await ensure_topics(kafka, [topics.validated, topics.validated_labels])


async def send_events(
    producer: AIOKafkaProducer, topics: Topics, events: Iterable[Event | tuple[bytes, bytes]]
) -> None:
    """Send in order (``(key, value)`` tuples go raw to events.validated)."""
    for event in events:
        if isinstance(event, Txn):
            value = event.message().SerializeToString()
            await producer.send(topics.validated, value, key=event.user_id.encode())
        elif isinstance(event, Label):
            value = event.message().SerializeToString()
            await producer.send(topics.validated_labels, value, key=event.transaction_id.encode())
        else:
            await producer.send(topics.validated, event[1], key=event[0])


async def publish(
    kafka: KafkaSettings,
    events: Sequence[Event | tuple[bytes, bytes]],
    *,
    chunk: int | None = None,
    pause_s: float = 0.0,
) -> None:
    """Publish in order, all at once or ``chunk`` events every ``pause_s`` seconds."""
    topics = Topics.from_settings(kafka)
    producer = create_producer(kafka, client_id="features-test")
    await producer.start()
    try:
        step = chunk or len(events) or 1
        for start in range(0, len(events), step):
            await send_events(producer, topics, events[start : start + step])
            await producer.flush()
            if pause_s:
                await asyncio.sleep(pause_s)
    finally:
        await producer.stop()


# ------------------------------------------------------------------------------------ worker


def worker_env(
    kafka: KafkaSettings,
    redis: RedisSettings,
    storage: StorageSettings,
    feast: FeastSettings,
    metrics_port: int,
    **features: str,
) -> dict[str, str]:
    env = {
        **settings_environment(kafka, redis, storage, feast),
        "MLOPS_FEATURES_METRICS_PORT": str(metrics_port),
    }
    env.update({f"MLOPS_FEATURES_{k.upper()}": v for k, v in features.items()})
    return env


class FeaturesWorker:
    """``python -m services.features`` as a child process, ready once it reports ready."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.metrics_port = int(env["MLOPS_FEATURES_METRICS_PORT"])
        spec = localinfra.ProcessSpec(
            name="features",
            command=[sys.executable, "-m", "services.features"],
            env=env,
            ready=lambda: self.metric("mlops_service_ready", service="features") == 1.0,
            startup_timeout_s=90,
        )
        self.process = localinfra.RunningProcess(spec, log_path)

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                return str(response.read().decode())
        except OSError:
            return ""

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples of ``name`` whose labels include ``labels`` (0 if none)."""
        total = 0.0
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total

    def kill(self) -> None:
        self.process.kill()
        self.process.stop()  # closes its log file

    def stop(self) -> int:
        """SIGTERM (graceful: the offline log is flushed); returns the exit code."""
        self.process.stop(timeout=30)
        return int(self.process.process.returncode)


def wait_for(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(0.2)


# --------------------------------------------------------------------------------- reference


def user_features(txns: Sequence[Txn]) -> dict[str, Any]:
    clock = max(t.event_time_us for t in txns)

    def within(width: int) -> list[Txn]:
        return [t for t in txns if clock - width < t.event_time_us <= clock]

    day, week = within(DAY_US), within(WEEK_US)
    counts = Counter(t.country for t in week)
    last = {c: max(t.event_time_us for t in week if t.country == c) for c in counts}
    return {
        "user_txn_count_1h": len(within(HOUR_US)),
        "user_txn_count_24h": len(day),
        "user_amount_sum_24h": math.fsum(t.amount for t in day),
        "user_amount_mean_7d": math.fsum(t.amount for t in week) / len(week),
        "user_distinct_merchants_24h": len({t.merchant_id for t in day}),
        "user_last_txn_epoch": clock / US,
        "user_home_country": max(counts, key=lambda c: (counts[c], last[c], c)),
    }


def merchant_features(
    txn_times: Iterable[int], labels: Iterable[tuple[int, bool]]
) -> dict[str, Any]:
    txn_times, labels = list(txn_times), list(labels)
    clock = max([*txn_times, *(t for t, _ in labels)])
    week = [fraud for t, fraud in labels if clock - WEEK_US < t <= clock]
    return {
        "merchant_txn_count_24h": sum(1 for t in txn_times if clock - DAY_US < t <= clock),
        "merchant_fraud_rate_7d": sum(week) / len(week) if week else 0.0,
        "merchant_labels_7d": len(week),
    }


Snapshot = tuple[int, dict[str, Any]]  # (the entity's clock, its features) after an event


@dataclass
class Reference:
    """The features service's semantics, brute force, fed in processing order."""

    lateness_us: int = HOUR_US
    user_txns: dict[str, dict[str, Txn]] = field(default_factory=dict)
    user_rows: dict[str, list[Snapshot]] = field(default_factory=dict)
    merchant_txns: dict[str, dict[str, int]] = field(default_factory=dict)
    merchant_labels: dict[str, dict[str, tuple[int, bool]]] = field(default_factory=dict)
    merchant_rows: dict[str, list[Snapshot]] = field(default_factory=dict)
    refs: dict[str, tuple[str, int]] = field(default_factory=dict)
    labels: dict[str, Label] = field(default_factory=dict)
    late_user_events: int = 0

    def feed(self, events: Iterable[Event]) -> None:
        for event in events:
            if isinstance(event, Txn):
                self.transaction(event)
            else:
                self.label(event)

    def transaction(self, txn: Txn) -> None:
        mine = self.user_txns.setdefault(txn.user_id, {})
        if txn.transaction_id in mine:  # a duplicate re-emits the current row
            self.user_rows[txn.user_id].append(self._user_snapshot(txn.user_id))
        elif mine and txn.event_time_us < max(t.event_time_us for t in mine.values()) - (
            self.lateness_us
        ):
            self.late_user_events += 1
        else:
            mine[txn.transaction_id] = txn
            self.user_rows.setdefault(txn.user_id, []).append(self._user_snapshot(txn.user_id))
        # the merchant and the label join see every transaction, whatever the user made of it
        self.refs[txn.transaction_id] = (txn.merchant_id, txn.event_time_us)
        self._merchant_txn(txn.merchant_id, txn.transaction_id, txn.event_time_us)
        label = self.labels.get(txn.transaction_id)
        if label is not None:
            self._merchant_label(txn.merchant_id, txn.transaction_id, txn.event_time_us, label)

    def label(self, label: Label) -> None:
        self.labels[label.transaction_id] = label
        ref = self.refs.get(label.transaction_id)
        if ref is not None:
            self._merchant_label(ref[0], label.transaction_id, ref[1], label)

    def _user_snapshot(self, user_id: str) -> Snapshot:
        txns = list(self.user_txns[user_id].values())
        return max(t.event_time_us for t in txns), user_features(txns)

    def _merchant_clock(self, merchant_id: str) -> int | None:
        times = [
            *self.merchant_txns.get(merchant_id, {}).values(),
            *(t for t, _ in self.merchant_labels.get(merchant_id, {}).values()),
        ]
        return max(times) if times else None

    def _merchant_snapshot(self, merchant_id: str) -> None:
        txns = self.merchant_txns.get(merchant_id, {}).values()
        labels = self.merchant_labels.get(merchant_id, {}).values()
        clock = self._merchant_clock(merchant_id)
        assert clock is not None
        self.merchant_rows.setdefault(merchant_id, []).append(
            (clock, merchant_features(txns, labels))
        )

    def _merchant_txn(self, merchant_id: str, txn_id: str, t: int) -> None:
        txns = self.merchant_txns.setdefault(merchant_id, {})
        clock = self._merchant_clock(merchant_id)
        if txn_id not in txns:
            if clock is not None and t < clock - self.lateness_us:
                return
            txns[txn_id] = t
        self._merchant_snapshot(merchant_id)

    def _merchant_label(self, merchant_id: str, txn_id: str, t: int, label: Label) -> None:
        labels = self.merchant_labels.setdefault(merchant_id, {})
        if labels.get(txn_id) != (t, label.is_fraud):
            clock = self._merchant_clock(merchant_id)
            if clock is not None and t <= clock - WEEK_US:
                return
            labels[txn_id] = (t, label.is_fraud)
        self._merchant_snapshot(merchant_id)

    # what the stores should hold

    def online_users(self) -> dict[str, dict[str, Any]]:
        return {u: rows[-1][1] for u, rows in self.user_rows.items()}

    def online_merchants(self) -> dict[str, dict[str, Any]]:
        return {m: rows[-1][1] for m, rows in self.merchant_rows.items()}

    @staticmethod
    def as_of(rows: Sequence[Snapshot], when_us: int) -> dict[str, Any] | None:
        """What a point-in-time join at ``when_us`` reads: the last row with clock <= when."""
        found = None
        for clock, features in rows:
            if clock <= when_us:
                found = features
        return found

    def training_row(self, txn: Txn) -> dict[str, Any]:
        """The features a labelled transaction's training row must carry (at t - 1 µs)."""
        when = txn.event_time_us - 1
        user = self.as_of(self.user_rows.get(txn.user_id, []), when)
        merchant = self.as_of(self.merchant_rows.get(txn.merchant_id, []), when)
        return {
            **(user or dict.fromkeys(USER_FEATURES)),
            **(merchant or dict.fromkeys(MERCHANT_FEATURES)),
        }


def online_features(
    store: Any, feature_service: str, users: Sequence[str], merchants: Sequence[str]
) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    """Read every given user's and merchant's online row through Feast."""
    service = store.get_feature_service(feature_service)
    rows = [{"user_id": u, "merchant_id": ""} for u in users] + [
        {"user_id": "", "merchant_id": m} for m in merchants
    ]
    data = store.get_online_features(features=service, entity_rows=rows).to_dict()
    by_user = {u: {name: data[name][i] for name in USER_FEATURES} for i, u in enumerate(users)}
    offset = len(users)
    by_merchant = {
        m: {name: data[name][offset + i] for name in MERCHANT_FEATURES}
        for i, m in enumerate(merchants)
    }
    return by_user, by_merchant


def wait_until_online_matches(
    store: Any, feast: FeastSettings, reference: Reference, what: str, timeout_s: float = 60
) -> None:
    """Poll Feast's online store until every entity's row equals the reference's latest."""
    users, merchants = reference.online_users(), reference.online_merchants()
    got: tuple[dict[str, Any], dict[str, Any]] = ({}, {})

    def matches() -> bool:
        nonlocal got
        got = online_features(store, feast.feature_service, list(users), list(merchants))
        return got == (users, merchants)

    deadline = time.monotonic() + timeout_s
    while not matches() and time.monotonic() < deadline:
        time.sleep(0.2)
    differences = [
        (entity, got_side.get(entity), want)
        for got_side, want_side in zip(got, (users, merchants), strict=True)
        for entity, want in want_side.items()
        if got_side.get(entity) != want
    ]
    assert not differences, (
        f"online features differ from the reference ({what}): {len(differences)} entities, "
        f"first (entity, online, reference): {differences[:3]}"
    )


# ------------------------------------------------------------------------------------ streams


def phased_stream(seed: int, users: int = 6, merchants: int = 4) -> list[list[Event]]:
    """Phases of validated events covering every case the features service distinguishes.

    Each phase is published, then processed, before the next: transactions of a day (random
    plus hand-placed cases), then labels for them. Within a phase, merchant facts arrive in a
    fixed order when the topics have one partition, so every row is predictable.
    Cases: windows rolling over 1 h / 24 h / 7 days, out-of-order events within the lateness,
    an event older than the lateness (to a merchant of its own), an upstream duplicate, a
    label before its transaction, a corrected label, a label outside the 7-day window.
    """
    import random

    rng = random.Random(seed)
    countries = ["DE", "FR", "NL"]
    phases: list[list[Event]] = []
    txns: list[Txn] = []
    counter = 0

    def txn(day: int, offset_us: int, user: int, merchant: str) -> Txn:
        nonlocal counter
        counter += 1
        made = Txn(
            f"tx{counter:04d}",
            f"u{user}",
            merchant,
            round(rng.uniform(1, 300), 2),
            rng.choice(countries),
            T0 + day * DAY_US + offset_us,
        )
        txns.append(made)
        return made

    early_label: Label | None = None
    for day in (0, 1, 2, 9):
        day_txns: list[Event] = []
        clock = 0
        for _ in range(30):
            clock += rng.randint(60, 40 * 60) * US
            day_txns.append(txn(day, clock, rng.randint(1, users), f"m{rng.randint(1, merchants)}"))
        # out of order within the lateness (30 min behind the user's latest)
        day_txns.append(txn(day, clock - 30 * 60 * US, 1, "m1"))
        # two hours behind: late for u1, but alone at its merchant (accepted there)
        day_txns.append(txn(day, clock - 2 * HOUR_US, 1, f"m-late-{day}"))
        # an upstream duplicate of an earlier transaction of the phase
        day_txns.append(day_txns[5])
        if early_label is not None:  # its transaction: the last one of its merchant
            day_txns.append(
                Txn(early_label.transaction_id, "u2", "m-early", 42.0, "DE", T0 + day * DAY_US)
            )
        phases.append(day_txns)

        labelled = [t for t in day_txns if isinstance(t, Txn)][: 20 if day < 9 else 5]
        day_labels: list[Event] = [
            Label(t.transaction_id, rng.random() < 0.3, t.event_time_us + HOUR_US) for t in labelled
        ]
        if day == 1:  # correct an earlier label
            first = phases[1][0]
            assert isinstance(first, Label)
            day_labels.append(Label(first.transaction_id, not first.is_fraud, T0 + 2 * DAY_US))
        if day == 9:  # an unlabelled transaction of day 0: outside its merchant's 7 days now
            day_labels.append(Label(txns[25].transaction_id, True, T0 + 9 * DAY_US))
        early_label = Label(f"early-{day}", True, T0 + day * DAY_US + 5 * HOUR_US)
        day_labels.append(early_label)  # its transaction comes in the next phase
        phases.append(day_labels)
    return phases
