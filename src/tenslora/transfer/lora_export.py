"""A TensLoRA adapter written as a plain PEFT LoRA adapter, with no approximation.

Every slice of a TensLoRA tensor is ``Delta W = s * (U_in B)^T``, of rank at most ``r_in`` (``R`` for CP):
it *is* a LoRA with ``A = U_in^T`` and ``B = s * B^T``. A Tucker slice's ``B`` is its core times the output
factors, of rank at most ``r_out`` (the output modes' ranks multiplied): where that is smaller, the pair is
refactored to rank ``min(r_in, r_out)`` through the SVD of its small middle (exact to fp32 rounding), as smaller
adapters are cheaper to serve. A transposed slice (the attention output ``o``
and the MLP ``down``, whose update is the slice transposed) swaps the two: ``A = B`` and ``B = s * U_in``.
A fused projection (GPT-2's ``c_attn``: q, k and v side by side) gets one LoRA whose ``A`` stacks the
distinct input factors of its slices and whose ``B`` is block-structured (zero rows where a role is not
adapted).

The exported folder is an ordinary LoRA adapter: ``PeftModel.from_pretrained`` loads it in a process
that never imports tenslora, and engines that serve LoRA adapters (multi-adapter batching included)
serve it as it is.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from ..core.tensors.tucker import TuckerTensor
from ..files import new_folder
from ..tuner.config import TensLoraConfig, adapter_config_of
from ..tuner.layer import TensLoraLayer

_MODEL_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules in a saved adapter
_LORA_BIAS = {"none": "none", "all": "all", "tenslora_only": "lora_only"}  # trained biases keep LoRA's key names


@torch.no_grad()
def lora_adapter(peft_model: PeftModel, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The ``LoraConfig`` and saved-adapter state dict equal to a TensLoRA adapter (what ``export_lora`` writes).

    ``lora_alpha`` equals each module's rank (PEFT's scale ``lora_alpha / r`` is 1; TensLoRA's scaling is in
    ``B``); each module's rank is the most its update can have (``min(r_in, r_out)`` a slice, summed over a fused
    module's slices). The global ``r`` is the largest module rank; modules of another rank are listed in
    ``rank_pattern`` and ``alpha_pattern``. Modules besides the adapter (the trained head) are kept as
    ``modules_to_save`` and trained biases as LoRA's ``bias``, under the keys PEFT saves them with.
    """
    config = adapter_config_of(peft_model, adapter_name, TensLoraConfig)
    model = peft_model.base_model.model
    factors, conv1d = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, TensLoraLayer) and adapter_name in module._banks:
            lora_a, lora_b = module.lora_factors(adapter_name)
            factors[name] = _at_rank(lora_a, lora_b, _update_rank(module, adapter_name))
            conv1d.add(module.is_conv1d)
    if len(conv1d) > 1:
        raise ValueError("This adapter wraps both nn.Linear and Conv1D modules; a LoRA adapter stores one "
                         "`fan_in_fan_out` for all of them. Export the two kinds as separate adapters.")
    ranks = {name: a.shape[0] for name, (a, _) in factors.items()}
    rank = max(ranks.values())
    other_ranks = {name: r for name, r in ranks.items() if r != rank}
    lora_config = LoraConfig(
        task_type=config.task_type, base_model_name_or_path=config.base_model_name_or_path,
        revision=config.revision, r=rank, lora_alpha=rank, target_modules=sorted(factors),
        rank_pattern=other_ranks, alpha_pattern=dict(other_ranks), lora_dropout=config.dropout,
        fan_in_fan_out=conv1d == {True}, modules_to_save=config.modules_to_save, bias=_LORA_BIAS[config.bias],
        inference_mode=True,
    )
    state = {key: value for key, value in get_peft_model_state_dict(peft_model, adapter_name=adapter_name).items()
             if key.startswith(_MODEL_PREFIX)}
    for name, (lora_a, lora_b) in factors.items():
        state[f"{_MODEL_PREFIX}{name}.lora_A.weight"] = lora_a
        state[f"{_MODEL_PREFIX}{name}.lora_B.weight"] = lora_b
    # Copies: PEFT's state dict may name one tensor twice (a head's bias with bias="all"); safetensors refuses that.
    return lora_config, {key: value.detach().cpu().clone(memory_format=torch.contiguous_format)
                         for key, value in state.items()}


def _update_rank(module: TensLoraLayer, adapter_name: str) -> int:
    """The most rank a module's update can have: per role, r_in or the blocks' output ranks summed (Tucker: the
    output modes' ranks multiplied, CP and TT: r_in); summed over the roles, at most the rows of its LoRA ``A``."""
    bank, total = module._banks[adapter_name], 0
    for segment in module._segments[adapter_name]:
        if segment.blocks:
            tensor = bank.tensor(segment.blocks[0].key)
            output_rank = (math.prod(tensor.ranks[m] for m in tensor.output_modes) if isinstance(tensor, TuckerTensor)
                           else tensor.input_rank)
            total += min(tensor.input_rank, len(segment.blocks) * output_rank)
    return total


def _at_rank(lora_a: torch.Tensor, lora_b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A LoRA pair of ``rank`` columns with the product ``B A`` of the given one, whose rank is at most ``rank``:
    ``B A = Q_B (R_B R_A^T) Q_A^T`` by two QRs, the small middle's SVD cut at ``rank`` (float64)."""
    if rank >= lora_a.shape[0]:
        return lora_a, lora_b
    q_a, r_a = torch.linalg.qr(lora_a.double().T)
    q_b, r_b = torch.linalg.qr(lora_b.double())
    u, s, vh = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)
    return (vh[:rank] @ q_a.T).to(lora_a.dtype), (q_b @ u[:, :rank] * s[:rank]).to(lora_b.dtype)


def export_lora(peft_model: PeftModel, out_dir: str | os.PathLike, adapter_name: str = "default") -> Path:
    """Write the TensLoRA adapter ``adapter_name`` of ``peft_model`` as a standard PEFT LoRA adapter folder.

    ``PeftModel.from_pretrained(base_model, out_dir)`` then gives the same outputs as the TensLoRA model,
    with or without tenslora installed. ``out_dir`` must be new or empty; it appears whole or not at all.
    """
    lora_config, state = lora_adapter(peft_model, adapter_name)
    with new_folder(out_dir) as staging:
        write_lora(lora_config, state, staging)
    return Path(out_dir)


def write_lora(lora_config: LoraConfig, state: dict[str, torch.Tensor], folder: Path) -> None:
    """The two files of a PEFT adapter folder: ``adapter_config.json`` and ``adapter_model.safetensors``."""
    lora_config.save_pretrained(str(folder))
    save_file(state, str(folder / SAFETENSORS_WEIGHTS_NAME), metadata={"format": "pt"})
