"""Zero-gap version switches: the order of Triton, MLflow, events and unloads (no network).

The registry's own collaborators are replaced by recording fakes that write into one journal:
the MLflow store (aliases, tags), the Triton repository (config, load, unload) and the
lifecycle sink (published events). The domain (``ModelRegistryService``) and the coordinator
(lock, outbox, retirement task) are the real ones.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import SecretStr

from services.registry.coordinator import RegistryCoordinator
from services.registry.mlflow_store import VersionView
from services.registry.outbox import LifecycleOutbox
from services.registry.service import ModelRegistryService
from services.registry.settings import RegistrySettings
from services.registry.triton_repository import sha256_hex
from services.shared.errors import NotFound, Unavailable
from services.shared.mlflow_client import RunView
from services.shared.proto.mlops.v1 import models_pb2

EventType = models_pb2.ModelEventType
MODEL = "fraud_test"
FEATURES = json.dumps(["a", "b", "c"])


def payload(version: int) -> bytes:
    return f"torchscript of v{version}".encode()


class Journal(list[tuple[Any, ...]]):
    def index_of(self, entry: tuple[Any, ...]) -> int:
        return self.index(entry)


class FakeStore:
    """MLflow's model registry as the service uses it: versions, tags, aliases, history."""

    def __init__(self, journal: Journal, versions: Sequence[int]) -> None:
        self.journal = journal
        self.tags: dict[int, dict[str, str]] = {
            v: {
                "sha256": sha256_hex(payload(v)),
                "stage": "CANDIDATE",
                "threshold": "0.5",
                "feature_names": FEATURES,
            }
            for v in versions
        }
        self._aliases: dict[str, int] = {}
        self.history: list[int] = []

    def aliases(self, name: str) -> dict[str, int]:
        return dict(self._aliases)

    def version(self, name: str, version: int) -> VersionView:
        if version not in self.tags:
            raise NotFound(f"no v{version}")
        return VersionView(
            version=version,
            run_id=f"run-{version}",
            source="",
            tags=dict(self.tags[version]),
            aliases=tuple(sorted(a for a, v in self._aliases.items() if v == version)),
            created_at=datetime(2026, 3, 1, tzinfo=UTC),
            description="",
        )

    def versions(self, name: str) -> list[VersionView]:
        return [self.version(name, v) for v in sorted(self.tags)]

    def run(self, run_id: str) -> RunView:
        raise NotFound(run_id)

    def download(self, run_id: str, artifact_path: str) -> bytes:
        return payload(int(run_id.removeprefix("run-")))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self.journal.append(("mlflow.alias", alias, version))
        self._aliases[alias] = version

    def delete_alias(self, name: str, alias: str) -> None:
        self.journal.append(("mlflow.alias", alias, None))
        del self._aliases[alias]

    def set_version_tags(self, name: str, version: int, tags: dict[str, str]) -> None:
        self.tags[version].update(tags)

    def production_history(self, name: str) -> list[int]:
        return list(self.history)

    def set_production_history(self, name: str, history: list[int]) -> None:
        self.history = list(history)


class FakeTriton:
    """Triton's repository and model control: load serves exactly the configured versions."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.files: set[int] = set()
        self.config: list[int] = []
        self.ready: list[int] = []
        self.refuse_loads = False

    def write_version(self, version: int, torchscript: bytes, sha256: str) -> None:
        assert sha256_hex(torchscript) == sha256
        self.journal.append(("triton.write", version))
        self.files.add(version)

    def verify_version(self, version: int) -> bool:
        return version in self.files

    def write_config(self, versions: list[int], n_inputs: int) -> None:
        self.journal.append(("triton.config", tuple(versions)))
        self.config = list(versions)

    def load(self) -> None:
        if self.refuse_loads:
            self.journal.append(("triton.load_refused", tuple(self.config)))
            raise Unavailable("Triton refused")
        self.journal.append(("triton.load", tuple(self.config)))
        self.ready = sorted(self.config)

    def unload(self) -> None:
        self.journal.append(("triton.unload",))
        self.ready = []

    def ready_versions(self) -> list[int]:
        return list(self.ready)

    def probe(self, version: int, n_inputs: int) -> bool:
        return version in self.ready


class FakeSink:
    """The lifecycle publisher: records what it published; refuses while ``down``."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.down = False
        self.published: list[models_pb2.ModelEvent] = []

    async def publish(self, events: Sequence[models_pb2.ModelEvent]) -> None:
        if self.down:
            raise ConnectionError("broker down")
        for event in events:
            self.published.append(event)
            self.journal.append(("event", EventType.Name(event.type), event.version))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def settings(**overrides: Any) -> RegistrySettings:
    return RegistrySettings.model_validate(
        {"token": SecretStr("t"), "model_name": MODEL, "retire_grace_s": 10.0, **overrides}
    )


