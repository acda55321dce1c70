"""Reading and writing the weight of an adapted base layer, whether plain or quantized by bitsandbytes.

Merging needs the base weight as a dense fp32 matrix and a way to store the merged matrix back in
the base's own format. For a plain ``nn.Linear``/``Conv1D`` that is a cast. For a bitsandbytes
``Linear4bit`` (nf4/fp4) or ``Linear8bitLt`` base it is dequantize -> (add the update in fp32) ->
requantize with the weight's own settings (block size, quant type, nested statistics, storage dtype),
so the merged layer is a quantized layer of the same kind. Requantizing rounds, so subtracting the
update again would not give the original weight back; instead, the quantized original is kept while
merged (:func:`keep_original`) and put back as it was on unmerge (:func:`restore_original`).

bitsandbytes is optional: a module can only be a bitsandbytes layer if bitsandbytes was imported by
whoever built it, so this module never imports it itself.
"""

from __future__ import annotations

import copy
import sys
import warnings
from importlib.util import find_spec
from typing import Any, Optional

import torch
from torch import nn


def _bitsandbytes() -> Optional[Any]:
    return sys.modules.get("bitsandbytes")


def check_bitsandbytes_installed(quantization: str) -> None:
    """Refuse a base quantized to ``quantization`` ("4bit", "8bit") where bitsandbytes is not installed, with the
    fix (transformers would raise an ImportError from inside ``from_pretrained``, after the data is loaded)."""
    if find_spec("bitsandbytes") is None:
        raise ValueError(f"A base quantized to {quantization[0]} bits (--load-in-{quantization}) needs bitsandbytes, "
                         "which is not installed here: pip install bitsandbytes.")


def quantization(module: nn.Module) -> Optional[str]:
    """'4-bit' or '8-bit' when the module's weight is stored quantized by bitsandbytes, else None.

    A bitsandbytes weight that is not quantized yet (before it is moved to a device, or an 8-bit
    layer that keeps fp16 weights) is an ordinary floating-point weight and is merged as one.
    """
    bnb = _bitsandbytes()
    weight = module.weight
    if bnb is None:
        return None
    if isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized:
        return "4-bit"
    if isinstance(weight, bnb.nn.Int8Params) and weight.dtype == torch.int8:
        return "8-bit"
    return None


def _refuse(module: nn.Module, problem: str) -> ValueError:
    return ValueError(
        f"Cannot merge a TensLoRA adapter into this {type(module).__name__} base layer: {problem}. Merge into an "
        "unquantized copy of the base model instead (load it in fp32/bf16/fp16, load the adapter with "
        "PeftModel.from_pretrained, then merge_and_unload), or keep the adapter unmerged."
    )


def dense_weight(module: nn.Module) -> torch.Tensor:
    """The base weight as a new dense fp32 tensor in the module's own layout (dequantized if quantized)."""
    weight = module.weight
    if weight.device.type == "meta":
        raise _refuse(module, "its weights are on the meta device (not loaded)")
    kind = quantization(module)
    if kind == "4-bit":
        return _bitsandbytes().functional.dequantize_4bit(*_standard_4bit(module)).float()
    if kind == "8-bit":
        return _bitsandbytes().functional.int8_vectorwise_dequant(weight.data, _scales_8bit(module)).float()
    if type(weight.data) is not torch.Tensor or not weight.dtype.is_floating_point:
        raise _refuse(module, f"its weight is a {type(weight.data).__name__} of dtype {weight.dtype}, which TensLoRA "
                              "can only merge into when bitsandbytes quantized it (Linear4bit, Linear8bitLt)")
    return weight.data.float()


def store_weight(module: nn.Module, weight: torch.Tensor) -> None:
    """Put a dense fp32 weight (as :func:`dense_weight` returns it) back into the module, in the module's format."""
    kind = quantization(module)
    if kind is not None:
        warnings.warn(f"Merging into a {kind} base layer rounds the merged weights to {kind}: the merged model's "
                      "outputs differ slightly from the adapted model's.", stacklevel=3)
    if kind == "4-bit":
        _store_4bit(module, weight)
    elif kind == "8-bit":
        _store_8bit(module, weight)
    else:
        module.weight.data = weight.to(module.weight.dtype)


