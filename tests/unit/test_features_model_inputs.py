"""The request-time transformation shared by training and serving (usecase/features.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from services.shared.usecase.features import (
    FEATURE_DEFAULTS,
    MERCHANT_FEATURES,
    MODEL_INPUTS,
    USER_FEATURES,
    TransactionColumns,
    model_inputs,
)

NOON = 1_767_268_800.0  # 2026-01-01T12:00:00Z


def columns(**kwargs: object) -> TransactionColumns:
    base: dict[str, object] = {
        "amount": np.array([100.0, 50.0]),
        "channel": ["web", "pos"],
        "country": ["DE", "FR"],
        "event_time_epoch": np.array([NOON, NOON + 3 * 3600]),
    }
    base.update(kwargs)
    return TransactionColumns(**base)  # type: ignore[arg-type]


def test_feature_names_are_declared_once_with_defaults() -> None:
    assert set(FEATURE_DEFAULTS) == set(USER_FEATURES) | set(MERCHANT_FEATURES)
    assert not set(USER_FEATURES) & set(MERCHANT_FEATURES)


def test_known_entities() -> None:
    online = {
        "user_amount_mean_7d": [50.0, 25.0],
        "user_last_txn_epoch": [NOON - 60, NOON - 7200],
        "user_home_country": ["DE", "DE"],
        "user_txn_count_1h": [3, 0],
        "user_txn_count_24h": [5, 1],
        "user_amount_sum_24h": [200.0, 10.0],
        "user_distinct_merchants_24h": [2, 1],
        "merchant_txn_count_24h": [10, 0],
        "merchant_fraud_rate_7d": [0.25, 0.0],
    }
    x = model_inputs(columns(), online)
    assert x.shape == (2, len(MODEL_INPUTS)) and x.dtype == np.float32
    row = dict(zip(MODEL_INPUTS, x[0].tolist(), strict=True))
    assert row["log_amount"] == pytest.approx(math.log1p(100.0))
    assert row["amount_to_user_mean"] == pytest.approx(2.0)
    assert row["log_seconds_since_prev"] == pytest.approx(math.log1p(60.0))
    assert row["is_first_seen_user"] == 0.0
    assert row["country_mismatch"] == 0.0
    assert row["log_user_txn_count_1h"] == pytest.approx(math.log1p(3))
    assert row["merchant_fraud_rate_7d"] == pytest.approx(0.25)
    assert (row["channel_web"], row["channel_pos"], row["channel_app"]) == (1.0, 0.0, 0.0)
    assert row["hour_sin"] == pytest.approx(0.0, abs=1e-6)  # 12:00 UTC
    assert row["hour_cos"] == pytest.approx(-1.0)
    second = dict(zip(MODEL_INPUTS, x[1].tolist(), strict=True))
    assert second["country_mismatch"] == 1.0
    assert second["log_seconds_since_prev"] == pytest.approx(math.log1p(3 * 3600 + 7200))


@pytest.mark.parametrize(
    "missing",
    [None, float("nan"), pd.NA],
    ids=["none (online)", "nan (training frame)", "pandas NA (nullable frame)"],
)
def test_entities_never_seen_get_the_defaults(missing: object) -> None:
    online = {name: [missing, missing] for name in FEATURE_DEFAULTS}
    x = model_inputs(columns(), online)
    absent = model_inputs(columns(), {})
    np.testing.assert_array_equal(x, absent)
    row = dict(zip(MODEL_INPUTS, x[0].tolist(), strict=True))
    assert row["is_first_seen_user"] == 1.0
    assert row["amount_to_user_mean"] == 1.0
    assert row["log_seconds_since_prev"] == pytest.approx(math.log1p(30 * 24 * 3600.0), rel=1e-6)
    assert row["country_mismatch"] == 0.0
    assert row["log_user_txn_count_24h"] == 0.0


def test_a_training_frame_and_online_lists_give_the_same_matrix() -> None:
    online = {
        "user_amount_mean_7d": [50.0, None],
        "user_last_txn_epoch": [NOON - 60, None],
        "user_home_country": ["FR", None],
        "user_txn_count_1h": [3, None],
    }
    frame = pd.DataFrame(online)  # ints with a gap become float NaN, as in a training set
    from_frame = model_inputs(columns(), {k: frame[k].to_numpy() for k in frame})
    np.testing.assert_array_equal(model_inputs(columns(), online), from_frame)
