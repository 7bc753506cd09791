"""Applying models.lifecycle events to the router (no broker: records are fed directly)."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import REGISTRY

from services.serving.routing import CanaryRouter, RoutingTable, ServedModel
from services.serving.routing_source import RoutingFollower, apply_table
from services.shared.proto.mlops.v1 import models_pb2
from services.shared.settings import KafkaSettings, RegistryClientSettings

MODEL = "fraud_unit"


def follower() -> RoutingFollower:
    return RoutingFollower(
        CanaryRouter(),
        registry=RegistryClientSettings(address="127.0.0.1:1", model_name=MODEL),
        kafka=KafkaSettings(bootstrap="127.0.0.1:1"),
        lifecycle_topic="models.lifecycle",
    )


def event(
    served: list[tuple[int, str, int, float]],
    *,
    seconds: int = 1_800_000_000,
    model: str = MODEL,
    kind: int = models_pb2.MODEL_EVENT_TYPE_PROMOTED,
) -> bytes:
    return models_pb2.ModelEvent(
        event_id=f"e-{seconds}",
        type=kind,  # type: ignore[arg-type]
        model_name=model,
        occurred_at=Timestamp(seconds=seconds),
        served=[
            models_pb2.ServedVersion(version=v, alias=a, traffic_percent=p, threshold=t)
            for v, a, p, t in served
        ],
    ).SerializeToString()


def test_an_event_replaces_the_whole_table() -> None:
    routing = follower()
    assert routing.apply_event(event([(1, "production", 100, 0.5), (2, "canary", 10, 0.4)]))
    assert routing.router.table == RoutingTable(
        production=ServedModel(1, "production", 100, 0.5),
        canary=ServedModel(2, "canary", 10, 0.4),
    )
    assert routing.apply_event(event([(2, "production", 100, 0.4)], seconds=1_800_000_001))
    assert routing.router.table == RoutingTable(production=ServedModel(2, "production", 100, 0.4))


def test_events_that_do_not_route_leave_the_table_alone() -> None:
    routing = follower()
    routing.apply_event(event([(1, "production", 100, 0.5)]))
    table = routing.router.table
    assert not routing.apply_event(event([], kind=models_pb2.MODEL_EVENT_TYPE_REGISTERED))
    assert not routing.apply_event(event([(9, "production", 100, 0.5)], model="other_model"))
    assert not routing.apply_event(event([(2, "canary", 10, 0.5)]))  # no production: broken
    assert not routing.apply_event(b"\xff\xff not a protobuf")
    assert not routing.apply_event(None)
    assert routing.router.table == table


def test_an_older_event_never_rolls_the_table_back() -> None:
    routing = follower()
    routing.apply_event(event([(3, "production", 100, 0.5)], seconds=1_800_000_100))
    assert not routing.apply_event(event([(2, "production", 100, 0.5)], seconds=1_800_000_050))
    assert routing.router.table is not None
    assert routing.router.table.production.version == 3


def test_the_table_is_exported_as_metrics_with_the_registrys_shares() -> None:
    router = CanaryRouter()
    apply_table(
        router,
        RoutingTable(  # the registry computed production's share: serving applies it as given
            production=ServedModel(11, "production", 75, 0.5),
            canary=ServedModel(12, "canary", 25, 0.5),
        ),
        "test",
    )
    sample = REGISTRY.get_sample_value
    assert (
        sample(
            "mlops_serving_route_traffic_percent", {"model_version": "11", "alias": "production"}
        )
        == 75
    )
    assert (
        sample("mlops_serving_route_traffic_percent", {"model_version": "12", "alias": "canary"})
        == 25
    )
    apply_table(router, RoutingTable(production=ServedModel(12, "production", 100, 0.5)), "test")
    assert (
        sample(
            "mlops_serving_route_traffic_percent", {"model_version": "11", "alias": "production"}
        )
        is None
    )
    assert (
        sample(
            "mlops_serving_route_traffic_percent", {"model_version": "12", "alias": "production"}
        )
        == 100
    )