def keep_original(module: nn.Module) -> Optional[nn.Parameter]:
    """What :func:`restore_original` needs to undo every later merge exactly: the quantized weight as it is.

    None for a plain weight, whose merge is undone by subtracting the update. The merged weight is a
    new parameter, so keeping the original costs one quantized copy of the layer while merged.
    """
    kind = quantization(module)
    if kind == "4-bit":
        return module.weight
    if kind == "8-bit":
        weight = module.weight
        return _bitsandbytes().nn.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False, CB=weight.data,
                                             SCB=_scales_8bit(module))
    return None


def restore_original(module: nn.Module, original: nn.Parameter) -> None:
    """Put back the weight that :func:`keep_original` kept, on the device the module's weight is on now."""
    device = module.weight.device
    if original.device != device:
        original = original.to(device)
    module.weight = original
    if quantization(module) == "4-bit":
        module.quant_state = original.quant_state


def _quant_state(module: nn.Module) -> Any:
    state = module.weight.quant_state
    if state is None:
        state = getattr(module, "quant_state", None)
    if state is None:
        raise _refuse(module, "its 4-bit weight has no quantization state")
    return state


def _standard_4bit(module: nn.Module) -> tuple[torch.Tensor, Any]:
    """The 4-bit data and quantization state in bitsandbytes' standard layout, which (de)quantize_4bit use.

    On CPUs with AVX512-BF16, bitsandbytes repacks a Linear4bit's weight in place for faster inference
    at its first eval forward pass. Converting it back (as bitsandbytes does before saving) re-quantizes
    nested statistics, so it is done on copies: the layer keeps the weight it computes with.
    """
    data, state = module.weight.data, _quant_state(module)
    if not getattr(state, "packing_format_for_cpu", False):
        return data, state
    inverse = getattr(_bitsandbytes().functional, "_convert_weight_packed_for_cpu_inverse", None)
    if inverse is None:
        raise _refuse(module, "its 4-bit weight is in bitsandbytes' CPU inference layout, which this bitsandbytes "
                              "version cannot convert back")
    return inverse(data.clone(), copy.deepcopy(state))


def _store_4bit(module: nn.Module, weight: torch.Tensor) -> None:
    bnb, old = _bitsandbytes(), module.weight
    _, state = _standard_4bit(module)
    data, new_state = bnb.functional.quantize_4bit(
        weight.to(device=old.device, dtype=state.dtype), blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
    )
    module.weight = bnb.nn.Params4bit(
        data, requires_grad=False, quant_state=new_state, blocksize=old.blocksize,
        compress_statistics=old.compress_statistics, quant_type=old.quant_type, quant_storage=old.quant_storage,
        module=module, bnb_quantized=True,
    )
    module.quant_state = new_state


def _scales_8bit(module: nn.Module) -> torch.Tensor:
    """Row scales of an int8 weight: on the weight until the first forward pass, then on the layer's state."""
    scales = getattr(module.weight, "SCB", None)
    if scales is None:
        scales = getattr(getattr(module, "state", None), "SCB", None)
    if scales is None:
        raise _refuse(module, "its int8 weight has no row scales (SCB)")
    return scales


def _store_8bit(module: nn.Module, weight: torch.Tensor) -> None:
    bnb, device = _bitsandbytes(), module.weight.device
    data, scales, _ = bnb.functional.int8_vectorwise_quant(weight.to(device=device, dtype=torch.float16))
    # The layer moves CB/SCB from the weight to its state at its next forward pass.
    module.weight = bnb.nn.Int8Params(data, requires_grad=False, has_fp16_weights=False, CB=data, SCB=scales)
    module.state.CB, module.state.SCB = None, None
