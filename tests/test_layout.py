"""The library's structure, checked statically (nothing is imported or run):

(a) no import cycle among `mqa` modules, imports inside functions included (only an
    `if TYPE_CHECKING:` block, which never runs, is left out); `from mqa.pkg import name`
    is an edge to `mqa.pkg.name` where that is a module and to the package `mqa.pkg`
    (its `__init__`, which re-exports it) where it is not;
(b) no module imports another module's private (underscore) name, by `from m import _x`
    or as `m._x` of a module it imported;
(c) no library module is over 400 lines;
(d) the entry scripts `train.py`, `eval.py`, `sweep.py` are under 150 lines.
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

# What is being restructured on other branches (issue #24) and fails a rule today: the
# marks come off once those branches are merged.
SPLIT = "is being split on another branch (issue #24)"
BEING_SPLIT = {  # (c), (d): too long
    "mqa/convert.py": f"mqa/convert.py (473 lines) {SPLIT}",
    "mqa/data/__init__.py": f"mqa/data/__init__.py (514 lines) {SPLIT}",
    "sweep.py": "sweep.py (325 lines) is being moved into mqa/ on another branch (issue #24)",
}
IN_A_CYCLE = {  # (a): mqa.convert -> mqa.export_hf, mqa.gguf_llama (in functions) -> mqa.convert
    module: f"{module} is in the import cycle through mqa.convert, which {SPLIT}"
    for module in ("mqa.convert", "mqa.export_hf", "mqa.gguf_llama", "mqa.gguf_tokenizer")}
PRIVATE_IMPORTS = {  # (b)
    "mqa.data": f"mqa/data/__init__.py re-exports mqa.data.tokenizers' private helpers; mqa/data {SPLIT}",
    "mqa.data.__main__": f"mqa/data/__main__.py reads mqa.trainer._data_config; mqa/trainer.py {SPLIT}",
    "mqa.export_hf": f"mqa/export_hf.py imports mqa.convert._dotted_arrays; mqa/convert.py {SPLIT}",
    "mqa.gguf_llama": f"mqa/gguf_llama.py imports mqa.convert's _check_new_workdir, _write_workdir; "
                      f"mqa/convert.py {SPLIT}",
    "mqa.gguf_tokenizer": f"mqa/gguf_tokenizer.py reads mqa.data._byte_level_chars; mqa/data {SPLIT}",
}


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


def resolved_imports(module: str, tree: ast.AST, is_package: bool, modules) -> list[tuple[str, str | None, int]]:
    """(imported module, name imported from it or None, line) for each import in `module`
    (parsed as `tree`) of one of `modules`, resolved as the module docstring says."""
    found = []
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names
                      if alias.name in modules]
            continue
        base = _base(module, is_package, node)
        if base not in modules:
            continue
        for alias in node.names:
            submodule = f"{base}.{alias.name}"
            found.append((submodule, None, node.lineno) if submodule in modules
                         else (base, alias.name, node.lineno))
    return found


def private_names(module: str, tree: ast.AST, is_package: bool, modules) -> list[str]:
    """'line: what' for each private name of another of `modules` that `module` uses:
    `from m import _x`, or `m._x` of a module `m` it imported."""
    found = [f"{line}: from {target} import {name}"
             for target, name, line in resolved_imports(module, tree, is_package, modules)
             if name and name.startswith("_") and not name.startswith("__") and target != module]
    aliases = {}  # `import mqa.x as y` / `from mqa import x` bind modules
    for node in _imports(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in modules:
                    aliases[alias.asname or alias.name] = alias.name
        else:
            base = _base(module, is_package, node)
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{base}.{alias.name}"
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            owner = ast.unparse(node.value)
            if aliases.get(owner, module) != module:
                found.append(f"{node.lineno}: {owner}.{node.attr}")
    return found


@functools.lru_cache(maxsize=None)
def _parsed(module: str) -> tuple[ast.AST, bool]:
    path = library()[module]
    return ast.parse(path.read_text(), str(path)), path.name == "__init__.py"


def imports_of(module: str) -> list[tuple[str, str | None, int]]:
    return resolved_imports(module, *_parsed(module), library())


def private_uses(module: str) -> list[str]:
    return private_names(module, *_parsed(module), library())


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


def _marked(items, reasons):
    return [pytest.param(item, marks=pytest.mark.xfail(reason=reasons[item], strict=False))
            if item in reasons else item for item in items]


def _relative(path: pathlib.Path) -> str:
    return path.relative_to(REPO).as_posix()


def test_the_layout_checks_find_what_they_look_for():
    """The checks themselves, on made-up modules: a cycle, an import inside a function, a
    relative import, a package re-export, private names imported or read, and an import
    under TYPE_CHECKING left out."""
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    modules = {"p", "p.core", "p.model", "p.util"}
    tree = ast.parse("import p.util as u\n"
                     "from p import Name\n"
                     "if TYPE_CHECKING:\n    from p.model import Model\n"
                     "def f():\n    from .core import _helper, public\n    return u._hidden\n")
    found = resolved_imports("p.model", tree, False, modules)
    assert sorted((t, n) for t, n, _ in found) == [
        ("p", "Name"), ("p.core", "_helper"), ("p.core", "public"), ("p.util", None)]
    assert sorted(private_names("p.model", tree, False, modules)) == [
        "6: from p.core import _helper", "7: u._hidden"]
    assert _base("p.pkg", True, ast.parse("from .core import x").body[0]) == "p.pkg.core"
    assert _base("p.pkg.mod", False, ast.parse("from ..b import c").body[0]) == "p.b"
    # The real graph: a re-export is an edge to the package, the package to its modules.
    assert ("mqa.attention", "family") in {(t, n) for t, n, _ in imports_of("mqa.model")}
    assert "mqa.attention.protocol" in import_graph()["mqa.attention"]


@pytest.mark.parametrize("module", _marked(sorted(library()), IN_A_CYCLE))
def test_no_module_is_in_an_import_cycle(module):
    found = [c for c in cycles(import_graph()) if module in c]
    assert not found, f"{module} is in an import cycle: {' <-> '.join(found[0])}"


@pytest.mark.parametrize("module", _marked(sorted(library()), PRIVATE_IMPORTS))
def test_no_module_imports_another_modules_private_names(module):
    assert not private_uses(module), f"{module} uses private names: {private_uses(module)}"


@pytest.mark.parametrize("path", _marked([_relative(p) for p in library().values()], BEING_SPLIT))
def test_library_modules_are_at_most_400_lines(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path} has {lines} lines"


@pytest.mark.parametrize("path", _marked(SCRIPTS, BEING_SPLIT))
def test_entry_scripts_are_under_150_lines(path):
    lines = len((REPO / path).read_text().splitlines())
    assert lines < MAX_SCRIPT_LINES, f"{path} has {lines} lines"
