"""The card-payment event contract (docs/architecture.md) as executable rules.

One set of rules for every entry point: ingestion validates Kafka events with it, serving
validates Predict calls with it. A violation raises ``InvalidArgument`` naming the field, with
a machine-readable code (the dead-letter reason) and a sentence for a person.

Reason codes (``InvalidArgument.code``), checked in this order, first failure wins:

- ``unknown_field``    a field the event does not have (the first one, alphabetically)
- ``missing_field``    a required field is absent, null or an empty string
- ``invalid_type``     a field has the wrong JSON type (e.g. amount as a string)
- ``too_long``         an id longer than 64 characters
- ``invalid_value``    control characters or invalid Unicode in an id; a non-finite amount; a
                       currency/country not in ISO 4217/3166-1 (upper case); an unknown channel
- ``out_of_range``     amount <= 0 or > 1,000,000
- ``invalid_time``     event_time is not RFC 3339 with an offset, or not a real moment
- ``event_in_future``  event_time is more than 5 minutes after the validator's clock

Fields are checked in their declared order (transaction_id, user_id, merchant_id, amount,
currency, channel, country, event_time; label: transaction_id, is_fraud, event_time). Codes for
records that cannot be read at all are in ``services.shared.codecs``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import pycountry
from google.protobuf.timestamp_pb2 import Timestamp

from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import events_pb2

MAX_RECORD_BYTES = 16 * 1024
MAX_ID_CHARS = 64
MAX_AMOUNT = 1_000_000.0
MAX_FUTURE = timedelta(minutes=5)
CHANNELS = ("web", "pos", "app")
CURRENCIES = frozenset(c.alpha_3 for c in pycountry.currencies)
COUNTRIES = frozenset(c.alpha_2 for c in pycountry.countries)

TRANSACTION_FIELDS = tuple(f.name for f in events_pb2.Transaction.DESCRIPTOR.fields)
LABEL_FIELDS = tuple(f.name for f in events_pb2.Label.DESCRIPTOR.fields)

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)
_TRANSACTION_KEYS = frozenset(TRANSACTION_FIELDS)
_LABEL_KEYS = frozenset(LABEL_FIELDS)
_CHANNEL_SET = frozenset(CHANNELS)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ValidTransaction(NamedTuple):
    """A transaction that satisfies the contract, with its time parsed.

    Immutable; a NamedTuple rather than a frozen dataclass because it is built for every event
    ingested and costs a fifth as much to create."""

    transaction_id: str
    user_id: str
    merchant_id: str
    amount: float
    currency: str
    channel: str
    country: str
    event_time: datetime


class ValidLabel(NamedTuple):
    """A label that satisfies the contract, with its time parsed."""

    transaction_id: str
    is_fraud: bool
    event_time: datetime


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def epoch_parts(moment: datetime) -> tuple[int, int]:
    """(seconds, nanos) since the epoch of an aware datetime, exactly (no float rounding).

    Timestamp.FromDatetime does the same through time tuples, several times slower: this is
    on the ingestion hot path (two timestamps per event)."""
    delta = moment - _EPOCH
    return delta.days * 86_400 + delta.seconds, delta.microseconds * 1000


def to_timestamp(moment: datetime) -> Timestamp:
    seconds, nanos = epoch_parts(moment)
    return Timestamp(seconds=seconds, nanos=nanos)


def _require(data: Mapping[str, Any], name: str) -> Any:
    if name not in data or data[name] is None:
        raise InvalidArgument(name, "is required", code="missing_field")
    return data[name]


def _identifier(data: Mapping[str, Any], name: str) -> str:
    value = _require(data, name)
    if not isinstance(value, str):
        raise InvalidArgument(
            name, f"must be a string, got {type(value).__name__}", code="invalid_type"
        )
    if not value:
        raise InvalidArgument(name, "is required", code="missing_field")
    if len(value) > MAX_ID_CHARS:
        raise InvalidArgument(
            name, f"must be at most {MAX_ID_CHARS} characters, got {len(value)}", code="too_long"
        )
    if value.isascii() and value.isprintable():
        return value  # the common case, checked in one pass
    if _CONTROL.search(value):
        raise InvalidArgument(name, "must not contain control characters", code="invalid_value")
    if not _encodable(value):
        # JSON escapes can smuggle lone surrogates in; no UTF-8 output (protobuf) can hold them
        raise InvalidArgument(name, "must be valid Unicode text", code="invalid_value")
    return value


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _amount(data: Mapping[str, Any]) -> float:
    value = _require(data, "amount")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidArgument(
            "amount", f"must be a number, got {type(value).__name__}", code="invalid_type"
        )
    try:
        amount = float(value)
    except OverflowError:  # an integer with hundreds of digits
        raise InvalidArgument(
            "amount", f"must be at most {MAX_AMOUNT:,.0f}", code="out_of_range"
        ) from None
    if not math.isfinite(amount):
        raise InvalidArgument("amount", "must be finite", code="invalid_value")
    if amount <= 0:
        raise InvalidArgument(
            "amount", f"must be greater than 0, got {amount:g}", code="out_of_range"
        )
    if amount > MAX_AMOUNT:
        raise InvalidArgument(
            "amount", f"must be at most {MAX_AMOUNT:,.0f}, got {amount:g}", code="out_of_range"
        )
    return amount


def _code(data: Mapping[str, Any], name: str, valid: frozenset[str], what: str) -> str:
    value = _require(data, name)
    if not isinstance(value, str):
        raise InvalidArgument(
            name, f"must be a string, got {type(value).__name__}", code="invalid_type"
        )
    if value not in valid:
        raise InvalidArgument(name, f"{value[:16]!r} is not {what}", code="invalid_value")
    return value


def _channel(data: Mapping[str, Any]) -> str:
    value = _require(data, "channel")
    if not isinstance(value, str):
        raise InvalidArgument(
            "channel", f"must be a string, got {type(value).__name__}", code="invalid_type"
        )
    if value not in CHANNELS:
        raise InvalidArgument(
            "channel",
            f"must be one of {', '.join(CHANNELS)}, got {str(value)[:16]!r}",
            code="invalid_value",
        )
    return str(value)


def _event_time(data: Mapping[str, Any], now: datetime) -> datetime:
    value = _require(data, "event_time")
    if not isinstance(value, str):
        raise InvalidArgument(
            "event_time",
            f"must be an RFC 3339 string, got {type(value).__name__}",
            code="invalid_type",
        )
    if not value:
        raise InvalidArgument("event_time", "is required", code="missing_field")
    if not _RFC3339.match(value):
        raise InvalidArgument(
            "event_time", f"{value[:40]!r} is not RFC 3339 with an offset", code="invalid_time"
        )
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise InvalidArgument(
            "event_time", f"{value[:40]!r} is not a valid time: {exc}", code="invalid_time"
        ) from exc
    if moment - now > MAX_FUTURE:
        raise InvalidArgument(
            "event_time", f"{value} is more than 5 minutes in the future", code="event_in_future"
        )
    return moment


def _no_unknown_fields(data: Mapping[str, Any], known: tuple[str, ...]) -> None:
    unknown = sorted(str(name) for name in set(data) - set(known))
    if unknown:
        # the name is the sender's text: keep it short and printable in the dead letter
        name = unknown[0].encode("utf-8", "backslashreplace").decode("utf-8")[:MAX_ID_CHARS]
        raise InvalidArgument(name, "is not a field of this event", code="unknown_field")


def _plain_id(value: Any) -> bool:
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ID_CHARS
        and value.isascii()
        and value.isprintable()
    )


def _fast_time(value: Any, now: datetime) -> datetime | None:
    if type(value) is not str or not _RFC3339.match(value):
        return None
    try:
        moment = datetime.fromisoformat(value.upper().replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment - now <= MAX_FUTURE else None


def _fast_transaction(data: Mapping[str, Any], now: datetime) -> ValidTransaction | None:
    """The common case (a valid transaction, plain ASCII ids) checked in one pass.

    None means "not sure": the rules then run one by one and name the first failure. It
    accepts nothing the rules would refuse (tests/unit/test_schemas.py checks it against
    them); it exists because ingestion validates every event on its hot path."""
    if len(data) != len(_TRANSACTION_KEYS) or data.keys() != _TRANSACTION_KEYS:
        return None
    transaction_id, user_id, merchant_id = (
        data["transaction_id"],
        data["user_id"],
        data["merchant_id"],
    )
    if not (_plain_id(transaction_id) and _plain_id(user_id) and _plain_id(merchant_id)):
        return None
    amount = data["amount"]
    kind = type(amount)
    if kind is int:
        if not 0 < amount <= MAX_AMOUNT:
            return None
        amount = float(amount)
    elif kind is not float or not 0.0 < amount <= MAX_AMOUNT:  # NaN fails the comparison
        return None
    currency, channel, country = data["currency"], data["channel"], data["country"]
    if not (
        type(currency) is str
        and currency in CURRENCIES
        and type(channel) is str
        and channel in _CHANNEL_SET
        and type(country) is str
        and country in COUNTRIES
    ):
        return None
    moment = _fast_time(data["event_time"], now)
    if moment is None:
        return None
    return ValidTransaction(
        transaction_id, user_id, merchant_id, amount, currency, channel, country, moment
    )


def validate_transaction(data: Mapping[str, Any], *, now: datetime) -> ValidTransaction:
    """The transaction in ``data`` if it keeps the contract; else ``InvalidArgument``."""
    return _fast_transaction(data, now) or _transaction_rules(data, now)


def _transaction_rules(data: Mapping[str, Any], now: datetime) -> ValidTransaction:
    _no_unknown_fields(data, TRANSACTION_FIELDS)
    return ValidTransaction(
        transaction_id=_identifier(data, "transaction_id"),
        user_id=_identifier(data, "user_id"),
        merchant_id=_identifier(data, "merchant_id"),
        amount=_amount(data),
        currency=_code(data, "currency", CURRENCIES, "an ISO 4217 currency code (upper case)"),
        channel=_channel(data),
        country=_code(data, "country", COUNTRIES, "an ISO 3166-1 alpha-2 country code"),
        event_time=_event_time(data, now),
    )


def _flag(data: Mapping[str, Any], name: str) -> bool:
    value = _require(data, name)
    if not isinstance(value, bool):
        raise InvalidArgument(
            name, f"must be a boolean, got {type(value).__name__}", code="invalid_type"
        )
    return value


def validate_label(data: Mapping[str, Any], *, now: datetime) -> ValidLabel:
    """The label in ``data`` if it keeps the contract; else ``InvalidArgument``."""
    return _fast_label(data, now) or _label_rules(data, now)


def _fast_label(data: Mapping[str, Any], now: datetime) -> ValidLabel | None:
    """Like ``_fast_transaction``, for labels."""
    if len(data) == len(_LABEL_KEYS) and data.keys() == _LABEL_KEYS:
        transaction_id, is_fraud = data["transaction_id"], data["is_fraud"]
        if _plain_id(transaction_id) and type(is_fraud) is bool:
            moment = _fast_time(data["event_time"], now)
            if moment is not None:
                return ValidLabel(transaction_id, is_fraud, moment)
    return None


def _label_rules(data: Mapping[str, Any], now: datetime) -> ValidLabel:
    _no_unknown_fields(data, LABEL_FIELDS)
    return ValidLabel(
        transaction_id=_identifier(data, "transaction_id"),
        is_fraud=_flag(data, "is_fraud"),
        event_time=_event_time(data, now),
    )


def transaction_fields(message: events_pb2.Transaction) -> dict[str, Any]:
    """A protobuf Transaction as the dict the rules read (fast path for serving)."""
    return {name: getattr(message, name) for name in TRANSACTION_FIELDS}
