"""The package's rooms: imports flow downward only (core <- tuner <- transfer <- app), no module imports itself back
through others, and the math (core) knows nothing of transformers or PEFT."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

import tenslora

PACKAGE = Path(tenslora.__file__).parent
LEAVES = {"files", "third_party_logs"}  # used by library and application alike; import nothing of ours
#: what each room may import besides itself.
MAY_IMPORT = {
    "leaf": set(),
    "core": {"leaf"},
    "data": {"leaf"},
    "tuner": {"core", "leaf"},
    "transfer": {"tuner", "core", "leaf"},
    "app": {"transfer", "tuner", "core", "data", "leaf"},
}
HUGGING_FACE = ("transformers", "peft", "accelerate", "datasets", "trl")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _room(module: str) -> str | None:
    """The room of ``tenslora.<room>...``; None for the facade (the package root, ``__main__``, old paths)."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__main__", "_moved"):
        return None
    return "leaf" if parts[1] in LEAVES else parts[1]


def _imports(module: str) -> set[str]:
    """Every module ``module`` imports (at the top or inside a function), relative imports resolved."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # names defined in ``base`` itself
                found.add(base)
    return found


def test_the_four_rooms_exist():
    assert {_room(module) for module in MODULES} - {None} == {"core", "tuner", "transfer", "app", "data", "leaf"}


@pytest.mark.parametrize("module", [module for module in MODULES if _room(module) is not None])
def test_imports_flow_downward(module):
    room = _room(module)
    ours = {imported for imported in _imports(module) if imported.startswith("tenslora")}
    upward = sorted(imported for imported in ours
                    if _room(imported) != room and _room(imported) not in MAY_IMPORT[room])
    assert not upward, f"{module} ({room}) imports {upward}"
    if room == "core":
        foreign = sorted(imported for imported in _imports(module) if imported.split(".")[0] in HUGGING_FACE)
        assert not foreign, f"{module} is math and imports {foreign}"


def test_no_import_circles():
    graph = {module: {imported for imported in _imports(module) if imported in MODULES and imported != module}
             for module in MODULES if _room(module) is not None}
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                pytest.fail("import circle: " + " -> ".join([*path[path.index(imported):], imported]))
            if imported not in state:
                visit(imported, [*path, imported])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_the_old_flat_paths_still_import():
    """Code written against tenslora 0.1 (``tenslora.train.run_training``, ``from tenslora.distributed import
    fully_shard_model``, ``tenslora.construction.FUSED_CONSTRUCTIONS``) keeps working: same module objects."""
    from tenslora.distributed import fully_shard_model
    from tenslora.factorization import TuckerTensor
    from tenslora.train import run_training

    assert run_training is tenslora.app.train.run_training
    assert fully_shard_model is tenslora.tuner.distributed.fully_shard_model
    assert TuckerTensor is tenslora.core.tensors.TuckerTensor
    assert tenslora.construction is tenslora.core.construction
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        tenslora.nothing  # noqa: B018


def test_an_old_path_leaves_the_module_its_own_spec():
    """Imported under an old name, a module keeps its spec: its name, its file, its package's search path (what
    ``importlib.reload`` and tools reading ``__spec__`` use; reloading itself is not tried here, as it would give
    the other tests' modules new classes)."""
    import tenslora.factorization
    import tenslora.train

    assert tenslora.app.train.__spec__.name == "tenslora.app.train"
    assert tenslora.app.train.__spec__.origin == tenslora.app.train.__file__
    assert tenslora.core.tensors.__spec__.submodule_search_locations
    assert importlib.util.find_spec("tenslora.app.train").origin == tenslora.app.train.__file__
