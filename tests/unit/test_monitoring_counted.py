"""Where monitoring's counting resumes after a restart: the counted mark in its commits."""

from __future__ import annotations

from services.monitoring.reader import counted_from, counted_metadata


def test_counting_resumes_at_the_mark_written_with_the_commit() -> None:
    # the join committed 100 (a prediction still waits for its label), counting read to 250
    assert counted_from(100, counted_metadata(250, 100)) == 250


def test_the_mark_is_never_below_the_committed_offset() -> None:
    assert counted_metadata(80, 100) == counted_metadata(100, 100)
    assert counted_from(100, counted_metadata(80, 100)) == 100


def test_a_commit_without_a_readable_mark_resumes_at_its_offset() -> None:
    # never committed, another writer's metadata, a mark that does not parse
    assert counted_from(0, "") == 0
    assert counted_from(42, "written by someone else") == 42
    assert counted_from(42, "counted=lots") == 42
