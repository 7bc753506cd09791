"""The serving service's domain: one transaction in, a fraud score and a decision out.

Per request: validate (the contract's rules, INVALID_ARGUMENT naming the field), route (the
production version, a sticky canary share, a shadow mirror), then join a micro-batch. Per
batch: one online-feature read for every row's user and merchant, the shared request-time
transformation (``model_inputs``, the function training used), one Triton call per version in
the batch, and one prediction record per answer for predictions.log. Shadow copies are scored
after the answers have gone, and never change them.

Deadlines: every request carries its caller's deadline less a small margin; the feature read
and the Triton calls get the batch's remaining time, and a request whose own time runs out is
answered UNAVAILABLE before its caller's deadline, whatever its batch is still waiting for.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from services.serving import metrics
from services.serving.batching import MicroBatcher
from services.serving.online_features import OnlineFeatureReader
from services.serving.prediction_log import PredictionBatch, PredictionLog
from services.serving.routing import CanaryRouter, RouteDecision, RoutingTable, ServedModel
from services.serving.scoring import TritonScorer, VersionNotServed
from services.shared.errors import DeadlineExceeded, InvalidArgument, PlatformError, Unavailable
from services.shared.logging import get_logger
from services.shared.model_aliases import ROUTE_NAMES
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.usecase.features import MODEL_INPUTS, TransactionColumns, model_inputs
from services.shared.usecase.schemas import transaction_fields, validate_transaction

log = get_logger("serving.predictor")


class RequestIds:
    """Ids for requests that came without one: a random prefix per process and a counter
    (unique across replicas and restarts, and far cheaper than a uuid4 per request)."""

    def __init__(self) -> None:
        self._prefix = uuid.uuid4().hex[:12]
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._counter)}"


@dataclass(frozen=True, slots=True)
class Prediction:
    """The answer to one request."""

    transaction_id: str
    request_id: str
    fraud_probability: float
    declined: bool
    model_name: str
    model_version: int
    degraded: bool
    route: int


@dataclass(slots=True)
class _Request:
    """A validated, routed request waiting for its batch."""

    request_id: str
    transaction: events_pb2.Transaction
    amount: float
    event_epoch: float
    route: RouteDecision
    deadline: float  # event-loop time by which it must be answered
    received: float  # perf_counter at arrival (latency)


@dataclass(slots=True)
class _Scored:
    """One version's scores for some rows of a batch."""

    model: ServedModel
    rows: list[int]
    scores: np.ndarray | None
    error: PlatformError | None


