"""The package's layering, checked on the source (AST): imports go down, never around.

* every ``import nxd_cp...`` inside nxd_cp is at module level (no function-level import that
  would hide a cycle);
* no module of nxd_cp imports the ``nxd_cp`` facade (``import nxd_cp`` / ``from nxd_cp import
  <name that is not a module>``);
* the import graph of nxd_cp's modules has no cycle;
* each module imports only modules of a lower layer (``LAYERS``), or of its own package;
* the aliases kept at old documented paths (``ALIASES``) are imported by no module of nxd_cp.
"""
import ast
import pathlib

import pytest

pytestmark = pytest.mark.unit

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "nxd_cp"

# The layer of each package / top-level module: a module may import only lower layers, or its
# own package. Order: compat, nxd_subconfigs (leaves) < topology, config < parallel_state,
# comm < sequence < attention,
# tensor_parallel < training, nxd_config < pipeline, nn < models < testing < the facade and aliases.
LAYERS = {
    "nxd_cp.compat": 0,
    "nxd_cp.nxd_subconfigs": 0,
    "nxd_cp.topology": 1, "nxd_cp.config": 1,
    "nxd_cp.parallel_state": 2, "nxd_cp.comm": 2,
    "nxd_cp.sequence": 3,
    "nxd_cp.attention": 4, "nxd_cp.tensor_parallel": 4,
    "nxd_cp.training": 5, "nxd_cp.nxd_config": 5,
    "nxd_cp.pipeline": 6, "nxd_cp.nn": 6,
    "nxd_cp.models": 7, "nxd_cp.plan": 7,
    "nxd_cp.testing": 8,
    "nxd_cp": 9,
}
ALIASES = {"nxd_cp.sharding", "nxd_cp.packing", "nxd_cp.data", "nxd_cp.layers", "nxd_cp.loss",
           "nxd_cp.grads", "nxd_cp.optim", "nxd_cp.checkpoint", "nxd_cp.memory",
           "nxd_cp.layout", "nxd_cp.sequence_parallel"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(name: str) -> int:
    if name in ALIASES:
        return LAYERS["nxd_cp"]
    best = max((k for k in LAYERS if name == k or name.startswith(k + ".")), key=len)
    return LAYERS[best]


def package_of(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def imports(name: str):
    """(imported nxd_cp module, line, at module level) for every import of nxd_cp in ``name``."""
    tree = ast.parse(MODULES[name].read_text())
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            targets = []
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                targets.append(sub if sub in MODULES else node.module)
        else:
            continue
        for t in targets:
            if t == "nxd_cp" or t.startswith("nxd_cp."):
                yield t, node.lineno, id(node) in top


def test_no_function_level_import_of_nxd_cp():
    bad = [f"{m}:{line} imports {t}" for m in MODULES for t, line, top in imports(m)
           if not top]
    assert not bad, "function-level imports of nxd_cp inside nxd_cp:\n" + "\n".join(bad)


def test_no_module_imports_the_facade_or_an_alias():
    bad = [f"{m}:{line} imports {t}" for m in MODULES if m != "nxd_cp" and m not in ALIASES
           for t, line, _ in imports(m) if t == "nxd_cp" or t in ALIASES]
    assert not bad, "modules importing the nxd_cp facade or an alias:\n" + "\n".join(bad)


def test_imports_go_down_the_layers():
    bad = []
    for m in MODULES:
        for t, line, _ in imports(m):
            if t == m or package_of(t) == package_of(m):
                continue
            if layer_of(t) >= layer_of(m):
                bad.append(f"{m} (layer {layer_of(m)}):{line} imports {t} (layer {layer_of(t)})")
    assert not bad, "imports that do not go down the layers:\n" + "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {t for t, _, _ in imports(m) if t in MODULES and t != m} for m in MODULES}
    # a package imports its own modules (re-exports): that edge is no cycle
    for m in graph:
        graph[m] = {t for t in graph[m] if not t.startswith(m + ".")}
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_layer_map_is_complete_and_negative_control():
    """Every module has a layer, and the checker does see an upward import (a control built
    from the real graph: sequence.batch imports parallel_state, a lower layer; the reverse
    edge is what the check refuses)."""
    assert all(layer_of(m) >= 0 for m in MODULES)
    assert layer_of("nxd_cp.parallel_state") < layer_of("nxd_cp.sequence.batch")
    assert any(t == "nxd_cp.parallel_state" for t, _, _ in imports("nxd_cp.sequence.batch"))
