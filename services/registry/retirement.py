"""Versions that left the routing table and stay loaded in Triton for a grace period.

A switch's old versions are *retiring*: a consumer that has not seen the switch yet may still
route to them. Their grace period starts once the events announcing the switch were
acknowledged (``start_grace``: from the moment consumers can know) and lasts
``retire_grace_s``; then the registry unloads them (``ModelRegistryService.retire_due``).

Changed by mutations (the registry's worker thread) and by ``start_grace`` (the event loop,
when the broker acknowledged), hence the lock.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass


@dataclass(eq=False)
class Retirement:
    """One retiring version. ``deadline`` (on the schedule's clock) is unset until the events
    announcing the switch were acknowledged."""

    version: int
    reason: str
    actor: str
    deadline: float | None = None


class RetirementSchedule:
    """The retiring versions and when each grace period ends."""

    def __init__(self, grace_s: float, clock: Callable[[], float]) -> None:
        self.grace_s = grace_s
        self._clock = clock
        self._retiring: dict[int, Retirement] = {}
        self._lock = threading.Lock()

    def deadlines(self) -> dict[int, float | None]:
        """Version -> when its grace period ends (None: not started)."""
        with self._lock:
            return {v: r.deadline for v, r in self._retiring.items()}

    def versions(self) -> set[int]:
        with self._lock:
            return set(self._retiring)

    def add(self, versions: Collection[int], reason: str, actor: str) -> list[Retirement]:
        """Start retiring ``versions`` (their grace period starts with ``start_grace``)."""
        with self._lock:
            added = []
            for version in sorted(versions):
                retirement = Retirement(version, reason, actor)
                self._retiring[version] = retirement
                added.append(retirement)
        return added

    def keep(self, versions: Collection[int]) -> None:
        """Back in the routing table before their grace ended: no longer retiring."""
        with self._lock:
            for version in versions:
                self._retiring.pop(version, None)

    def start_grace(self, retirements: Collection[Retirement]) -> None:
        """The switch that retired these was announced: their grace period starts now."""
        deadline = self._clock() + self.grace_s
        with self._lock:
            for retirement in retirements:
                current = self._retiring.get(retirement.version)
                if current is retirement and current.deadline is None:
                    current.deadline = deadline

    def next_at(self) -> float | None:
        """When the earliest started grace period ends, if any."""
        with self._lock:
            deadlines = [r.deadline for r in self._retiring.values() if r.deadline is not None]
        return min(deadlines) if deadlines else None

    def due(self) -> tuple[dict[int, Retirement], set[int]]:
        """The retirements whose grace period is over, and the versions still waiting."""
        now = self._clock()
        with self._lock:
            due = {
                v: r
                for v, r in self._retiring.items()
                if r.deadline is not None and r.deadline <= now
            }
            waiting = {v for v in self._retiring if v not in due}
        return due, waiting

    def done(self, retired: dict[int, Retirement]) -> None:
        """These were unloaded (unless retired again meanwhile)."""
        with self._lock:
            for version, retirement in retired.items():
                if self._retiring.get(version) is retirement:
                    del self._retiring[version]
