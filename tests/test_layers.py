"""The layout is the architecture: the pack's imports (those inside functions too, and the node modules that
``nodes.NODE_TABLE`` loads by name) run one way, from the node layer down to the core, with no module importing,
however indirectly, one that imports it; and every package folder ships."""
import ast
import os
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
OUTSIDE = {"tests", "bench", "tools", "build", "docs", "workflows", "example_workflows", ".venv", ".ci"}
# the entry point (the pack's __init__: its node mappings), the node layer and the ComfyUI glue; everything else
# is the core, which never imports them
NODE_LAYER = {"", "nodes", "node_inputs", "interop_nodes", "calibration_nodes", "comfy_adapter", "comfy_calibration",
              "comfy_checks", "workflow", "__main__", "bundled"}


def _modules() -> dict[str, Path]:
    """Dotted module name (relative to the pack, "" for its __init__) -> file."""
    found = {}
    for folder, subfolders, files in os.walk(ROOT):
        subfolders[:] = [d for d in subfolders if not (Path(folder) == ROOT and d in OUTSIDE)
                         and not d.startswith(".") and not d.endswith(".egg-info") and d != "__pycache__"]
        for file in files:
            if file.endswith(".py"):
                path = Path(folder, file)
                parts = path.relative_to(ROOT).parts
                found[".".join(list(parts[:-1]) + ([] if path.stem == "__init__" else [path.stem]))] = path
    return found


def _imports(name: str, path: Path, modules: dict) -> set[str]:
    """The pack's modules that ``name`` imports by a relative import, anywhere in the file."""
    package = name.split(".") if path.stem == "__init__" else name.split(".")[:-1]
    package = [p for p in package if p]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if not isinstance(node, ast.ImportFrom) or not node.level:
            continue
        base = package[:len(package) - (node.level - 1)] if node.level > 1 else list(package)
        target = base + (node.module.split(".") if node.module else [])
        for alias in node.names:  # "from . import comfy_adapter" names a module; "from .x import y" a value
            as_module = ".".join(target + [alias.name])
            out.add(as_module if as_module in modules else ".".join(target))
    return {m for m in out if m in modules and m != name}


def _table_modules(path: Path) -> set[str]:
    """The modules that ``NODE_TABLE`` (id -> (module, class, display name)) in ``path`` names: ``nodes`` loads
    them with importlib, which no import statement shows."""
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "NODE_TABLE" for t in node.targets):
            return {module for module, _, _ in ast.literal_eval(node.value).values()}
    raise AssertionError(f"no NODE_TABLE in {path}")


MODULES = _modules()
GRAPH = {name: _imports(name, path, MODULES) for name, path in MODULES.items()}
GRAPH["nodes"] |= _table_modules(MODULES["nodes"]) - {"nodes"}


def test_the_node_table_names_modules_of_the_pack():
    assert _table_modules(MODULES["nodes"]) <= set(MODULES)


def _layer(name: str) -> str:
    return "node" if name.split(".")[0] in NODE_LAYER else "core"


def test_the_core_never_imports_the_node_layer():
    upward = sorted(f"{name} -> {target}" for name, targets in GRAPH.items() if _layer(name) == "core"
                    for target in targets if _layer(target) == "node")
    assert upward == []


def test_no_module_imports_one_that_imports_it():
    """Depth-first search for a cycle; a package's __init__ importing its own modules is the package, not a cycle
    (those modules never import their __init__ back here)."""
    state, path, cycles = {}, [], []

    def visit(name):
        state[name] = "open"
        path.append(name)
        for target in sorted(GRAPH[name]):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target)
        path.pop()
        state[name] = "done"
    for name in sorted(GRAPH):
        if name not in state:
            visit(name)
    assert cycles == []


def test_every_package_folder_ships():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    folders = {"ksampler" + "".join("." + p for p in path.relative_to(ROOT).parent.parts)
               for path in MODULES.values() if path.stem == "__init__"}
    assert folders - listed == set()
