"""bitkern's import graph: no module imports a higher layer (not even inside a function), and no loops.

Layers, lowest first (docs/architecture.md draws them). A module may import its own layer and lower ones;
within a layer the graph must stay acyclic. The package's __init__ only re-exports, so nothing inside
bitkern imports it (`from bitkern import name` of a non-module counts as importing it).
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "bitkern"
LAYERS = (
    ("bitkern._checks", "bitkern._env", "bitkern._io", "bitkern._bitmath", "bitkern._C", "bitkern._C_cuda",
     "bitkern.distributed"),
    ("bitkern.backends",),
    ("bitkern.dispatch",),
    ("bitkern.ops",),
    ("bitkern.nn",),
    ("bitkern.quant", "bitkern.models"),
    ("bitkern.bops", "bitkern.bitserial", "bitkern.freeze", "bitkern.model_files", "bitkern.checkpoint",
     "bitkern.data"),
    ("bitkern.attacks", "bitkern.train", "bitkern.eval"),
    ("bitkern.study",),
    ("bitkern.cli", "bitkern.__main__"),
)


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()


def layer_of(module: str) -> int:
    if module == "bitkern":
        return len(LAYERS)  # the package __init__: above everything
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    if best is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYERS in {__file__} and to "
                             "docs/architecture.md")
    return best[0]


def imports_of(module: str) -> set[str]:
    """bitkern modules `module` imports anywhere in its body (relative imports resolved)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module
            names = []
            for alias in node.names:
                candidate = f"{origin}.{alias.name}"
                names.append(candidate if candidate in MODULES or candidate.endswith(("._C", "._C_cuda"))
                             else origin)
        else:
            continue
        found.update(n for n in names if n == "bitkern" or n.startswith("bitkern."))
    found.discard(module)
    return found


GRAPH = {module: imports_of(module) for module in MODULES}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m != "bitkern"))
def test_no_import_from_a_higher_layer(module):
    own = layer_of(module)
    upward = sorted(t for t in GRAPH[module] if layer_of(t) > own)
    assert not upward, f"{module} (layer {own}) imports higher layers: " + ", ".join(
        f"{t} (layer {layer_of(t)})" for t in upward)


def test_no_import_loops():
    """Tarjan's strongly connected components; a subpackage's __init__ re-exporting its own modules is
    not a loop unless one of those modules imports the __init__ back."""
    index, low, on_stack, stack, loops = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in GRAPH.get(node, ()):
            if target not in MODULES:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                loops.append(sorted(component))

    for module in sorted(MODULES):
        if module not in index:
            visit(module)
    assert not loops, "import loops: " + "; ".join(" <-> ".join(c) for c in loops)
