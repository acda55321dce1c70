"""The module that wraps one adapted projection (``nn.Linear`` or GPT-2's ``Conv1D``).

It owns no trainable parameter: it reads its slice of the adapter's shared tensors (the
:class:`TensorBank` on the tuner) at each forward pass, as the factor pair (A, B) of
``core/tensors/``. A fused projection (q, k, v side by side) reads one slice per role; in the
block layout (``core/blocks.py``) a role reads one slice per d x d block, their B side by side.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, _get_in_out_features, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.bank import SliceAddress, TensorBank, factor_order, side_by_side
from .quantized import dense_weight, keep_original, restore_original, store_weight


@dataclass(frozen=True)
class Segment:
    """Output features ``[start, stop)`` of the wrapped module (one role), and the slices that update them: one in
    the role layout, one per d x d block in the block layout, in feature order (none: not adapted)."""

    start: int
    stop: int
    blocks: tuple[SliceAddress, ...]


class TensLoraLayer(nn.Module, BaseTunerLayer):
    # The trainable tensors are shared across layers and live on the tuner (TensLoraModel), which
    # handles their gradients, dtype and deletion; the layer keeps only per-adapter bookkeeping.
    adapter_layer_names = ()
    other_param_names = ("tenslora_dropout", "_banks", "_segments", "_scaling")

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = _get_in_out_features(base_layer)
        self.is_conv1d = isinstance(base_layer, Conv1D)  # weight stored (in, out)
        self.tenslora_dropout = nn.ModuleDict()
        self._banks: dict[str, TensorBank] = {}
        self._segments: dict[str, list[Segment]] = {}
        self._scaling: dict[str, float] = {}
        self._disable_adapters = False
        self.merged_adapters = []

    def update_layer(self, adapter_name: str, bank: TensorBank, segments: list[Segment], scaling: float,
                     dropout: float) -> None:
        self._banks[adapter_name] = bank
        self._segments[adapter_name] = segments
        self._scaling[adapter_name] = scaling
        self.tenslora_dropout[adapter_name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.set_adapter(self.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        """The adapters this layer applies (PEFT reads them from ``adapter_layer_names``, empty here)."""
        return set(self._banks)

    def _adapter_output(self, adapter_name: str, x: torch.Tensor) -> torch.Tensor:
        """scaling * x Delta W^T, through the factors: two thin matmuls per slice, no dense update."""
        bank, scaling = self._banks[adapter_name], self._scaling[adapter_name]
        x = self.tenslora_dropout[adapter_name](x)
        pieces = []
        for segment in self._segments[adapter_name]:
            if not segment.blocks:
                pieces.append(x.new_zeros(*x.shape[:-1], segment.stop - segment.start))
                continue
            address = segment.blocks[0]
            b = side_by_side(segment.blocks, [bank.scaled_output(block, scaling, x.dtype) for block in segment.blocks])
            first, second = factor_order(address, bank.tensor(address.key).input_factor(), b)
            # x U_in is shared by the roles that read x (core/reuse.py); a transposed role's x B^T is its own.
            head = x @ first if address.transposed else bank.project(address, x)
            pieces.append(head @ second.to(x.dtype))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        if self.merged:
            return result
        for adapter_name in self.active_adapters:
            if adapter_name in self._banks:
                result = result + self._adapter_output(adapter_name, x).to(result.dtype)
        return result

    def lora_factors(self, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The update as a LoRA pair, exactly: ``B @ A`` is scaling * Delta W in ``nn.Linear`` layout, in fp32.

        Every slice is ``s (U_in B)^T``, a LoRA with ``A = U_in^T`` and ``B = s B^T`` (a transposed role, o or
        down, swaps them). ``A`` is (rank x in_features) and ``B`` (out_features x rank), as PEFT's ``lora_A`` /
        ``lora_B`` are for a Linear and a Conv1D alike. Slices of one tensor share ``U_in``, so a fused module
        (GPT-2's ``c_attn``) stacks each distinct input factor once and its ``B`` is block-structured. Merging,
        PEFT's conversion to LoRA and ``export_lora`` all read the update from here.
        """
        bank, scaling = self._banks[adapter_name], self._scaling[adapter_name]
        factors_of_a: dict[object, torch.Tensor] = {}  # the row blocks of A, one per distinct input factor
        updates = []  # (output rows, block of A they read, their columns of B)
        for position, segment in enumerate(self._segments[adapter_name]):
            if not segment.blocks:
                continue
            address = segment.blocks[0]
            tensor = bank.tensor(address.key)
            output = side_by_side(segment.blocks, [tensor.output_matrix(block.index) for block in segment.blocks])
            first, second = factor_order(address, tensor.input_factor().float(), output.float())
            key = ("transposed", position) if address.transposed else address.key  # the roles of a tensor share U_in
            factors_of_a.setdefault(key, first.T)
            updates.append((segment, key, second.T * scaling))
        offsets, start = {}, 0
        for key, a in factors_of_a.items():
            offsets[key], start = start, start + a.shape[0]
        lora_a = torch.cat(list(factors_of_a.values()))
        lora_b = lora_a.new_zeros(self.out_features, lora_a.shape[0])
        for segment, key, b in updates:
            lora_b[segment.start : segment.stop, offsets[key] : offsets[key] + b.shape[1]] = b
        return lora_a, lora_b

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense scaling * Delta W in the base weight's layout, computed in fp32 (for merging only)."""
        lora_a, lora_b = self.lora_factors(adapter_name)
        delta = lora_b @ lora_a
        return delta.T if self.is_conv1d else delta

    #: The quantized base layer (or, for a requantizing merge, its weight) as it was before the first merge, so that
    #: unmerging gives it back exactly (a tuple, so that nn.Module does not register it: it is not trained or saved).
    _quantized_original: tuple[nn.Module | nn.Parameter, ...] = ()

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Add the updates into the base weight, through fp32 whatever the weight's dtype or quantization (a
        bitsandbytes base layer is replaced by a dense one: see quantized.py).

        ``safe_merge`` checks the merged weight before it replaces the base weight and raises a
        ValueError if it holds NaN or inf, with PEFT's own message (on nn.Linear and Conv1D alike).
        """
        for adapter_name in check_adapters_to_merge(self, adapter_names):
            if adapter_name not in self._banks:
                continue
            base = self.get_base_layer()
            with torch.no_grad():
                weight = dense_weight(base)
                merged = weight + self.get_delta_weight(adapter_name).to(weight.device)
                if safe_merge and not torch.isfinite(merged).all():
                    raise ValueError(
                        f"NaNs detected in the merged weights. The adapter {adapter_name} seems to be broken: "
                        f"merging it would put NaN or inf into the {type(base).__name__} weights (diverged training?)."
                    )
                if not self.merged:
                    original = keep_original(base)
                    self._quantized_original = () if original is None else (original,)
                self.base_layer = store_weight(base, merged)
            self.merged_adapters.append(adapter_name)

    def unmerge(self) -> None:
        """Take every merged update out of the base weight again.

        A quantized base gets its original quantized layer back, bit for bit (subtracting the update
        from a rounded weight would round twice); a plain weight gets the updates subtracted.
        """
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        base = self.get_base_layer()
        with torch.no_grad():
            if self._quantized_original:
                self.base_layer = base = restore_original(base, self._quantized_original[0])
                self._quantized_original = ()
                self.merged_adapters.clear()
            while self.merged_adapters:
                adapter_name = self.merged_adapters.pop()
                weight = dense_weight(base)
                store_weight(base, weight - self.get_delta_weight(adapter_name).to(weight.device))  # plain: in place

    def __repr__(self) -> str:
        return "tenslora." + super().__repr__()

    def supports_lora_conversion(self, adapter_name: str = "default") -> bool:
        """Every update is additive and of low rank: PEFT's ``convert_to_lora`` applies (see lora_export)."""
        return True
