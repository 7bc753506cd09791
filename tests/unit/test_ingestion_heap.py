"""Ingestion freezes its heap out of the cyclic collector (services/ingestion/main.py)."""

from __future__ import annotations

import asyncio
import gc

from services.ingestion.main import _freeze_heap
from services.ingestion.settings import IngestionSettings


async def test_the_heap_is_frozen_at_start_and_the_task_ends_on_stop() -> None:
    settings = IngestionSettings(gc_freeze_interval_s=60)
    stop = asyncio.Event()
    gc.unfreeze()
    try:
        task = asyncio.create_task(_freeze_heap(settings, stop))
        await asyncio.sleep(0)  # the task runs up to its first wait: the first freeze is done
        assert gc.get_freeze_count() > 0
        stop.set()
        await asyncio.wait_for(task, timeout=5)
    finally:
        gc.unfreeze()
