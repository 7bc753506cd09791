"""The aliases a model version can hold: one definition, the proto enum ``ModelAlias``.

Their names (``production``, ``canary``, ``shadow``) are derived from the enum here and
nowhere else: they are the MLflow aliases the registry keeps, the ``alias`` string of
``ServedVersion`` (what lifecycle events written before ``ModelAlias`` carry), metric labels and
what an operator types in ``mlops models``. What the aliases *mean* for traffic (production takes
what the canary leaves, a shadow is mirrored) is the registry's routing table
(``services/registry/routing.py``), served to everyone by ``GetRoutingTable`` and in every
lifecycle event; no consumer recomputes it.
"""

from __future__ import annotations

from services.shared.errors import InvalidArgument
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2

ModelAlias = models_pb2.ModelAlias
_PREFIX = "MODEL_ALIAS_"


def alias_name(role: models_pb2.ModelAlias.ValueType) -> str:
    """``MODEL_ALIAS_CANARY`` -> ``canary``."""
    return ModelAlias.Name(role).removeprefix(_PREFIX).lower()


ROLES: tuple[models_pb2.ModelAlias.ValueType, ...] = (
    models_pb2.MODEL_ALIAS_PRODUCTION,
    models_pb2.MODEL_ALIAS_CANARY,
    models_pb2.MODEL_ALIAS_SHADOW,
)  # the order of a routing table
PRODUCTION, CANARY, SHADOW = (alias_name(role) for role in ROLES)
ALIASES: tuple[str, ...] = (PRODUCTION, CANARY, SHADOW)


# the route a prediction took (monitoring's Route: production, canary, shadow, unspecified) by
# name; for the three routes, the alias of the version that answered
ROUTE_NAMES: dict[int, str] = {
    value.number: value.name.removeprefix("ROUTE_").lower()
    for value in monitoring_pb2.Route.DESCRIPTOR.values
}


def alias_role(name: str, field: str = "alias") -> models_pb2.ModelAlias.ValueType:
    """``canary`` -> ``MODEL_ALIAS_CANARY``; ``InvalidArgument`` naming ``field`` otherwise."""
    if name.lower() not in ALIASES:
        raise InvalidArgument(field, f"must be one of {', '.join(ALIASES)}, not {name[:40]!r}")
    return ModelAlias.Value(_PREFIX + name.upper())


def checked_role(role: int, field: str = "alias") -> str:
    """The name of an enum value a caller sent; ``InvalidArgument`` naming ``field`` when it is
    unset or unknown."""
    if role not in ROLES:
        raise InvalidArgument(field, f"must be one of {', '.join(ALIASES)} (got {role})")
    return alias_name(models_pb2.ModelAlias.ValueType(role))


def served_alias(entry: models_pb2.ServedVersion) -> str:
    """The alias a routing-table entry names: its ``role``, or for an event written before
    roles existed its ``alias`` string. ``ValueError`` when it names none."""
    if entry.role != models_pb2.MODEL_ALIAS_UNSPECIFIED:
        if entry.role not in ROLES:
            raise ValueError(f"unknown role {entry.role} for version {entry.version}")
        return alias_name(entry.role)
    name = entry.alias.lower()
    if name not in ALIASES:
        raise ValueError(f"unknown alias {entry.alias!r} for version {entry.version}")
    return name
