"""The package's import graph: imports point down the layers of docs/architecture.md and never form a cycle.

Every `import`/`from ... import` in the package's AST counts, including those inside functions (a lazy import is
still a dependency). The layers, lowest first:

0 errors, env · 1 config, kernels, data, weights, distributed · 2 models · 3 engine, tracking ·
4 tasks, search, distributed.msrun · 5 cli, hydra_plugins (the search sweeper, installed as the top-level
hydra_plugins namespace). `bench` is a side branch: it may import anything, nothing imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "x3d_exp"

# Longest prefix wins, so distributed.msrun sits above distributed.
LAYERS = {"x3d_exp.errors": 0, "x3d_exp.env": 0,
          "x3d_exp.config": 1, "x3d_exp.kernels": 1, "x3d_exp.data": 1, "x3d_exp.weights": 1,
          "x3d_exp.distributed": 1,
          "x3d_exp.models": 2, "x3d_exp": 2,  # the package itself re-exports build_model
          "x3d_exp.engine": 3, "x3d_exp.tracking": 3,
          "x3d_exp.search": 4,
          "x3d_exp.tasks": 4, "x3d_exp.distributed.msrun": 4,
          "x3d_exp.cli": 5, "x3d_exp.hydra_plugins": 5}
SIDE_BRANCH = "x3d_exp.bench"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str):
    if module == SIDE_BRANCH or module.startswith(SIDE_BRANCH + "."):
        return None
    owner = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return LAYERS[owner]


def imports_of(path: Path, modules: set) -> set:
    """Modules of the package that `path` imports, resolved to the deepest known module."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from x3d_exp import kernels` imports the module x3d_exp.kernels.
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("x3d_exp"):
                found.add(name)
                break
    return found


def import_graph() -> dict:
    paths = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {module: imports_of(path, set(paths)) - {module} for module, path in paths.items()}


def test_every_module_has_a_layer():
    assert all(layer_of(m) is not None or m.startswith(SIDE_BRANCH) for m in import_graph())


def test_imports_only_point_down_or_sideways():
    upward = []
    for module, targets in import_graph().items():
        for target in targets:
            if target.startswith(SIDE_BRANCH) and not module.startswith(SIDE_BRANCH):
                upward.append(f"{module} -> {target} (bench is a side branch)")
            elif layer_of(module) is not None and layer_of(target) is not None and layer_of(target) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) -> {target} (layer {layer_of(target)})")
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = import_graph()
    # Tarjan's strongly connected components; a component of more than one module is a cycle.
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node), on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_graph_sees_lazy_imports():
    """The checks above would pass vacuously if function-local imports were missed."""
    graph = import_graph()
    assert "x3d_exp.kernels.ops" in graph["x3d_exp.models.x3d"]  # imported inside channelwise_conv3d
    assert "x3d_exp.tracking.sweeps" in graph["x3d_exp.cli"]  # imported inside main


def test_only_the_cli_reads_hydras_global_state():
    readers = [str(p.relative_to(PACKAGE.parent)) for p in PACKAGE.rglob("*.py")
               if "HydraConfig" in p.read_text() and module_name(p) != "x3d_exp.cli"]
    assert readers == [], f"HydraConfig read outside x3d_exp.cli: {readers}"


def test_the_engine_is_a_library():
    """No Hydra, MLflow, tasks, launcher or CLI below the engine's own modules."""
    targets = {t for module, found in import_graph().items() if module.startswith("x3d_exp.engine") for t in found}
    assert not {t for t in targets if t.startswith(("x3d_exp.tracking", "x3d_exp.tasks", "x3d_exp.cli",
                                                    "x3d_exp.distributed.msrun"))}
    for path in (PACKAGE / "engine").rglob("*.py"):
        third_party = {alias.name.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                       if isinstance(node, ast.Import) for alias in node.names}
        third_party |= {node.module.split(".")[0] for node in ast.walk(ast.parse(path.read_text()))
                        if isinstance(node, ast.ImportFrom) and node.module}
        assert not third_party & {"hydra", "mlflow"}, f"{path.name} imports {third_party & {'hydra', 'mlflow'}}"
