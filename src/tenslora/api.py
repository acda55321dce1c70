"""Budgets from a model's config alone: no weights are built or downloaded."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from . import budget as budgets
from .architectures import geometry_from_config
from .config import TensLoraConfig
from .construction import Geometry, get_construction, resolve_ranks


def model_geometry(model_config: Any, roles: Sequence[str] = ("q", "k", "v"), num_heads: int | None = None,
                   layers_to_transform: Sequence[int] | None = None) -> Geometry:
    """Sizes of the adapted projections of a Hugging Face config (a ``PretrainedConfig`` or its dict)."""
    return geometry_from_config(model_config, roles, num_heads, layers_to_transform)


def _geometry_of(config: TensLoraConfig, model_config: Any) -> Geometry:
    return model_geometry(model_config, config.roles, config.num_heads, config.layers_to_transform)


def count_parameters(config: TensLoraConfig, model_config: Any) -> int:
    """Trainable adapter parameters of ``config`` on a model with ``model_config`` (head excluded)."""
    return budgets.count_adapter_parameters(config.construction, config.factorization, config.ranks,
                                           _geometry_of(config, model_config))


def resolved_ranks(config: TensLoraConfig, model_config: Any) -> dict[str, int] | int:
    """The ranks ``config`` trains with on a model with ``model_config``: a single int spread over the
    modes, ``"full"`` and ranks above a mode's size (capped) written out, one per mode (CP: its one rank)."""
    construction = get_construction(config.construction)
    sizes = _geometry_of(config, model_config).mode_sizes(construction)
    return resolve_ranks(construction, config.factorization, config.ranks, sizes)


def lora_parameter_count(rank: int, model_config: Any, roles: Sequence[str] = ("q", "k", "v")) -> int:
    """Parameters of LoRA rank ``rank`` on ``roles`` of every layer (e.g. 2 * r * d * 3 * L for BERT)."""
    return budgets.lora_parameter_count(rank, model_geometry(model_config, roles))


def match_budget(construction: str, factorization: str, budget: int, model_config: Any,
                 roles: Sequence[str] = ("q", "k", "v"), fixed: Mapping[str, int | str] | None = None,
                 num_heads: int | None = None) -> dict[str, int] | int:
    """Ranks of ``construction`` whose parameter count is closest to ``budget`` (the isoparameter condition).

    Example: ``match_budget("qkv_depth", "tucker", lora_parameter_count(8, cfg), cfg)``.
    """
    config = TensLoraConfig(construction=construction, factorization=factorization, roles=list(roles),
                            num_heads=num_heads)
    return budgets.match_budget(config.construction, config.factorization, budget, _geometry_of(config, model_config),
                               fixed)
