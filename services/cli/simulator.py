"""Simulated card-payment traffic: the stand-in for the product services.

    sim = TrafficSimulator(SimulationConfig(seed=7))
    for event in sim.history(start, end):      # backdated days, simulated clock, time order
        ...                                    # event.kind, event.key, event.value, event.at
    for event in sim.live(datetime.now(UTC)):  # endless; event.at is when to publish it
        ...

``services/cli/simulate.py`` publishes the events to Kafka (``publish``); this module only
decides what happens when, deterministically for a seed and a start time.

The world: ``users`` card holders, each with a home country (and its currency), a typical
spend, favourite merchants, a channel preference and an activity level; ``merchants`` in a
country with a category that sets their price level and channel mix.

``history`` and ``live`` are one process: the same world, the same per-user rate
(``transactions_per_user_per_day``; ``live`` runs at ``users x transactions_per_user_per_day /
86,400`` transactions per second unless ``rate`` says otherwise) and the same arrival pattern
(constant, or the ``daily_rhythm``: quiet nights, busy middays and evenings, in both). Live
traffic therefore continues the history a model was trained on, and every per-user and
per-merchant count the features service keeps has the distribution it had in training: live
traffic at another per-user rate is a different world, and its model inputs drift (a user
with 800 payments a day has other 1 h and 24 h counts than one with 3).

Fraud (``fraud_rate`` of the transactions) comes in episodes on one victim's card:

- until ``concept_drift_at``: a burst of 2-8 transactions within minutes at merchants the
  victim never used, mostly abroad, on web/app, for 3-12x the victim's typical amount,
  mostly at night;
- from ``concept_drift_at``: many (5-15) small pos payments (0.1-0.5x) in the home country,
  a few minutes apart, during the day: the old signals (foreign, large, web at night) vanish.

From ``data_drift_at`` every amount is ``data_drift_amount_factor`` times larger and the
channel mix moves to web. Every valid transaction gets a label (``is_fraud``) on
``events.labels`` ``label_delay_s`` (x0.5-1.5) later, like a chargeback feed; the label's
``event_time`` is when the label is issued. ``invalid_fraction`` of the transactions are
replaced by an invalid variant (one per DLQ reason, ``SimEvent.reason_code`` says which) and
``duplicate_fraction`` are sent twice (same transaction, a few seconds later).

Ids: users ``user-00042`` and merchants ``merchant-0042`` are the same for every run (with the
same seed, the same profiles), so history and live traffic build on each other; transaction
ids carry a run tag derived from the seed, the mode and the start time, so two runs never
collide and the same run always yields the same ids.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

EventKind = Literal["transaction", "label"]
Expectation = Literal["valid", "invalid", "duplicate"]


class SimulationConfig(BaseModel):
    """What to simulate. Times (``*_at``) are seconds after the start of the run."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    seed: int = Field(42, description="Seed: the same seed and start give the same events.")
    users: int = Field(2000, ge=1, description="Card holders.")
    merchants: int = Field(300, ge=10, description="Merchants.")
    fraud_rate: float = Field(0.02, ge=0.0, lt=0.5, description="Share of fraud transactions.")
    rate: float | None = Field(
        None,
        gt=0,
        description="Live mode: transactions per second; None: the history's rate (users x "
        "transactions_per_user_per_day / 86,400), so that live traffic continues the history.",
    )
    transactions_per_user_per_day: float = Field(
        3.0, gt=0, description="Average daily transactions of a user (history and live)."
    )
    daily_rhythm: bool = Field(
        False,
        description="Traffic follows the time of day (history and live alike), and the old "
        "fraud pattern strikes mostly at night; off: constant rates, so that any stretch of "
        "traffic looks like any other (what the drift detectors' all-day reference assumes).",
    )
    label_delay_s: float = Field(
        120.0, ge=0, description="Mean delay from a transaction to its label (x0.5-1.5)."
    )
    concept_drift_at: float | None = Field(
        None, ge=0, description="From then on fraud is small pos payments in the home country."
    )
    data_drift_at: float | None = Field(
        None, ge=0, description="From then on amounts are larger and more payments are web."
    )
    data_drift_amount_factor: float = Field(2.0, gt=0, description="Amount factor of data drift.")
    invalid_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of transactions replaced by an invalid record."
    )
    duplicate_fraction: float = Field(
        0.0, ge=0, le=1, description="Share of transactions published a second time."
    )


