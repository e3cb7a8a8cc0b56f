"""House rules that code review alone would let slip, over every module of sft/ and its wings (lazy imports
inside functions count too): no import cycle; no module or wing named like a stdlib module; and the layers
import downwards only: sft.config <- sft.data <- sft.model <- sft.training <- the tools and recipes in sft/."""

import ast
import sys
from pathlib import Path

SFT = Path(__file__).resolve().parents[1] / "sft"
# the layer of each wing; modules directly in sft/ are the tools and recipes (top), except config (bottom)
LAYER = {"config": 0, "data": 1, "model": 2, "training": 3}
TOP = 4


def _modules() -> dict[str, Path]:
    """Dotted names below ``sft`` (``config``, ``data.render``, ``training.trainer``...) -> file."""
    return {
        ".".join(p.relative_to(SFT).with_suffix("").parts): p
        for p in SFT.rglob("*.py")
        if p.name != "__init__.py"
    }


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "sft":
                base = node.module.split(".")[1:]
                for (
                    a
                ) in node.names:  # `from sft.training import runs` names a module; `from sft.x import f` not
                    dotted = ".".join([*base, a.name])
                    deps.add(dotted if dotted in mods else ".".join(base))
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("sft.")}
        graph[name] = (deps & set(mods)) - {name}
    return graph


def _layer(module: str) -> int:
    head = module.split(".")[0]
    return LAYER.get(head, TOP)


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
    assert {"training.trainer", "training.engine", "training.memory", "model.models", "data.prepare"} <= set(
        graph
    )
    assert "training.engine" in graph["training.trainer"] and "training.runs" in graph["training.checkpoints"]
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_from_a_lower_wing_into_a_higher_one():
    graph = _graph()
    upward = sorted(f"{m} -> {d}" for m, deps in graph.items() for d in deps if _layer(d) > _layer(m))
    assert upward == []


def test_the_layer_check_sees_an_upward_import():
    assert _layer("data.render") < _layer("model.models") < _layer("training.engine") < _layer("chat")
    assert _layer("config") == 0


def test_the_wings_are_where_the_layout_says():
    wings = {p.name for p in SFT.iterdir() if (p / "__init__.py").is_file()}
    assert wings == {"data", "model", "training"}
    for w in wings:  # each wing's first docstring line says what it is for
        doc = ast.get_docstring(ast.parse((SFT / w / "__init__.py").read_text()))
        assert doc and doc.startswith(f"The {w} wing"), w


def test_no_module_shadows_the_standard_library():
    names = {p.stem for p in SFT.rglob("*.py")} | {p.name for p in SFT.rglob("*") if p.is_dir()}
    assert names & set(sys.stdlib_module_names) == set()
