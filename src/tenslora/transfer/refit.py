"""Adapters refitted through their mode spectra: a trained Tucker / tensor-train adapter truncated to smaller ranks
(``compress_adapter``), and a trained PEFT LoRA adapter turned into a TensLoRA one (``from_lora``).

Both report the relative error of the updates, ``||Delta W_new - Delta W||_F / ||Delta W||_F`` over every adapted
projection (the scaled updates, as merged). The mathematics is in ``core/truncation.py``.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.utils import load_peft_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core import budget as budgets
from ..core.bank import TensorBank, slice_rows
from ..core.blocks import PlannedTensors, plan_tensors
from ..core.construction import ALL_LINEAR, ROLE_NAMES, RankSpec, one_or_per_family, parse_roles, preset_fixed_ranks
from ..core.truncation import check_energy, family_energy_ranks, fit, place_slice, truncated
from ..tuner.budgets import match_budget
from ..tuner.config import TensLoraConfig, adapter_config_of
from ..tuner.layer import Segment, TensLoraLayer
from ..tuner.model import plan_targets
from .lora_export import _MODEL_PREFIX

_TENSLORA_BIAS = {"none": "none", "all": "all", "lora_only": "tenslora_only"}  # LoRA's bias -> TensLoRA's


@dataclass(frozen=True)
class RefitReport:
    """What a refit changed: ranks (keyed by family with attention and MLP roles), parameters and the error."""

    ranks_before: Any
    ranks_after: Any
    parameters_before: int
    parameters_after: int
    relative_error: float


def delta_weights(peft_model: PeftModel, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The scaled update of every module adapted by LoRA or TensLoRA, in ``nn.Linear`` layout (out x in), fp32."""
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        adapted = (isinstance(module, TensLoraLayer) and adapter_name in module._banks) or (
            isinstance(module, LoraLayer) and adapter_name in module.lora_A)
        if not adapted:
            continue
        base = module.get_base_layer()
        if not isinstance(base, (nn.Linear, Conv1D)):
            raise ValueError(f"Module '{name}' is a {type(base).__name__} with a LoRA; only nn.Linear and Conv1D "
                             "updates are refitted. Leave it out of the LoRA's target_modules.")
        with torch.no_grad():
            delta = module.get_delta_weight(adapter_name).float()
        deltas[name] = delta.T if isinstance(base, Conv1D) else delta
    return deltas


def relative_error(reference: Mapping[str, torch.Tensor], approximation: Mapping[str, torch.Tensor]) -> float:
    """``||approximation - reference||_F / ||reference||_F`` over all modules (a module missing from one is zero)."""
    error = reference_norm = 0.0
    for name in {*reference, *approximation}:
        ref, approx = reference.get(name), approximation.get(name)
        ref = torch.zeros_like(approx) if ref is None else ref
        approx = torch.zeros_like(ref) if approx is None else approx
        error += float((approx - ref).double().norm() ** 2)
        reference_norm += float(ref.double().norm() ** 2)
    return (error / reference_norm) ** 0.5 if reference_norm > 0 else error ** 0.5


def _bank_parameters(bank: TensorBank) -> int:
    return sum(parameter.numel() for parameter in bank.parameters())


def _by_family(plan: PlannedTensors) -> dict[str, Any]:
    """The ranks of a plan keyed by family, also where the config gives one family's (or the block tensors') alone."""
    families = list(dict.fromkeys(spec.family for spec, _ in plan.tensors.values()))
    return dict(plan.ranks) if len(families) > 1 else {families[0]: plan.ranks}


def check_compression_target(ranks: RankSpec | None, energy: float | None, budget: object) -> None:
    """Exactly one of the three ways to give new ranks, and an energy in (0, 1]: checked before any work."""
    if [ranks, energy, budget].count(None) != 2:
        raise ValueError("Give exactly one of `ranks`, `energy` and `budget` to compress an adapter.")
    if energy is not None:
        check_energy(energy)


