"""``TensLoraModel``: the PEFT tuner that finds the projections, owns the shared tensors and wraps the layers."""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Optional

import torch
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _ExcludedModule,
    _get_in_out_features,
    check_target_module_exists,
)
from peft.utils.integrations import init_empty_weights
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..core.bank import TensorBank
from ..core.budget import count_adapter_parameters
from ..core.construction import FAMILIES, Geometry, get_construction
from ..core.truncation import truncate_tt
from .architectures import (
    Target,
    config_value,
    expand_roles,
    expected_shape,
    find_targets,
    geometry_from_config,
    role_patterns_for,
    target_regex,
)
from .config import TensLoraConfig
from .layer import Segment, TensLoraLayer
from .quantized import record_dense_layers

_BANKS = "tenslora_tensors"
#: What attaching records in a config (the caller's object), and the attribute naming those it filled in itself.
_RECORDED = ("target_modules", "geometry")
_FILLED = "_tenslora_filled_on_attach"


def plan_targets(model: nn.Module, config: TensLoraConfig) -> tuple[list[Target], Geometry]:
    """The modules an adapter will wrap and the geometry of its tensors, checked against the real modules: every
    check of the model an adapter must pass before anything is allocated or changed."""
    model_config = getattr(model, "config", None)
    model_type = None if model_config is None else config_value(model_config, "model_type")
    patterns = role_patterns_for(model_type, config.role_patterns, config.roles)
    roles = expand_roles(config.roles, patterns)  # "all-linear": every role the model's table has
    if config.target_modules is None:
        config.target_modules = target_regex(patterns, roles)
    modules = dict(model.named_modules())
    names = [name for name in modules if name and check_target_module_exists(config, name)]
    targets = find_targets(names, patterns, roles, config.layer_pattern, config.layers_to_transform)
    if not targets:
        raise ValueError(
            f"No {'attention' if set(roles) <= set(FAMILIES['attention']) else 'attention or MLP'} projection for "
            f"roles {list(roles)} was found in the model (looked for {patterns}). "
            "If the model is not a known architecture, pass `role_patterns` (and maybe `layer_pattern`) in the "
            "TensLoraConfig; check `target_modules`, `exclude_modules` and `layers_to_transform`."
        )
    if model_config is None:
        raise ValueError("The model has no `config`; TensLoRA reads hidden size, heads and layers from it.")
    geometry = geometry_from_config(model_config, roles, config.num_heads)
    layers = sorted({t.layer for t in targets})
    geometry = dataclasses.replace(geometry, num_layers=len(layers))
    geometry.validate(get_construction(config.construction))
    for target in targets:
        module = modules[target.name]
        module = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        if not isinstance(module, (nn.Linear, Conv1D)):
            raise ValueError(f"Module '{target.name}' is a {type(module).__name__}; TensLoRA adapts nn.Linear and "
                             "Conv1D projections only. Check `role_patterns`.")
        shape = tuple(_get_in_out_features(module))
        if shape != expected_shape(geometry, target.fused_roles):
            raise ValueError(
                f"Module '{target.name}' ({'+'.join(target.fused_roles)}) maps {shape[0]} -> {shape[1]} features, "
                f"but the model config implies {expected_shape(geometry, target.fused_roles)} (hidden size "
                f"{geometry.hidden_size}, attention width {geometry.attention_width}, MLP width "
                f"{geometry.ffn_width}). Check the config's hidden_size / num_attention_heads / head_dim / "
                "num_key_value_heads / intermediate_size, or `role_patterns`."
            )
    missing_roles = [r for r in geometry.roles if r not in {role for t in targets for role in t.roles}]
    if missing_roles:
        raise ValueError(f"No module was found for role(s) {missing_roles}; fix `role_patterns` or `roles`.")
    check_geometry(config, geometry)
    _check_one_module_per_slot(targets)
    _check_adapter_size(config, geometry)
    return targets, geometry


