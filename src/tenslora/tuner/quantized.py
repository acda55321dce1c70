"""Reading and writing the weight of an adapted base layer, whether plain or quantized by bitsandbytes.

Merging needs the base weight as a dense fp32 matrix and a layer to hold the merged matrix. For a plain
``nn.Linear``/``Conv1D`` that is the layer itself, and the merge a cast. For a bitsandbytes ``Linear4bit`` (nf4/fp4)
or ``Linear8bitLt`` base it is a new dense layer (:class:`DequantizedLinear`) holding the dequantized W + delta W in
fp32: a trained delta W is far below the 4-bit (and 8-bit) quantization step, so requantizing W + delta W rounds it
away (SmolLM2-135M, nf4: what is kept has cosine 0.08 with delta W; benchmarks/real_quantized_merge.py). A PEFT user
merges to keep the fine-tune, and calls ``merge_and_unload()`` from recipes and trainers that a refusal would break,
so a dense merge is the default; requantizing into a layer of the same kind stays available inside
:func:`requantizing_merge`, which reports how much of the update survived. Either way the quantized original is kept
while merged (:func:`keep_original`) and put back as it was on unmerge (:func:`restore_original`): subtracting the
update would round twice.

bitsandbytes is optional: a module can only be a bitsandbytes layer if bitsandbytes was imported by
whoever built it, so this module never imports it itself.
"""

from __future__ import annotations

import copy
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib.util import find_spec
from typing import Any, Optional, Union

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


