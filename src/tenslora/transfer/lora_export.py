"""A TensLoRA adapter written as a plain PEFT LoRA adapter, with no approximation.

Every slice of a TensLoRA tensor is ``Delta W = s * (U_in B)^T``, of rank at most ``r_in`` (``R`` for CP):
it *is* a LoRA with ``A = U_in^T`` and ``B = s * B^T``. A transposed slice (the attention output ``o``
and the MLP ``down``, whose update is the slice transposed) swaps the two: ``A = B`` and ``B = s * U_in``.
A fused projection (GPT-2's ``c_attn``: q, k and v side by side) gets one LoRA whose ``A`` stacks the
distinct input factors of its slices and whose ``B`` is block-structured (zero rows where a role is not
adapted).

The exported folder is an ordinary LoRA adapter: ``PeftModel.from_pretrained`` loads it in a process
that never imports tenslora, and engines that serve LoRA adapters (multi-adapter batching included)
serve it as it is.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
from safetensors.torch import save_file

from ..files import new_folder
from ..tuner.config import TensLoraConfig, adapter_config_of
from ..tuner.layer import TensLoraLayer

_MODEL_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules in a saved adapter
_LORA_BIAS = {"none": "none", "all": "all", "tenslora_only": "lora_only"}  # trained biases keep LoRA's key names


@torch.no_grad()
def lora_adapter(peft_model: PeftModel, adapter_name: str = "default") -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """The ``LoraConfig`` and saved-adapter state dict equal to a TensLoRA adapter (what ``export_lora`` writes).

    ``lora_alpha`` equals each module's rank (PEFT's scale ``lora_alpha / r`` is 1; TensLoRA's scaling is in
    ``B``). The global ``r`` is the largest module rank; modules of another rank are listed in
    ``rank_pattern`` and ``alpha_pattern``. Modules besides the adapter (the trained head) are kept as
    ``modules_to_save`` and trained biases as LoRA's ``bias``, under the keys PEFT saves them with.
    """
    config = adapter_config_of(peft_model, adapter_name, TensLoraConfig)
    model = peft_model.base_model.model
    factors, conv1d = {}, set()
    for name, module in model.named_modules():
        if isinstance(module, TensLoraLayer) and adapter_name in module._banks:
            factors[name] = module.lora_factors(adapter_name)
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
