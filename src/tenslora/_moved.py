"""The flat module paths of tenslora 0.1 (``tenslora.train``, ``tenslora.distributed``...), kept importable.

The package now has rooms (core, tuner, transfer, app); the old module paths still import: ``import
tenslora.train`` gives the very module ``tenslora.app.train`` (one module object, two names). A few helpers moved
between modules in the move (file writing to ``tenslora.files``) and are imported from their new module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

#: old module (under ``tenslora``) -> the module it is now.
MOVED = {
    "api": "tuner.budgets", "architectures": "tuner.architectures", "bank": "core.bank", "blocks": "core.blocks",
    "budget": "core.budget", "cli": "app.cli", "compression": "core.truncation", "config": "tuner.config",
    "construction": "core.construction", "distributed": "tuner.distributed", "export": "app.export",
    "factorization": "core.tensors", "inputs": "app.inputs", "layer": "tuner.layer",
    "lora_export": "transfer.lora_export", "model": "tuner.model", "modeling": "app.modeling",
    "options": "app.options", "params": "app.params", "persistence": "tuner.persistence", "pooling": "app.pooling",
    "quantized": "tuner.quantized", "refit": "transfer.refit", "registration": "tuner.registration",
    "reuse": "core.reuse", "run_compression": "app.compress", "runs": "app.runs", "stats": "app.sweep.stats",
    "sweep": "app.sweep.run", "sweep_report": "app.sweep.report", "tensor_train": "core.tensors.tt",
    "train": "app.train",
}


class MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an import of an old path with the module at its new one."""

    def find_spec(self, fullname: str, path, target=None):
        package, _, name = fullname.rpartition(".")
        if package == __package__ and name in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec) -> ModuleType:
        module = importlib.import_module(f"{__package__}.{MOVED[spec.name.rpartition('.')[2]]}")
        spec.loader_state = module.__spec__  # the import machinery overwrites it with this spec next
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The module ran when it was imported under its own name: only its own spec is put back (what
        ``importlib.reload`` and tools reading ``__spec__.origin`` use)."""
        module.__spec__ = module.__spec__.loader_state


def old_module(name: str) -> ModuleType:
    """``tenslora.<name>`` read as an attribute (``tenslora.train.run_training`` after ``import tenslora``)."""
    if name not in MOVED:
        raise AttributeError(f"module {__package__!r} has no attribute {name!r}")
    return importlib.import_module(f"{__package__}.{name}")


def install() -> None:
    """Make the old paths importable (``import tenslora.train``)."""
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