def serving(
    journal: Journal,
    versions: Sequence[int],
    aliases: dict[str, int],
    *,
    clock: Callable[[], float] = time.monotonic,
    **overrides: Any,
) -> tuple[ModelRegistryService, FakeStore, FakeTriton]:
    """A service whose store holds ``versions`` and whose Triton serves ``aliases``."""
    store = FakeStore(journal, versions)
    triton = FakeTriton(journal)
    for alias, version in aliases.items():
        store._aliases[alias] = version
        store.tags[version]["stage"] = alias.upper()
        triton.files.add(version)
    if "canary" in aliases:
        store.tags[aliases["canary"]]["traffic_percent"] = "20"
    store.history = [aliases["production"]]
    triton.config = triton.ready = sorted(set(aliases.values()))
    service = ModelRegistryService(settings(**overrides), store, triton, clock=clock)  # type: ignore[arg-type]
    journal.clear()
    return service, store, triton


def kinds(events: Sequence[models_pb2.ModelEvent]) -> list[tuple[str, int]]:
    return [(EventType.Name(e.type).removeprefix("MODEL_EVENT_TYPE_"), e.version) for e in events]


def table(event: models_pb2.ModelEvent) -> list[tuple[int, str, int]]:
    return [(s.version, s.alias, s.traffic_percent) for s in event.served]


