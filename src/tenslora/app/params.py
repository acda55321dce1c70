"""The ``tenslora params`` table: every construction's parameter count, from a model's config alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..core.construction import FAMILIES, TENSOR_CONSTRUCTIONS
from ..tuner.budgets import count_parameters, lora_parameter_count, match_budget, model_geometry
from ..tuner.config import TensLoraConfig


@dataclass(frozen=True)
class Row:
    """One construction: its count at isorank r, and the ranks (and count) closest to LoRA rank r's count."""

    construction: str
    isorank_parameters: int
    isoparameter_ranks: Any  # None when no ranks come near the budget
    isoparameter_parameters: int | None


def parameter_rows(model_config: Any, rank: int, roles: str | Sequence[str],
                   factorization: str) -> tuple[int, list[Row]]:
    """LoRA rank ``rank``'s count and one row per tensor construction (the paper's seven).

    ``roles`` may be ``"all-linear"``: every attention and MLP projection of the model's blocks.
    """
    roles = list(model_geometry(model_config, roles).roles)
    budget = lora_parameter_count(rank, model_config, roles)
    rows = []
    for construction in TENSOR_CONSTRUCTIONS:
        isorank = TensLoraConfig(construction=construction, factorization=factorization, ranks=rank, roles=roles)
        try:
            ranks = match_budget(construction, factorization, budget, model_config, roles=roles)
            matched = count_parameters(TensLoraConfig(construction=construction, factorization=factorization,
                                                      ranks=ranks, roles=roles), model_config)
        except ValueError:  # no ranks within a factor 2 of the budget
            ranks, matched = None, None
        rows.append(Row(construction, count_parameters(isorank, model_config), ranks, matched))
    return budget, rows


def format_ranks(ranks: Any) -> str:
    """``in=4,out=4,qkv=3``; ranks given per family as ``attention[in=4,...] mlp[in=4,...]``."""
    if ranks is None:
        return "-"
    if isinstance(ranks, dict) and ranks.keys() <= set(FAMILIES):
        return " ".join(f"{family}[{format_ranks(value)}]" for family, value in ranks.items())
    return ",".join(f"{mode}={value}" for mode, value in ranks.items()) if isinstance(ranks, dict) else str(ranks)


def format_parameter_table(model_config: Any, model_name: str, rank: int, roles: str | Sequence[str],
                           factorization: str) -> str:
    """A plain-text table, one line per construction."""
    geometry = model_geometry(model_config, roles)
    budget, rows = parameter_rows(model_config, rank, roles, factorization)
    ranks_width = max(20, *(len(format_ranks(row.isoparameter_ranks)) for row in rows)) + 2
    mlp = f", MLP width {geometry.ffn_width}" if geometry.ffn_width else ""
    lines = [
        f"{model_name}: hidden {geometry.hidden_size}, {geometry.num_heads} heads, {geometry.num_layers} layers{mlp}; "
        f"adapting {','.join(geometry.roles)}",
        f"LoRA rank {rank}: {budget:,} adapter parameters (a classifier's head not counted)",
        "",
        f"{'construction':<15}{factorization + ' at rank ' + str(rank):>22}{'isoparameter ranks':>{ranks_width}}"
        f"{'params':>12}",
    ]
    for row in rows:
        matched = "-" if row.isoparameter_parameters is None else f"{row.isoparameter_parameters:,}"
        lines.append(f"{row.construction:<15}{row.isorank_parameters:>22,}"
                     f"{format_ranks(row.isoparameter_ranks):>{ranks_width}}{matched:>12}")
    return "\n".join(lines)
