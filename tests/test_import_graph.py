"""No import cycle in loom/, and no import from a higher layer: each module's imports
(also those under TYPE_CHECKING or inside functions, which only hide one) form a graph
without loops that runs only downwards through LAYERS, so every layer can be read, tested
and replaced without the ones that build on it. A part that needs its caller gets what it
needs passed in (values, a part, a small protocol), never the caller's module."""

from __future__ import annotations

import ast
from pathlib import Path

LOOM = Path(__file__).resolve().parents[1] / "loom"

# The layers, lowest first (docs/architecture.md, "Import rules"): a module imports only
# from its own layer and the layers below. A module belongs to the longest prefix listed.
LAYERS = (
    (
        "loom.version",
        "loom.runtime",  # the package itself is empty
        "loom.runtime.logs",
        "loom.runtime.args",
        "loom.runtime.forward",
        "loom.runtime.memory",
        "loom.runtime.process_util",
        "loom.runtime.watchdog",
        "loom.constrain",
    ),
    ("loom.radix",),
    ("loom.runtime.layers",),
    ("loom.runtime.models",),
    ("loom.runtime.executor",),
    ("loom.runtime.sampling", "loom.runtime.messages"),
    ("loom.runtime.scheduler", "loom.runtime.tokenizer"),
    ("loom.runtime.launch", "loom.runtime.engine"),
    ("loom.runtime.http",),
    ("loom.backends",),
    ("loom.lang",),
    ("loom", "loom.cli", "loom.serve"),
)
# The language talks to a backend and shares the grammar layer; it never reaches into the
# runtime (a program runs the same on an Engine, a server or OpenAI).
LANG_MAY_IMPORT = ("loom.lang", "loom.backends", "loom.constrain", "loom.version")


def module_names() -> dict[str, Path]:
    names = {}
    for path in LOOM.rglob("*.py"):
        parts = list(path.relative_to(LOOM.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names[".".join(parts)] = path
    return names


def imported(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The loom modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the package, `level - 1` packages up
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            found.add(base)  # `from pkg import mod` imports pkg.mod too
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return {m for m in found if m in known and m != name}


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, edges = work[-1]
            child = next(edges, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    component = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.add(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(component)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph[child]))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return found


def layer_of(name: str) -> int:
    matches = [
        (len(prefix), level)
        for level, prefixes in enumerate(LAYERS)
        for prefix in prefixes
        if name == prefix or name.startswith(prefix + ".")
    ]
    assert matches, f"{name} is in no layer: add it to LAYERS (and to docs/architecture.md)"
    return max(matches)[1]


def within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def test_the_finder_sees_a_cycle_through_a_function_level_import():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [{"a", "b", "c"}]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_loom_has_no_import_cycle():
    known = module_names()
    graph = {name: imported(name, path, known) for name, path in known.items()}
    assert "loom.lang.executor" in graph["loom.lang.interpreter"]  # the graph is read
    found = [sorted(c) for c in cycles(graph)]
    assert not found, (
        f"import cycles: {found}; break them (pass the callee in, move the shared type)"
    )


def test_every_import_runs_down_the_layers():
    known = module_names()
    assert layer_of("loom.runtime.layers.mlp") < layer_of("loom.runtime.executor.cuda_graph")
    assert layer_of("loom.lang.api") < layer_of("loom")  # the longest prefix decides
    upward = [
        f"{name} -> {dep}"
        for name, path in sorted(known.items())
        for dep in sorted(imported(name, path, known))
        if layer_of(dep) > layer_of(name)
    ]
    assert not upward, f"imports from a higher layer: {upward}; pass the caller's part in"


def test_the_language_reaches_the_runtime_only_through_a_backend():
    known = module_names()
    reached = [
        f"{name} -> {dep}"
        for name, path in sorted(known.items())
        if within(name, ("loom.lang",))
        for dep in sorted(imported(name, path, known))
        if not within(dep, LANG_MAY_IMPORT)
    ]
    assert not reached, f"the language imports the runtime: {reached}"
