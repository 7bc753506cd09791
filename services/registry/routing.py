"""The routing table: which versions Triton serves, under which alias, with what traffic share.

The one place the routing rules are written. Derived from the MLflow aliases and each served
version's tags, nothing else; the registry hands the result to everyone (``GetRoutingTable``,
and the ``served`` list of every ``models.lifecycle`` event), so no consumer recomputes it:

- ``production``: traffic_percent = 100 minus the canary's share (100 without a canary);
- ``canary``: its own share (1-100) of live traffic, answered by the canary;
- ``shadow``: the share of traffic mirrored to it (its answers are logged, never returned).

Every route carries the version's decision threshold on ``fraud_probability``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.registry.mlflow_store import TAG_THRESHOLD, TAG_TRAFFIC
from services.shared.model_aliases import ALIASES, CANARY, PRODUCTION, SHADOW

DEFAULT_CANARY_SHARE = 10  # a canary tagged without a share (older versions)
DEFAULT_SHADOW_SHARE = 100


@dataclass(frozen=True)
class Route:
    """One version Triton serves and how traffic reaches it."""

    version: int
    alias: str
    traffic_percent: int
    threshold: float

    @property
    def shadow(self) -> bool:
        """Mirrored: its answers are logged, never returned to callers."""
        return self.alias == SHADOW


def _int(tags: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(tags.get(key, default))
    except ValueError:
        return default


def _share(tags: Mapping[str, str], default: int) -> int:
    return min(100, max(1, _int(tags, TAG_TRAFFIC, default)))


def routing_table(aliases: Mapping[str, int], tags: Mapping[int, Mapping[str, str]]) -> list[Route]:
    """The complete routing table for ``aliases`` (alias -> version), production first."""
    table: list[Route] = []
    canary_share = 0
    if CANARY in aliases:
        canary_share = _share(tags.get(aliases[CANARY], {}), DEFAULT_CANARY_SHARE)
    for alias in ALIASES:
        if alias not in aliases:
            continue
        version = aliases[alias]
        version_tags = tags.get(version, {})
        if alias == PRODUCTION:
            share = 100 - canary_share
        elif alias == CANARY:
            share = canary_share
        else:
            share = _share(version_tags, DEFAULT_SHADOW_SHARE)
        threshold = float(version_tags.get(TAG_THRESHOLD, "0.5"))
        table.append(Route(version, alias, share, threshold))
    return table
