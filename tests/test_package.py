"""The package's public surface and the one-way layering of its modules."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, modules: set[str]) -> set[str]:
    """tokenrelay modules that ``path`` imports anywhere, except in ``if TYPE_CHECKING:``.

    ``from tokenrelay.x import y`` names the module ``tokenrelay.x.y`` if there is one
    (so ``from tokenrelay import events`` does not point at the package ``__init__``),
    else ``tokenrelay.x`` (``from tokenrelay import __version__`` does).
    """
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for other in child.orelse:
                    visit_one(other)
            else:
                visit_one(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tokenrelay"):
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                found.add(child if child in modules else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("tokenrelay"))
        visit(node)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    return found


def _import_graph(package: Path) -> dict[str, set[str]]:
    paths = {_module_name(p, package): p for p in package.rglob("*.py")}
    modules = set(paths)
    return {
        name: {dep for dep in _imports(path, modules) if dep in modules and dep != name}
        for name, path in paths.items()
    }


def _first_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, trail: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*trail, name, dep]
            if dep not in state and (cycle := visit(dep, [*trail, name])):
                return cycle
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state and (cycle := visit(name, [])):
            return cycle
    return None


def test_no_import_cycles():
    """Imports point one way, including those inside functions.

    A function-level import is still an edge: it runs at the first call, and it is how
    a cycle hides (journal/base.py's ``open_journal`` imported the backends that import
    base.py; ``routes/chat.py`` took ``__version__`` from the package whose ``create_app``
    imports app.py, which imports the routes). Only ``if TYPE_CHECKING:`` blocks never
    run. Importing a package's children from its ``__init__`` is no cycle; a child
    importing a name from its parent package is.
    """
    cycle = _first_cycle(_import_graph(PACKAGE))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_reads_function_imports_but_not_type_checking(tmp_path):
    package = tmp_path / "tokenrelay"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from tokenrelay.high import High\n"
    )
    (package / "high.py").write_text("from tokenrelay.low import Low\n")
    assert _first_cycle(_import_graph(package)) is None

    (package / "low.py").write_text("def f():\n    from tokenrelay.high import High\n")
    assert _first_cycle(_import_graph(package)) == [
        "tokenrelay.high", "tokenrelay.low", "tokenrelay.high"
    ]


def test_settings_read_the_simulator_catalogue_without_loading_the_simulator():
    # config.py imports the model catalogue at top level; the app and its text stay unloaded.
    code = (
        "import sys, tokenrelay.config; "
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('tokenrelay.simulator'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["tokenrelay.simulator", "tokenrelay.simulator.catalogue"]
