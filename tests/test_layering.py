"""The package's folders are its flow: no module imports from a stage after its own, and no import circle.

Every import counts, including those inside functions: a lazy import is still a dependency.
"""

import ast
from pathlib import Path
from typing import Dict, List, Set

PACKAGE = Path(__file__).resolve().parents[1] / "hf_freeze"

# Stages in dependency order: a module may import from its own stage and the ones before it. The modules at the
# top of the package (errors, registry, logs, processes, add_on) are shared by every stage and import none of them.
# The rooms of add-on capabilities (the loss lever, the frozen-prefix cache, learning rates per part and layer, LoRA on
# the frozen layers, the reference model) sit among them: the engine runs the first four, the reference model uses the
# backend detection of the integrations.
STAGES = [
    "shared", "model", "policies", "config", "scores", "apply", "loss", "prefix_cache", "learning_rates", "lora", "report",
    "engine",
    "integrations", "reference", "tools",
]
ROOMS = {"loss", "prefix_cache", "learning_rates", "lora", "reference"}
# Where the core reaches a room: the engine's list of add-ons (their registration) and the command-line tools.
ROOM_DOORS = {"hf_freeze.engine.addons", "hf_freeze.tools"}
ENTRY_POINTS = {"hf_freeze", "hf_freeze.__main__"}  # the package's front door re-exports from every stage


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _stage(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or (len(parts) == 2 and (PACKAGE / parts[1]).is_dir()) else "shared"


def _imports() -> Dict[str, Set[str]]:
    modules = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: Dict[str, Set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        found: Set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            else:
                continue
            found |= {name for name in candidates if name in modules and name != module}
        graph[module] = found
    return graph


def test_no_module_imports_from_a_later_stage():
    rank = {stage: index for index, stage in enumerate(STAGES)}
    upward: List[str] = []
    for module, targets in _imports().items():
        if module in ENTRY_POINTS:
            continue
        for target in targets:
            if target not in ENTRY_POINTS and rank[_stage(target)] > rank[_stage(module)]:
                upward.append(f"{module} ({_stage(module)}) imports {target} ({_stage(target)})")
    assert not upward, "\n".join(sorted(upward))


def test_a_room_is_entered_only_through_its_registration():
    """Removing an add-on is deleting its folder and its registration: no other room and no core module but the
    registration (and the tools) imports it."""
    stray = []
    for module, targets in _imports().items():
        if module in ENTRY_POINTS or module.startswith(tuple(door for door in ROOM_DOORS)):
            continue
        for target in targets:
            room = _stage(target)
            if room in ROOMS and _stage(module) != room:
                stray.append(f"{module} imports {target}")
    assert not stray, "\n".join(sorted(stray))


def test_policies_never_import_torch_or_the_configuration():
    for path in (PACKAGE / "policies").glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        names |= {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert not {name for name in names if name.split(".")[0] == "torch" or name.endswith("config")}, path.name


def test_there_is_no_import_circle():
    graph = _imports()
    # A package imports its submodules through its __init__; the edge from a submodule to its own package's
    # __init__ is Python's import order, not a dependency of the code.
    graph = {
        module: {target for target in targets if not (module.startswith(target + ".") and target != "hf_freeze")}
        for module, targets in graph.items()
    }
    graph = {module: {t for t in targets if t != "hf_freeze"} for module, targets in graph.items() if module != "hf_freeze"}
    state: Dict[str, int] = {}
    cycles: List[List[str]] = []

    def visit(module: str, trail: List[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target] if target in trail else [module, target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_every_stage_is_a_folder_and_the_top_holds_only_shared_modules():
    folders = sorted(path.name for path in PACKAGE.iterdir() if path.is_dir() and not path.name.startswith("__"))
    assert folders == sorted(STAGES[1:])
    top = sorted(path.stem for path in PACKAGE.glob("*.py"))
    assert top == ["__init__", "__main__", "add_on", "errors", "logs", "processes", "registry"]


def test_every_error_about_an_option_names_its_fields():
    """Errors are data: a refusal that mentions a `freeze_*` option lists it in `fields`, so that tools sort problems
    by field without reading the text."""
    import re

    unnamed = []
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        for node in ast.walk(ast.parse(text)):
            called = getattr(getattr(node, "func", None), "id", None) if isinstance(node, ast.Call) else None
            if called in ("FreezeConfigError", "LayerDiscoveryError"):
                keywords = {keyword.arg for keyword in node.keywords}
                if not keywords & {"field", "fields"} and re.search(r"`freeze_\w+`", ast.get_source_segment(text, node)):
                    unnamed.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert not unnamed, unnamed


# The one module allowed past the size limit: the `freeze_*` field declarations, one help text each.
DECLARATIONS = "config/arguments.py"
MAX_LINES = 400


def test_every_module_is_small_except_the_field_declarations():
    """A module past about 400 lines is usually two (STYLE.md); the field declarations are one list."""
    long = {
        str(path.relative_to(PACKAGE)): len(path.read_text().splitlines())
        for path in PACKAGE.rglob("*.py")
        if len(path.read_text().splitlines()) > MAX_LINES
    }
    assert set(long) <= {DECLARATIONS}, long


def test_the_declarations_module_holds_declarations_only():
    """What keeps the size exception honest: besides imports, `FreezeArguments` (fields, and methods that hand over to
    `hf_freeze.config.checks`), and two one-line helpers, nothing lives in config/arguments.py."""
    tree = ast.parse((PACKAGE / DECLARATIONS).read_text())
    kept = []
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)) or (isinstance(node, ast.Expr) and node is tree.body[0]):
            continue
        if isinstance(node, ast.Assign) and [target.id for target in node.targets] == ["__all__"]:
            continue
        kept.append(node.name if isinstance(node, (ast.ClassDef, ast.FunctionDef)) else ast.dump(node)[:60])
    assert kept == ["_help", "FreezeArguments", "freeze_fields"]
    (arguments,) = [node for node in tree.body if isinstance(node, ast.ClassDef)]
    methods = [node for node in arguments.body if isinstance(node, ast.FunctionDef)]
    assert all(len(method.body) <= 4 for method in methods), [method.name for method in methods]


def test_no_private_name_is_imported_from_another_module():
    """A helper used by two modules is public, with a docstring: a `_name` is its own module's business."""
    found = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private = [alias.name for alias in node.names if alias.name.startswith("_") and not alias.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(PACKAGE)}:{node.lineno} imports {', '.join(private)}")
    assert not found, found
