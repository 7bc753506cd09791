"""services/shared/retry.py: the pauses, timers and retries every service loop uses."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from services.shared.retry import Backoff, Stopping, pause, retry, ticks


async def test_pause_returns_at_once_when_stopped_meanwhile() -> None:
    stop = asyncio.Event()
    waiting = asyncio.create_task(pause(stop, 3600))
    await asyncio.sleep(0)
    assert not waiting.done()
    stop.set()
    # an hour's pause ends with the stop (the test's own timeout would fail it otherwise)
    assert await waiting is True


async def test_pause_runs_out_without_a_stop() -> None:
    stop = asyncio.Event()
    assert await pause(stop, 0.001) is False
    assert await pause(None, 0.001) is False
    stop.set()
    assert await pause(stop, 3600) is True


async def test_ticks_yield_until_stopped() -> None:
    stop = asyncio.Event()
    seen = 0
    async for _ in ticks(stop, 0.001):
        seen += 1
        if seen == 3:
            stop.set()
    assert seen == 3
    # already stopped: no tick at all
    assert [t async for t in ticks(stop, 0.001)] == []


def test_backoff_doubles_up_to_its_cap() -> None:
    backoff = Backoff(0.5, 3.0)
    assert list(itertools.islice(backoff.delays(), 6)) == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert [backoff.delay(n) for n in range(1, 7)] == [0.5, 1.0, 2.0, 3.0, 3.0, 3.0]
    assert backoff.delay(10**6) == 3.0  # no overflow after a long outage


def test_backoff_without_a_cap_is_a_fixed_pause() -> None:
    assert list(itertools.islice(Backoff(2.0).delays(), 3)) == [2.0, 2.0, 2.0]
    # a cap below the first pause is the first pause
    assert Backoff(2.0, 1.0).delay(3) == 2.0


async def test_retry_until_the_operation_succeeds() -> None:
    outcomes: list[Exception | str] = [OSError("down"), ConnectionError("refused"), "done"]
    notes: list[tuple[str, float]] = []

    async def operation() -> str:
        outcome = outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    result = await retry(
        operation,
        retryable=(OSError,),
        backoff=Backoff(0.001, 0.002),
        on_retry=lambda exc, delay: notes.append((str(exc), delay)),
    )
    assert result == "done"
    assert notes == [("down", 0.001), ("refused", 0.002)]


async def test_retry_lets_other_errors_through() -> None:
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        raise ValueError("a bug, not an outage")

    with pytest.raises(ValueError, match="a bug"):
        await retry(operation, retryable=(OSError,), backoff=Backoff(0.001))
    assert calls == 1


async def test_retry_stops_with_the_service() -> None:
    stop = asyncio.Event()
    calls = 0

    async def operation() -> None:
        nonlocal calls
        calls += 1
        stop.set()  # the service is asked to stop while this attempt fails
        raise OSError("down")

    with pytest.raises(Stopping):
        await retry(operation, retryable=(OSError,), backoff=Backoff(3600), stop=stop)
    assert calls == 1


async def test_backoff_wait_raises_stopping_only_when_stopped() -> None:
    stop = asyncio.Event()
    await Backoff(0.001).wait(stop, 0.001)
    stop.set()
    with pytest.raises(Stopping):
        await Backoff(0.001).wait(stop, 3600)
