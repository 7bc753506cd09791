"""The aliases: one enum, names derived from it, and what callers may send."""

from __future__ import annotations

import pytest

from services.shared.errors import InvalidArgument
from services.shared.model_aliases import (
    ALIASES,
    alias_name,
    alias_role,
    checked_role,
    served_alias,
)
from services.shared.proto.mlops.v1 import models_pb2


def test_the_names_are_the_enum_values_in_routing_order() -> None:
    assert ALIASES == ("production", "canary", "shadow")
    for name in ALIASES:
        assert alias_name(alias_role(name)) == name
    assert alias_role("CANARY") == models_pb2.MODEL_ALIAS_CANARY


def test_route_numbers_match_monitorings_route() -> None:
    from services.shared.proto.mlops.v1 import monitoring_pb2

    for name in ALIASES:
        assert alias_role(name) == monitoring_pb2.Route.Value(f"ROUTE_{name.upper()}")


@pytest.mark.parametrize("bad", ["", "beta", "x" * 1000])
def test_an_unknown_name_is_an_invalid_argument_naming_the_field(bad: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        alias_role(bad, field="to")
    assert caught.value.field == "to" and len(caught.value.message) < 200


@pytest.mark.parametrize("bad", [models_pb2.MODEL_ALIAS_UNSPECIFIED, 99, -1])
def test_an_unset_or_unknown_enum_value_is_an_invalid_argument(bad: int) -> None:
    with pytest.raises(InvalidArgument) as caught:
        checked_role(bad)
    assert caught.value.field == "alias"


def test_a_served_entry_is_read_by_role_first_then_by_name() -> None:
    both = models_pb2.ServedVersion(version=1, alias="canary", role=models_pb2.MODEL_ALIAS_SHADOW)
    assert served_alias(both) == "shadow"
    assert served_alias(models_pb2.ServedVersion(version=1, alias="Production")) == "production"
    with pytest.raises(ValueError, match="unknown alias"):
        served_alias(models_pb2.ServedVersion(version=1))


def test_route_names_are_the_aliases_and_unspecified() -> None:
    from services.shared.model_aliases import ROUTE_NAMES

    assert sorted(ROUTE_NAMES.values()) == sorted([*ALIASES, "unspecified"])
    assert all(ROUTE_NAMES[alias_role(name)] == name for name in ALIASES)