async def until(condition: Callable[[], bool], what: str, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# ----------------------------------------------------------------------------- the domain


def test_a_promotion_serves_old_and_new_then_moves_aliases_and_retires_the_old_later() -> None:
    journal, clock = Journal(), Clock()
    service, store, triton = serving(journal, [1, 2], {"production": 1}, clock=clock)

    transition = service.set_alias(MODEL, "production", 2, reason="canary looked good")

    # Triton serves both before MLflow moves; nothing is unloaded in the call
    assert journal == [
        ("triton.write", 2),
        ("triton.config", (1, 2)),
        ("triton.load", (1, 2)),
        ("mlflow.alias", "production", 2),
    ]
    assert triton.ready == [1, 2]
    assert kinds(transition.events) == [("PUBLISHED", 2), ("PROMOTED", 2)]
    assert all(table(e) == [(2, "production", 100)] for e in transition.events)
    assert [r.version for r in transition.retiring] == [1]
    assert service.retiring() == {1: None}  # its grace starts once the switch is announced
    assert store.history == [1, 2] and store.tags[1]["stage"] == "ARCHIVED"

    # not announced yet: no deadline, nothing due, however late it is
    clock.now += 3600
    assert service.retire_due() == [] and triton.ready == [1, 2]
    service.start_grace(transition.retiring)
    assert service.retiring() == {1: clock.now + 10.0}
    clock.now += 9.9
    assert service.retire_due() == [] and triton.ready == [1, 2]
    clock.now += 0.1
    journal.clear()
    unpublished = service.retire_due()
    assert journal == [("triton.config", (2,)), ("triton.load", (2,))]
    assert triton.ready == [2]
    assert kinds(unpublished) == [("UNPUBLISHED", 1)]
    assert table(unpublished[0]) == [(2, "production", 100)]
    assert unpublished[0].reason == "canary looked good"
    assert service.retiring() == {}


def test_reconcile_keeps_versions_in_their_grace_period_loaded() -> None:
    journal, clock = Journal(), Clock()
    service, _, triton = serving(journal, [1, 2], {"production": 1}, clock=clock)
    transition = service.set_alias(MODEL, "production", 2)
    service.start_grace(transition.retiring)
    journal.clear()

    report = service.reconcile()
    assert (report.desired, report.published, report.events, report.retiring) == (
        [2],
        False,
        [],
        [],
    )
    assert triton.ready == [1, 2] and journal == []  # v1 is retiring: nothing to repair

    triton.ready = [2]  # Triton restarted and loaded only part of it: v1 is loaded again
    report = service.reconcile()
    assert report.published and triton.ready == [1, 2]
    assert service.retiring() == {1: clock.now + 10.0}


def test_a_version_back_in_the_table_during_its_grace_is_never_unloaded() -> None:
    journal, clock = Journal(), Clock()
    service, _, triton = serving(journal, [1, 2], {"production": 1}, clock=clock)
    promoted = service.set_alias(MODEL, "production", 2)
    service.start_grace(promoted.retiring)
    journal.clear()

    rolled = service.rollback(MODEL, reason="regression")
    assert rolled.version.version == 1
    assert not any(entry[0] == "triton.load" for entry in journal)  # already serves both
    assert kinds(rolled.events) == [("ROLLED_BACK", 1)]  # v1 never left Triton: no PUBLISHED
    assert table(rolled.events[0]) == [(1, "production", 100)]
    assert service.retiring() == {2: None}

    service.start_grace(promoted.retiring)  # the first switch's late acknowledgement: no effect
    service.start_grace(rolled.retiring)
    clock.now += 10.0
    assert kinds(service.retire_due()) == [("UNPUBLISHED", 2)]
    assert triton.ready == [1]


def test_removing_a_canary_keeps_it_loaded_until_its_grace_ends() -> None:
    journal, clock = Journal(), Clock()
    service, _, triton = serving(journal, [1, 2], {"production": 1, "canary": 2}, clock=clock)
    removed = service.set_alias(MODEL, "canary", 0, reason="pause")
    assert journal == [("mlflow.alias", "canary", None)]  # Triton already serves both
    assert kinds(removed.events) == [("ALIAS_SET", 0)]
    assert table(removed.events[0]) == [(1, "production", 100)]
    service.start_grace(removed.retiring)
    clock.now += 10.0
    assert kinds(service.retire_due()) == [("UNPUBLISHED", 2)] and triton.ready == [1]


def test_a_refused_load_changes_nothing_and_retires_nothing() -> None:
    journal = Journal()
    service, store, triton = serving(journal, [1, 2], {"production": 1})
    triton.refuse_loads = True
    with pytest.raises(Unavailable):
        service.set_alias(MODEL, "production", 2)
    assert store.aliases(MODEL) == {"production": 1}
    assert triton.config == [1] and service.retiring() == {}
    assert ("mlflow.alias", "production", 2) not in journal


def test_after_a_restart_loaded_unrouted_versions_are_announced_then_retired() -> None:
    journal, clock = Journal(), Clock()
    # the previous process moved production to v2 and died during v1's grace period
    service, _, triton = serving(journal, [1, 2], {"production": 2}, clock=clock)
    triton.files.add(1)
    triton.config = triton.ready = [1, 2]

    report = service.reconcile(announce=True)
    assert triton.ready == [1, 2] and journal == []  # not unloaded at once
    assert kinds(report.events) == [("ROUTING_ANNOUNCED", 2)]
    assert table(report.events[0]) == [(2, "production", 100)]
    assert [r.version for r in report.retiring] == [1]
    assert service.reconcile().events == []  # already retiring: announced once

    service.start_grace(report.retiring)
    clock.now += 10.0
    assert kinds(service.retire_due()) == [("UNPUBLISHED", 1)]
    assert triton.ready == [2]


def test_a_start_up_announcement_without_anything_to_retire() -> None:
    journal = Journal()
    service, _, triton = serving(journal, [1, 2], {"production": 1, "canary": 2})
    report = service.reconcile(announce=True)
    assert kinds(report.events) == [("ROUTING_ANNOUNCED", 1)] and report.retiring == []
    assert table(report.events[0]) == [(1, "production", 80), (2, "canary", 20)]
    assert triton.ready == [1, 2] and journal == []
    assert service.reconcile().events == []  # the periodic pass announces nothing new


# ----------------------------------------------------------------------------- the coordinator


async def test_the_event_is_published_before_the_old_version_is_unloaded() -> None:
    journal = Journal()
    service, _, triton = serving(journal, [1, 2], {"production": 1}, retire_grace_s=0.05)
    sink = FakeSink(journal)
    coordinator = RegistryCoordinator(service, sink, publish_wait_s=5.0, retry_s=0.01)
    await coordinator.start()
    try:
        version = await coordinator.mutate(lambda: service.set_alias(MODEL, "production", 2))
        assert version.version == 2
        # the call returns once its events are acknowledged, the old version still loaded
        assert journal == [
            ("triton.write", 2),
            ("triton.config", (1, 2)),
            ("triton.load", (1, 2)),
            ("mlflow.alias", "production", 2),
            ("event", "MODEL_EVENT_TYPE_PUBLISHED", 2),
            ("event", "MODEL_EVENT_TYPE_PROMOTED", 2),
        ]
        await until(lambda: ("event", "MODEL_EVENT_TYPE_UNPUBLISHED", 1) in journal, "unpublish")
        assert journal[6:] == [
            ("triton.config", (2,)),
            ("triton.load", (2,)),
            ("event", "MODEL_EVENT_TYPE_UNPUBLISHED", 1),
        ]
        assert triton.ready == [2]
    finally:
        await coordinator.stop()


async def test_no_grace_starts_while_the_broker_refuses_the_announcement() -> None:
    journal = Journal()
    service, store, triton = serving(journal, [1, 2], {"production": 1}, retire_grace_s=0.01)
    sink = FakeSink(journal)
    sink.down = True
    coordinator = RegistryCoordinator(service, sink, publish_wait_s=0.05, retry_s=0.01)
    await coordinator.start()
    try:
        # the change is applied and the call answers; its events wait in the outbox
        version = await coordinator.mutate(lambda: service.set_alias(MODEL, "production", 2))
        assert version.version == 2 and store.aliases(MODEL) == {"production": 2}
        await until(lambda: coordinator.outbox.failures >= 3, "three refused attempts")
        assert coordinator.outbox.pending == 2
        assert service.retiring() == {1: None} and triton.ready == [1, 2]
        assert sink.published == []

        sink.down = False
        await until(lambda: ("event", "MODEL_EVENT_TYPE_UNPUBLISHED", 1) in journal, "unpublish")
        events = [entry for entry in journal if entry[0] == "event"]
        assert events == [
            ("event", "MODEL_EVENT_TYPE_PUBLISHED", 2),
            ("event", "MODEL_EVENT_TYPE_PROMOTED", 2),
            ("event", "MODEL_EVENT_TYPE_UNPUBLISHED", 1),
        ]
        assert journal.index_of(("event", "MODEL_EVENT_TYPE_PROMOTED", 2)) < journal.index_of(
            ("triton.config", (2,))
        )
        assert coordinator.outbox.pending == 0 and triton.ready == [2]
    finally:
        await coordinator.stop()


async def test_changes_and_retirements_never_interleave() -> None:
    journal = Journal()
    service, _, _ = serving(journal, [1, 2, 3], {"production": 1}, retire_grace_s=0.0)
    coordinator = RegistryCoordinator(service, FakeSink(journal), publish_wait_s=5.0, retry_s=0.01)
    inside = threading.Lock()
    overlaps: list[str] = []
    original = service.retire_due

    def exclusive(call: Callable[[], Any], name: str) -> Callable[[], Any]:
        def run() -> Any:
            if not inside.acquire(blocking=False):
                overlaps.append(name)
                inside.acquire()
            try:
                time.sleep(0.02)  # widen the window an overlap would need
                return call()
            finally:
                inside.release()

        return run

    service.retire_due = exclusive(original, "retire")  # type: ignore[method-assign]
    await coordinator.start()
    try:
        await asyncio.gather(
            coordinator.mutate(
                exclusive(lambda: service.set_alias(MODEL, "production", 2), "promote 2")
            ),
            coordinator.mutate(
                exclusive(lambda: service.set_alias(MODEL, "shadow", 3), "shadow 3")
            ),
            coordinator.mutate(exclusive(lambda: service.rollback(MODEL), "rollback")),
        )
        await until(lambda: service.retiring() == {}, "every retirement")
    finally:
        await coordinator.stop()
    assert overlaps == []


# ----------------------------------------------------------------------------- the outbox


def event(version: int) -> models_pb2.ModelEvent:
    return models_pb2.ModelEvent(event_id=f"e{version}", model_name=MODEL, version=version)


class FlakySink:
    """Refuses every second publish attempt."""

    def __init__(self) -> None:
        self.attempts = 0
        self.published: list[int] = []

    async def publish(self, events: Sequence[models_pb2.ModelEvent]) -> None:
        self.attempts += 1
        if self.attempts % 2 == 0:
            raise TimeoutError("no acknowledgement")
        self.published += [e.version for e in events]


async def test_the_outbox_publishes_in_order_without_repeating_acknowledged_events() -> None:
    sink = FlakySink()
    outbox = LifecycleOutbox(sink, retry_s=0.001)
    delivered: list[str] = []
    task = asyncio.create_task(outbox.run())
    try:
        first = outbox.put([event(1), event(2), event(3)], lambda: delivered.append("first"))
        second = outbox.put([event(4)], lambda: delivered.append("second"))
        empty = outbox.put([], lambda: delivered.append("empty"))
        assert outbox.pending == 4
        assert await outbox.drain(5.0)
        assert first.done() and second.done() and empty.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert sink.published == [1, 2, 3, 4]
    assert delivered == ["first", "second", "empty"]
    assert outbox.failures == sink.attempts - 4 >= 2
    assert outbox.pending == 0
