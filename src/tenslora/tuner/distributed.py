"""Sharding a TensLoRA model with FSDP2 so that the adapter's shared factors stay in the root unit.

DDP needs nothing from TensLoRA (see ``docs/distributed.md``). FSDP does: every adapted projection of
every layer reads the factors of its adapter, which live once on the tuner (``tenslora_tensors``) and
inside no layer. The root unit gathers its parameters before the forward pass and keeps them whole
until the backward pass has reduced their gradients, so that is where the factors must be; a unit of
their own would never be gathered (the factors are read by the layers, never called as a module).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Optional

from torch import nn

from ..core.bank import TensorBank


def transformer_blocks(model: nn.Module, block_classes: Optional[Iterable[str]] = None) -> list[nn.Module]:
    """The modules of ``model`` whose class is named in ``block_classes`` (default: the Hugging Face model's
    ``_no_split_modules``, e.g. ``BertLayer`` and ``BertEmbeddings``), innermost first."""
    names = set(block_classes or _no_split_modules(model))
    if not names:
        raise ValueError(f"{type(model).__name__} does not name its transformer blocks (`_no_split_modules`); "
                         "pass `block_classes`, e.g. ['BertLayer'].")
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ValueError(f"No module of class {sorted(names)} in the model; check `block_classes`.")
    for block in blocks:
        if any(isinstance(module, TensorBank) for module in block.modules()):
            raise ValueError(f"{type(block).__name__} holds TensLoRA's shared factors: they must stay in the root "
                             "FSDP unit. Name the transformer layers in `block_classes`, not a module that holds "
                             "the adapter.")
    return blocks[::-1]  # FSDP2 shards inner modules before the modules that contain them


def fully_shard_model(model: nn.Module, block_classes: Optional[Iterable[str]] = None,
                      **fully_shard_kwargs: Any) -> nn.Module:
    """FSDP2 (``torch.distributed.fsdp.fully_shard``): one unit per transformer block, and the root unit for
    the rest: embeddings not in a block, the classification head and TensLoRA's shared factors.

    ``fully_shard_kwargs`` (``mesh``, ``mp_policy``, ``reshard_after_forward``, ...) go to every call.
    Returns ``model``, sharded in place, for use in a training loop of one's own (``accelerate`` and the
    ``transformers.Trainer`` shard the model themselves, see ``docs/distributed.md``).
    """
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6; imported here: DDP users need none of it

    for block in transformer_blocks(model, block_classes):
        fully_shard(block, **fully_shard_kwargs)
    return fully_shard(model, **fully_shard_kwargs)


def _no_split_modules(model: nn.Module) -> set[str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return set(getattr(base, "_no_split_modules", None) or ())
