"""The fraud model's features: what the streams compute, and the request-time transformation.

Streaming features (computed by the features service, stored in Feast) are declared here by
name and type; feature_repo/ builds its Feast views from these lists, so the names exist once.
How each is computed from an entity's history is here too (``user_features``,
``merchant_features``); the features service (services/features/windows.py) keeps the
histories (event-time order, deduplication, lateness, retention) and calls them:

- user features: counts, sums and means of the user's transactions over 1 h, 24 h and 7 days,
  distinct merchants over 24 h, the most frequent country over 7 days;
- merchant fraud rate: labelled frauds / labels over 7 days, windowed by the labelled
  *transaction's* event time (not the label's arrival): the fraud share among the merchant's
  transactions of the last 7 days whose labels have arrived. A label for a transaction older
  than the window is dropped (it can never count again).

``model_inputs`` is the request-time transformation: it turns a batch of transactions plus
their online features into the model's input matrix. Training calls it on the point-in-time
training set, serving on each batch of live requests: the same function, so no skew. It
works on columns (numpy arrays) and so serves one row or a million alike.
"""

from __future__ import annotations

import bisect
import math
import operator
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

# The model's tensor contract with Triton (model.py builds the model behind it): input
# TRITON_INPUT (FP32, [batch, len(MODEL_INPUTS)]) -> output TRITON_OUTPUT (FP32, [batch, 1]).
TRITON_INPUT = "features"
TRITON_OUTPUT = "fraud_probability"

# Streaming features per user (Feast view "user_activity", entity user_id).
USER_FEATURES: dict[str, str] = {
    "user_txn_count_1h": "int64",
    "user_txn_count_24h": "int64",
    "user_amount_sum_24h": "float64",
    "user_amount_mean_7d": "float64",
    "user_distinct_merchants_24h": "int64",
    "user_last_txn_epoch": "float64",  # event time (epoch seconds) of the latest transaction
    "user_home_country": "string",  # the most frequent country over 7 days
}
# Streaming features per merchant (Feast view "merchant_activity", entity merchant_id).
MERCHANT_FEATURES: dict[str, str] = {
    "merchant_txn_count_24h": "int64",
    "merchant_fraud_rate_7d": "float64",  # labelled frauds / labels over 7 days
    "merchant_labels_7d": "int64",
}
USER_VIEW = "user_activity"
MERCHANT_VIEW = "merchant_activity"

# ------------------------------------------------------------------ streaming computation
# Times are integer microseconds since the epoch, as in the features service.
US_PER_SECOND = 1_000_000
HOUR_US = 3600 * US_PER_SECOND
DAY_US = 24 * HOUR_US
WEEK_US = 7 * DAY_US
# How far back each history must reach for its longest window (the features service keeps
# this plus the allowed lateness).
USER_WINDOW_US = WEEK_US
MERCHANT_TXN_WINDOW_US = DAY_US
MERCHANT_LABEL_WINDOW_US = WEEK_US


class UserTransaction(NamedTuple):
    """One transaction in a user's history; histories are sorted (event time, then seq)."""

    event_time_us: int
    seq: int  # where it was read in its partition (orders equal event times)
    transaction_id: str
    amount: float
    merchant_id: str
    country: str


class MerchantEvent(NamedTuple):
    """A transaction at a merchant, or the label of one, at the transaction's event time."""

    event_time_us: int
    seq: int
    transaction_id: str


_event_time = operator.itemgetter(0)  # event_time_us of either history entry, as a sort key


def _count_in(window: Sequence[Any], low: int, high: int) -> int:
    """Entries (sorted by event time) with ``low < event time <= high``."""
    return bisect.bisect_right(window, high, key=_event_time) - bisect.bisect_right(
        window, low, key=_event_time
    )


def user_features(history: Sequence[UserTransaction]) -> dict[str, Any]:
    """The user features of a non-empty, time-sorted history, as of its latest transaction."""
    clock = history[-1].event_time_us
    day = history[bisect.bisect_right(history, clock - DAY_US, key=_event_time) :]
    week = history[bisect.bisect_right(history, clock - WEEK_US, key=_event_time) :]
    countries: Counter[str] = Counter()
    last_seen: dict[str, int] = {}
    for txn in week:
        countries[txn.country] += 1
        last_seen[txn.country] = txn.event_time_us
    # most frequent; ties go to the most recently seen, then the larger code (deterministic)
    home = max(countries, key=lambda c: (countries[c], last_seen[c], c))
    return {
        "user_txn_count_1h": _count_in(history, clock - HOUR_US, clock),
        "user_txn_count_24h": len(day),
        "user_amount_sum_24h": math.fsum(txn.amount for txn in day),
        "user_amount_mean_7d": math.fsum(txn.amount for txn in week) / len(week),
        "user_distinct_merchants_24h": len({txn.merchant_id for txn in day}),
        "user_last_txn_epoch": clock / US_PER_SECOND,
        "user_home_country": home,
    }


def merchant_features(
    txns: Sequence[MerchantEvent],
    labels: Sequence[MerchantEvent],
    positives: Sequence[MerchantEvent],
) -> tuple[int, dict[str, Any]]:
    """(clock, features) of a merchant's time-sorted transactions, labels and positive labels
    (is_fraud; at least one list non-empty); the clock is the latest event time of any."""
    clock = max(txns[-1].event_time_us if txns else -1, labels[-1].event_time_us if labels else -1)
    labelled = _count_in(labels, clock - WEEK_US, clock)
    fraud = _count_in(positives, clock - WEEK_US, clock)
    return clock, {
        "merchant_txn_count_24h": _count_in(txns, clock - DAY_US, clock),
        "merchant_fraud_rate_7d": fraud / labelled if labelled else 0.0,
        "merchant_labels_7d": labelled,
    }


