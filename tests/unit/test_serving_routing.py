"""Routing: the table from the registry's served list, canary share and stickiness, shadow."""

from __future__ import annotations

import uuid

import pytest

from services.serving.routing import (
    BUCKETS,
    CanaryRouter,
    RoutingTable,
    ServedModel,
    user_bucket,
)
from services.shared.errors import Unavailable
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2

USERS = [f"user-{uuid.UUID(int=i).hex[:12]}-{i}" for i in range(20_000)]


def served(*entries: tuple[int, str, int, float]) -> list[models_pb2.ServedVersion]:
    return [
        models_pb2.ServedVersion(version=v, alias=a, traffic_percent=p, threshold=t)
        for v, a, p, t in entries
    ]


def table(canary: int = 0, shadow: int | None = None) -> RoutingTable:
    entries = [(1, "production", 100, 0.5)]
    if canary:
        entries.append((2, "canary", canary, 0.4))
    if shadow is not None:
        entries.append((3, "shadow", shadow, 0.6))
    return RoutingTable.from_served(served(*entries))


def test_the_table_reads_every_alias_with_its_threshold() -> None:
    routing = RoutingTable.from_served(
        served((4, "production", 90, 0.5), (5, "Canary", 10, 0.45), (6, "shadow", 0, 0.7))
    )
    assert routing.production == ServedModel(4, "production", 90, 0.5)
    assert routing.canary == ServedModel(5, "canary", 10, 0.45)
    assert routing.shadow == ServedModel(6, "shadow", 0, 0.7)
    assert routing.versions() == {4, 5, 6}
    assert [m.version for m in routing.answering()] == [4, 5]
    assert routing.production.route == monitoring_pb2.ROUTE_PRODUCTION
    assert routing.canary is not None and routing.canary.route == monitoring_pb2.ROUTE_CANARY


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([(2, "canary", 10, 0.5)], "no production"),
        ([(1, "production", 100, 0.5), (1, "production", 100, 0.5)], "twice"),
        ([(1, "production", 100, 0.5), (2, "beta", 10, 0.5)], "unknown alias"),
        ([(0, "production", 100, 0.5)], "version 0"),
        ([(1, "production", 100, 0.5), (2, "canary", 120, 0.5)], "traffic_percent 120"),
    ],
)
def test_a_broken_table_is_refused(entries: list[tuple[int, str, int, float]], reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        RoutingTable.from_served(served(*entries))


def test_decisions_use_the_versions_threshold() -> None:
    model = ServedModel(1, "production", 100, 0.5)
    assert model.declines(0.5)
    assert model.declines(0.93)
    assert not model.declines(0.4999)


def test_buckets_are_stable_and_spread() -> None:
    assert user_bucket("alice") == user_bucket("alice")
    buckets = [user_bucket(u) for u in USERS]
    assert all(0 <= b < BUCKETS for b in buckets)
    # ten equal ranges each hold about a tenth of the users
    counts = [0] * 10
    for bucket in buckets:
        counts[bucket * 10 // BUCKETS] += 1
    assert all(abs(c - len(USERS) / 10) < len(USERS) * 0.01 for c in counts)


def test_production_takes_everything_without_a_canary() -> None:
    router = CanaryRouter(table())
    decisions = [router.route(u) for u in USERS[:1000]]
    assert {d.primary.version for d in decisions} == {1}
    assert all(d.shadow is None for d in decisions)


@pytest.mark.parametrize("share", [1, 5, 20, 50, 90])
def test_the_canary_gets_its_share(share: int) -> None:
    router = CanaryRouter(table(canary=share))
    on_canary = sum(router.route(u).primary.version == 2 for u in USERS)
    assert abs(on_canary / len(USERS) - share / 100) < 0.01


def test_canary_users_are_sticky_and_stay_when_the_share_grows() -> None:
    router = CanaryRouter(table(canary=10))
    first = {u: router.route(u).primary.version for u in USERS}
    assert {u: router.route(u).primary.version for u in USERS} == first
    router.update(table(canary=30))
    grown = {u: router.route(u).primary.version for u in USERS}
    assert all(grown[u] == 2 for u, v in first.items() if v == 2)
    router.update(table(canary=100))
    assert all(router.route(u).primary.version == 2 for u in USERS[:500])


def test_the_shadow_mirrors_its_share_independently_of_the_canary() -> None:
    router = CanaryRouter(table(canary=20, shadow=0))
    assert all(router.route(u).shadow is not None for u in USERS[:500])  # 0: mirror all
    router.update(table(canary=20, shadow=30))
    decisions = {u: router.route(u) for u in USERS}
    mirrored = [u for u, d in decisions.items() if d.shadow is not None]
    assert abs(len(mirrored) / len(USERS) - 0.3) < 0.01
    canary_among_mirrored = sum(decisions[u].primary.version == 2 for u in mirrored)
    assert abs(canary_among_mirrored / len(mirrored) - 0.2) < 0.02  # not the same users


def test_without_a_table_nothing_is_routable() -> None:
    with pytest.raises(Unavailable, match="no model version is routable"):
        CanaryRouter().route("alice")


def test_the_table_reads_roles_and_events_written_before_them() -> None:
    by_role = RoutingTable.from_served(
        [
            models_pb2.ServedVersion(
                version=1, role=models_pb2.MODEL_ALIAS_PRODUCTION, traffic_percent=80
            ),
            models_pb2.ServedVersion(
                version=2, role=models_pb2.MODEL_ALIAS_CANARY, traffic_percent=20
            ),
        ]
    )
    by_name = RoutingTable.from_served(served((1, "production", 80, 0.0), (2, "canary", 20, 0.0)))
    assert by_role == by_name
    assert by_role.canary is not None and by_role.canary.alias == "canary"
    with pytest.raises(ValueError, match="unknown role"):
        RoutingTable.from_served([models_pb2.ServedVersion(version=1, role=7)])  # type: ignore[arg-type]
