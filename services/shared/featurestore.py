"""Opening the Feast feature store from the platform's settings.

Every service builds its ``FeatureStore`` here, from typed settings, instead of reading
feature_repo/feature_store.yaml: addresses and paths then come from one place, and tests point
the store at their own Redis and directories. ``apply_definitions`` registers the use case's
definitions (feature_repo/fraud_features.py) over a given offline directory; only one process
applies at a time (Feast's file registry has no locking).
"""

from __future__ import annotations

import hashlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

from services.shared.settings import FeastSettings, RedisSettings, StorageSettings

if TYPE_CHECKING:
    from feast import FeatureStore

ONLINE_STORE_TYPE = "services.shared.feast_online.EventTimeRedisOnlineStore"
_DEFINITIONS_MODULE = "fraud_features"


def repo_config_dict(
    feast: FeastSettings, redis: RedisSettings, registry_path: Path
) -> dict[str, object]:
    return {
        "project": feast.project,
        "provider": "local",
        "registry": str(registry_path),
        "online_store": {
            "type": ONLINE_STORE_TYPE,
            "connection_string": redis.connection_string,
            "redis_type": "redis_cluster" if redis.cluster else "redis",
        },
        "offline_store": {"type": "duckdb"},
        "entity_key_serialization_version": 3,
        "repo_path": str(feast.repo_path),
    }


def open_store(
    feast: FeastSettings,
    redis: RedisSettings,
    storage: StorageSettings,
    *,
    registry_path: Path | None = None,
) -> FeatureStore:
    from feast import FeatureStore
    from feast.repo_config import RepoConfig

    path = registry_path or storage.feast_registry_path
    path.parent.mkdir(parents=True, exist_ok=True)
    config = RepoConfig(**repo_config_dict(feast, redis, path))
    return FeatureStore(config=config)


def load_definitions_module(feast: FeastSettings) -> ModuleType:
    """Import feature_repo/fraud_features.py (it is not a package of ours)."""
    path = feast.repo_path / f"{_DEFINITIONS_MODULE}.py"
    name = f"mlops_feature_repo.{_DEFINITIONS_MODULE}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load feature definitions from {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def apply_definitions(store: FeatureStore, feast: FeastSettings, offline_dir: Path) -> None:
    """Register the feature definitions, reading offline data under ``offline_dir``."""
    definitions = load_definitions_module(feast).build(offline_dir, feast.feature_service)
    store.apply(definitions.objects())


def definitions_sha256(feast: FeastSettings) -> str:
    """A content hash of the feature definitions (the version lineage records)."""
    digest = hashlib.sha256()
    for path in sorted(feast.repo_path.glob("*")):
        if path.is_file() and path.suffix in {".py", ".yaml"}:
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()