# What an entity the store has never seen (or cannot reach) looks like.
FEATURE_DEFAULTS: dict[str, Any] = {
    "user_txn_count_1h": 0,
    "user_txn_count_24h": 0,
    "user_amount_sum_24h": 0.0,
    "user_amount_mean_7d": 0.0,
    "user_distinct_merchants_24h": 0,
    "user_last_txn_epoch": 0.0,
    "user_home_country": "",
    "merchant_txn_count_24h": 0,
    "merchant_fraud_rate_7d": 0.0,
    "merchant_labels_7d": 0,
}

CHANNELS = ("web", "pos", "app")
# The model's inputs, in column order.
MODEL_INPUTS: tuple[str, ...] = (
    "log_amount",
    "amount_to_user_mean",
    "log_seconds_since_prev",
    "is_first_seen_user",
    "country_mismatch",
    "log_user_txn_count_1h",
    "log_user_txn_count_24h",
    "log_user_amount_sum_24h",
    "user_distinct_merchants_24h",
    "log_merchant_txn_count_24h",
    "merchant_fraud_rate_7d",
    "channel_web",
    "channel_pos",
    "channel_app",
    "hour_sin",
    "hour_cos",
)
_SECONDS_CAP = 30 * 24 * 3600.0


@dataclass(frozen=True)
class TransactionColumns:
    """The request-time part of a batch of transactions, as columns."""

    amount: np.ndarray  # float64
    channel: Sequence[str]
    country: Sequence[str]
    event_time_epoch: np.ndarray  # float64, seconds


def _is_missing(value: Any) -> bool:
    """None, NaN or pandas' NA (nullable columns of a training frame) mean "never seen"."""
    if value is None:
        return True
    try:
        return math.isnan(float(value))
    except TypeError:  # pandas.NA refuses float(); a non-number raises ValueError instead
        return True


def _column(online: Mapping[str, Any], name: str, n: int) -> np.ndarray:
    """An online feature column with missing values (None/NaN/NA: never seen) set to default."""
    default = FEATURE_DEFAULTS[name]
    values = online.get(name)
    if values is None:
        return np.full(n, default, dtype=np.float64)
    array = np.asarray(values)
    if array.dtype.kind in "fiub":  # numeric already (a training frame's column): vectorised
        array = array.astype(np.float64)
        return np.where(np.isnan(array), float(default), array)
    return np.asarray([default if _is_missing(v) else v for v in values], dtype=np.float64)


def _strings(online: Mapping[str, Any], name: str, n: int) -> list[str]:
    values = online.get(name)
    if values is None:
        return [""] * n
    # a string feature is a str when present; None/NaN/NA all mean "never seen"
    return [v if isinstance(v, str) else "" for v in values]


def model_inputs(txns: TransactionColumns, online: Mapping[str, Any]) -> np.ndarray:
    """The model input matrix (float32, rows x len(MODEL_INPUTS)) for a batch.

    ``online`` maps each streaming feature name to one value per transaction, as of just
    before the transaction (None or NaN where the entity has no features yet).
    """
    n = len(txns.amount)
    amount = np.asarray(txns.amount, dtype=np.float64)
    when = np.asarray(txns.event_time_epoch, dtype=np.float64)

    user_mean = _column(online, "user_amount_mean_7d", n)
    last_seen = _column(online, "user_last_txn_epoch", n)
    first_seen = last_seen <= 0
    since = np.where(first_seen, _SECONDS_CAP, np.clip(when - last_seen, 0.0, _SECONDS_CAP))
    ratio = np.where(user_mean > 0, amount / np.maximum(user_mean, 1e-9), 1.0)
    home = _strings(online, "user_home_country", n)
    mismatch = np.asarray(
        [1.0 if h and h != c else 0.0 for h, c in zip(home, txns.country, strict=True)]
    )
    hour = (when % 86400.0) / 3600.0
    channel = list(txns.channel)

    columns = {
        "log_amount": np.log1p(amount),
        "amount_to_user_mean": np.clip(ratio, 0.0, 100.0),
        "log_seconds_since_prev": np.log1p(since),
        "is_first_seen_user": first_seen.astype(np.float64),
        "country_mismatch": mismatch,
        "log_user_txn_count_1h": np.log1p(_column(online, "user_txn_count_1h", n)),
        "log_user_txn_count_24h": np.log1p(_column(online, "user_txn_count_24h", n)),
        "log_user_amount_sum_24h": np.log1p(_column(online, "user_amount_sum_24h", n)),
        "user_distinct_merchants_24h": _column(online, "user_distinct_merchants_24h", n),
        "log_merchant_txn_count_24h": np.log1p(_column(online, "merchant_txn_count_24h", n)),
        "merchant_fraud_rate_7d": _column(online, "merchant_fraud_rate_7d", n),
        "channel_web": np.asarray([c == "web" for c in channel], dtype=np.float64),
        "channel_pos": np.asarray([c == "pos" for c in channel], dtype=np.float64),
        "channel_app": np.asarray([c == "app" for c in channel], dtype=np.float64),
        "hour_sin": np.sin(2 * np.pi * hour / 24.0),
        "hour_cos": np.cos(2 * np.pi * hour / 24.0),
    }
    return np.stack([columns[name] for name in MODEL_INPUTS], axis=1).astype(np.float32)