def compress_adapter(peft_model: PeftModel, ranks: RankSpec | None = None, energy: float | None = None,
                     budget: int | None = None, adapter_name: str = "default") -> RefitReport:
    """Truncate a trained Tucker or tensor-train adapter in place to smaller ranks, through its mode spectra.

    Give one of: ``ranks`` (as a config's, e.g. ``4`` or ``{"in": 4, "out": 4, "qkv": 3, "depth": 2}``), ``energy``
    (per mode, or bond, the smallest rank keeping that share of the squared singular values, in every tensor of a
    family) or ``budget`` (a parameter count, a ceiling: the largest common rank whose adapter has at most that
    many parameters; modes whose rank is ``"full"``, as a preset's rule writes them (LoTR's depth), stay full). A
    truncation never raises a rank: one asked above the adapter's stays the adapter's. The adapter's config gets
    the new ranks, so that ``save_pretrained`` writes an adapter that loads as any other. The tensors are never
    formed densely.
    """
    config = adapter_config_of(peft_model, adapter_name, TensLoraConfig)
    check_compression_target(ranks, energy, budget)
    if budget is not None:
        budget = budgets.check_budget(budget)
    if config.factorization == "cp":
        raise ValueError("Only Tucker and tensor-train adapters have mode spectra to truncate; this one is CP (or the "
                         "LoRA preset). Train with factorization 'tucker' or 'tt' to compress afterwards.")
    bank: TensorBank = peft_model.base_model.tenslora_tensors[adapter_name]

    def plan(spec: RankSpec) -> PlannedTensors:
        return plan_tensors(bank.construction, config.factorization, spec, bank.geometry,
                            sorted(bank.layer_position), bank.layout)

    current = plan(config.ranks)
    held = _by_family(current)
    fixed = preset_fixed_ranks(config.construction, config.ranks) if budget is not None else None
    if energy is not None:
        wanted = family_energy_ranks(bank.tensors, {key: spec.family for key, (spec, _) in current.tensors.items()},
                                     energy)
    else:
        if budget is not None:  # an adapter already within the budget is kept as it is
            ranks = config.ranks if budget >= _bank_parameters(bank) else budgets.match_budget(
                config.construction, config.factorization, budget, bank.geometry, fixed, bank.layout, ceiling=True,
                held=held)
        wanted = _by_family(plan(ranks))
    new = plan(one_or_per_family({family: {name: min(rank, held[family][name]) for name, rank in ranks.items()}
                                   for family, ranks in wanted.items()}))
    before, parameters_before = delta_weights(peft_model, adapter_name), _bank_parameters(bank)
    for key, (_, tensor_ranks) in new.tensors.items():
        parameter = bank.tensor(key).factors["in"]
        replacement = truncated(bank.tensor(key), tensor_ranks).to(parameter.device, parameter.dtype)
        bank.tensors[key] = replacement.requires_grad_(parameter.requires_grad)
    bank.ranks = new.ranks
    # The modes kept full stay "full" in the config (in their own family), so that the next compression keeps
    # them too.
    if fixed is not None:
        by_family = _by_family(new)
        full = budgets.fixed_by_family(fixed, by_family)
        config.ranks = one_or_per_family({family: {name: "full" if name in full[family] else rank
                                                   for name, rank in family_ranks.items()}
                                          for family, family_ranks in by_family.items()})
    else:
        config.ranks = new.ranks
    return RefitReport(current.ranks, new.ranks, parameters_before, _bank_parameters(bank),
                       relative_error(before, delta_weights(peft_model, adapter_name)))