@dataclass(frozen=True)
class SimEvent:
    """One record a product service would publish."""

    kind: EventKind  # "transaction" -> events.transactions, "label" -> events.labels
    key: str  # record key: user_id for transactions, transaction_id for labels
    value: dict[str, Any]  # the JSON object (for raw records: what it was meant to be)
    at: datetime  # when it is published (simulated clock; equals event_time when valid)
    raw: bytes | None = None  # set only for deliberately malformed records: sent as is
    expect: Expectation = "valid"  # what ingestion should do with it
    reason_code: str | None = None  # for expect="invalid": the DLQ reason it must get
    is_fraud: bool | None = None  # ground truth of a transaction


# -------------------------------------------------------------------------- the world

# (country, currency, share of users)
_HOME_COUNTRIES = (
    ("US", "USD", 0.30),
    ("GB", "GBP", 0.12),
    ("DE", "EUR", 0.12),
    ("FR", "EUR", 0.10),
    ("ES", "EUR", 0.06),
    ("IT", "EUR", 0.06),
    ("NL", "EUR", 0.05),
    ("CA", "CAD", 0.06),
    ("AU", "AUD", 0.04),
    ("SE", "SEK", 0.03),
    ("PL", "PLN", 0.03),
    ("IE", "EUR", 0.03),
)
# where card fraud tends to cash out in this little world (besides other home countries)
_FRAUD_COUNTRIES = (("BR", "BRL"), ("NG", "NGN"), ("RO", "RON"), ("VN", "VND"), ("ID", "IDR"))
_CURRENCY = {c: cur for c, cur, _ in _HOME_COUNTRIES} | dict(_FRAUD_COUNTRIES)

# category: (price factor, channel weights web/pos/app, share of merchants)
_CATEGORIES: dict[str, tuple[float, tuple[float, float, float], float]] = {
    "grocery": (0.8, (0.05, 0.9, 0.05), 0.22),
    "restaurant": (0.9, (0.05, 0.85, 0.10), 0.16),
    "fuel": (1.3, (0.0, 0.95, 0.05), 0.08),
    "pharmacy": (0.6, (0.1, 0.85, 0.05), 0.06),
    "fashion": (1.8, (0.45, 0.45, 0.10), 0.12),
    "electronics": (4.0, (0.55, 0.3, 0.15), 0.08),
    "online": (1.2, (0.6, 0.0, 0.4), 0.16),
    "travel": (6.0, (0.6, 0.1, 0.3), 0.06),
    "entertainment": (1.0, (0.4, 0.3, 0.3), 0.06),
}
_CHANNELS = ("web", "pos", "app")
_SMALL_TICKET = ("grocery", "pharmacy", "fuel", "restaurant")


@dataclass(frozen=True)
class Merchant:
    merchant_id: str
    country: str
    category: str


@dataclass(frozen=True)
class User:
    user_id: str
    country: str
    currency: str
    typical_amount: float
    activity: float  # relative transaction frequency
    favourites: tuple[int, ...]  # merchant indexes
    web_affinity: float  # shifts the channel mix towards web/app


def _pick(rng: random.Random, weighted: list[tuple[Any, float]]) -> Any:
    return rng.choices([v for v, _ in weighted], weights=[w for _, w in weighted])[0]


def build_world(config: SimulationConfig) -> tuple[list[User], list[Merchant]]:
    """The users and merchants of a seed (the same for every run with that seed)."""
    rng = random.Random(f"world-{config.seed}")
    homes = [(c, w) for c, _, w in _HOME_COUNTRIES]
    merchants: list[Merchant] = []
    categories = [(name, spec[2]) for name, spec in _CATEGORIES.items()]
    for i in range(config.merchants):
        # a few merchants are in the countries where stolen cards are cashed out
        country = rng.choice(_FRAUD_COUNTRIES)[0] if rng.random() < 0.08 else _pick(rng, homes)
        merchants.append(Merchant(f"merchant-{i:04d}", country, _pick(rng, categories)))
    by_country: dict[str, list[int]] = {}
    for i, m in enumerate(merchants):
        by_country.setdefault(m.country, []).append(i)
    users: list[User] = []
    for i in range(config.users):
        country = _pick(rng, homes)
        local = by_country.get(country) or list(range(len(merchants)))
        online = [j for j, m in enumerate(merchants) if m.category in ("online", "travel")]
        pool = local + rng.sample(online, k=min(1, len(online)))  # one shop abroad, maybe
        favourites = tuple(sorted(set(rng.sample(pool, k=min(len(pool), rng.randint(6, 18))))))
        users.append(
            User(
                user_id=f"user-{i:05d}",
                country=country,
                currency=_CURRENCY[country],
                typical_amount=round(math.exp(rng.gauss(math.log(35.0), 0.5)), 2),
                activity=rng.gammavariate(2.0, 0.5),
                favourites=favourites,
                web_affinity=rng.uniform(-0.15, 0.25),
            )
        )
    return users, merchants


