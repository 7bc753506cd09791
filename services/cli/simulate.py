"""`mlops simulate`: publish realistic card-payment traffic, as product services would.

The traffic itself comes from ``services.cli.simulator`` (``TrafficSimulator``);
this module is the transport: ``publish`` sends ``SimEvent``s to ``events.transactions`` and
``events.labels`` as JSON (UTF-8) through a plain aiokafka producer, keyed by user_id
(transactions) and transaction_id (labels), with ``acks=all``.

    stats = await publish(sim.history(start, end), kafka, rate=None, progress=None)

Topic names follow ``KafkaSettings.topic_prefix``; the broker is ``MLOPS_KAFKA_BOOTSTRAP``.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import grpc
import numpy as np
import typer
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from services.cli.simulator import SimEvent, SimulationConfig, TrafficSimulator
from services.shared.codecs import encode_json
from services.shared.errors import Unavailable
from services.shared.kafka import ensure_topics, security_options
from services.shared.proto.mlops.v1 import events_pb2, predictor_pb2, predictor_pb2_grpc
from services.shared.settings import KafkaSettings, ServingClientSettings
from services.shared.topics import Topics

ProgressCallback = Callable[["PublishStats"], None]
_IN_FLIGHT = 20_000  # acknowledgements awaited in one go; bounds memory, keeps batches full


@dataclass
class PublishStats:
    """What ``publish`` sent (every record acknowledged by the broker)."""

    transactions: int = 0  # records sent to events.transactions (incl. invalid/duplicates)
    labels: int = 0
    fraud: int = 0  # valid fraud transactions
    invalid: int = 0  # deliberately invalid transaction records
    duplicates: int = 0  # second copies of transactions
    invalid_reasons: dict[str, int] = field(default_factory=dict)  # expected DLQ reason codes
    predictions: int = 0  # Predict calls answered
    predict_errors: dict[str, int] = field(default_factory=dict)  # gRPC status name -> calls
    predict_latencies_ms: deque[float] = field(default_factory=lambda: deque(maxlen=10_000))
    first_event_at: datetime | None = None
    last_event_at: datetime | None = None
    seconds: float = 0.0  # wall-clock time spent publishing

    @property
    def predict_error_count(self) -> int:
        return sum(self.predict_errors.values())

    def predict_summary(self) -> str:
        """``1,234 predicted (2 errors: UNAVAILABLE=2), p50 1.8 ms, p99 6.0 ms`` (last 10k)."""
        if not self.predictions and not self.predict_errors:
            return ""
        text = f"{self.predictions:,} predicted"
        if self.predict_errors:
            detail = ", ".join(f"{k}={v}" for k, v in sorted(self.predict_errors.items()))
            text += f" ({self.predict_error_count:,} errors: {detail})"
        if self.predict_latencies_ms:
            p50, p99 = np.percentile(np.asarray(self.predict_latencies_ms), [50, 99])
            text += f", p50 {p50:.1f} ms, p99 {p99:.1f} ms"
        return text

    @property
    def records(self) -> int:
        return self.transactions + self.labels

    @property
    def records_per_second(self) -> float:
        return self.records / self.seconds if self.seconds > 0 else 0.0

    def count(self, event: SimEvent) -> None:
        if event.kind == "label":
            self.labels += 1
        else:
            self.transactions += 1
            if event.expect == "invalid":
                self.invalid += 1
                code = event.reason_code or "unknown"
                self.invalid_reasons[code] = self.invalid_reasons.get(code, 0) + 1
            elif event.expect == "duplicate":
                self.duplicates += 1
            elif event.is_fraud:
                self.fraud += 1
        if self.first_event_at is None:
            self.first_event_at = event.at
        self.last_event_at = event.at


def record_value(event: SimEvent) -> bytes:
    """The bytes a product service would publish for ``event``."""
    return event.raw if event.raw is not None else encode_json(event.value)


class Predictor:
    """Calls ``Predict`` for each transaction before it is published, as a payment flow does
    (one call at a time, with a deadline); records answers, errors (by gRPC status) and
    latency in the stats. An error never stops the traffic: the event is published anyway."""

    def __init__(self, address: str, timeout_s: float = 1.0) -> None:
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.aio.insecure_channel(address)
        self._stub = predictor_pb2_grpc.PredictorStub(self._channel)

    async def predict(self, value: dict[str, Any], stats: PublishStats) -> None:
        request = predictor_pb2.PredictRequest(
            transaction=events_pb2.Transaction(
                transaction_id=str(value["transaction_id"]),
                user_id=str(value["user_id"]),
                merchant_id=str(value["merchant_id"]),
                amount=float(value["amount"]),
                currency=str(value["currency"]),
                channel=str(value["channel"]),
                country=str(value["country"]),
                event_time=str(value["event_time"]),
            )
        )
        started = time.perf_counter()
        try:
            await self._stub.Predict(request, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            name = exc.code().name
            stats.predict_errors[name] = stats.predict_errors.get(name, 0) + 1
            return
        stats.predictions += 1
        stats.predict_latencies_ms.append((time.perf_counter() - started) * 1000)

    async def close(self) -> None:
        await self._channel.close()


async def publish(
    events: Iterable[SimEvent],
    kafka: KafkaSettings,
    rate: float | None = None,
    progress: ProgressCallback | None = None,
    *,
    realtime: bool = False,
    linger_ms: int = 20,
    predictor: Predictor | None = None,
) -> PublishStats:
    """Publish ``events`` in order; returns once every record is acknowledged.

    ``rate``: at most this many records (transactions + labels) per second; None: as fast as
    the broker takes them. ``realtime``: never publish an event before its ``at`` (live
    traffic, whose ``at`` are wall-clock times). ``progress`` is called with the running
    stats about five times a second and once at the end. Creates the two topics if they are
    missing. Raises ``KafkaError`` if the broker refuses a record (after the producer's own
    retries), ``Unavailable`` if the broker cannot be reached. ``predictor``: call Predict for
    each valid transaction before publishing it (not for re-sent duplicates or invalid ones).
    """
    topics = Topics.from_settings(kafka)
    # created with the platform's partition count if missing (a broker that auto-creates
    # topics would pick its own); on a managed cluster they exist already
    await ensure_topics(kafka, [topics.transactions, topics.labels])
    producer = AIOKafkaProducer(
        bootstrap_servers=kafka.bootstrap,
        client_id="traffic-simulator",
        acks="all",
        linger_ms=linger_ms,
        max_batch_size=256 * 1024,
        request_timeout_ms=kafka.request_timeout_ms,
        **security_options(kafka),
    )
    await producer.start()
    stats = PublishStats()
    started = time.monotonic()
    next_report = started
    in_flight: list[asyncio.Future[Any]] = []
    first_at: datetime | None = None
    try:
        for event in events:
            if realtime:
                first_at = first_at or event.at
                wait = (event.at - first_at).total_seconds() - (time.monotonic() - started)
                if wait > 0.002:
                    await asyncio.sleep(wait)
            if rate is not None:
                wait = stats.records / rate - (time.monotonic() - started)
                if wait > 0.002:
                    await asyncio.sleep(wait)
            topic = topics.labels if event.kind == "label" else topics.transactions
            if predictor is not None and event.kind == "transaction" and event.expect == "valid":
                await predictor.predict(event.value, stats)
            in_flight.append(
                await producer.send(topic, record_value(event), key=event.key.encode())
            )
            stats.count(event)
            if len(in_flight) >= _IN_FLIGHT:
                await _acknowledged(in_flight)
            if progress is not None and time.monotonic() >= next_report:
                next_report = time.monotonic() + 0.2
                stats.seconds = time.monotonic() - started
                progress(stats)
        await producer.flush()
        await _acknowledged(in_flight)
    finally:
        await producer.stop()
        if predictor is not None:
            await predictor.close()
    stats.seconds = time.monotonic() - started
    if progress is not None:
        progress(stats)
    return stats


async def _acknowledged(futures: list[asyncio.Future[Any]]) -> None:
    await asyncio.gather(*futures)  # raises the first delivery error
    futures.clear()


# ----------------------------------------------------------------------------- the command

_HELP = "\n\n".join(
    [
        "Publish simulated card-payment traffic to Kafka, as the product services would.",
        "Transactions go to events.transactions (JSON, key user_id) and, --label-delay seconds "
        "later, a label for each (is_fraud true/false) to events.labels (key transaction_id), "
        "like a chargeback feed. The broker is MLOPS_KAFKA_BOOTSTRAP (topic prefix "
        "MLOPS_KAFKA_TOPIC_PREFIX).",
        "Live mode (default) publishes in real time at --rate transactions per second, for "
        "--duration seconds or --count transactions (else until Ctrl-C), then the labels still "
        "due (--no-wait-labels skips them). --history-days N instead publishes N days of "
        "backdated traffic (event times in the past, daily rhythm) as fast as the broker takes "
        "it, e.g. to train the first model. The same --seed gives the same users and merchants.",
        "Live traffic continues the history as the same process (same world, same "
        "transactions per user and day) unless --rate says otherwise.",
        "Examples: 'mlops simulate --duration 600'; 'mlops simulate --history-days "
        "14'; 'mlops simulate --rate 200 --duration 900 --concept-drift-at 300'; 'mlops "
        "simulate --count 1000 --invalid-fraction 0.05 --duplicate-fraction 0.02 --dry-run'.",
    ]
)


def simulate(
    rate: Annotated[
        float | None,
        typer.Option(
            help="Live mode: transactions per second (labels come on top of it). Default: the "
            "history's rate, users x --transactions-per-user-per-day / 86,400, so that live "
            "traffic continues the history the model was trained on; another rate changes "
            "every per-user count, and the drift detectors see it.",
            show_default=False,
        ),
    ] = None,
    duration: Annotated[
        float | None,
        typer.Option(help="Live mode: stop creating transactions after this many seconds."),
    ] = None,
    count: Annotated[
        int | None,
        typer.Option(help="Live mode: stop after this many transactions (incl. invalid ones)."),
    ] = None,
    history_days: Annotated[
        float | None,
        typer.Option(
            help="Publish this many days of backdated traffic, ending now, as fast as "
            "possible, instead of live traffic."
        ),
    ] = None,
    seed: Annotated[int, typer.Option(help="Random seed: same seed and start, same events.")] = 42,
    users: Annotated[int, typer.Option(help="Number of card holders.")] = 2000,
    merchants: Annotated[int, typer.Option(help="Number of merchants.")] = 300,
    fraud_rate: Annotated[
        float, typer.Option(help="Share of transactions that are fraud (0.02 = 2%).")
    ] = 0.02,
    transactions_per_user_per_day: Annotated[
        float,
        typer.Option(
            help="Average transactions per user and day (history, and live unless --rate); "
            "use the value `mlops bootstrap` used."
        ),
    ] = 3.0,
    daily_rhythm: Annotated[
        bool,
        typer.Option(
            help="Traffic follows the time of day (as `mlops bootstrap --daily-rhythm`); "
            "time-of-day-dependent inputs then drift by the hour."
        ),
    ] = False,
    label_delay: Annotated[
        float,
        typer.Option(help="Mean seconds from a transaction to its label (each x0.5-1.5)."),
    ] = 120.0,
    concept_drift_at: Annotated[
        float | None,
        typer.Option(
            help="Seconds after the start from which fraud changes pattern: many small pos "
            "payments in the home country instead of bursts of large foreign web/app ones."
        ),
    ] = None,
    data_drift_at: Annotated[
        float | None,
        typer.Option(
            help="Seconds after the start from which inputs shift: amounts x "
            "--data-drift-amount-factor and more web payments."
        ),
    ] = None,
    data_drift_amount_factor: Annotated[
        float, typer.Option(help="Amount multiplier of the data drift.")
    ] = 2.0,
    invalid_fraction: Annotated[
        float,
        typer.Option(
            help="Share of transactions replaced by an invalid record (malformed JSON, "
            "missing field, bad currency, ...): they should land in events.dlq."
        ),
    ] = 0.0,
    duplicate_fraction: Annotated[
        float,
        typer.Option(help="Share of transactions published twice (ingestion drops the copy)."),
    ] = 0.0,
    max_rate: Annotated[
        float | None,
        typer.Option(help="Cap on records per second (history mode; default: no cap)."),
    ] = None,
    wait_labels: Annotated[
        bool,
        typer.Option(help="Live mode: after the last transaction, publish the labels still due."),
    ] = True,
    dry_run: Annotated[
        bool,
        typer.Option(help="Print the records as JSON lines instead of publishing them."),
    ] = False,
    predict: Annotated[
        bool,
        typer.Option(
            help="Live mode: call Predict (MLOPS_SERVING_HOST:MLOPS_SERVING_PORT) for each "
            "transaction before publishing it, as the payment flow would, so predictions.log "
            "fills; errors and latency show in the progress line. --no-predict skips it "
            "(history mode never predicts: its transactions are in the past)."
        ),
    ] = True,
) -> None:
    config = SimulationConfig(
        seed=seed,
        users=users,
        merchants=merchants,
        fraud_rate=fraud_rate,
        rate=rate,
        transactions_per_user_per_day=transactions_per_user_per_day,
        daily_rhythm=daily_rhythm,
        label_delay_s=label_delay,
        concept_drift_at=concept_drift_at,
        data_drift_at=data_drift_at,
        data_drift_amount_factor=data_drift_amount_factor,
        invalid_fraction=invalid_fraction,
        duplicate_fraction=duplicate_fraction,
    )
    simulator = TrafficSimulator(config)
    now = datetime.now(UTC)
    console = Console(stderr=True)
    events: Iterable[SimEvent]
    if history_days is not None:
        start = now - timedelta(days=history_days)
        events, span, realtime = simulator.history(start, now), (start, now), False
        mode = f"history: {history_days:g} days"
    else:
        events = simulator.live(now, duration_s=duration, max_transactions=count)
        if not wait_labels:
            events = _without_trailing_labels(events, now, duration, count)
        rate = simulator.live_rate
        horizon = duration if duration is not None else (count / rate if count else 0.0)
        tail = label_delay * 1.5 if wait_labels else 0.0
        span = (now, now + timedelta(seconds=horizon + tail) if horizon else now)
        realtime = True
        mode = f"live: {rate:.3g} transactions/s"
    if dry_run:
        for event in events:
            sys.stdout.write(_dry_run_line(event))
        return
    kafka = KafkaSettings()
    topics = Topics.from_settings(kafka)
    console.print(
        f"simulating [bold]{mode}[/bold] -> {kafka.bootstrap} "
        f"({topics.transactions}, {topics.labels}); seed {seed}, {users} users, "
        f"{merchants} merchants, fraud {fraud_rate:.1%}"
    )
    try:
        serving = ServingClientSettings().address if predict and realtime else None
        if serving:
            console.print(f"calling Predict on {serving} for each transaction (--no-predict: off)")
        stats = asyncio.run(
            _publish_with_bar(events, kafka, max_rate, realtime, span, console, serving)
        )
    except KeyboardInterrupt:
        console.print("interrupted")
        raise typer.Exit(130) from None
    except (KafkaError, OSError, Unavailable) as exc:
        console.print(f"[red]could not publish to {kafka.bootstrap}: {exc}[/red]")
        raise typer.Exit(1) from None
    _summary(console, stats)


def _without_trailing_labels(
    events: Iterable[SimEvent], start: datetime, duration: float | None, count: int | None
) -> Iterator[SimEvent]:
    """Live events until the run's last transaction, without the labels due after it."""
    created = 0
    for event in events:
        if duration is not None and (event.at - start).total_seconds() > duration:
            return
        if count is not None and created >= count:
            return
        created += event.kind == "transaction"
        yield event


