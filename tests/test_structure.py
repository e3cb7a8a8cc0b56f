"""House rules that code review alone would let slip: no import cycle between the modules of sft/ (lazy
imports inside functions count too), and no module directly in sft/ named like a stdlib module."""

import ast
import sys
from pathlib import Path

SFT = Path(__file__).resolve().parents[1] / "sft"


def _graph() -> dict[str, set[str]]:
    mods = {p.stem for p in SFT.glob("*.py")}
    graph = {}
    for name in mods:
        deps = set()
        for node in ast.walk(ast.parse((SFT / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sft":
                parts = node.module.split(".")
                deps |= {a.name for a in node.names} if len(parts) == 1 else {parts[1]}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("sft.")}
        graph[name] = (deps & mods) - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_in_sft():
    graph = _graph()
    assert {"trainer", "engine", "memory", "models", "prepare", "runs", "distributed"} <= set(graph)
    assert "engine" in graph["trainer"] and "runs" in graph["distributed"]  # the graph is really read
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_module_shadows_the_standard_library():
    clash = {p.stem for p in SFT.glob("*.py")} & set(sys.stdlib_module_names)
    assert clash == set()