def daily_rhythm(moment: datetime) -> float:
    """Relative traffic at a time of day (UTC): 0.15 at night, 1.0 around noon and 19:00."""
    hour = moment.hour + moment.minute / 60
    if hour < 6:
        return 0.15
    day = math.sin(math.pi * (hour - 6) / 18)  # 0 at 6:00 and 24:00, 1 at 15:00
    evening = math.exp(-(((hour - 19) / 2.0) ** 2))
    return 0.15 + 0.7 * max(day, 0.0) + 0.3 * evening


def night_rhythm(moment: datetime) -> float:
    """When the old fraud pattern strikes: mostly at night."""
    return 1.35 - daily_rhythm(moment)


def _rhythm_mean(rhythm: Any) -> float:
    base = datetime(2024, 1, 1, tzinfo=UTC)
    samples = [rhythm(base + timedelta(minutes=m)) for m in range(0, 1440, 5)]
    return sum(samples) / len(samples)


_DAY_MEAN = _rhythm_mean(daily_rhythm)
_NIGHT_MEAN = _rhythm_mean(night_rhythm)
_DAY_MAX = 1.15
_NIGHT_MAX = 1.25
# mean transactions per fraud episode (see _old_episode / _new_episode)
_OLD_BURST_MEAN = 4.5
# how far before a run's start its fraud episodes begin (the longest burst, 15 payments ~150 s
# apart, spans well under an hour)
_EPISODE_WARM_S = 3600.0
_NEW_BURST_MEAN = 9.5


