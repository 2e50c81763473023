"""The project's import graph, read from the source with `ast` (nothing is imported): no cycles, and the
layering README states: nothing in `pipeline/` imports `stages/` but the CLI (`pipeline/__main__.py`), and no
stage imports another.

Nodes are the modules under pipeline/ and stages/, package `__init__`s included (as the package's name).
Edges are every import of one of them wherever it is written: at module level, inside a function, a class,
an `if` or a `try`, absolute or relative. `from pipeline.x import y` is an edge to pipeline.x.y when y is a
submodule, else to pipeline.x. A parent package that Python initialises on the way is not an edge of its
own: a package importing its submodules is not a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("pipeline", "stages")
CLI = "pipeline.__main__"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Module name -> source file, for every .py file under the project's packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "__pycache__" not in path.parts:
                found[module_name(path)] = path
    return found


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """`name` if it is a project module, else its nearest ancestor that is one; None outside the project."""
    if name.split(".")[0] not in PACKAGES:
        return None
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules that module `name` (source `path`) imports, anywhere in its source."""
    package = name if _is_package(path) else name.rpartition(".")[0]
    edges: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from the module's package, one level up per extra dot
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)] if node.level > 1 else base
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = []
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                targets.append(submodule if submodule in modules else source)
        else:
            continue
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != name:
                edges.add(resolved)
    return edges


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a -> ... -> a) per group of modules that import each other, round or not."""
    return [_cycle_within(graph, set(group)) for group in cycle_groups(graph)]


def cycle_groups(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, each sorted (Tarjan, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return sorted(components)


def _cycle_within(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first module, staying inside the component (breadth first)."""
    start = min(component)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following = []
        for node in frontier:
            for child in sorted(graph[node] & component):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start] if node != start else [start, start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no cycle found in component {sorted(component)}")


# ---------------------------------------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_the_graph_sees_every_kind_of_import(graph):
    """The reader itself: function-level imports, `from package import submodule`, package __init__s."""
    assert {"pipeline", "pipeline.features", "stages", CLI} <= set(graph)
    assert "stages.extract" in graph[CLI]  # `from stages import extract as stage`, inside a command function
    assert "pipeline.features.reader" in graph["pipeline.features.plan"]
    assert "pipeline.features.weights_lpips" in graph["pipeline.features.weights"]  # from ... import submodule


def test_the_import_graph_has_no_cycles(graph):
    described = []
    for group in cycle_groups(graph):
        cycle = _cycle_within(graph, set(group))
        others = sorted(set(group) - set(cycle))
        described.append(" -> ".join(cycle) + (f" (tangled with {', '.join(others)})" if others else ""))

    assert not described, "import cycles: " + "; ".join(described)


def test_nothing_in_pipeline_imports_stages_but_the_cli(graph):
    offenders = sorted(f"{name} -> {target}" for name, targets in graph.items()
                       if name.split(".")[0] == "pipeline" and name != CLI
                       for target in targets if target.split(".")[0] == "stages")

    assert not offenders, f"pipeline/ modules importing stages/ (only {CLI} may): " + ", ".join(offenders)


def test_no_stage_imports_another_stage(graph):
    stage_modules = {name for name in graph if name.startswith("stages.")}
    offenders = sorted(f"{name} -> {target}" for name in stage_modules
                       for target in graph[name] if target in stage_modules)

    assert not offenders, "stages importing other stages: " + ", ".join(offenders)


def test_a_cycle_is_named_module_by_module():
    """The checker on a made-up graph: a cycle among other edges is found and spelt out in order."""
    made_up = {"a": {"b"}, "b": {"c", "d"}, "c": {"a"}, "d": set(), "e": {"e2"}, "e2": {"e"}}

    assert find_cycles(made_up) == [["a", "b", "c", "a"], ["e", "e2", "e"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []
