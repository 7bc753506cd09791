"""HeapFreezer: survivors leave the scanned generations; a full collection still reclaims
a cycle that died frozen."""

from __future__ import annotations

import asyncio
import gc
import warnings
import weakref
from collections.abc import Iterator

import pytest

from services.features.settings import FeaturesSettings
from services.ingestion.settings import IngestionSettings
from services.shared.heap import HeapFreezer, freeze_periodically
from services.shared.settings import HeapSettings


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    # garbage left by earlier tests (a client socket an integration test never closed) would
    # otherwise be frozen by these tests and its ResourceWarning raised in their collections
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
    yield
    gc.unfreeze()


def _cycle() -> weakref.ref[Node]:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_tick_freezes_survivors_and_collects_young_cycles() -> None:
    young = _cycle()  # garbage before the tick: the young collection reclaims it
    state = [{"fact": i} for i in range(1000)]
    HeapFreezer().tick()
    assert young() is None
    assert gc.get_freeze_count() >= len(state)
    assert gc.get_count()[2] == 0  # nothing left for a full collection to scan


def test_frozen_objects_are_still_freed_by_reference_counting() -> None:
    holder = [Node()]
    dead = weakref.ref(holder[0])
    HeapFreezer().tick()
    holder.clear()
    assert dead() is None


def test_a_cycle_that_died_frozen_waits_for_the_full_collection() -> None:
    a = Node()
    a.other = a
    dead = weakref.ref(a)
    freezer = HeapFreezer(full_every_s=3600)
    freezer.tick()
    del a
    freezer.tick()  # young collection only: the frozen cycle stays
    assert dead() is not None
    assert freezer.full_collection() >= 1
    assert dead() is None


def test_tick_runs_the_full_collection_when_due() -> None:
    a = Node()
    a.other = a
    dead = weakref.ref(a)
    freezer = HeapFreezer(full_every_s=1e-9)
    gc.freeze()
    del a
    freezer.tick()
    assert dead() is None


@pytest.mark.parametrize("service", [IngestionSettings, FeaturesSettings])
def test_the_services_with_a_large_heap_have_the_policy(service: type[HeapSettings]) -> None:
    settings = service(gc_freeze_interval_s=2.5)  # type: ignore[call-arg]
    assert settings.gc_freeze_interval_s == 2.5
    assert settings.gc_full_interval_s == 3600.0


async def test_the_heap_is_frozen_at_start_and_the_task_ends_on_stop() -> None:
    stop = asyncio.Event()
    task = asyncio.create_task(freeze_periodically(HeapSettings(gc_freeze_interval_s=60), stop))
    await asyncio.sleep(0)  # the task runs up to its first wait: the first freeze is done
    assert gc.get_freeze_count() > 0
    stop.set()
    await asyncio.wait_for(task, timeout=5)


async def test_an_interval_of_zero_leaves_the_collector_alone() -> None:
    await asyncio.wait_for(
        freeze_periodically(HeapSettings(gc_freeze_interval_s=0), asyncio.Event()), timeout=5
    )
    assert gc.get_freeze_count() == 0
