"""Products that several projections of one forward pass share, computed once (eager mode only).

q, k and v of a layer read the same hidden states and, in the constructions with a role mode,
share ``U_in`` and the slices of one layer: ``x @ U_in`` and the B of every role of the layer are
computed by the first projection and reused by the others. An entry is reused only while every
tensor it was computed from is the same object, unmodified (same version counter), in the same
grad, inference and autocast mode; so input dropout (a new tensor per projection) or an optimizer
step between two calls recompute it. And it is served once to each projection: one asking again
is in a new pass, which recomputes it. That holds for passes the model's hooks below do not see
(a call into an inner module: ``peft_model.base_model.model.bert(...)``, a fused-loss trainer's
``model.model(...)``), whose backward would otherwise reach into the previous pass's freed graph,
and whose weights may have been changed through ``.data`` (no version bump).

- Inference tensors (``torch.inference_mode``) have no version counter: what is computed from one
  is never reused (each projection computes its own, as LoRA does).
- Under ``torch.compile`` nothing is stored: the compiler sees the repeated products in its graph
  and merges them itself, where Python-side identity and version checks would break the graph.
- The model's forward pre- and post-hooks clear the cache, so nothing outlives a pass and a
  checkpointed layer's recomputation computes what its first run computed.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Optional, TypeVar

import torch

T = TypeVar("T")


@dataclass(frozen=True)
class _Entry:
    sources: tuple[weakref.ref, ...]
    versions: tuple[int, ...]
    mode: tuple[bool, bool, bool]
    value: object
    served: set[Hashable]  # the consumers that had it

    def is_for(self, sources: Sequence[torch.Tensor], versions: tuple[int, ...], mode: tuple[bool, bool, bool]) -> bool:
        return (self.versions == versions and self.mode == mode
                and all(ref() is source for ref, source in zip(self.sources, sources, strict=True)))


def _versions(sources: Sequence[torch.Tensor]) -> Optional[tuple[int, ...]]:
    """Version counters of ``sources``; None when one is an inference tensor (it has none)."""
    if any(source.is_inference() for source in sources):
        return None
    return tuple(source._version for source in sources)


def _mode(device_type: str) -> tuple[bool, bool, bool]:
    return torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.is_autocast_enabled(device_type)


class PassCache:
    """Values computed from tensors, reused while those tensors are unchanged, until ``clear``."""

    def __init__(self) -> None:
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def get(self, name: Hashable, sources: Sequence[torch.Tensor], compute: Callable[[], T],
            consumer: Hashable) -> T:
        """``compute()``, or what it returned last time for ``name`` if ``sources`` are unchanged and ``consumer``
        has not had it yet."""
        if torch.compiler.is_compiling():
            return compute()
        versions, mode = _versions(sources), _mode(sources[0].device.type)
        entry = self._entries.get(name)
        if (entry is not None and versions is not None and consumer not in entry.served
                and entry.is_for(sources, versions, mode)):
            entry.served.add(consumer)
            return entry.value
        value = compute()
        if versions is None:
            self._entries.pop(name, None)
        else:
            self._entries[name] = _Entry(tuple(weakref.ref(source) for source in sources), versions, mode, value,
                                         {consumer})
        return value