def from_lora(lora: PeftModel | str | os.PathLike, construction: str, ranks: RankSpec | None = None,
              budget: int | None = None, factorization: str = "tucker", roles: Sequence[str] | None = None,
              layout: str = "roles", base_model: nn.Module | None = None,
              adapter_name: str = "default") -> tuple[PeftModel, RefitReport]:
    """A TensLoRA adapter of ``construction`` fitted to a trained PEFT LoRA adapter: ``(model, report)``.

    The LoRA updates ``B A * scaling`` are stacked into the construction's tensors (each family its own, ``o`` and
    ``down`` transposed, grouped-query k/v zero-padded as training lays them out; cut into d x d blocks under
    ``layout="blocks"``), then truncated by HOSVD (``tucker``) or TT-SVD (``tt``) to ``ranks`` or to the ranks
    whose count is nearest ``budget``. ``lora`` is a ``PeftModel`` or a LoRA adapter folder (then ``base_model`` is
    the model it was trained on). The LoRA model is consumed once every check has passed (a refusal leaves it
    whole): its LoRA layers are removed and the TensLoRA adapter is put on the same base, with the LoRA's trained
    ``modules_to_save`` (the head) and biases. ``roles`` defaults to those the LoRA adapts; fewer roles than the
    LoRA's (its updates would be dropped), and a module the adapter would wrap that the LoRA leaves without an update
    (a deeper base, a LoRA of some layers), are refused. A preset keeps its rule under a budget (LoTR's depth stays
    full). The stacked tensors are formed densely here, once (a 7B model's all-linear tensors would need tens of GB).
    """
    if (ranks is None) == (budget is None):
        raise ValueError("Give exactly one of `ranks` and `budget` to fit a LoRA.")
    if budget is not None:
        budgets.check_budget(budget)
    if factorization not in ("tucker", "tt"):
        raise ValueError(f"A LoRA is fitted by HOSVD (factorization 'tucker') or TT-SVD ('tt'), not {factorization!r}.")
    # Everything is checked before the LoRA is consumed: an error leaves the caller's model as it was.
    ranks_to_check = 1 if ranks is None else ranks  # under a budget, match_budget sets the ranks further down
    TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks_to_check, layout=layout)
    saved = None  # a folder's tensors: a module it lacks (a deeper base) is left at PEFT's init, which is no update
    if not isinstance(lora, PeftModel):
        if base_model is None:
            raise ValueError(f"'{lora}' is an adapter folder: pass base_model=, the model the LoRA was trained on.")
        saved = load_peft_weights(str(lora), device="cpu")
        lora = PeftModel.from_pretrained(base_model, str(lora), adapter_name=adapter_name)
    lora_config: LoraConfig = adapter_config_of(lora, adapter_name, LoraConfig)
    if lora_config.use_dora:
        raise ValueError("A DoRA adapter's update is not B A (it rescales the weight's columns); only plain LoRA "
                         "adapters are fitted.")
    lora.set_adapter(adapter_name)
    deltas = delta_weights(lora, adapter_name)
    if saved is not None:
        deltas = {name: delta for name, delta in deltas.items() if f"{_MODEL_PREFIX}{name}.lora_A.weight" in saved}
    lora_parameters = sum(parameter.numel() for name, parameter in lora.named_parameters()
                          if f".lora_A.{adapter_name}." in name or f".lora_B.{adapter_name}." in name)
    adapted = lora.get_base_model()  # the base with the LoRA layers still in: every check runs on it
    lora_roles = _lora_roles(adapted, deltas)
    roles = lora_roles if roles is None else parse_roles(roles)  # "q,v", ["q", "v"] or "all-linear"
    dropped = [role for role in lora_roles if roles != ALL_LINEAR and role not in roles]
    if dropped:
        raise ValueError(f"The LoRA adapts roles {lora_roles}; roles={roles} would drop its updates of "
                         f"{dropped}. Include them in `roles`, or leave `roles` out (the LoRA's).")
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks_to_check, roles=roles,
                            task_type=lora_config.task_type, modules_to_save=lora_config.modules_to_save,
                            bias=_TENSLORA_BIAS[lora_config.bias], dropout=lora_config.lora_dropout,
                            base_model_name_or_path=lora_config.base_model_name_or_path,
                            revision=lora_config.revision, layout=layout)
    if budget is not None:  # a preset keeps its rule (LoTR's depth stays full), as everywhere
        config.ranks = match_budget(construction, config.factorization, budget, adapted.config, roles=roles,
                                    layout=layout)
    targets = plan_targets(adapted, copy.deepcopy(config))[0]  # what get_peft_model would refuse, refused now
    empty = [target.name for target in targets if target.name not in deltas or not bool(deltas[target.name].any())]
    if empty:
        raise ValueError(f"The LoRA holds no update for {len(empty)} module(s) the TensLoRA adapter would adapt "
                         f"({', '.join(empty[:3])}{', ...' if len(empty) > 3 else ''}): they would get a zero "
                         "update. Pass the base model the LoRA was trained on; it must adapt its roles in every layer.")
    model = get_peft_model(lora.unload(), config, adapter_name=adapter_name)
    bank: TensorBank = model.base_model.tenslora_tensors[adapter_name]
    dense = {key: torch.zeros(*tensor.sizes.values(), dtype=torch.float64) for key, tensor in bank.tensors.items()}
    known = {key: torch.zeros(*tensor.sizes.values(), dtype=torch.bool) for key, tensor in bank.tensors.items()}
    for name, module in model.base_model.model.named_modules():
        if isinstance(module, TensLoraLayer):
            for segment in module._segments[adapter_name]:
                update = deltas[name][segment.start : segment.stop]
                _place_segment(dense, bank, segment, update.double())
                _place_segment(known, bank, segment, torch.ones_like(update, dtype=torch.bool))
    for key, tensor in dense.items():
        fit(bank.tensor(key), tensor, known[key])
    report = RefitReport(lora_config.r, bank.ranks, lora_parameters,
                         _bank_parameters(bank), relative_error(deltas, delta_weights(model, adapter_name)))
    return model, report


def _lora_roles(base: nn.Module, deltas: Mapping[str, torch.Tensor]) -> list[str]:
    """The roles whose modules the LoRA adapts (a fused module, GPT-2's ``c_attn``, brings all of its roles)."""
    probe = TensLoraConfig(roles="all-linear")
    targets = {target.name: target for target in plan_targets(base, probe)[0]}
    unknown = [name for name in deltas if name not in targets]
    if unknown:
        raise ValueError(f"The LoRA adapts {unknown[:3]}, which are not attention or MLP projections TensLoRA knows "
                         "on this model; a TensLoRA adapter cannot hold their updates.")
    adapted = {role for name in deltas for role in targets[name].roles}
    return [role for role in ROLE_NAMES if role in adapted]


def _place_segment(dense: Mapping[str, torch.Tensor], bank: TensorBank, segment: Segment, rows: torch.Tensor) -> None:
    """Write one role's update (its rows of the module's update) into the dense tensors of its slices: one slice,
    or the d x d blocks that cut its wide side (output rows, or the input columns of a transposed o/down)."""
    if not segment.blocks:
        return
    for address, matrix in slice_rows(segment.blocks, rows):
        place_slice(dense[address.key], bank.tensor(address.key), address.index, matrix)
