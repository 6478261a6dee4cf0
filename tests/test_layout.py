"""The library's structure, checked statically (nothing is imported or run):

(a) no import cycle among `mqa` modules, imports inside functions included (only an
    `if TYPE_CHECKING:` block, which never runs, is left out); `from mqa.pkg import name`
    is an edge to `mqa.pkg.name` where that is a module and to the package `mqa.pkg`
    (its `__init__`, which re-exports it) where it is not;
(b) no module imports another module's private (underscore) name, by `from m import _x`
    or as `m._x` of a module it imported;
(c) no library module is over 400 lines;
(d) the entry scripts `train.py`, `eval.py`, `sweep.py` are under 150 lines;
(e) no test module imports another: what tests share lives in `tests/helpers.py` (models),
    `tests/commands.py` (running the tools), `tests/model_files.py` (converters' files).
"""

from __future__ import annotations

import ast
import functools
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 400
MAX_SCRIPT_LINES = 150
SCRIPTS = ("train.py", "eval.py", "sweep.py")



def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.lru_cache(maxsize=1)
def library() -> dict[str, pathlib.Path]:
    """Module name -> file, for every `mqa/**/*.py`."""
    return {module_name(path): path for path in sorted((REPO / "mqa").rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import / ImportFrom node that can run: at any depth, outside TYPE_CHECKING."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _base(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ImportFrom reads from (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    package = package[:len(package) - (node.level - 1)]
    return ".".join(package + ([node.module] if node.module else []))


@functools.lru_cache(maxsize=None)
def imports_of(module: str) -> tuple[tuple[str, str | None, int], ...]:
    """(imported module, name imported from it or None, line) for each import in `module`
    of an `mqa` module, resolved as the module docstring says."""
    path = library()[module]
    tree = ast.parse(path.read_text(), str(path))
    modules, found = library(), []
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name in modules]
            continue
        base = _base(module, path.name == "__init__.py", node)
        if base not in modules:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.append((submodule, None, node.lineno) if submodule in modules
                         else (base, alias.name, node.lineno))
    return tuple(found)


def import_graph() -> dict[str, set[str]]:
    return {module: {target for target, _, _ in imports_of(module) if target != module}
            for module in library()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def private_uses(module: str) -> list[str]:
    """'line: what' for each private name of another module that `module` uses."""
    path = library()[module]
    tree = ast.parse(path.read_text(), str(path))
    found = [f"{line}: from {target} import {name}" for target, name, line in imports_of(module)
             if name and name.startswith("_") and not name.startswith("__") and target != module]
    # `import mqa.x as y` / `from mqa import x` bind modules; `y._z` reads a private name.
    aliases = {}
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in library():
                    aliases[alias.asname or alias.name] = alias.name
        else:
            base = _base(module, path.name == "__init__.py", node)
            for alias in node.names:
                if f"{base}.{alias.name}" in library():
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            owner = ast.unparse(node.value)
            if aliases.get(owner, module) != module:
                found.append(f"{node.lineno}: {owner}.{node.attr}")
    return found


def _relative(path: pathlib.Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_layout_checks_find_what_they_look_for(tmp_path):
    """The checks themselves, on a made-up package: a cycle through a function-level import
    and a package re-export, a private import, and a TYPE_CHECKING import left out."""
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("import x\nif TYPE_CHECKING:\n    import y\ndef f():\n    from . import z\n")
    assert sorted(type(n).__name__ for n in _imports(tree)) == ["Import", "ImportFrom"]
    node = ast.parse("from ..b import c").body[0]
    assert _base("mqa.pkg.mod", False, node) == "mqa.b"
    assert _base("mqa.pkg", True, ast.parse("from .core import x").body[0]) == "mqa.pkg.core"
    # The real graph resolves re-exports to the package and submodules to themselves.
    assert ("mqa.attention", "family", ) in {(t, n) for t, n, _ in imports_of("mqa.model")}
    assert "mqa.attention.protocol" in import_graph()["mqa.attention"]


def test_no_import_cycle_among_mqa_modules():
    found = cycles(import_graph())
    assert not found, "import cycles (modules that import each other, directly or not): " + \
        "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.parametrize("module", sorted(library()))
def test_no_module_imports_another_modules_private_names(module):
    assert not private_uses(module), f"{module} uses private names: {private_uses(module)}"


@pytest.mark.parametrize("path", [_relative(p) for p in library().values()])
def test_library_modules_are_at_most_400_lines(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines"


@pytest.mark.parametrize("path", SCRIPTS)
def test_entry_scripts_are_under_150_lines(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines < MAX_SCRIPT_LINES, f"{path} has {lines} lines"


def test_no_test_module_imports_another():
    tests = {path.stem for path in (REPO / "tests").glob("test_*.py")}
    found = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in _imports(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""])
            found += [f"{path.name}:{node.lineno} imports {name}" for name in names
                      if name.removeprefix("tests.") in tests]
    assert not found, "; ".join(found)
