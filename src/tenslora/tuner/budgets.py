"""Budgets from a model's config alone: no weights are built or downloaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..core import budget as budgets
from ..core.blocks import plan_tensors
from ..core.construction import Geometry, RankSpec, get_construction, preset_fixed_ranks
from .architectures import adapted_roles, config_value, geometry_from_config
from .config import TensLoraConfig

Roles = str | Sequence[str]


def model_geometry(model_config: Any, roles: Roles = ("q", "k", "v"), num_heads: int | None = None,
                   layers_to_transform: Sequence[int] | None = None,
                   role_patterns: Mapping[str, str] | None = None) -> Geometry:
    """Sizes of the adapted projections of a Hugging Face config (a ``PretrainedConfig`` or its dict).

    ``roles="all-linear"`` is expanded with the role table of the config's ``model_type`` (or
    ``role_patterns``): LLaMA gets gate, up and down, BERT up and down.
    """
    roles = adapted_roles(roles, config_value(model_config, "model_type"), role_patterns)
    return geometry_from_config(model_config, roles, num_heads, layers_to_transform)


def _geometry_of(config: TensLoraConfig, model_config: Any) -> Geometry:
    return model_geometry(model_config, config.roles, config.num_heads, config.layers_to_transform,
                          config.role_patterns)


def count_parameters(config: TensLoraConfig, model_config: Any) -> int:
    """Trainable adapter parameters of ``config`` on a model with ``model_config`` (head excluded)."""
    return budgets.count_adapter_parameters(config.construction, config.factorization, config.ranks,
                                           _geometry_of(config, model_config), config.layout)


def resolved_ranks(config: TensLoraConfig, model_config: Any) -> RankSpec:
    """The ranks ``config`` trains with on a model with ``model_config``: a single int spread over the
    modes, ``"full"`` and ranks above a mode's size (capped) written out, one per mode (CP: its one rank).
    With attention and MLP roles, keyed by family: ``{"attention": ..., "mlp": ...}`` (not in the block layout)."""
    return plan_tensors(get_construction(config.construction), config.factorization, config.ranks,
                        _geometry_of(config, model_config), layout=config.layout).ranks


def lora_parameter_count(rank: int, model_config: Any, roles: Roles = ("q", "k", "v"),
                         layers_to_transform: Sequence[int] | None = None,
                         role_patterns: Mapping[str, str] | None = None) -> int:
    """Parameters of LoRA rank ``rank`` on ``roles`` of every layer (or of ``layers_to_transform``):
    r * (d_in + d_out) per projection (e.g. 2 * r * d * 3 * L for BERT on q, k, v); ``roles="all-linear"``
    counts every block linear (of the model type's role table, or of ``role_patterns``)."""
    geometry = model_geometry(model_config, roles, layers_to_transform=layers_to_transform, role_patterns=role_patterns)
    return budgets.lora_parameter_count(rank, geometry)


def match_budget(construction: str, factorization: str, budget: int, model_config: Any,
                 roles: Roles = ("q", "k", "v"), fixed: Mapping[str, int | str] | None = None,
                 num_heads: int | None = None, layout: str = "roles",
                 layers_to_transform: Sequence[int] | None = None,
                 role_patterns: Mapping[str, str] | None = None, max_input_rank: int | None = None) -> RankSpec:
    """Ranks of ``construction`` whose parameter count is closest to ``budget`` (the isoparameter condition; it
    may lie a little above the budget: a compression to a budget, which never exceeds it, is ``compress_adapter``).

    Example: ``match_budget("qkv_depth", "tucker", lora_parameter_count(8, cfg, "all-linear"), cfg,
    roles="all-linear")``. With attention and MLP roles, Tucker ranks come keyed by family (not under
    ``layout="blocks"``, whose blocks share one tensor). A preset keeps its rule (LoTR's depth mode stays full);
    ``fixed`` adds to or overrides it. ``layers_to_transform`` and ``role_patterns`` as in ``TensLoraConfig``.
    ``max_input_rank`` caps the rank that sets the cost per token (that of a LoRA of this rank) and spends the
    budget on the other modes and the core: at LoRA rank r's budget, ``max_input_rank=r`` costs what LoRA costs.
    """
    config = TensLoraConfig(construction=construction, factorization=factorization, roles=roles,
                            num_heads=num_heads, layout=layout, layers_to_transform=layers_to_transform,
                            role_patterns=role_patterns)
    fixed = {**(preset_fixed_ranks(construction) or {}), **(fixed or {})}
    return budgets.match_budget(config.construction, config.factorization, budget, _geometry_of(config, model_config),
                               fixed, config.layout, max_input_rank=max_input_rank)
