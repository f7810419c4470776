"""Imports run one way: the composition root, ``gateway.app``, is imported only by the
processes' own composition (``cli.py``, ``serving.py``) and by tests; the views
(``gateway.views``) only by the root and by each other.  A view gets its services from
``gateway.views.context``, never from ``gateway.app``.

Every import statement counts, at the top of a module or inside a function (a lazy
import is still a dependency); read from the source with :mod:`ast`, nothing imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "gateway"

ROOT = "gateway.app"
VIEWS = "gateway.views"
#: the modules that compose a process (``serve``, the CLI) and so may import the root
MAY_IMPORT_ROOT = {"gateway.app", "gateway.cli", "gateway.serving"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_names(source: str, module: str, *, is_package: bool = False) -> Iterator[str]:
    """Every module ``source`` may import, anywhere in it: ``from a.b import c`` yields
    ``a.b`` and ``a.b.c`` (``c`` may be a submodule); relative imports resolved."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)] if node.level > 1 else package
                stem = ".".join([*base, *([node.module] if node.module else [])])
            else:
                stem = node.module or ""
            yield stem
            yield from (f"{stem}.{alias.name}" for alias in node.names if alias.name != "*")


def is_within(name: str, module: str) -> bool:
    return name == module or name.startswith(module + ".")


def violations(source: str, module: str, *, is_package: bool = False) -> list[str]:
    found = set()
    for name in imported_names(source, module, is_package=is_package):
        if is_within(name, ROOT) and module not in MAY_IMPORT_ROOT:
            found.add(f"{module} imports the composition root {ROOT}")
        if is_within(name, VIEWS) and not is_within(module, VIEWS) and module != ROOT:
            view = ".".join(name.split(".")[:3])  # gateway.views.<module>, not its names
            found.add(f"{module} imports the views ({view})")
    return sorted(found)


def package_violations() -> list[str]:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        found += violations(path.read_text(encoding="utf-8"), module_name(path),
                            is_package=path.name == "__init__.py")
    return found


def test_no_module_imports_the_composition_root_or_a_view_against_the_direction() -> None:
    found = package_violations()
    assert not found, ("imports against the direction (a view takes its services from "
                       "gateway.views.context):\n" + "\n".join(found))


def test_the_package_is_read() -> None:
    modules = {module_name(path) for path in PACKAGE.rglob("*.py")}
    assert {"gateway.app", "gateway.delivery", "gateway.views.voice",
            "gateway.views.context"} <= modules


@pytest.mark.parametrize(("module", "source"), [
    ("gateway.views.ops", "from gateway.app import services"),
    ("gateway.views.ops", "import gateway.app"),
    ("gateway.views.ops", "import gateway.app as root"),
    ("gateway.views.ops", "from gateway import app"),
    ("gateway.views.ops", "from .. import app"),
    ("gateway.views.ops", "from ..app import services"),
    ("gateway.delivery", "def run():\n    from gateway.app import build_health\n"),
    ("gateway.delivery", "if True:\n    from .app import build_health\n"),
    ("gateway.plan", "from ..app import Services"),
    ("gateway.delivery", "from gateway.views.common import action_url"),
    ("gateway.delivery", "from gateway import views"),
    ("gateway.delivery", "from gateway.views import voice"),
    ("gateway.delivery", "def f():\n    import gateway.views.voice\n"),
    ("gateway.calls.call_plan", "from ..views import voice"),
    ("gateway.serving", "from gateway.views import voice"),
])
def test_an_import_against_the_direction_is_found(module: str, source: str) -> None:
    assert violations(source, module, is_package=module == "gateway.plan") != []


@pytest.mark.parametrize(("module", "source"), [
    ("gateway.views.ops", "from gateway.views.context import services"),
    ("gateway.views.voice", "def f():\n    from gateway.views import ivr\n"),
    ("gateway.views.ivr", "from .common import action_url"),
    ("gateway.app", "from gateway.views import admin, voice"),
    ("gateway.serving", "def build():\n    from gateway.app import create_app\n"),
    ("gateway.cli", "def serve():\n    from gateway.app import create_app\n"),
    ("gateway.delivery", "from gateway.centre_health import build_health"),
    ("gateway.delivery", "from gateway.application import x"),  # a name that only starts so
    ("gateway.delivery", "from gateway.viewset import x"),
])
def test_an_import_along_the_direction_passes(module: str, source: str) -> None:
    assert violations(source, module) == []
