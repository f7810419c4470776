"""The package declares what it imports, and imports what it declares (pyproject.toml)."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared() -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    return {normalise(re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0])
            for dep in project["dependencies"]}


def imported_modules() -> dict[str, set[str]]:
    """Top-level modules outside the standard library imported by gateway/, with where."""
    found: dict[str, set[str]] = {}
    for path in (REPO / "gateway").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for name in names:
                top = name.split(".")[0]
                if top != "gateway" and top not in sys.stdlib_module_names:
                    found.setdefault(top, set()).add(str(path.relative_to(REPO)))
    return found


def test_every_imported_package_is_declared() -> None:
    distributions = packages_distributions()
    wanted = declared()
    missing = {module: sorted(where) for module, where in imported_modules().items()
               if not {normalise(d) for d in distributions.get(module, [module])} & wanted}
    assert missing == {}, "imported but not in [project] dependencies"


def test_every_declared_dependency_is_imported() -> None:
    modules_of: dict[str, set[str]] = {}
    for module, dists in packages_distributions().items():
        for dist in dists:
            modules_of.setdefault(normalise(dist), set()).add(module)
    imported = set(imported_modules())
    unused = sorted(dep for dep in declared() if not modules_of.get(dep, {dep}) & imported)
    assert unused == [], "declared in [project] dependencies but imported nowhere in gateway/"
