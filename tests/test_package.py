"""The package's public surface and the one-way layering of its modules."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import tokenrelay

PACKAGE = Path(tokenrelay.__file__).parent


def test_public_surface():
    assert sorted(tokenrelay.__all__) == ["Settings", "__version__", "create_app", "load_settings"]
    for name in tokenrelay.__all__:
        assert hasattr(tokenrelay, name)


def test_version_module_matches_pyproject():
    pyproject = tomllib.loads((PACKAGE.parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    assert tokenrelay.__version__ == pyproject["project"]["version"]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """tokenrelay modules imported at import time (not inside functions or TYPE_CHECKING)."""
    found: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks do not run
            continue
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
            "tokenrelay"
        ):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tokenrelay"))
    return found


def test_no_import_cycles():
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {
        name: {dep for dep in _top_level_imports(path) if dep in modules and dep != name}
        for name, path in modules.items()
    }
    # A package imports its children freely; cycles among modules are what break imports.
    state: dict[str, int] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = 1
        for dep in graph[name]:
            if dep == "tokenrelay" or name == "tokenrelay":
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, name, dep]))
            if dep not in state:
                visit(dep, [*trail, name])
        state[name] = 2

    for name in graph:
        if name not in state:
            visit(name, [])
