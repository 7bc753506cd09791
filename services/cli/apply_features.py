"""Register the Feast feature definitions: the one writer of Feast's registry.

Feast's file registry has no locking, so services never apply; this runs once before they
start: the local stack calls ``apply_if_changed`` from ``mlops stack up``, compose runs
``python -m services.cli.apply_features`` as a one-shot job. Skipped when the definitions
(and the project) are unchanged since the last apply, because importing Feast and applying
take seconds.
"""

from __future__ import annotations

import sys

from services.shared.settings import FeastSettings, RedisSettings, StorageSettings


def apply_if_changed(feast: FeastSettings, redis: RedisSettings, storage: StorageSettings) -> bool:
    """Apply the definitions over ``storage``'s offline store; returns whether it applied."""
    from services.shared.featurestore import apply_definitions, definitions_sha256, open_store

    stamp = storage.feast_registry_path.with_name("applied.sha256")
    fingerprint = f"{feast.project} {definitions_sha256(feast)}"
    applied = storage.feast_registry_path.exists() and stamp.exists()
    if applied and stamp.read_text().strip() == fingerprint:
        return False
    store = open_store(feast, redis, storage)
    apply_definitions(store, feast, storage.offline_dir)
    stamp.write_text(fingerprint + "\n")
    return True


def main() -> int:
    feast, storage = FeastSettings(), StorageSettings()
    applied = apply_if_changed(feast, RedisSettings(), storage)
    state = "applied" if applied else "unchanged"
    print(f"Feast definitions {state}: project {feast.project}, {storage.feast_registry_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
