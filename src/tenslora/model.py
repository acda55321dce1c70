"""``TensLoraModel``: the PEFT tuner that finds the projections, owns the shared tensors and wraps the layers."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer, _get_in_out_features, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

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
from .bank import TensorBank
from .config import TensLoraConfig
from .construction import Geometry, get_construction
from .layer import Segment, TensLoraLayer

_BANKS = "tenslora_tensors"


def plan_targets(model: nn.Module, config: TensLoraConfig) -> tuple[list[Target], Geometry]:
    """The modules an adapter will wrap and the geometry of its tensors, checked against the real modules."""
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
            f"No projection for roles {list(roles)} was found in the model (looked for {patterns}). "
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
        address = bank.address(role, target.layer) if role in target.roles else None
        segments.append(Segment(start, start + width, address))
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
        config = self.peft_config[adapter_name]
        targets, geometry = plan_targets(model, config)
        bank = TensorBank(get_construction(config.construction), config.factorization, config.ranks, geometry,
                          sorted({t.layer for t in targets}))
        if not config.init_weights:
            with torch.no_grad():
                for parameter in bank.parameters():
                    parameter.normal_(0.0, 1.0 / parameter.shape[0] ** 0.5)
        device = next(model.parameters()).device
        if _BANKS not in self._modules:
            self.tenslora_tensors = nn.ModuleDict()
        self.tenslora_tensors[adapter_name] = bank.to(device)
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

    def _clear_projections(self, *hook_args) -> None:
        for bank in self.tenslora_tensors.values():
            bank.clear_projections()

    def _unload_and_optionally_merge(self, *args, **kwargs) -> nn.Module:
        model = super()._unload_and_optionally_merge(*args, **kwargs)
        for hook in self._pass_hooks:  # the returned model is plain: no hook, no reference to the tensors
            hook.remove()
        del self._pass_hooks
        return model

    def _check_target_module_exists(self, peft_config: TensLoraConfig, key: str) -> bool:
        return key in self._pending_targets

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
        super().delete_adapter(adapter_name)
        del self.tenslora_tensors[adapter_name]

    def _cast_adapter_dtype(self, adapter_name: str, autocast_adapter_dtype: bool = True) -> None:
        """Factors stay fp32 by default (as PEFT keeps LoRA weights), else follow the base model's dtype."""
        dtype = torch.float32 if autocast_adapter_dtype else next(self.model.parameters()).dtype
        self.tenslora_tensors[adapter_name].to(dtype)

    @classmethod
    def _remove_adapter_name_from_key(cls, key: str, adapter_name: str) -> str:
        marker = f"{_BANKS}.{adapter_name}."
        if marker in key:
            return key.replace(marker, f"{_BANKS}.", 1)
        return super()._remove_adapter_name_from_key(key, adapter_name)
