"""Which model version answers a request: production, a sticky canary share, a shadow mirror.

The routing table is the registry's, applied as given (shares included): the ``served`` list of
every ``models.lifecycle`` event, or at start-up the registry's ``GetRoutingTable``.
``CanaryRouter`` maps a user to a version with a
stable hash of the user id, so a user stays on the canary (or off it) for as long as the
canary's share does not change, and raising the share only adds users to it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import mmh3

from services.shared.errors import Unavailable
from services.shared.model_aliases import CANARY, PRODUCTION, SHADOW, served_alias
from services.shared.proto.mlops.v1 import models_pb2, monitoring_pb2

BUCKETS = 10_000  # traffic shares have a resolution of 0.01 %
_CANARY_SEED = 0x5EED_0001
_SHADOW_SEED = 0x5EED_0002


@dataclass(frozen=True, slots=True)
class ServedModel:
    """A version Triton serves and how traffic reaches it."""

    version: int
    alias: str
    traffic_percent: int
    threshold: float

    @property
    def route(self) -> int:
        return _ROUTES[self.alias]

    def declines(self, fraud_probability: float) -> bool:
        return fraud_probability >= self.threshold


_ROUTES = {
    PRODUCTION: monitoring_pb2.ROUTE_PRODUCTION,
    CANARY: monitoring_pb2.ROUTE_CANARY,
    SHADOW: monitoring_pb2.ROUTE_SHADOW,
}


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Production always; a canary and a shadow when the registry has set them."""

    production: ServedModel
    canary: ServedModel | None = None
    shadow: ServedModel | None = None

    @classmethod
    def from_served(cls, served: Iterable[models_pb2.ServedVersion]) -> RoutingTable:
        """The registry's table (a lifecycle event's ``served``, or ``GetRoutingTable``);
        ``ValueError`` when it has no production version."""
        by_alias: dict[str, ServedModel] = {}
        for entry in served:
            alias = served_alias(entry)
            if alias in by_alias:
                raise ValueError(f"alias {alias} appears twice in the routing table")
            if entry.version <= 0:
                raise ValueError(f"alias {alias} names version {entry.version}")
            if not 0 <= entry.traffic_percent <= 100:
                raise ValueError(f"alias {alias} has traffic_percent {entry.traffic_percent}")
            by_alias[alias] = ServedModel(
                version=int(entry.version),
                alias=alias,
                traffic_percent=int(entry.traffic_percent),
                threshold=float(entry.threshold),
            )
        if PRODUCTION not in by_alias:
            raise ValueError("the routing table has no production version")
        return cls(
            production=by_alias[PRODUCTION],
            canary=by_alias.get(CANARY),
            shadow=by_alias.get(SHADOW),
        )

    def entries(self) -> list[ServedModel]:
        return [m for m in (self.production, self.canary, self.shadow) if m is not None]

    def versions(self) -> set[int]:
        return {m.version for m in self.entries()}

    def answering(self) -> list[ServedModel]:
        """The versions whose answers reach callers (health depends on them)."""
        return [m for m in (self.production, self.canary) if m is not None]

    def describe(self) -> str:
        return ",".join(f"{m.alias}=v{m.version}@{m.traffic_percent}%" for m in self.entries())


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Who answers a request, and which version (if any) gets a mirrored copy."""

    primary: ServedModel
    shadow: ServedModel | None


def user_bucket(user_id: str, seed: int = _CANARY_SEED) -> int:
    """A stable bucket in [0, BUCKETS) for a user (murmur3: same on every replica and run)."""
    return int(mmh3.hash(user_id, seed, signed=False)) % BUCKETS


class CanaryRouter:
    """Routes users over the current table; swapped atomically when the registry moves."""

    def __init__(self, table: RoutingTable | None = None) -> None:
        self._table = table
        self._waiters: list[asyncio.Future[None]] = []
        self._listeners: list[Callable[[RoutingTable | None, RoutingTable], None]] = []

    def on_update(self, listener: Callable[[RoutingTable | None, RoutingTable], None]) -> None:
        """Call ``listener(previous, table)`` after every table swap (on the swapper's thread)."""
        self._listeners.append(listener)

    @property
    def table(self) -> RoutingTable | None:
        return self._table

    def update(self, table: RoutingTable) -> None:
        previous, self._table = self._table, table
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        for listener in self._listeners:
            listener(previous, table)

    async def changed(self, since: RoutingTable | None, timeout_s: float) -> bool:
        """Wait (up to ``timeout_s``) until the table is no longer ``since``."""
        if self._table is not since:
            return True
        if timeout_s <= 0:
            return False
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            return False
        return self._table is not since

    def route(self, user_id: str) -> RouteDecision:
        table = self._table
        if table is None:
            raise Unavailable("no model version is routable yet")
        return self.route_with(table, user_id)

    @staticmethod
    def route_with(table: RoutingTable, user_id: str) -> RouteDecision:
        primary = table.production
        canary = table.canary
        # users in the lowest buckets take the canary: a bigger share keeps them there
        if canary is not None and user_bucket(user_id) < canary.traffic_percent * (BUCKETS // 100):
            primary = canary
        shadow = table.shadow
        if shadow is not None:
            # a shadow without a share mirrors everything; an independent hash, so the
            # mirrored users are not just the canary's
            share = shadow.traffic_percent or 100
            if user_bucket(user_id, _SHADOW_SEED) >= share * (BUCKETS // 100):
                shadow = None
        return RouteDecision(primary=primary, shadow=shadow)
