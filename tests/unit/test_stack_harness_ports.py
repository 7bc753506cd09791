"""The load tests' own stacks (loadtests/stack_harness.py) move every port of the stack: one
left at its default would meet a developer's stack (it did: the dashboard's and autopilot's)."""

from __future__ import annotations

import sys
from pathlib import Path

from services.cli.localstack import StackSettings

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from loadtests.stack_harness import PORT_OFFSETS


def test_every_port_of_the_stack_has_an_offset_of_its_own() -> None:
    ports = {name.removesuffix("_port").upper() for name in StackSettings.model_fields}
    ports = {p for p in ports if f"{p.lower()}_port" in StackSettings.model_fields}
    assert set(PORT_OFFSETS) == ports
    assert len(set(PORT_OFFSETS.values())) == len(PORT_OFFSETS)
