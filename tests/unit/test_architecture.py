"""The package's shape, checked on its source: no import cycles, a pure model leaf, one class per idea, small files.

Read with `ast`, never imported: imports inside functions count (a lazy import is still a dependency),
`if TYPE_CHECKING:` blocks do not (they never run).
"""

from __future__ import annotations

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "cogbatch"
MAX_LINES = 500
MAX_CLI_MODULE_LINES = 200  # the CLI only parses, calls cogbatch.api and prints: no module of it grows long


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imported(module: str, tree: ast.AST) -> set[str]:
    """The cogbatch modules `module` imports anywhere in its body (functions included)."""
    found: set[str] = set()
    is_package = MODULES[module].name == "__init__.py"

    def target(name: str) -> str:
        return name if name in MODULES else name.rpartition(".")[0] if name.rpartition(".")[0] in MODULES else name

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(target(a.name) for a in node.names if a.name.split(".")[0] == "cogbatch")
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] == "cogbatch":
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    found.add(sub if sub in MODULES else target(base))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    found.discard(module)
    return {m for m in found if m in MODULES}


GRAPH = {m: _imported(m, ast.parse(p.read_text(), str(p))) for m, p in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def strongconnect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def test_the_checker_sees_a_cycle_through_a_lazy_import():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from cogbatch.errors import exit_code_for\n")
    assert _imported("cogbatch.cli", tree) == {"cogbatch.errors"}


def test_no_import_cycle_among_cogbatch_modules():
    assert _cycles(GRAPH) == []


def test_the_model_package_is_a_leaf():
    outside = {
        m: sorted(d for d in deps if not d.startswith("cogbatch.model"))
        for m, deps in GRAPH.items()
        if m.startswith("cogbatch.model")
    }
    assert {m: deps for m, deps in outside.items() if deps} == {}


@pytest.mark.parametrize("name", ["QuantConfig", "GenerationConfig", "ConfigError"])
def test_one_class_per_settings_idea(name):
    defined = Counter(
        _module_name(path)
        for path in MODULES.values()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and node.name == name
    )
    assert sum(defined.values()) == 1, dict(defined)


def test_no_file_is_too_long():
    lengths = {m: len(p.read_text().splitlines()) for m, p in MODULES.items()}
    assert {m: n for m, n in lengths.items() if n > MAX_LINES} == {}
    cli = {m: n for m, n in lengths.items() if m == "cogbatch.cli" or m.startswith("cogbatch.cli.")}
    assert len(cli) > 1
    assert {m: n for m, n in cli.items() if n > MAX_CLI_MODULE_LINES} == {}
