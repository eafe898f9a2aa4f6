"""Layer rules, read from the source with ``ast`` (module-level and function-local imports alike).

core (problem, stats, solve, solvers, gradients, layer, kv_cache, nn, tree, regularization, files, errors)
imports nothing from models, training, evaluation or the CLI; models import nothing from training,
evaluation or the CLI; training reaches a model family only through its task registry
(``deqgen.training.tasks``); and the package has no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deqgen"
CORE = (
    "problem",
    "stats",
    "solve",
    "solvers",
    "gradients",
    "layer",
    "kv_cache",
    "nn",
    "tree",
    "regularization",
    "files",
    "errors",
)
APPLICATION = ("deqgen.models", "deqgen.training", "deqgen.evaluation", "deqgen.cli")


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, name: str, modules: set[str]) -> set[str]:
    """Every module of ``modules`` that ``path`` imports, anywhere in the file. ``from x import y`` counts
    ``x.y`` when that is a module, else ``x``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base)
    return found & modules


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports (names that are not modules, like classes, are dropped)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: imports_of(path, name, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None. Parent packages' ``__init__`` imports
    are not followed implicitly: only written imports count."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def _is_under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


GRAPH = import_graph()


@pytest.mark.parametrize(
    "module", sorted(m for m in GRAPH if _is_under(m, tuple(f"deqgen.{c}" for c in CORE)))
)
def test_core_imports_no_application_layer(module: str) -> None:
    bad = sorted(m for m in GRAPH[module] if _is_under(m, APPLICATION))
    assert not bad, f"{module} (core) imports {bad}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _is_under(m, ("deqgen.models",))))
def test_models_import_no_training_evaluation_or_cli(module: str) -> None:
    bad = sorted(
        m for m in GRAPH[module] if _is_under(m, ("deqgen.training", "deqgen.evaluation", "deqgen.cli"))
    )
    assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize(
    "module",
    sorted(
        m
        for m in GRAPH
        if _is_under(m, ("deqgen.training",)) and not _is_under(m, ("deqgen.training.tasks",))
    ),
)
def test_training_engine_reaches_models_only_through_the_task_registry(module: str) -> None:
    bad = sorted(m for m in GRAPH[module] if _is_under(m, ("deqgen.models",)))
    assert not bad, f"{module} imports {bad}; go through deqgen.training.tasks"


def test_no_import_cycles() -> None:
    assert find_cycle(GRAPH) is None, f"import cycle: {' -> '.join(find_cycle(GRAPH) or [])}"


def test_a_planted_function_local_cycle_is_found(tmp_path: Path) -> None:
    """The checker sees imports inside functions: two modules importing each other lazily form a cycle."""
    pkg = tmp_path / "deqgen"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "a.py").write_text("def f():\n    from deqgen.sub.b import g\n    return g\n")
    (pkg / "sub" / "b.py").write_text("from . import a\n\ndef g():\n    return a\n")
    graph = import_graph(pkg)
    assert graph["deqgen.sub.a"] == {"deqgen.sub.b"} and graph["deqgen.sub.b"] == {"deqgen.sub.a"}
    assert find_cycle(graph) is not None
    (pkg / "sub" / "a.py").write_text("def f():\n    return 1\n")
    assert find_cycle(import_graph(pkg)) is None