async def _publish_with_bar(
    events: Iterable[SimEvent],
    kafka: KafkaSettings,
    max_rate: float | None,
    realtime: bool,
    span: tuple[datetime, datetime],
    console: Console,
    serving: str | None = None,
) -> PublishStats:
    total = max((span[1] - span[0]).total_seconds(), 0.0)
    with Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as bar:
        task = bar.add_task("publishing", total=total or None, detail="")

        def report(stats: PublishStats) -> None:
            done = (
                (stats.last_event_at - span[0]).total_seconds()
                if stats.last_event_at is not None
                else 0.0
            )
            bar.update(
                task,
                completed=min(max(done, 0.0), total) if total else None,
                detail=f"{stats.transactions:,} transactions, {stats.labels:,} labels, "
                f"{stats.records_per_second:,.0f} records/s"
                + (
                    f", simulated {stats.last_event_at:%Y-%m-%d %H:%M}"
                    if stats.last_event_at is not None and not realtime
                    else ""
                )
                + (f"; {stats.predict_summary()}" if stats.predict_summary() else ""),
            )

        predictor = Predictor(serving) if serving else None
        return await publish(
            events, kafka, max_rate, report, realtime=realtime, predictor=predictor
        )


def _summary(console: Console, stats: PublishStats) -> None:
    console.print(
        f"published {stats.transactions:,} transactions ({stats.fraud:,} fraud, "
        f"{stats.invalid:,} invalid, {stats.duplicates:,} duplicates) and {stats.labels:,} "
        f"labels in {stats.seconds:,.1f}s ({stats.records_per_second:,.0f} records/s)"
    )
    if stats.predict_summary():
        console.print(f"Predict: {stats.predict_summary()}")
    if stats.invalid_reasons:
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(stats.invalid_reasons.items()))
        console.print(f"expected DLQ reasons: {reasons}")


def _dry_run_line(event: SimEvent) -> str:
    line: dict[str, Any] = {
        "topic": "events.labels" if event.kind == "label" else "events.transactions",
        "key": event.key,
        "value": record_value(event).decode("utf-8", "replace"),
        "expect": event.expect,
    }
    if event.reason_code:
        line["reason_code"] = event.reason_code
    return json.dumps(line) + "\n"


simulate.__doc__ = _HELP  # typer shows it as the command's help
