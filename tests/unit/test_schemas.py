"""The event contract's rules (schemas.py) and the external codecs (codecs.py): every invalid
class gets its exact reason code and field."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from services.shared.codecs import (
    CONTENT_TYPE,
    MESSAGE_TYPE,
    PROTOBUF,
    decode_external,
    encode_json,
    header,
    protobuf_headers,
)
from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import events_pb2
from services.shared.usecase.schemas import (
    MAX_AMOUNT,
    transaction_fields,
    validate_label,
    validate_transaction,
)

NOW = datetime(2025, 6, 1, 12, 0, tzinfo=UTC)
VALID: dict[str, Any] = {
    "transaction_id": "tx-1",
    "user_id": "user-1",
    "merchant_id": "merchant-1",
    "amount": 12.5,
    "currency": "EUR",
    "channel": "web",
    "country": "DE",
    "event_time": "2025-06-01T11:59:00Z",
}
LABEL: dict[str, Any] = {
    "transaction_id": "tx-1",
    "is_fraud": True,
    "event_time": "2025-06-01T12:00:00+02:00",
}
_ABSENT = object()


def _with(base: dict[str, Any], **changes: Any) -> dict[str, Any]:
    data = dict(base)
    for name, value in changes.items():
        if value is _ABSENT:
            data.pop(name)
        else:
            data[name] = value
    return data


def _rejection(data: dict[str, Any], *, label: bool = False) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        (validate_label if label else validate_transaction)(data, now=NOW)
    return caught.value.code, caught.value.field


def test_a_valid_transaction_is_parsed() -> None:
    valid = validate_transaction(VALID, now=NOW)
    assert valid.transaction_id == "tx-1"
    assert valid.amount == 12.5
    assert valid.event_time == datetime(2025, 6, 1, 11, 59, tzinfo=UTC)
    assert (valid.user_id, valid.merchant_id) == ("user-1", VALID["merchant_id"])
    assert (valid.currency, valid.channel, valid.country) == (
        VALID["currency"],
        VALID["channel"],
        VALID["country"],
    )


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        # unknown fields come first
        ({"cvv": "123"}, "unknown_field", "cvv"),
        ({"amount_eur": 1, "Amount": 2}, "unknown_field", "Amount"),
        # missing: absent, null, empty
        ({"transaction_id": _ABSENT}, "missing_field", "transaction_id"),
        ({"user_id": None}, "missing_field", "user_id"),
        ({"merchant_id": ""}, "missing_field", "merchant_id"),
        ({"amount": _ABSENT}, "missing_field", "amount"),
        ({"currency": None}, "missing_field", "currency"),
        ({"channel": _ABSENT}, "missing_field", "channel"),
        ({"country": _ABSENT}, "missing_field", "country"),
        ({"event_time": _ABSENT}, "missing_field", "event_time"),
        ({"event_time": ""}, "missing_field", "event_time"),
        # wrong types
        ({"transaction_id": 17}, "invalid_type", "transaction_id"),
        ({"user_id": ["u"]}, "invalid_type", "user_id"),
        ({"merchant_id": {"id": 1}}, "invalid_type", "merchant_id"),
        ({"amount": "12.50"}, "invalid_type", "amount"),
        ({"amount": True}, "invalid_type", "amount"),
        ({"currency": 978}, "invalid_type", "currency"),
        ({"channel": 1}, "invalid_type", "channel"),
        ({"country": False}, "invalid_type", "country"),
        ({"event_time": 1717243140}, "invalid_type", "event_time"),
        # ids
        ({"transaction_id": "t" * 65}, "too_long", "transaction_id"),
        ({"user_id": "u\x00"}, "invalid_value", "user_id"),
        ({"merchant_id": "m\n1"}, "invalid_value", "merchant_id"),
        ({"transaction_id": "tx-\ud800"}, "invalid_value", "transaction_id"),
        # amounts
        ({"amount": 0}, "out_of_range", "amount"),
        ({"amount": -5.0}, "out_of_range", "amount"),
        ({"amount": MAX_AMOUNT + 0.01}, "out_of_range", "amount"),
        ({"amount": 10**400}, "out_of_range", "amount"),
        ({"amount": float("nan")}, "invalid_value", "amount"),
        ({"amount": float("inf")}, "invalid_value", "amount"),
        ({"amount": float("-inf")}, "invalid_value", "amount"),
        # codes
        ({"currency": "eur"}, "invalid_value", "currency"),
        ({"currency": "EURO"}, "invalid_value", "currency"),
        ({"currency": "ABC"}, "invalid_value", "currency"),
        ({"channel": "atm"}, "invalid_value", "channel"),
        ({"channel": "WEB"}, "invalid_value", "channel"),
        ({"country": "ZZ"}, "invalid_value", "country"),
        ({"country": "de"}, "invalid_value", "country"),
        ({"country": "DEU"}, "invalid_value", "country"),
        # times
        ({"event_time": "2025-06-01"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T11:59:00"}, "invalid_time", "event_time"),  # no offset
        ({"event_time": "2025-06-01 11:59:00Z"}, "invalid_time", "event_time"),
        ({"event_time": "yesterday"}, "invalid_time", "event_time"),
        ({"event_time": "2025-02-30T00:00:00Z"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T24:00:00Z"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T23:59:60Z"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T11:59:00+25:00"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T12:05:01Z"}, "event_in_future", "event_time"),
        ({"event_time": "2025-06-02T00:00:00+02:00"}, "event_in_future", "event_time"),
    ],
)
def test_each_transaction_rule_has_its_code_and_field(
    changes: dict[str, Any], code: str, field: str
) -> None:
    assert _rejection(_with(VALID, **changes)) == (code, field)


@pytest.mark.parametrize(
    ("event_time", "instant"),
    [
        # exactly 5 minutes ahead: allowed
        ("2025-06-01T12:05:00Z", datetime(2025, 6, 1, 12, 5, tzinfo=UTC)),
        # lower-case T and Z are RFC 3339
        ("2025-06-01t11:00:00z", datetime(2025, 6, 1, 11, 0, tzinfo=UTC)),
        # an offset is applied; digits past the microsecond are cut
        ("2025-06-01T13:59:00.123456789+02:00", datetime(2025, 6, 1, 11, 59, 0, 123456, UTC)),
        ("2020-01-01T00:00:00-08:00", datetime(2020, 1, 1, 8, 0, tzinfo=UTC)),
        ("1999-12-31T23:59:59.5Z", datetime(1999, 12, 31, 23, 59, 59, 500000, UTC)),
    ],
)
def test_rfc3339_times_within_the_future_margin_are_accepted(
    event_time: str, instant: datetime
) -> None:
    valid = validate_transaction(_with(VALID, event_time=event_time), now=NOW)
    assert valid.event_time.utcoffset() is not None
    assert valid.event_time == instant


def test_boundaries_of_amount_and_ids_are_accepted() -> None:
    edge = _with(VALID, amount=MAX_AMOUNT, transaction_id="t" * 64, user_id="ü" * 64)
    assert validate_transaction(edge, now=NOW).amount == MAX_AMOUNT
    assert validate_transaction(_with(VALID, amount=1), now=NOW).amount == 1.0
    assert validate_transaction(_with(VALID, amount=0.01), now=NOW).amount == 0.01


def test_the_first_failing_field_in_declared_order_is_reported() -> None:
    broken = _with(VALID, user_id=5, amount=-1, currency="x")
    assert _rejection(broken) == ("invalid_type", "user_id")


def test_unknown_field_names_are_made_printable_and_short() -> None:
    code, field = _rejection(_with(VALID, **{"x\ud800" + "y" * 100: 1}))
    assert code == "unknown_field"
    assert len(field) <= 64
    field.encode("utf-8")  # no lone surrogate left


def test_a_valid_label_is_parsed() -> None:
    label = validate_label(LABEL, now=NOW)
    assert label.is_fraud is True
    assert label.event_time == datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
    assert label.transaction_id == LABEL["transaction_id"]


@pytest.mark.parametrize(
    ("changes", "code", "field"),
    [
        ({"amount": 3}, "unknown_field", "amount"),
        ({"transaction_id": _ABSENT}, "missing_field", "transaction_id"),
        ({"transaction_id": "x" * 65}, "too_long", "transaction_id"),
        ({"is_fraud": _ABSENT}, "missing_field", "is_fraud"),
        ({"is_fraud": "true"}, "invalid_type", "is_fraud"),
        ({"is_fraud": 1}, "invalid_type", "is_fraud"),
        ({"event_time": "soon"}, "invalid_time", "event_time"),
        ({"event_time": "2025-06-01T13:00:00Z"}, "event_in_future", "event_time"),
    ],
)
def test_each_label_rule_has_its_code_and_field(
    changes: dict[str, Any], code: str, field: str
) -> None:
    assert _rejection(_with(LABEL, **changes), label=True) == (code, field)


def test_protobuf_transactions_go_through_the_same_rules() -> None:
    message = events_pb2.Transaction(**VALID)
    assert validate_transaction(transaction_fields(message), now=NOW).amount == 12.5
    message.amount = 0
    assert _rejection(transaction_fields(message)) == ("out_of_range", "amount")


# ------------------------------------------------------------------------------- codecs

PB_HEADERS = [(CONTENT_TYPE, PROTOBUF.encode())]


def _decode_error(
    value: bytes | None, headers: list[tuple[str, bytes]] | None = None
) -> tuple[str, str]:
    with pytest.raises(InvalidArgument) as caught:
        decode_external(value, headers, events_pb2.Transaction)
    return caught.value.code, caught.value.field


def test_json_is_the_default_encoding() -> None:
    raw = json.dumps(VALID).encode()
    assert decode_external(raw, None, events_pb2.Transaction) == VALID
    assert (
        decode_external(
            raw, [("Content-Type", b"application/json; charset=utf-8")], events_pb2.Transaction
        )
        == VALID
    )


@pytest.mark.parametrize(
    ("value", "code", "field"),
    [
        (None, "empty_record", ""),
        (b"", "empty_record", ""),
        (b"{", "malformed_json", ""),
        (b'{"amount": 1,}', "malformed_json", ""),
        (b"\xff\xfe{}", "malformed_json", ""),  # not UTF-8
        (b'{"amount": NaN}', "malformed_json", ""),
        (b'{"amount": Infinity}', "malformed_json", ""),
        (b'{"amount": -Infinity}', "malformed_json", ""),
        (b"[" * 100_000, "malformed_json", ""),  # deeper than the parser can go
        (b'{"amount": 1, "amount": 2}', "duplicate_field", "amount"),
        (b"[]", "not_an_object", ""),
        (b'"tx"', "not_an_object", ""),
        (b"42", "not_an_object", ""),
        (b"null", "not_an_object", ""),
    ],
)
def test_unreadable_json_records_have_their_code(
    value: bytes | None, code: str, field: str
) -> None:
    assert _decode_error(value) == (code, field)


def test_the_fast_json_reader_reads_exactly_what_the_json_module_reads() -> None:
    """decode_external reads most records with msgspec; whatever that path accepts must be the
    very dict (values, their types, key order) the json module gives, and a repeated key must
    never get through it (msgspec would keep the last value silently)."""
    from services.shared.codecs import _JSON_DECODER, _plain_json_object

    values = [
        '"tx-1"',
        '"üser ✓"',
        '"a\\"b"',
        '"\\u00e9"',
        '"\\ud800"',
        '"tab\there"',
        '""',
        "1",
        "-0",
        "0.1",
        "45.26",
        "1e2",
        "1E-7",
        "-3.5e+3",
        "1e400",
        "123456789012345678901234",
        "true",
        "false",
        "null",
        "NaN",
        "Infinity",
        "[]",
        '[1, "a"]',
        '{"x": 1}',
        '{"x": "y"}',
        "01",
        "1.",
        ".5",
        "+1",
        "'a'",
        '"\x01"',
    ]
    keys = ["transaction_id", "amount", "a", "ü", "amount"]
    rng = random.Random(5)
    accepted = 0
    for _ in range(4000):
        pairs = [(rng.choice(keys), rng.choice(values)) for _ in range(rng.randint(0, 5))]
        space = rng.choice(["", " ", "\n\t "])
        text = "{" + space + ("," + space).join(f'"{k}":{space}{v}' for k, v in pairs) + "}"
        if rng.random() < 0.1:
            text = text[: rng.randrange(len(text) + 1)]  # truncated
        raw = text.encode("utf-8", "surrogatepass")
        if rng.random() < 0.05:
            raw += b"\xff"
        fast = _plain_json_object(raw)
        if fast is None:
            continue
        accepted += 1
        reference = _JSON_DECODER.decode(raw.decode("utf-8"))  # raises if it is not JSON
        assert list(fast.items()) == list(reference.items()), raw
        assert [type(v) for v in fast.values()] == [type(v) for v in reference.values()], raw
        assert len({k for k, _ in pairs}) == len(pairs), raw  # no repeated key got through
    assert accepted > 400  # the fast path does take the common case
    for repeated in (b'{"a":1,"a":1}', b'{"a":"x","a":2}', b'{"a":{"b":1,"b":2}}'):
        assert _plain_json_object(repeated) is None
        assert _decode_error(repeated)[0] == "duplicate_field"


def test_unknown_content_types_are_refused() -> None:
    assert _decode_error(b"{}", [(CONTENT_TYPE, b"application/avro")]) == (
        "unsupported_content_type",
        "",
    )
    assert _decode_error(b"{}", [(CONTENT_TYPE, b"\xff\xfe")])[0] == "unsupported_content_type"


def test_protobuf_records_are_decoded_field_by_field() -> None:
    message = events_pb2.Transaction(**{**VALID, "amount": float("nan")})
    data = decode_external(message.SerializeToString(), PB_HEADERS, events_pb2.Transaction)
    assert data["transaction_id"] == "tx-1"
    assert data["amount"] != data["amount"]  # NaN stays a float: the amount rule reports it
    assert _rejection(data) == ("invalid_value", "amount")
    label = events_pb2.Label(
        transaction_id="tx-1", is_fraud=True, event_time="2025-06-01T11:00:00Z"
    )
    decoded = decode_external(label.SerializeToString(), PB_HEADERS, events_pb2.Label)
    assert validate_label(decoded, now=NOW).is_fraud is True


def test_missing_protobuf_fields_read_as_empty_and_are_rejected() -> None:
    message = events_pb2.Transaction(**_with(VALID, merchant_id=""))
    data = decode_external(message.SerializeToString(), PB_HEADERS, events_pb2.Transaction)
    assert _rejection(data) == ("missing_field", "merchant_id")


@pytest.mark.parametrize(
    "value",
    [
        b"not a protobuf",
        b"\x0a\xff\xff\xff\xff\x0f",  # a length beyond the buffer
        b"\x0a\x02\xff\xfe",  # a string field that is not UTF-8
        json.dumps(VALID).encode(),  # JSON sent with the protobuf content type
    ],
)
def test_garbled_protobuf_is_malformed(value: bytes) -> None:
    assert _decode_error(value, PB_HEADERS)[0] == "malformed_protobuf"


def test_unknown_protobuf_fields_are_refused() -> None:
    known = events_pb2.Transaction(**VALID).SerializeToString()
    extra = known + b"\xa0\x06\x01"  # field 100, varint 1
    assert _decode_error(extra, PB_HEADERS) == ("unknown_field", "#100")


def test_helpers() -> None:
    assert header([("Content-Type", b"a/b")], "content-type") == "a/b"
    assert header(None, "x") is None
    names = dict(protobuf_headers(events_pb2.DeadLetter()))
    assert names[MESSAGE_TYPE] == b"mlops.v1.DeadLetter"
    assert encode_json({"a": 1.5, "b": "é"}) == '{"a":1.5,"b":"é"}'.encode()
    with pytest.raises(ValueError, match="finite"):
        encode_json({"a": float("nan")})


def test_validator_clock_defines_the_future() -> None:
    later = NOW + timedelta(hours=1)
    data = _with(VALID, event_time="2025-06-01T12:30:00Z")
    assert _rejection(data) == ("event_in_future", "event_time")
    assert validate_transaction(data, now=later).transaction_id == "tx-1"


# ---------------------------------------------------------- the fast path agrees with the rules

_CANDIDATES: dict[str, list[Any]] = {
    "transaction_id": [
        "tx-1",
        "t" * 64,
        "t" * 65,
        "",
        "ü-1",
        "tx\u00a0",
        "tx\t1",
        5,
        None,
        "tx-\ud800",
    ],
    "user_id": ["user-1", "u", "u" * 65, "", None, 3.5, "用户"],
    "merchant_id": ["merchant-1", "m\x7f", "", ["m"], "m" * 64],
    "amount": [
        12.5,
        1,
        0,
        -1,
        0.0,
        1e-9,
        MAX_AMOUNT,
        MAX_AMOUNT + 1,
        10**7,
        True,
        "1",
        float("nan"),
        float("inf"),
        None,
    ],
    "currency": ["EUR", "USD", "eur", "EURO", "", 978, None, ["EUR"]],
    "channel": ["web", "pos", "app", "WEB", "atm", 1, None, ["web"]],
    "country": ["DE", "US", "de", "ZZ", "DEU", None, {"c": 1}],
    "event_time": [
        "2025-06-01T11:59:00Z",
        "2025-06-01t11:59:00z",
        "2025-06-01T12:05:00Z",
        "2025-06-01T12:05:00.000001Z",
        "2025-06-01T13:59:00.123456789+02:00",
        "2025-06-01T11:59:00",
        "2025-02-30T00:00:00Z",
        "\u0662\u0660\u0662\u0665-06-01T11:59:00Z",  # Arabic-Indic digits
        "",
        None,
        1717243140,
    ],
}


def test_the_fast_path_never_accepts_what_the_rules_refuse() -> None:
    from services.shared.usecase.schemas import (
        _fast_label,
        _fast_transaction,
        _label_rules,
        _transaction_rules,
    )

    rng = random.Random(1)
    fast_accepted = 0
    for _ in range(5000):
        data = dict(VALID)
        for name in rng.sample(sorted(_CANDIDATES), k=rng.randint(0, 3)):
            data[name] = rng.choice(_CANDIDATES[name])
        if rng.random() < 0.05:
            data.pop(rng.choice(sorted(data)))
        if rng.random() < 0.05:
            data["extra"] = 1
        fast = _fast_transaction(data, NOW)
        try:
            ruled = _transaction_rules(data, NOW)
        except InvalidArgument:
            assert fast is None, data
            continue
        assert fast is None or fast == ruled, data
        fast_accepted += fast is not None
    assert fast_accepted > 500  # the fast path does take the common case
    for flag in (True, False, 1, "true", None):
        for time_value in _CANDIDATES["event_time"]:
            label = {**LABEL, "is_fraud": flag, "event_time": time_value}
            fast_label = _fast_label(label, NOW)
            try:
                assert fast_label is None or fast_label == _label_rules(label, NOW)
            except InvalidArgument:
                assert fast_label is None, label
