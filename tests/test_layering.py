"""The package's shape (docs/architecture.md): imports point one way, from the front ends down to
the kernels, and no module reaches itself again through others. Lazy imports inside functions
count too: they break the shape the same way, only later."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Source folders and the package each installs as (setup.py's package_dir).
TREES = {"kimivl_local": "kimivl_local", "quantize": "kimivl_local.quantize",
         "app": "kimivl_local.app"}
# Lowest first. A module may import its own layer and the layers below it, never above.
LAYERS = [
    ["errors"],
    ["kernels", "checkpoint"],  # the extension's border; checkpoint files, config, Hub cache
    ["quant", "inputs"],  # weight formats; user inputs to tokens and pixels
    ["ops"],  # ops on torch tensors, each with its torch reference
    ["model"],  # nn.Modules: MoonViT, projector, MLA/MoE language model, quantized linears
    ["engine"],  # load, plan memory, prompts, prefill/decode, cache, sampling
    ["api", "", "synthetic"],  # the public facade ("" is the package root, which re-exports it)
    ["quantize"],
    ["cli", "app"],  # front ends
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def modules() -> dict[str, Path]:
    found = {}
    for folder, package in TREES.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = [package, *path.relative_to(REPO / folder).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


MODULES = modules()


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def imports(name: str) -> set[str]:
    """The kimivl_local modules `name` imports, anywhere in its body."""
    package = name if is_package(name) else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                       for a in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != name)
    return found


GRAPH = {name: imports(name) for name in MODULES}


def layer_of(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_module_has_a_layer():
    assert {layer_of(m) for m in MODULES} - set(RANK) == set()


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{m} -> {t}" for m, targets in graph.items() for t in targets
                  if RANK[layer_of(t)] > RANK[layer_of(m)])


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v):
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
            while not component or component[-1] != v:
                component.append(stack.pop())
                on_stack.discard(component[-1])
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_imports_point_down():
    assert upward_edges(GRAPH) == [], "imports from a lower layer to a higher one"


def test_no_import_cycles():
    assert cycles(GRAPH) == []


def test_the_checks_catch_a_planted_upward_import_and_cycle():
    graph = {k: set(v) for k, v in GRAPH.items()}
    graph["kimivl_local.model.kimivl"].add("kimivl_local.engine.generate")
    assert upward_edges(graph) == ["kimivl_local.model.kimivl -> kimivl_local.engine.generate"]
    graph["kimivl_local.ops.attention"].add("kimivl_local.ops.moe")
    graph["kimivl_local.ops.moe"].add("kimivl_local.ops.attention")
    assert ["kimivl_local.ops.attention", "kimivl_local.ops.moe"] in cycles(graph)
