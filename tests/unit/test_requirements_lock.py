"""requirements.lock (what `make install` installs, without resolving) covers requirements.txt."""

from __future__ import annotations

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from services.shared.settings import PROJECT_ROOT


def _lines(name: str) -> list[str]:
    text = (PROJECT_ROOT / name).read_text()
    return [line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()]


def test_every_direct_requirement_is_pinned_and_locked_at_its_version() -> None:
    locked = {}
    for line in _lines("requirements.lock"):
        name, _, version = line.partition("==")
        assert version, f"requirements.lock: {line!r} is not pinned"
        locked[canonicalize_name(name)] = Version(version)
    problems = []
    for line in _lines("requirements.txt"):
        requirement = Requirement(line)
        specifiers = list(requirement.specifier)
        if len(specifiers) != 1 or specifiers[0].operator != "==":
            problems.append(f"{line}: not pinned with ==")
            continue
        version = locked.get(canonicalize_name(requirement.name))
        if version is None or version not in requirement.specifier:
            problems.append(f"{line}: requirements.lock has {version}")
    assert not problems, "run `make lock`:\n" + "\n".join(problems)