class Predictor:
    """Scores transactions: features from Feast, the model on Triton, routed per user."""

    def __init__(
        self,
        *,
        model_name: str,
        router: CanaryRouter,
        features: OnlineFeatureReader,
        scorer: TritonScorer,
        prediction_log: PredictionLog,
        batch_max_size: int = 256,
        batch_max_delay_s: float = 0.001,
        batch_max_in_flight: int = 1,
        default_timeout_s: float = 1.0,
        deadline_margin_s: float = 0.005,
        deadline_margin_fraction: float = 0.05,
        degrade_without_features: bool = True,
        shadow_max_inflight: int = 8,
        shadow_replay_s: float = 600.0,
        shadow_replay_max_rows: int = 20_000,
        switch_wait_s: float = 2.0,
        max_batch_requests: int = 1000,
    ) -> None:
        self.model_name = model_name
        self._max_batch_requests = max_batch_requests
        self.router = router
        self._features = features
        self._scorer = scorer
        self._log = prediction_log
        self._batch_max_size = batch_max_size
        self._default_timeout_s = default_timeout_s
        self._margin_s = deadline_margin_s
        self._margin_fraction = deadline_margin_fraction
        self._degrade = degrade_without_features
        self._shadow_max_inflight = shadow_max_inflight
        self._switch_wait_s = switch_wait_s
        self._unserved_since: dict[int, float] = {}  # version -> when a wait for it failed
        self._shadow_tasks: set[asyncio.Task[None]] = set()
        self._shadow_warned = 0.0
        self._replay_s = shadow_replay_s
        self._replay_max_rows = shadow_replay_max_rows
        self._recent: deque[PredictionBatch] = deque()  # answers a new shadow replays
        self._recent_rows = 0
        self._replay: asyncio.Task[None] | None = None
        self._request_ids = RequestIds()
        self._join_keys = features.layout.join_keys
        unknown = [
            k for k in self._join_keys if k not in events_pb2.Transaction.DESCRIPTOR.fields_by_name
        ]
        if unknown:
            raise ValueError(f"feature views join on {unknown}, which transactions do not carry")
        router.on_update(self._routing_changed)
        self._batcher: MicroBatcher[_Request, Prediction] = MicroBatcher(
            self._score_batch,
            max_size=batch_max_size,
            max_delay_s=batch_max_delay_s,
            max_in_flight=batch_max_in_flight,
            name="predict",
        )

    # ------------------------------------------------------------------ requests

    def _admit(
        self,
        transaction: events_pb2.Transaction | None,
        request_id: str,
        budget_s: float,
        field: str,
    ) -> _Request:
        if transaction is None:
            raise InvalidArgument(field, "is required", code="missing_field")
        try:
            valid = validate_transaction(transaction_fields(transaction), now=datetime.now(UTC))
        except InvalidArgument as exc:
            raise InvalidArgument(f"{field}.{exc.field}", exc.reason, code=exc.code) from None
        loop = asyncio.get_running_loop()
        return _Request(
            request_id=request_id or self._request_ids.next(),
            transaction=transaction,
            amount=valid.amount,
            event_epoch=valid.event_time.timestamp(),
            route=self.router.route(valid.user_id),
            deadline=loop.time() + budget_s,
            received=time.perf_counter(),
        )

    def _budget(self, timeout_s: float | None) -> float:
        """The time a request may use: the caller's deadline less the answer margin."""
        allowed = self._default_timeout_s if timeout_s is None else timeout_s
        budget = allowed - max(self._margin_s, allowed * self._margin_fraction)
        if budget <= 0:
            raise DeadlineExceeded("the caller's deadline leaves no time to score")
        return budget

    async def predict(
        self,
        transaction: events_pb2.Transaction | None,
        request_id: str = "",
        timeout_s: float | None = None,
    ) -> Prediction:
        """Score one transaction within ``timeout_s`` (the caller's remaining time)."""
        budget = self._budget(timeout_s)
        request = self._admit(transaction, request_id, budget, "transaction")
        try:
            return await self._batcher.submit(request, budget)
        except TimeoutError:
            raise Unavailable(
                f"no score for {request.request_id} within the deadline "
                f"({budget * 1000:.0f} ms): the model or the feature store is too slow"
            ) from None

    async def predict_many(
        self,
        transactions: Sequence[tuple[events_pb2.Transaction | None, str]],
        timeout_s: float | None = None,
    ) -> list[Prediction]:
        """Score many transactions (answers in order); any invalid one fails the call, and so
        does a call of more than ``max_batch_requests`` (one caller must not hold every
        batch slot)."""
        if len(transactions) > self._max_batch_requests:
            raise InvalidArgument(
                "requests",
                f"at most {self._max_batch_requests} per call, got {len(transactions)}",
                code="too_many_requests",
            )
        budget = self._budget(timeout_s)
        requests = [
            self._admit(txn, request_id, budget, f"requests[{i}].transaction")
            for i, (txn, request_id) in enumerate(transactions)
        ]
        chunks = [
            requests[i : i + self._batch_max_size]
            for i in range(0, len(requests), self._batch_max_size)
        ]
        try:
            answered = await asyncio.wait_for(
                asyncio.gather(*(self._score_batch(chunk) for chunk in chunks)), budget
            )
        except TimeoutError:
            raise Unavailable(
                f"no scores for the batch within the deadline ({budget * 1000:.0f} ms)"
            ) from None
        predictions: list[Prediction] = []
        for chunk in answered:
            for result in chunk:
                if isinstance(result, BaseException):
                    raise result
                predictions.append(result)
        return predictions

    # ------------------------------------------------------------------ batches

    async def _score_batch(self, batch: list[_Request]) -> list[Prediction | BaseException]:
        loop = asyncio.get_running_loop()
        now = loop.time()
        results: list[Prediction | BaseException | None] = [None] * len(batch)
        live: list[int] = []
        for i, request in enumerate(batch):
            if request.deadline > now:
                live.append(i)
            else:
                results[i] = Unavailable("the deadline passed before the request was scored")
        rows = [batch[i] for i in live]
        if rows:
            await self._score_rows(rows, live, results, max(r.deadline for r in rows) - now)
        return [r if r is not None else Unavailable("not scored") for r in results]

    async def _score_rows(
        self,
        rows: list[_Request],
        live: list[int],
        results: list[Prediction | BaseException | None],
        timeout_s: float,
    ) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        # at most half the time left: the model still needs its share
        online, degraded, failure = await self._online_features(rows, timeout_s / 2)
        if failure is not None:
            for i in live:
                results[i] = failure
            return
        matrix = model_inputs(
            TransactionColumns(
                amount=np.fromiter((r.amount for r in rows), np.float64, len(rows)),
                channel=[r.transaction.channel for r in rows],
                country=[r.transaction.country for r in rows],
                event_time_epoch=np.fromiter((r.event_epoch for r in rows), np.float64, len(rows)),
            ),
            online,
        )

        groups: dict[int, tuple[ServedModel, list[int]]] = {}
        for position, request in enumerate(rows):
            model = request.route.primary
            groups.setdefault(model.version, (model, []))[1].append(position)
        scored = await self._score_groups(
            matrix,
            list(groups.values()),
            [r.transaction.user_id for r in rows],
            deadline,
        )

        predicted_at = time.time()
        for group in scored:
            if group.error is not None:
                for position in group.rows:
                    results[live[position]] = group.error
                continue
            assert group.scores is not None
            answered = self._answer(rows, group, matrix, degraded, predicted_at, live, results)
            self._remember(answered)
        self._mirror(rows, matrix, degraded)

    async def _online_features(
        self, rows: list[_Request], timeout_s: float
    ) -> tuple[dict[str, list[object]], bool, PlatformError | None]:
        """(features, degraded, failure): defaults and degraded when Redis cannot answer."""
        metrics.FEATURE_BATCH_SIZE.observe(len(rows))
        entities = {k: [getattr(r.transaction, k) for r in rows] for k in self._join_keys}
        try:
            return await self._features.read(entities, timeout_s), False, None
        except Unavailable as exc:
            metrics.FEATURE_STORE_ERRORS.inc()
            if not self._degrade:
                return {}, True, exc
            metrics.DEGRADED.inc(len(rows))
            return {}, True, None

    async def _score_groups(
        self,
        matrix: np.ndarray,
        groups: list[tuple[ServedModel, list[int]]],
        users: list[str],
        deadline: float,
    ) -> list[_Scored]:
        """Score each version's rows (concurrently when the batch spans versions).

        A version switch drops no request: rows whose version Triton no longer serves are
        routed again over the new table, once. If the table still names that version (the
        registry has changed Triton and its event is on the way), they wait for the new
        table, at most ``switch_wait_s`` and never past their deadline.
        """
        loop = asyncio.get_running_loop()
        table = self.router.table
        outcomes = await self._score_all(matrix, groups, deadline)
        final: list[_Scored] = []
        gone: list[_Scored] = []
        for outcome in outcomes:
            if isinstance(outcome.error, VersionNotServed):
                gone.append(outcome)
            else:
                final.append(outcome)
        if not gone:
            return final
        # stop waiting a little before the deadline, so rows still get the real error
        wait_s = min(self._switch_wait_s, deadline - loop.time() - 0.005)
        waited_in_vain = [
            o.model.version
            for o in gone
            if loop.time() - self._unserved_since.get(o.model.version, -1e9) < self._switch_wait_s
        ]
        if (
            table is not None
            and not waited_in_vain  # an earlier batch already waited for this version
            and all(o.model.version in table.versions() for o in gone)
            and not await self.router.changed(table, wait_s)
        ):
            # no new table came: later batches fail at once instead of each waiting
            for outcome in gone:
                self._unserved_since[outcome.model.version] = loop.time()
        current = self.router.table
        retry: dict[int, tuple[ServedModel, list[int]]] = {}
        for outcome in gone:
            if current is None or outcome.model.version in current.versions():
                final.append(outcome)  # still routed there: the error stands
                continue
            for position in outcome.rows:
                model = CanaryRouter.route_with(current, users[position]).primary
                retry.setdefault(model.version, (model, []))[1].append(position)
        if retry:
            log.info("rerouted_after_switch", rows=sum(len(r) for _, r in retry.values()))
            final += await self._score_all(matrix, list(retry.values()), deadline)
        return final

    async def _score_all(
        self, matrix: np.ndarray, groups: list[tuple[ServedModel, list[int]]], deadline: float
    ) -> list[_Scored]:
        loop = asyncio.get_running_loop()
        if len(groups) == 1:  # the common case: no task per group
            model, rows = groups[0]
            return [await self._score(model, rows, matrix, deadline - loop.time())]
        return list(
            await asyncio.gather(
                *(
                    self._score(model, rows, matrix, deadline - loop.time())
                    for model, rows in groups
                )
            )
        )

    async def _score(
        self, model: ServedModel, rows: list[int], matrix: np.ndarray, timeout_s: float
    ) -> _Scored:
        route = ROUTE_NAMES[model.route]
        metrics.TRITON_BATCH_SIZE.labels(route).observe(len(rows))
        try:
            scores = await self._scorer.score(model.version, matrix[rows], timeout_s)
        except Unavailable as exc:
            metrics.TRITON_ERRORS.labels(route).inc()
            return _Scored(model, rows, None, exc)
        return _Scored(model, rows, scores, None)

    def _answer(
        self,
        rows: list[_Request],
        group: _Scored,
        matrix: np.ndarray,
        degraded: bool,
        predicted_at: float,
        live: list[int],
        results: list[Prediction | BaseException | None],
    ) -> PredictionBatch:
        model = group.model
        assert group.scores is not None
        route = model.route
        version = str(model.version)
        counter = metrics.PREDICTIONS.labels(version, ROUTE_NAMES[route])
        latency = metrics.PREDICTION_LATENCY.labels(version, ROUTE_NAMES[route])
        now = time.perf_counter()
        scores: list[float] = group.scores.tolist()
        answered = [rows[position] for position in group.rows]
        flagged = [model.declines(score) for score in scores]
        latencies = [now - request.received for request in answered]
        request_ids = [request.request_id for request in answered]
        transactions = [request.transaction for request in answered]
        model_name, model_version = self.model_name, model.version
        for position, request, score, declined, elapsed in zip(
            group.rows, answered, scores, flagged, latencies, strict=True
        ):
            results[live[position]] = Prediction(
                transaction_id=request.transaction.transaction_id,
                request_id=request.request_id,
                fraud_probability=score,
                declined=declined,
                model_name=model_name,
                model_version=model_version,
                degraded=degraded,
                route=route,
            )
            latency.observe(elapsed)
        batch = PredictionBatch(
            request_ids=request_ids,
            transactions=transactions,
            features=matrix[group.rows],
            fraud_probabilities=scores,
            flagged=flagged,
            latencies_ms=[elapsed * 1000.0 for elapsed in latencies],
            model_name=model_name,
            model_version=model_version,
            route=route,
            degraded=degraded,
            predicted_at=predicted_at,
        )
        self._log.record(batch)
        counter.inc(len(group.rows))
        return batch

    # ------------------------------------------------------------------ shadow

    def _mirror(self, rows: list[_Request], matrix: np.ndarray, degraded: bool) -> None:
        """Score the rows mirrored to a shadow version in the background (logged only)."""
        groups: dict[int, tuple[ServedModel, list[int]]] = {}
        for position, request in enumerate(rows):
            shadow = request.route.shadow
            if shadow is not None:
                groups.setdefault(shadow.version, (shadow, []))[1].append(position)
        for model, positions in groups.values():
            if len(self._shadow_tasks) >= self._shadow_max_inflight:
                metrics.SHADOW_SKIPPED.inc(len(positions))
                continue
            task = asyncio.get_running_loop().create_task(
                self._shadow(model, positions, rows, matrix, degraded)
            )
            self._shadow_tasks.add(task)
            task.add_done_callback(self._shadow_tasks.discard)

    async def _shadow(
        self,
        model: ServedModel,
        positions: list[int],
        rows: list[_Request],
        matrix: np.ndarray,
        degraded: bool,
    ) -> None:
        timeout_s = max(0.05, self._default_timeout_s)
        scored = await self._score(model, positions, matrix, timeout_s)
        if scored.error is not None:
            now = time.monotonic()
            if now - self._shadow_warned >= 1.0:  # counted in the metrics; logged sparingly
                self._shadow_warned = now
                log.warning("shadow_failed", version=model.version, error=scored.error.message)
            return
        throwaway: list[Prediction | BaseException | None] = [None] * len(rows)
        self._answer(rows, scored, matrix, degraded, time.time(), list(range(len(rows))), throwaway)

    # ------------------------------------------------------------------ shadow replay

    def _remember(self, batch: PredictionBatch) -> None:
        """Keep an answered batch for a later shadow's replay (bounded by time and rows)."""
        if self._replay_s <= 0 or self._replay_max_rows <= 0 or batch.degraded:
            return  # degraded answers used default features: not what a model would see
        self._recent.append(batch)
        self._recent_rows += len(batch)
        oldest = batch.predicted_at - self._replay_s
        while self._recent and (
            self._recent_rows > self._replay_max_rows or self._recent[0].predicted_at < oldest
        ):
            self._recent_rows -= len(self._recent.popleft())

    def _routing_changed(self, previous: RoutingTable | None, table: RoutingTable) -> None:
        shadow = table.shadow
        before = previous.shadow if previous is not None else None
        if shadow is not None and before is not None and before.version == shadow.version:
            return
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()  # the shadow it scored for is gone or replaced
        if shadow is None or not self._recent:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # no event loop (a table set before serving runs): nothing answered yet
        self._replay = loop.create_task(self._replay_on(table, shadow))

    async def replay_done(self) -> None:
        """Wait for the running shadow replay, if any (tests, and an orderly stop)."""
        if self._replay is not None:
            await asyncio.gather(self._replay, return_exceptions=True)

    async def _replay_on(self, table: RoutingTable, shadow: ServedModel) -> None:
        """Score the recent answers' logged model inputs on the new shadow version and log
        them as replayed shadow records: a paired comparison then has transactions whose
        labels are still to come as soon as the shadow is set, not a label delay later.
        Rows of many (small) answered batches go to Triton in full batches."""
        started = time.perf_counter()
        horizon = time.time() - self._replay_s
        request_ids: list[str] = []
        transactions: list[events_pb2.Transaction] = []
        pieces: list[np.ndarray] = []
        model_name = self.model_name
        for batch in list(self._recent):
            if batch.predicted_at < horizon or batch.model_version == shadow.version:
                continue  # too old, or answered by that version already (a canary)
            keep = [
                i
                for i, txn in enumerate(batch.transactions)
                if CanaryRouter.route_with(table, txn.user_id).shadow is not None
            ]
            if keep:
                request_ids += [batch.request_ids[i] for i in keep]
                transactions += [batch.transactions[i] for i in keep]
                pieces.append(batch.features[keep])
        if not pieces:
            return
        features = np.concatenate(pieces)
        scored = 0
        try:
            for start in range(0, len(request_ids), self._batch_max_size):
                end = start + self._batch_max_size
                try:
                    scores = await self._scorer.score(
                        shadow.version, features[start:end], self._default_timeout_s
                    )
                except Unavailable as exc:
                    metrics.SHADOW_REPLAYED.labels("failed").inc(len(request_ids) - start)
                    log.warning(
                        "shadow_replay_failed",
                        version=shadow.version,
                        scored=scored,
                        given_up=len(request_ids) - start,
                        error=exc.message,
                    )
                    return
                values: list[float] = scores.tolist()
                self._log.record(
                    PredictionBatch(
                        request_ids=request_ids[start:end],
                        transactions=transactions[start:end],
                        features=features[start:end],
                        fraud_probabilities=values,
                        flagged=[shadow.declines(v) for v in values],
                        latencies_ms=[0.0] * len(values),
                        model_name=model_name,
                        model_version=shadow.version,
                        route=shadow.route,
                        degraded=False,
                        predicted_at=time.time(),
                        replayed=True,
                    )
                )
                scored += len(values)
                metrics.SHADOW_REPLAYED.labels("scored").inc(len(values))
        except asyncio.CancelledError:
            log.info("shadow_replay_stopped", version=shadow.version, scored=scored)
            raise
        log.info(
            "shadow_replayed",
            version=shadow.version,
            scored=scored,
            window_s=self._replay_s,
            seconds=round(time.perf_counter() - started, 3),
        )

    # ------------------------------------------------------------------ lifecycle

    async def probe(self, model: ServedModel, timeout_s: float) -> PlatformError | None:
        """Score one row of zeros on ``model``: None when Triton answers (health checks).

        Readiness alone is not enough: Triton still reports a model ready after its
        Python-backend stub died, and only an inference shows it.
        """
        try:
            await self._scorer.score(
                model.version, np.zeros((1, len(MODEL_INPUTS)), np.float32), timeout_s
            )
        except Unavailable as exc:
            return exc
        return None

    async def close(self) -> None:
        await self._batcher.close()
        if self._replay is not None and not self._replay.done():
            self._replay.cancel()
            await asyncio.gather(self._replay, return_exceptions=True)
        if self._shadow_tasks:
            await asyncio.gather(*self._shadow_tasks, return_exceptions=True)