class DequantizedLinear(nn.Linear):
    """The dense layer that a merge into a bitsandbytes layer leaves in its place, holding W + delta W in fp32.

    fp32, not the layer's compute dtype: a trained delta W of 1e-3 ||W|| is lost in bf16 too (the
    rounding of bf16(W + dW) - bf16(W) is 1.6 times dW; fp16: 0.3 times), and fp32 is what the adapted
    model added the update in. ``model.to(torch.bfloat16)`` after merging trades that for memory. Like a
    bitsandbytes layer it casts its input to its weight's dtype and its output back, so the merged model
    runs wherever the adapted one ran. It saves and loads as an ``nn.Linear``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.weight.dtype)).to(x.dtype)


@dataclass
class RequantizationReport:
    """How much of the update a merge inside :func:`requantizing_merge` kept, over every layer it requantized.

    With Q the layer's (de)quantization, W its weight and dW the update: ``relative_error`` is
    ||Q(W + dW) - Q(W) - dW|| / ||dW|| and ``cosine`` the cosine between Q(W + dW) - Q(W) and dW, each over
    all layers at once (0 and 1 when the update survives whole; about 1 and 0 when it is rounded away).
    """

    layers: int = 0
    update_squared: float = 0.0
    kept_squared: float = 0.0
    error_squared: float = 0.0
    inner: float = 0.0

    def add(self, update: torch.Tensor, kept: torch.Tensor) -> None:
        update, kept = update.double(), kept.double()
        self.layers += 1
        self.update_squared += update.square().sum().item()
        self.kept_squared += kept.square().sum().item()
        self.error_squared += (kept - update).square().sum().item()
        self.inner += (kept * update).sum().item()

    @property
    def relative_error(self) -> float:
        return (self.error_squared / self.update_squared) ** 0.5 if self.update_squared else 0.0

    @property
    def cosine(self) -> float:
        norms = (self.update_squared * self.kept_squared) ** 0.5
        return self.inner / norms if norms else float(self.update_squared == self.kept_squared)

    def __str__(self) -> str:
        return (f"Requantizing the merge into {self.layers} bitsandbytes layer(s) kept this much of the update: "
                f"||Q(W+dW) - Q(W) - dW|| / ||dW|| = {self.relative_error:.3f}, cosine(Q(W+dW) - Q(W), dW) = "
                f"{self.cosine:.3f} (0 and 1 when kept whole). Merge outside requantizing_merge() to keep all of "
                "it in dense layers.")


_REQUANTIZING: ContextVar[Optional[RequantizationReport]] = ContextVar("tenslora_requantizing", default=None)


@contextmanager
def requantizing_merge() -> Iterator[RequantizationReport]:
    """Within it, merges into a bitsandbytes 4-bit/8-bit base requantize W + delta W into a quantized layer of the
    same kind (same memory) instead of leaving a dense layer; what that kept of the update is the yielded report,
    also warned on exit: ``with tenslora.requantizing_merge() as report: model.merge_and_unload()``."""
    report = RequantizationReport()
    token = _REQUANTIZING.set(report)
    try:
        yield report
    finally:
        _REQUANTIZING.reset(token)
    if report.layers:
        warnings.warn(str(report), stacklevel=3)


def store_weight(module: nn.Module, weight: torch.Tensor) -> nn.Module:
    """The layer that holds ``weight`` (dense fp32, as :func:`dense_weight` returns it) merged: the module itself
    for a plain weight (cast to its dtype) and inside :func:`requantizing_merge`; else a new
    :class:`DequantizedLinear` to put in place of the quantized module."""
    kind, report = quantization(module), _REQUANTIZING.get()
    if kind is None:
        module.weight.data = weight.to(module.weight.dtype)
        return module
    if report is None:
        dense = DequantizedLinear(module.in_features, module.out_features, bias=module.bias is not None,
                                  device=module.weight.device, dtype=torch.float32)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if module.bias is not None:
                dense.bias.copy_(module.bias)
        return dense.requires_grad_(False)
    before = dense_weight(module)
    (_store_4bit if kind == "4-bit" else _store_8bit)(module, weight)
    report.add(weight - before, dense_weight(module) - before)
    return module


def record_dense_layers(model: nn.Module) -> None:
    """After a merge left dense layers in a model quantized by bitsandbytes through transformers: name every linear
    layer that bitsandbytes does not hold (the merged ones, and those it never quantized, such as the LM head) in
    the model's quantization config (``llm_int8_skip_modules``), so that ``save_pretrained`` then
    ``from_pretrained`` loads them dense rather than as quantized layers without quantization state."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is None or not any(isinstance(module, DequantizedLinear) for module in model.modules()):
        return
    bnb = _bitsandbytes()
    dense = {name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
    if isinstance(config, dict):
        config["llm_int8_skip_modules"] = sorted(set(config.get("llm_int8_skip_modules") or ()) | dense)
    else:
        config.llm_int8_skip_modules = sorted(set(config.llm_int8_skip_modules or ()) | dense)


def keep_original(module: nn.Module) -> Union[nn.Module, nn.Parameter, None]:
    """What :func:`restore_original` needs to undo every later merge exactly: the quantized layer itself (a merge
    puts a dense layer in its place) or, inside :func:`requantizing_merge`, its quantized weight as it is.

    None for a plain weight, whose merge is undone by subtracting the update. Keeping the original costs
    one quantized copy of the layer while merged.
    """
    kind = quantization(module)
    if kind is not None and _REQUANTIZING.get() is None:
        return module
    if kind == "4-bit":
        return module.weight
    if kind == "8-bit":
        weight = module.weight
        return _bitsandbytes().nn.Int8Params(weight.data, requires_grad=False, has_fp16_weights=False, CB=weight.data,
                                             SCB=_scales_8bit(module))
    return None


def restore_original(module: nn.Module, original: Union[nn.Module, nn.Parameter]) -> nn.Module:
    """The base layer as :func:`keep_original` kept it, on the device the (merged) ``module``'s weight is on now."""
    device = module.weight.device
    if isinstance(original, nn.Module):
        return original.to(device)
    if original.device != device:
        original = original.to(device)
    module.weight = original
    if quantization(module) == "4-bit":
        module.quant_state = original.quant_state
    return module


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
