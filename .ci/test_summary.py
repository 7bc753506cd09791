"""Summarise a pytest JUnit report and fail when tests that exist did not run.

    python .ci/test_summary.py var/test-results/junit.xml

pytest already fails when nothing is collected; this also fails when every test was skipped
or deselected, or when a test directory (unit, integration, e2e) that has test files ran
none of them, so a green run always means the suite really ran.
"""

from __future__ import annotations

import sys
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("unit", "integration", "e2e")


def main(report: Path) -> int:
    ran: Counter[str] = Counter()
    skipped: Counter[str] = Counter()
    for case in ET.parse(report).getroot().iter("testcase"):
        parts = case.get("classname", "").split(".")
        kind = next((k for k in KINDS if k in parts), "other")
        if case.find("skipped") is not None:
            skipped[kind] += 1
        else:
            ran[kind] += 1
    print(
        "tests run: "
        + ", ".join(
            f"{k} {ran[k]} (skipped {skipped[k]})"
            for k in (*KINDS, "other")
            if ran[k] or skipped[k]
        )
    )
    problems = []
    if sum(ran.values()) == 0:
        problems.append("no test ran")
    for kind in KINDS:
        if any((ROOT / "tests" / kind).glob("test_*.py")) and ran[kind] == 0:
            problems.append(f"tests/{kind} has test files but none of its tests ran")
    for problem in problems:
        print(f"FAILED: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(Path(sys.argv[1])))