def check_geometry(config: TensLoraConfig, geometry: Geometry) -> None:
    """Record the model's sizes in a new config; refuse a saved adapter built for different sizes."""
    actual = dataclasses.asdict(geometry)
    actual["roles"] = list(geometry.roles)
    if config.geometry is None:
        config.geometry = actual
        return
    differences = [f"{key} {config.geometry.get(key)} (adapter) vs {value} (model)"
                   for key, value in actual.items() if config.geometry.get(key) != value]
    if differences:
        raise ValueError(
            "This adapter was built for a different model: " + "; ".join(differences) + ". Load it into the "
            f"model it was trained on ({config.base_model_name_or_path or 'see base_model_name_or_path'})."
        )


def segments_for(target: Target, geometry: Geometry, bank: TensorBank) -> list[Segment]:
    """Output ranges of the module, in the order its fused roles lay them out."""
    segments, start = [], 0
    for role in target.fused_roles:
        width = geometry.role_shape(role)[1]
        blocks = bank.addresses(role, target.layer) if role in target.roles else ()
        segments.append(Segment(start, start + width, blocks))
        start += width
    return segments


class TensLoraModel(BaseTuner):
    """Tensor low-rank adapters as a PEFT tuner. The tensors of each adapter live here, in
    ``tenslora_tensors[adapter_name]``, once: saved once, counted once, trained once."""

    prefix: str = "tenslora_"
    tuner_layer_cls = TensLoraLayer
    target_module_mapping: dict[str, list[str]] = {}  # targets come from architectures.ROLE_PATTERNS
    uses_shared_state: bool = True

    def inject_adapter(self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True,
                       low_cpu_mem_usage: bool = False, state_dict: Optional[dict[str, torch.Tensor]] = None) -> None:
        _check_name_stays_in_folder(adapter_name)
        config, targets, geometry = self._plan_for_this_model(model, adapter_name)
        # Under low_cpu_mem_usage (PeftModel.from_pretrained builds the whole tuner so) the factors are created on
        # the meta device, as LoRA's are, and the loaded tensors are assigned in their place.
        with init_empty_weights() if low_cpu_mem_usage else nullcontext():
            bank = TensorBank(get_construction(config.construction), config.factorization, config.ranks, geometry,
                              sorted({t.layer for t in targets}), config.layout)
        if not config.init_weights:
            with torch.no_grad():
                for parameter in bank.parameters():
                    parameter.normal_(0.0, 1.0 / parameter.shape[0] ** 0.5)
        if not any(parameter.is_meta for parameter in bank.parameters()):
            bank = bank.to(next(model.parameters()).device)
        if _BANKS not in self._modules:
            self.tenslora_tensors = nn.ModuleDict()
        # PEFT restores the trainability of the model's existing parameters after adding an adapter (a frozen
        # second adapter must not freeze the one being trained); the banks live outside the model, so here.
        trainable = [(p, p.requires_grad) for b in self.tenslora_tensors.values() for p in b.parameters()]
        self.tenslora_tensors[adapter_name] = bank
        if not hasattr(self, "_pass_hooks"):
            # Products reused within a forward pass must not outlive it: not into the next pass, and not
            # into the recomputation of a checkpointed layer (which must recompute what it saved).
            self._pass_hooks = (model.register_forward_pre_hook(self._clear_projections),
                                model.register_forward_hook(self._clear_projections, always_call=True))
        self._pending_targets = {t.name: t for t in targets}
        self._pending_geometry = geometry
        try:
            super().inject_adapter(model, adapter_name, autocast_adapter_dtype, low_cpu_mem_usage, state_dict)
        except Exception:
            del self.tenslora_tensors[adapter_name]
            raise
        finally:
            del self._pending_targets, self._pending_geometry
            for parameter, requires_grad in trainable:
                parameter.requires_grad_(requires_grad)

    def _plan_for_this_model(self, model: nn.Module,
                             adapter_name: str) -> tuple[TensLoraConfig, list[Target], Geometry]:
        """The adapter's config with the model's targets and sizes recorded in it, and the plan.

        The caller's object itself, as LoRA's: attaching fills its `target_modules` and `geometry`, and
        ``PeftModel.from_pretrained(..., config=config)`` keeps it. What an earlier attach filled in is derived
        again for this model: a config that fits it stays shared; one filled for a model of other sizes or kind
        is copied and filled for this one, so one object serves several models. A config loaded with a saved
        adapter holds its model's sizes, and is checked against the model instead. Planning works on a copy, so
        a model that is refused leaves the config as it was."""
        config = self.peft_config[adapter_name]
        derived = set(getattr(config, _FILLED, ())) | {name for name in _RECORDED if getattr(config, name) is None}
        planned = copy.deepcopy(config)
        for name in derived:
            setattr(planned, name, None)
        targets, geometry = plan_targets(model, planned)
        setattr(planned, _FILLED, tuple(sorted(derived)))
        if all(getattr(config, name) in (None, getattr(planned, name)) for name in derived):
            for name in (*derived, _FILLED):
                setattr(config, name, getattr(planned, name))
            planned = config
        self.peft_config[adapter_name] = planned
        return planned, targets, geometry

    @classmethod
    def _get_adapter_state_dict(cls, model: nn.Module, config: TensLoraConfig, adapter_name: str,
                                state_dict: dict[str, torch.Tensor],
                                unwanted_adapter_names: list[str]) -> dict[str, torch.Tensor]:
        """PEFT's selection, and every tensor of the adapter's bank. PEFT drops each key holding ``.<name>.`` of
        another adapter: one named like a part of the bank's paths (``all``, ``in``, ``core``, ``tensors``,
        ``tenslora_tensors``) would take this adapter's tensors out of its save. The bank's are selected by
        structure, so any adapter name works (as with LoRA)."""
        selected = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        for name, module in model.named_modules():
            if isinstance(module, TensLoraModel) and adapter_name in module.tenslora_tensors:
                bank = module.tenslora_tensors[adapter_name].state_dict(prefix=f"{name}.{_BANKS}.{adapter_name}.")
                selected = {**bank, **selected}
        return selected

    def _clear_projections(self, *hook_args) -> None:
        for bank in self.tenslora_tensors.values():
            bank.clear_projections()

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        record_dense_layers(model)  # a merged bitsandbytes model then saves and reloads with its dense layers
        # The returned model is plain: no hook, no reference to the tensors. A second unload finds nothing to remove.
        for hook in self.__dict__.pop("_pass_hooks", ()):
            hook.remove()
        return model

    def _check_target_module_exists(self, peft_config: TensLoraConfig, key: str) -> bool | _ExcludedModule:
        """The planned targets; excluded modules are reported as such, so PEFT warns only if `exclude_modules`
        excluded nothing."""
        result = check_target_module_exists(peft_config, key)
        return result if isinstance(result, _ExcludedModule) else key in self._pending_targets

    def _create_and_replace(self, peft_config: TensLoraConfig, adapter_name: str, target: nn.Module,
                            target_name: str, parent: nn.Module, current_key: str, **kwargs) -> None:
        bank = self.tenslora_tensors[adapter_name]
        segments = segments_for(self._pending_targets[current_key], self._pending_geometry, bank)
        layer = target if isinstance(target, TensLoraLayer) else TensLoraLayer(target)
        layer.update_layer(adapter_name, bank, segments, peft_config.scaling, peft_config.dropout)
        if layer is not target:
            self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        """Put ``new_module`` in ``child``'s place, nothing more.

        PEFT's default also copies ``child.weight`` and moves the new module to its device. A
        ``TensLoraLayer`` keeps its base layer and owns no tensor (they live in the bank), and the module
        that unloading puts back (the base layer, or a ``modules_to_save`` copy such as RoBERTa's two-layer
        head, which has no ``weight``) is already whole and in place.
        """
        setattr(parent, child_name, new_module)

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._set_bank_requires_grad(adapter_name, inference_mode)

    def _set_bank_requires_grad(self, active: str | Sequence[str], inference_mode: bool) -> None:
        active = [active] if isinstance(active, str) else list(active)
        for name, bank in self.tenslora_tensors.items():
            bank.requires_grad_(name in active and not inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad)
        for name in [adapter_names] if isinstance(adapter_names, str) else adapter_names:
            self.tenslora_tensors[name].requires_grad_(requires_grad)

    def delete_adapter(self, adapter_name: str) -> None:
        """As LoRA: deleting an active adapter makes the remaining one(s) active and trainable."""
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        del self.tenslora_tensors[adapter_name]
        if was_active:
            self._set_bank_requires_grad(self.active_adapters, inference_mode=False)

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """The factors take the dtype of the weights they adapt, fp16 and bf16 raised to fp32 unless
        ``autocast_adapter_dtype=False``, as PEFT makes LoRA's (a quantized weight's: fp32)."""
        weight = next(module.get_base_layer().weight for module in self.model.modules()
                      if isinstance(module, TensLoraLayer) and adapter_name in module._banks)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        if autocast_adapter_dtype and dtype in (torch.float16, torch.bfloat16):
            dtype = torch.float32
        self.tenslora_tensors[adapter_name].to(dtype)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model: nn.Module, config: TensLoraConfig, adapter_name: str,
                                           state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """PEFT's remapping, then a check that the saved tensors are those the saved config implies, with its
        shapes: an edited or mixed-up adapter_config.json, or weights missing a tensor, are named as such, not left
        to PEFT's warning (a missing tensor would keep its initial value) or to a size-mismatch RuntimeError."""
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)
        own = model.state_dict()
        marker = f"{_BANKS}.{adapter_name}."
        bank_keys = {key for key in own if marker in key}
        missing = sorted(key.split(marker, 1)[1] for key in bank_keys - remapped.keys())
        unexpected = sorted(key.split(f"{_BANKS}.", 1)[1] for key in remapped
                            if f".{_BANKS}." in f".{key}" and key not in bank_keys)
        if missing or unexpected:
            raise ValueError(
                f"The saved weights of adapter '{adapter_name}' do not match its adapter_config.json (construction "
                f"'{config.construction}', {config.factorization}, ranks {config.ranks}): missing tensors "
                f"{_first(missing)}, unexpected tensors {_first(unexpected)}. The config and the weights do not "
                "belong together: re-save the adapter, or restore its adapter_config.json or adapter_model.safetensors."
            )
        if config.factorization == "tt":
            remapped = _round_oversized_bonds(remapped, {key: value for key, value in own.items() if key in bank_keys})
        for key, value in remapped.items():
            if marker in key and key in own and tuple(value.shape) != tuple(own[key].shape):
                raise ValueError(
                    f"The saved tensor '{key.split(marker, 1)[1]}' of adapter '{adapter_name}' has shape "
                    f"{tuple(value.shape)}, but its adapter_config.json (construction '{config.construction}', "
                    f"{config.factorization}, ranks {config.ranks}) implies {tuple(own[key].shape)}. The config and "
                    "the weights do not belong together: re-save the adapter, or restore its adapter_config.json."
                )
        return remapped

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{_BANKS}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{_BANKS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)


