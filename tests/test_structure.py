"""The shape of the code: uses point one way, no import cycles, short functions.

Imports are read from the source (``ast``), not by importing: an import inside a function is
an edge too (a lazy import is still a dependency), and importing ``a.b.c`` runs the
``__init__`` of ``a.b`` as well, so that is an edge unless the importer lives inside ``a.b``.
``if TYPE_CHECKING:`` imports are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "agelab"

#: Longest function allowed in src/ (lines, decorators excluded).
MAX_FUNCTION_LINES = 80


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module an ``import`` / ``from … import`` may load; for
    ``from a.b import c`` the entry is ``"a.b.c|a.b"`` (module a.b.c, or name c of a.b)."""
    out: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from a.b import c``: the module a.b.c if there is one, else a name of a.b.
            out.update(f"{base}.{alias.name}|{base}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = all_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets = set()
        for imported in imported_names(ast.parse(path.read_text()), name, is_package):
            imported, _, base = imported.partition("|")
            if imported not in modules:
                imported = base  # a name defined in module ``base``
            if imported not in modules:
                continue  # outside agelab
            parts = imported.split(".")
            for i in range(2, len(parts) + 1):  # a.b.c loads a.b's __init__ (not a's: agelab)
                target = ".".join(parts[:i])
                inside = name == target or name.startswith(target + ".")
                if target in modules and (target == imported or not inside):
                    targets.add(target)
        targets.discard(name)
        graph[name] = targets
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
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
        for w in graph.get(v, ()):
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


def test_the_cycle_finder_finds_a_planted_cycle() -> None:
    graph = import_graph()
    assert graph["agelab.cli"], "the walker found no imports in cli.py"
    planted = {k: set(v) for k, v in graph.items()}
    planted["agelab.errors"].add("agelab.cli")
    assert any("agelab.errors" in c and "agelab.cli" in c for c in cycles(planted))


def test_no_import_cycles() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles (a lazy import counts): " + "; ".join(
        " ↔ ".join(c) for c in found
    )


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph.get(todo.pop(), ()):
            if w not in seen:
                seen.add(w)
                todo.append(w)
    return seen


@pytest.mark.parametrize(
    ("lower", "upper"),
    [
        ("agelab.study", "agelab.cli"),
        ("agelab.objective", "agelab.study"),
        ("agelab.report", "agelab.study"),
        ("agelab.report", "agelab.reporting"),
        ("agelab.config", "agelab.study"),
        ("agelab.data.load", "agelab.objective"),
        ("agelab.models", "agelab.config"),
        ("agelab.train", "agelab.objective"),
        ("agelab.metrics", "agelab.report"),
        ("agelab.tracking", "agelab.study"),
    ],
)
def test_uses_point_one_way(lower: str, upper: str) -> None:
    """cli → study → objective → (data, models, train, metrics, plots, tracking); the report
    reads a DataFrame and never reaches the study (nor does anything below reach up)."""
    graph = import_graph()
    below = {m for m in graph if m == lower or m.startswith(lower + ".")}
    bad = [m for m in sorted(below) if upper in reaches(graph, m) | {m}]
    assert not bad, f"{', '.join(bad)} reach(es) {upper}"


def third_party_imports(path: Path) -> set[str]:
    name = module_name(path)
    tree = ast.parse(path.read_text())
    names = imported_names(tree, name, path.name == "__init__.py")
    return {n.split(".")[0] for n in names}


def test_optuna_and_mlflow_each_behind_one_seam() -> None:
    """optuna only in agelab.study (and ui's optuna-dashboard); mlflow only in agelab.tracking.
    ``agelab.bench`` is the exception by design: it builds the hand-wired pipelines agelab is
    measured against."""
    offenders = []
    for name, path in all_modules().items():
        used = third_party_imports(path)
        if name.startswith("agelab.bench"):
            continue
        if "mlflow" in used and not name.startswith("agelab.tracking"):
            offenders.append(f"{name} imports mlflow")
        if {"optuna", "optuna_integration"} & used and not name.startswith("agelab.study"):
            offenders.append(f"{name} imports optuna")
        if name.startswith("agelab.metrics") and "torch" in used:
            offenders.append(f"{name} imports torch (metrics are pure numpy/scipy)")
    assert not offenders, offenders


def test_private_optuna_api_only_in_the_compat_module() -> None:
    private = ("._storage", "._trial_id", "._pop_waiting_trial_id", "._suggest(")
    offenders = [
        f"{name}: {p}"
        for name, path in all_modules().items()
        if name != "agelab.study.optuna_compat"
        for p in private
        if p in path.read_text()
    ]
    assert not offenders, offenders


def long_functions(limit: int) -> list[str]:
    out = []
    for name, path in all_modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    out.append(f"{name}.{node.name}: {lines} lines")
    return out


def test_functions_read_in_one_sitting() -> None:
    too_long = long_functions(MAX_FUNCTION_LINES)
    assert not too_long, f"functions over {MAX_FUNCTION_LINES} lines: {too_long}"


def test_the_long_function_check_can_fail() -> None:
    assert long_functions(10), "no function over 10 lines found: the walker reads nothing"
