"""Services import only ``services.shared`` (and the generated protos under it), never each other.

Read from the source with ``ast`` (nothing is imported), so an import inside a function counts as
much as one at the top of a module. The CLI is the operator's tool that runs services in-process
(``mlops train``, ``mlops stack``): like each service's ``main.py`` it is where things are wired,
so it may reach into any service; no service may reach into it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[2] / "services"
SHARED = "shared"
COMPOSITION_ROOTS = frozenset({"cli"})  # may import any service


def _packages() -> list[str]:
    return sorted(p.name for p in SERVICES.iterdir() if (p / "__init__.py").is_file())


def _imported_modules(tree: ast.AST, module: str) -> list[str]:
    """Absolute names of every module imported in ``tree`` (relative imports resolved)."""
    found: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: -node.level]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            # `from services import registry` imports the package named by the alias
            found.extend(f"{name}.{alias.name}" for alias in node.names)
    return found


def _service_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "services" else None


def _cross_imports(package: str) -> list[str]:
    violations = []
    for path in sorted((SERVICES / package).rglob("*.py")):
        relative = path.relative_to(SERVICES.parent).with_suffix("")
        module = ".".join(relative.parts)
        if module.endswith(".__init__"):
            module = module.removesuffix(".__init__")
        for name in _imported_modules(ast.parse(path.read_text(), str(path)), module):
            target = _service_of(name)
            if target is None or target in (package, SHARED):
                continue
            violations.append(f"{relative}.py imports {name}")
    return violations


def test_every_service_package_is_checked() -> None:
    # a guard that the walk below sees the services at all
    assert {"ingestion", "features", "training", "registry", "serving", "shared"} <= set(
        _packages()
    )


@pytest.mark.parametrize("package", [p for p in _packages() if p not in COMPOSITION_ROOTS])
def test_a_service_imports_only_shared_and_itself(package: str) -> None:
    assert _cross_imports(package) == []


def test_the_check_sees_imports_inside_functions_and_relative_ones() -> None:
    source = (
        "from . import sibling\n"
        "def f():\n"
        "    from services.registry import service\n"
        "    import services.serving.app\n"
    )
    names = _imported_modules(ast.parse(source), "services.training.pipeline")
    assert sorted(names) == [
        "services.registry.service",
        "services.serving.app",
        "services.training.sibling",
    ]
