"""The routing table: which versions Triton serves, under which alias, with what traffic share.

Derived from the MLflow aliases and each served version's tags, nothing else, so the registry,
its ModelEvents and serving agree on one definition:

- ``production``: traffic_percent = 100 minus the canary's share (100 without a canary);
- ``canary``: its own share (1-100) of live traffic, answered by the canary;
- ``shadow``: the share of traffic mirrored to it (its answers are logged, never returned).

Every served entry carries the version's decision threshold on ``fraud_probability``.
"""

from __future__ import annotations

from collections.abc import Mapping

from services.registry.mlflow_store import TAG_THRESHOLD, TAG_TRAFFIC
from services.shared.proto.mlops.v1 import models_pb2

PRODUCTION = "production"
CANARY = "canary"
SHADOW = "shadow"
ALIASES = (PRODUCTION, CANARY, SHADOW)


def _int(tags: Mapping[str, str], key: str, default: int) -> int:
    try:
        return int(tags.get(key, default))
    except ValueError:
        return default


def routing_table(
    aliases: Mapping[str, int], tags: Mapping[int, Mapping[str, str]]
) -> list[models_pb2.ServedVersion]:
    """The complete routing table for ``aliases`` (alias -> version), production first."""
    table: list[models_pb2.ServedVersion] = []
    canary_share = 0
    if CANARY in aliases:
        canary_share = min(100, max(1, _int(tags.get(aliases[CANARY], {}), TAG_TRAFFIC, 10)))
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
            share = min(100, max(1, _int(version_tags, TAG_TRAFFIC, 100)))
        table.append(
            models_pb2.ServedVersion(
                version=version,
                alias=alias,
                traffic_percent=share,
                threshold=float(version_tags.get(TAG_THRESHOLD, "0.5")),
            )
        )
    return table
