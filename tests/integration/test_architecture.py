"""The package's layering, read from the source: no import cycle, the library never imports the CLI, and
private names (``_name``) stay inside their package.

Imports are collected from the AST of every module under ``src/expertscope``: top-level and lazy
(inside functions) imports count; imports under ``if TYPE_CHECKING:`` do not (they never run).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = "expertscope"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted((SRC / PKG).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that can run: all of them except those in an ``if TYPE_CHECKING:`` body."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _resolve(module: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if node.level == 0:
        return node.module or ""
    is_package = MODULES[module].name == "__init__.py"
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _edges() -> dict[str, set[tuple[str, str | None]]]:
    """``{module: {(imported module, imported name or None)}}`` for imports of modules of this package."""
    out: dict[str, set[tuple[str, str | None]]] = {}
    for module, path in MODULES.items():
        targets: set[tuple[str, str | None]] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets |= {(a.name, None) for a in node.names if a.name.split(".")[0] == PKG}
                continue
            base = _resolve(module, node)
            if base.split(".")[0] != PKG:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                # `from pkg import submodule` imports the submodule; `from mod import name` the module
                targets.add((sub, None) if sub in MODULES else (base, alias.name))
        out[module] = {(m, n) for m, n in targets if m in MODULES and m != module}
    return out


EDGES = _edges()
GRAPH = {m: {t for t, _ in e} for m, e in EDGES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return found


def _package(module: str) -> str:
    """The package a module belongs to: ``expertscope.causal`` for ``expertscope.causal.sweep``."""
    return module if MODULES[module].name == "__init__.py" else module.rsplit(".", 1)[0]


def test_the_scanner_sees_the_package() -> None:
    assert len(MODULES) > 30 and "expertscope.routing" in MODULES
    assert "expertscope.models.hooks" in GRAPH["expertscope.routing"]
    # lazy imports inside functions count: the intervention study imports the evaluation inside a function
    assert "expertscope.evaluation.evaluate" in GRAPH["expertscope.interventions.steering_study"]


def test_cycle_detection_finds_a_planted_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle() -> None:
    assert _cycles(GRAPH) == []


def test_the_library_never_imports_the_cli() -> None:
    bad = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
                 if not m.startswith(f"{PKG}.cli") and (t == f"{PKG}.cli" or t.startswith(f"{PKG}.cli.")))
    assert bad == []


def test_the_library_never_imports_its_test_helpers() -> None:
    """``expertscope.testing`` (tiny models, planted and carrier models, failure injection) is for tests and
    benchmarks: no library module imports it."""
    bad = sorted(f"{m} imports {t}" for m, ts in GRAPH.items() for t in ts
                 if not m.startswith(f"{PKG}.testing") and (t == f"{PKG}.testing" or t.startswith(f"{PKG}.testing.")))
    assert bad == []


def test_private_names_stay_in_their_package() -> None:
    bad = []
    for module, edges in EDGES.items():
        for target, name in edges:
            private_module = any(part.startswith("_") and not part.startswith("__") for part in target.split("."))
            private_name = name is not None and name.startswith("_") and not name.startswith("__")
            if (private_module or private_name) and not _package(module).startswith(_package(target)):
                bad.append(f"{module} imports {target}{'.' + name if name else ''}")
    assert sorted(bad) == []


@pytest.mark.parametrize("leaf", ["errors", "config", "io", "progress"])
def test_leaves_import_no_other_layer(leaf: str) -> None:
    allowed = {f"{PKG}.errors", f"{PKG}.config", f"{PKG}.io", f"{PKG}.progress"}
    assert GRAPH[f"{PKG}.{leaf}"] <= allowed


def test_routing_and_execution_sit_below_the_analyses() -> None:
    analyses = ("stats", "causal", "interventions", "evaluation", "report", "pipeline", "cli")
    for low in ("routing", "execution"):
        reached = _reachable(f"{PKG}.{low}")
        assert not [m for m in reached if m.split(".")[1] in analyses], f"{low} depends on an analysis"


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for t in GRAPH[todo.pop()]:
            if t not in seen:
                seen.add(t)
                todo.append(t)
    return seen


def _top(module: str) -> str:
    """The first-level package (or top-level module) a module belongs to: ``expertscope.causal`` for
    ``expertscope.causal.sweep``, ``expertscope.errors`` for itself."""
    return ".".join(module.split(".")[:2])


def _package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between first-level packages, without the public facade ``expertscope/__init__``."""
    out: dict[str, set[str]] = {}
    for m, targets in graph.items():
        if m == PKG:
            continue
        out.setdefault(_top(m), set())
        for t in targets:
            if t != PKG and _top(t) != _top(m):
                out[_top(m)].add(_top(t))
                out.setdefault(_top(t), set())
    return out


def test_package_cycle_detection_sees_a_cycle_through_two_packages() -> None:
    # models/loading -> demo and demo/train -> models: no module cycle, but a package cycle.
    graph = {"expertscope.models.loading": {"expertscope.demo"}, "expertscope.demo": set(),
             "expertscope.demo.train": {"expertscope.models.model"}, "expertscope.models.model": set()}
    assert _cycles(graph) == []
    assert _cycles(_package_graph(graph)) == [["expertscope.demo", "expertscope.models"]]


def test_no_package_level_cycle() -> None:
    assert _cycles(_package_graph(GRAPH)) == []