def rfc3339(moment: datetime) -> str:
    moment = moment.astimezone(UTC)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{moment.microsecond // 1000:03d}Z"


# ----------------------------------------------------------------------- the simulator


@dataclass(order=True)
class _Pending:
    at: datetime
    seq: int
    what: str = field(compare=False)  # "fraud" | "label" | "duplicate"
    payload: Any = field(compare=False)


@dataclass(frozen=True)
class _Clock:
    """How transactions arrive."""

    rate: float  # transactions per second (at rhythm 1.0 when ``rhythm``)
    rhythm: bool  # follows the daily rhythm (else a constant rate)


class TrafficSimulator:
    """Generates the traffic of ``config``; see the module docstring."""

    def __init__(self, config: SimulationConfig) -> None:
        self.config = config
        self.users, self.merchants = build_world(config)
        self._activity = list(itertools.accumulate(u.activity for u in self.users))
        self._by_country: dict[str, list[int]] = {}
        for i, m in enumerate(self.merchants):
            self._by_country.setdefault(m.country, []).append(i)

    # -- public API --------------------------------------------------------------------

    def history(self, start: datetime, end: datetime) -> Iterator[SimEvent]:
        """Backdated traffic with event times in [start, end], in time order, as fast as the
        caller consumes it. Labels due after ``end`` are issued at ``end``, so every valid
        transaction has its label."""
        start, end = start.astimezone(UTC), end.astimezone(UTC)
        yield from self._run("history", start, self._clock(), end=end, max_transactions=None)

    @property
    def live_rate(self) -> float:
        """Transactions per second of live traffic (on average over a day)."""
        if self.config.rate is not None:
            return self.config.rate
        return len(self.users) * self.config.transactions_per_user_per_day / 86_400

    def _clock(self) -> _Clock:
        rhythm = self.config.daily_rhythm
        return _Clock(self.live_rate / _DAY_MEAN if rhythm else self.live_rate, rhythm)

    def live(
        self,
        start: datetime,
        *,
        duration_s: float | None = None,
        max_transactions: int | None = None,
    ) -> Iterator[SimEvent]:
        """Traffic from ``start`` on at ``live_rate`` transactions per second (the history's
        process, continued). Endless, unless ``duration_s`` or ``max_transactions`` is given:
        then no transaction is created after that, and the labels still due follow at their
        scheduled times."""
        start = start.astimezone(UTC)
        clock = self._clock()
        end = start + timedelta(seconds=duration_s) if duration_s is not None else None
        yield from self._run("live", start, clock, end=end, max_transactions=max_transactions)

    def run_tag(self, mode: str, start: datetime) -> str:
        digest = hashlib.blake2b(
            f"{self.config.seed}|{mode}|{start.isoformat()}".encode(), digest_size=4
        )
        return digest.hexdigest()

    # -- the event loop ------------------------------------------------------------------

    def _run(
        self,
        mode: str,
        start: datetime,
        clock: _Clock,
        *,
        end: datetime | None,
        max_transactions: int | None,
    ) -> Iterator[SimEvent]:
        config = self.config
        rng = random.Random(f"{config.seed}|{mode}|{start.isoformat()}")
        tag = self.run_tag(mode, start)
        counter = itertools.count()
        seq = itertools.count()
        pending: list[_Pending] = []
        f = config.fraud_rate
        # transactions per second split into normal ones and fraud episodes, so that fraud
        # is ``fraud_rate`` of all transactions on average whatever the pattern's burst size
        total = clock.rate
        normal_rate = total * (1 - f)

        def episode_rate(at: datetime) -> float:
            burst = _NEW_BURST_MEAN if self._concept_drifted(start, at) else _OLD_BURST_MEAN
            return total * f / burst

        def next_arrival(now: datetime, rate: float, rhythm: Any, peak: float) -> datetime:
            if rate <= 0:
                return datetime.max.replace(tzinfo=UTC)
            if not clock.rhythm:
                return now + timedelta(seconds=rng.expovariate(rate))
            while True:  # thinning: a Poisson process whose rate follows the rhythm
                now += timedelta(seconds=rng.expovariate(rate * peak))
                if rng.random() * peak <= rhythm(now):
                    return now

        fraud_rhythm = night_rhythm if clock.rhythm else daily_rhythm
        fraud_scale = _DAY_MEAN / _NIGHT_MEAN if clock.rhythm else 1.0
        next_normal = next_arrival(start, normal_rate, daily_rhythm, _DAY_MAX)

        def warm(at: datetime) -> datetime:
            """Start the fraud process of the pattern current at ``at`` in its steady state:
            episodes that began in the _EPISODE_WARM_S before ``at`` go on into it; returns
            the next episode's start after ``at``."""
            new_pattern = self._concept_drifted(start, at)
            rate = episode_rate(at) * fraud_scale
            began = next_arrival(
                at - timedelta(seconds=_EPISODE_WARM_S), rate, fraud_rhythm, _NIGHT_MAX
            )
            while began < at:
                for when, victim, pattern in self._episode(rng, began, new_pattern):
                    if when >= at:
                        heapq.heappush(
                            pending, _Pending(when, next(seq), "fraud", (victim, pattern))
                        )
                began = next_arrival(began, rate, fraud_rhythm, _NIGHT_MAX)
            return began

        # The fraud process is in its steady state from the first second (a cold start had 2 %
        # fraud in the first 50 s of a 5 % world, rising to 5 % after ~4 min, and every fresh
        # `mlops simulate` began with a quiet stretch that a baseline taken from it mistook for
        # the normal loss). At ``concept_drift_at`` the fraudsters switch at once: the old
        # pattern's episodes in progress stop and the new pattern's start in their steady state
        # (growing the new one from nothing let the fraud share fall to ~1 % for minutes, and the
        # "shift" first looked like fewer frauds, an improvement, for about 20 minutes).
        next_episode = warm(start)
        onset = (
            start + timedelta(seconds=config.concept_drift_at)
            if config.concept_drift_at is not None and config.concept_drift_at > 0
            else None
        )
        created = 0

        def creating(at: datetime) -> bool:
            if end is not None and at > end:
                return False
            return max_transactions is None or created < max_transactions

        while True:
            candidates = [next_normal, next_episode]
            if pending:
                candidates.append(pending[0].at)
            at = min(candidates)
            if not creating(at):
                break
            if onset is not None and at >= onset:
                pending = [p for p in pending if p.what != "fraud"]
                heapq.heapify(pending)
                next_episode = warm(onset)
                onset = None
                continue
            if pending and pending[0].at == at:
                item = heapq.heappop(pending)
                if item.what == "label":
                    yield item.payload(at)
                    continue
                if item.what == "duplicate":
                    yield item.payload
                    continue
                user, pattern = item.payload  # a fraud burst's next transaction
                events = self._transaction(rng, tag, next(counter), at, start, user, fraud=pattern)
            elif at == next_normal:
                next_normal = next_arrival(at, normal_rate, daily_rhythm, _DAY_MAX)
                user = self._active_user(rng)
                events = self._transaction(rng, tag, next(counter), at, start, user, fraud=None)
            else:
                next_episode = next_arrival(
                    at, episode_rate(at) * fraud_scale, fraud_rhythm, _NIGHT_MAX
                )
                for when, victim, pattern in self._episode(
                    rng, at, self._concept_drifted(start, at)
                ):
                    heapq.heappush(pending, _Pending(when, next(seq), "fraud", (victim, pattern)))
                continue
            created += 1
            for event in events:
                yield event
                if event.expect != "valid" or event.kind != "transaction":
                    continue
                label_at = at + timedelta(seconds=config.label_delay_s * rng.uniform(0.5, 1.5))
                heapq.heappush(
                    pending,
                    _Pending(label_at, next(seq), "label", self._label_factory(event)),
                )
                if config.duplicate_fraction and rng.random() < config.duplicate_fraction:
                    again = at + timedelta(seconds=rng.uniform(0.5, 10.0))
                    copy = SimEvent(
                        "transaction",
                        event.key,
                        dict(event.value),
                        again,
                        expect="duplicate",
                        is_fraud=event.is_fraud,
                    )
                    heapq.heappush(pending, _Pending(again, next(seq), "duplicate", copy))
        # the run is over: labels and re-sends still due follow (at the end in history mode);
        # fraud bursts cut by the end are not
        while pending:
            item = heapq.heappop(pending)
            when = item.at if mode == "live" or end is None else min(item.at, end)
            if item.what == "label":
                yield item.payload(when)
            elif item.what == "duplicate":
                yield replace(item.payload, at=when)

    def _label_factory(self, transaction: SimEvent) -> Any:
        transaction_id = transaction.value["transaction_id"]
        is_fraud = bool(transaction.is_fraud)

        def make(at: datetime) -> SimEvent:
            return SimEvent(
                "label",
                transaction_id,
                {"transaction_id": transaction_id, "is_fraud": is_fraud, "event_time": rfc3339(at)},
                at,
            )

        return make

    # -- what happens ------------------------------------------------------------------------

    def _concept_drifted(self, start: datetime, at: datetime) -> bool:
        drift = self.config.concept_drift_at
        return drift is not None and (at - start).total_seconds() >= drift

    def _data_drifted(self, start: datetime, at: datetime) -> bool:
        drift = self.config.data_drift_at
        return drift is not None and (at - start).total_seconds() >= drift

    def _active_user(self, rng: random.Random) -> User:
        return rng.choices(self.users, cum_weights=self._activity)[0]

    def _episode(
        self, rng: random.Random, at: datetime, new_pattern: bool
    ) -> list[tuple[datetime, User, str]]:
        victim = self._active_user(rng)
        if new_pattern:
            size, gap = 5 + min(_poisson(rng, 4.5), 10), 150.0  # mean ~9.5
            pattern = "small_pos_home"
        else:
            size, gap = 2 + min(_poisson(rng, 2.5), 6), 45.0  # mean ~4.5
            pattern = "burst_abroad"
        times, when = [], at
        for _ in range(size):
            times.append((when, victim, pattern))
            when += timedelta(seconds=rng.expovariate(1 / gap))
        return times

    def _transaction(
        self,
        rng: random.Random,
        tag: str,
        number: int,
        at: datetime,
        start: datetime,
        user: User,
        *,
        fraud: str | None,
    ) -> list[SimEvent]:
        drifted = self._data_drifted(start, at)
        if fraud == "burst_abroad":
            merchant = self._unfamiliar_merchant(rng, user, abroad=rng.random() < 0.75)
            channel = _pick(rng, [("web", 0.6), ("app", 0.35), ("pos", 0.05)])
            amount = user.typical_amount * rng.uniform(3.0, 12.0)
        elif fraud == "small_pos_home":
            merchant = self._home_small_ticket_merchant(rng, user)
            channel = "pos"
            amount = user.typical_amount * rng.uniform(0.1, 0.5)
        else:
            merchant = self._usual_merchant(rng, user)
            price, mix, _ = _CATEGORIES[merchant.category]
            weights = [
                max(mix[0] + user.web_affinity * 0.5, 0.0),
                max(mix[1] - user.web_affinity, 0.0),
                max(mix[2] + user.web_affinity * 0.5, 0.0),
            ]
            if drifted:  # the product pushed its web checkout
                weights = [weights[0] + 0.35, weights[1] * 0.5, weights[2]]
            channel = rng.choices(_CHANNELS, weights=weights)[0] if sum(weights) else "pos"
            amount = user.typical_amount * price * math.exp(rng.gauss(0.0, 0.45))
        if drifted:
            amount *= self.config.data_drift_amount_factor
        amount = round(min(max(amount, 0.5), 50_000.0), 2)
        value = {
            "transaction_id": f"tx-{tag}-{number:08d}",
            "user_id": user.user_id,
            "merchant_id": merchant.merchant_id,
            "amount": amount,
            "currency": _CURRENCY[merchant.country],
            "channel": channel,
            "country": merchant.country,
            "event_time": rfc3339(at),
        }
        event = SimEvent("transaction", user.user_id, value, at, is_fraud=fraud is not None)
        if self.config.invalid_fraction and rng.random() < self.config.invalid_fraction:
            return [invalid_variant(rng, event)]
        return [event]

    def _usual_merchant(self, rng: random.Random, user: User) -> Merchant:
        if user.favourites and rng.random() < 0.85:
            return self.merchants[rng.choice(user.favourites)]
        local = self._by_country.get(user.country)
        if local and rng.random() < 0.9:
            return self.merchants[rng.choice(local)]
        return self.merchants[rng.randrange(len(self.merchants))]

    def _unfamiliar_merchant(self, rng: random.Random, user: User, *, abroad: bool) -> Merchant:
        for _ in range(20):
            index = rng.randrange(len(self.merchants))
            merchant = self.merchants[index]
            if index in user.favourites or (merchant.country == user.country) == abroad:
                continue
            return merchant
        return Merchant(
            f"merchant-x{rng.randrange(1000):03d}",
            rng.choice(_FRAUD_COUNTRIES)[0] if abroad else user.country,
            "online",
        )

    def _home_small_ticket_merchant(self, rng: random.Random, user: User) -> Merchant:
        local = [
            i
            for i in self._by_country.get(user.country, [])
            if self.merchants[i].category in _SMALL_TICKET
        ]
        if not local:
            return self._usual_merchant(rng, user)
        return self.merchants[rng.choice(local)]


def _poisson(rng: random.Random, mean: float) -> int:
    limit, k, p = math.exp(-mean), 0, 1.0
    while True:
        p *= rng.random()
        if p <= limit:
            return k
        k += 1


# ------------------------------------------------------------------------ invalid records


def _without(value: dict[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in value.items() if k != name}


def invalid_variant(rng: random.Random, event: SimEvent) -> SimEvent:
    """A broken version of a valid transaction, as buggy product services send them."""
    value = event.value
    # far enough ahead to be in the future of any validator clock, even for backdated history
    future = rfc3339(event.at + timedelta(days=1000))
    variants: list[tuple[str, dict[str, Any] | None, bytes | None]] = [
        ("missing_field", _without(value, "merchant_id"), None),
        ("invalid_type", {**value, "amount": str(value["amount"])}, None),
        ("out_of_range", {**value, "amount": -value["amount"]}, None),
        ("invalid_value", {**value, "currency": "EURO"}, None),
        ("invalid_value", {**value, "channel": "atm"}, None),
        ("invalid_value", {**value, "country": "ZZ"}, None),
        ("event_in_future", {**value, "event_time": future}, None),
        ("invalid_time", {**value, "event_time": value["event_time"][:10]}, None),
        ("unknown_field", {**value, "cvv": "123"}, None),
        ("too_long", {**value, "transaction_id": value["transaction_id"] * 4}, None),
        ("malformed_json", None, _json_bytes(value)[:-7]),
        ("not_an_object", None, b"[" + _json_bytes(value) + b"]"),
        ("malformed_json", None, _json_bytes(value).replace(b'"amount":', b'"amount":NaN,"x":')),
    ]
    code, broken, raw = rng.choice(variants)
    return SimEvent(
        "transaction",
        event.key,
        broken if broken is not None else value,
        event.at,
        raw=raw,
        expect="invalid",
        reason_code=code,
    )


def _json_bytes(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
