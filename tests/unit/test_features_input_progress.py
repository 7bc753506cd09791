"""The features service's report of an input partition whose commits stopped
(``InputPositions.check_progress``), on a stand-in for faust's consumer bookkeeping."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest
from faust.types import TP

from services.features.app import InputPositions

VALIDATED = "events.validated"


@dataclass(frozen=True)
class Message:
    tp: TP
    offset: int


class Consumer:
    """What check_progress reads of faust's consumer."""

    def __init__(self) -> None:
        self._thread = SimpleNamespace()
        self.resume_flow = lambda: None
        self.tps = [TP(VALIDATED, 0), TP(VALIDATED, 1), TP("not.an.input", 0)]
        self._committed_offset: defaultdict[TP, int | None] = defaultdict(lambda: None)
        self.ends = {tp: 0 for tp in self.tps}
        self._read_offset: dict[TP, int | None] = {}
        self._paused_partitions: set[TP] = set()
        self._buffered_partitions: set[TP] = set()
        self._acked: dict[TP, list[int]] = {}
        self._unacked_messages: set[Any] = set()

    def assignment(self) -> set[TP]:
        return set(self.tps)

    def highwater(self, tp: TP) -> int:
        return self.ends[tp]

    def _get_active_partitions(self) -> set[TP]:
        return set(self.tps) - self._paused_partitions


@pytest.fixture
def consumer() -> Consumer:
    return Consumer()


def _positions(consumer: Consumer) -> InputPositions:
    app = SimpleNamespace(
        consumer=consumer, on_rebalance_complete=SimpleNamespace(connect=lambda _: None)
    )
    return InputPositions(app, {VALIDATED})  # type: ignore[arg-type]


def test_a_partition_whose_commits_stop_is_reported_once_with_faust_s_view(
    consumer: Consumer,
) -> None:
    positions = _positions(consumer)
    p0, p1, other = consumer.tps
    consumer.ends.update({p0: 74, p1: 5, other: 99})  # p1 caught up; other: not an input
    consumer._committed_offset[p1] = 5
    consumer._read_offset[p0] = 12
    consumer._paused_partitions.add(p0)
    consumer._unacked_messages.update({Message(p0, 9), Message(p0, 11), Message(p1, 3)})
    assert positions.check_progress(0.0) == []
    assert positions.check_progress(InputPositions.STALL_S - 1) == []
    [report] = positions.check_progress(InputPositions.STALL_S + 1)
    assert report["topic"] == VALIDATED and report["partition"] == 0
    assert report["committed"] is None and report["end"] == 74
    assert report["read_offset"] == 12
    assert report["paused"] and not report["active"] and not report["buffered"]
    assert report["unacked"] == 2 and report["first_unacked"] == 9
    assert positions.check_progress(InputPositions.STALL_S * 3) == []  # once per stall


def test_a_commit_clears_the_stall_and_a_new_stall_is_reported_again(consumer: Consumer) -> None:
    positions = _positions(consumer)
    p0 = consumer.tps[0]
    consumer.ends[p0] = 74
    positions.check_progress(0.0)
    assert len(positions.check_progress(100.0)) == 1
    consumer._committed_offset[p0] = 74  # caught up
    assert positions.check_progress(110.0) == []
    consumer.ends[p0] = 80  # new records, and the commits stop again
    assert positions.check_progress(120.0) == []
    assert positions.check_progress(120.0 + InputPositions.STALL_S / 2) == []
    [again] = positions.check_progress(121.0 + InputPositions.STALL_S)
    assert again["committed"] == 74 and again["end"] == 80