def _round_oversized_bonds(saved: dict[str, torch.Tensor], own: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensor-train cores saved with bonds larger than their neighbours allow (what earlier versions kept for a
    "full" or too large bond), rounded to the bonds the config now resolves to. The extra rank carried nothing (an
    unfolding's rank is at most its smaller side), so the rounding is exact and the adapter loads unchanged."""
    tensors: dict[str, list[str]] = {}
    for key in own:  # a tensor's cores, in its modes' order
        tensors.setdefault(key.rsplit(".factors.", 1)[0], []).append(key)
    rounded = dict(saved)
    for keys in tensors.values():
        if any(key not in saved for key in keys):
            continue  # named as missing by the caller
        shapes, wanted = [saved[key].shape for key in keys], [own[key].shape for key in keys]
        if shapes == wanted or [len(shape) for shape in shapes] != [len(shape) for shape in wanted]:
            continue
        # G_in is (d_in x r_1), the others (r_(k-1) x n_k [x r_k]): each mode's size, then each bond's rank
        sizes = [[shape[0] if k == 0 else shape[1] for k, shape in enumerate(cores)] for cores in (shapes, wanted)]
        bonds, kept = ([shape[-1] for shape in cores[:-1]] for cores in (shapes, wanted))
        if sizes[0] != sizes[1] or any(bond < rank for bond, rank in zip(bonds, kept, strict=True)):
            continue  # not merely oversized bonds: the caller's shape check names it
        cores = truncate_tt([saved[key].double() for key in keys], kept)
        rounded.update({key: core.to(saved[key].dtype) for key, core in zip(keys, cores, strict=True)})
    return rounded


def _first(names: list[str], count: int = 5) -> str:
    """The first ``count`` names, and how many there are in all (a model of many layers has hundreds)."""
    return str(names[:count]) + (f" ({len(names)} in all)" if len(names) > count else "")


def _check_name_stays_in_folder(adapter_name: str) -> None:
    """PEFT saves every adapter but ``default`` in a subfolder named after it: a name that is absolute or holds a
    path would write outside the folder the user chose, so only a plain folder name is accepted."""
    if (not adapter_name or adapter_name in (".", "..") or "/" in adapter_name or "\\" in adapter_name
            or os.path.isabs(adapter_name)):
        raise ValueError(f"The adapter name {adapter_name!r} is not a plain folder name: PEFT saves a non-default "
                         f"adapter in a subfolder named after it, which must stay inside the save folder. Use a name "
                         f"without '/', '\\' or '..' (e.g. 'task_a').")


def _check_one_module_per_slot(targets: Sequence[Target]) -> None:
    """Two modules found for the same role of the same layer (an encoder and a decoder numbered alike) would
    silently share one update; refuse, and say how to pick one."""
    seen: dict[tuple[str, int], str] = {}
    for target in targets:
        for role in target.roles:
            first = seen.setdefault((role, target.layer), target.name)
            if first != target.name:
                raise ValueError(
                    f"Modules '{first}' and '{target.name}' are both role '{role}' of layer {target.layer}, so they "
                    "would share one update. Adapt one of them: make `role_patterns` specific (e.g. "
                    r"{'q': r'encoder\.layers\.\d+\.self_attn\.q_proj', ...}) or set `exclude_modules`; if they "
                    "are different layers, give a `layer_pattern` (or `layers_to_transform`) that tells them apart."
                )


def _check_adapter_size(config: TensLoraConfig, geometry: Geometry) -> None:
    """Refuse, before allocating anything, more parameters than the same construction has at full Tucker ranks
    (which already represent every update exactly): such ranks are a mistake, never a useful low-rank update (a CP
    rank of 10**9 would try to allocate hundreds of GB). Tucker and TT ranks are capped at their full ranks, so only
    CP ranks can reach this (full-rank TT tensors may hold a little more than Tucker's: they are not refused)."""
    if config.factorization != "cp":
        return
    count = count_adapter_parameters(config.construction, config.factorization, config.ranks, geometry, config.layout)
    limit = count_adapter_parameters(config.construction, "tucker", sys.maxsize, geometry, config.layout)
    if count > limit:
        raise ValueError(
            f"The adapter would have {count:,} parameters, more than the {limit:,} of full-rank Tucker tensors, "
            f"which already represent every update of the adapted weights exactly: ranks {config.ranks!r} are too "
            "large for this model. Lower `ranks` (tenslora.count_parameters gives the count of a config)."
        )
