"""The backend's structure, read from its source: no import circles, every error under one
root, CLI code only in backend/cli/. No server; these run in a second."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

from backend.errors import BackendError

BACKEND = Path(__file__).resolve().parent.parent / "backend"
# Research scripts of the pocket organism, run as `python -m backend.organism.<name>`, not
# commands of `python -m backend`.
ORGANISM_SCRIPTS = {"backend.organism.pocket.heldout", "backend.organism.pocket.measure",
                    "backend.organism.pocket.sweep"}


def modules() -> dict[str, Path]:
    found = {}
    for path in BACKEND.rglob("*.py"):
        name = ".".join(path.relative_to(BACKEND.parent).with_suffix("").parts).removesuffix(".__init__")
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """Every backend module `path` imports: at the top, inside functions and under TYPE_CHECKING."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names if alias.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                out.add(node.module)
            out |= {f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known}
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
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

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    # The check below means something only if a circle would be seen.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_backend_module_imports_one_that_imports_it_back():
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert "backend.lora_files" in graph["backend.serving"]  # the graph is read, not empty
    assert cycles(graph) == []


def test_every_backend_error_derives_from_backend_error():
    classes = []
    for name in modules():
        if name in ORGANISM_SCRIPTS or name.startswith("backend.organism"):
            continue
        module = importlib.import_module(name)
        classes += [obj for _, obj in inspect.getmembers(module, inspect.isclass)
                    if issubclass(obj, Exception) and obj.__module__ == name]
    assert len(classes) >= 15
    outside = [cls.__qualname__ for cls in classes if not issubclass(cls, BackendError)]
    assert outside == []


@pytest.mark.parametrize("name", sorted(n for n in modules() if not n.startswith("backend.cli")
                                        and n not in ORGANISM_SCRIPTS and n != "backend.__main__"))
def test_library_modules_hold_no_cli_code(name):
    tree = ast.parse(modules()[name].read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    functions = {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef)}
    assert "argparse" not in imported
    assert not {f for f in functions if f.startswith(("_cmd_", "cmd_")) or f == "register_cli"}


# Each module of backend/evaluation/ may import only those before it: what a run is (spec)
# and what it stores (persistence) must not depend on how it is run, or the pages that only
# read progress would pull in the runner's machinery, and a circle would be one edit away.
EVALUATION_LAYERS = ("spec", "persistence", "runner", "launch")


def test_evaluation_modules_import_only_earlier_layers():
    known = modules()
    package = {n.removeprefix("backend.evaluation.") for n in known if n.startswith("backend.evaluation.")}
    assert package == set(EVALUATION_LAYERS)
    for index, layer in enumerate(EVALUATION_LAYERS):
        found = imports(known[f"backend.evaluation.{layer}"], known)
        assert "backend.evaluation" not in found, layer  # the package imports its modules, not back
        inside = {n.removeprefix("backend.evaluation.") for n in found if n.startswith("backend.evaluation.")}
        assert inside <= set(EVALUATION_LAYERS[:index]), layer


def test_evaluation_modules_stay_small():
    sizes = {n: len(p.read_text().splitlines()) for n, p in modules().items() if n.startswith("backend.evaluation")}
    assert len(sizes) == len(EVALUATION_LAYERS) + 1
    assert {n: size for n, size in sizes.items() if size > 400} == {}
