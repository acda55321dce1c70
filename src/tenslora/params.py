"""The ``tenslora params`` table: every construction's parameter count, from a model's config alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .api import count_parameters, lora_parameter_count, match_budget, model_geometry
from .config import TensLoraConfig
from .construction import TENSOR_CONSTRUCTIONS


@dataclass(frozen=True)
class Row:
    """One construction: its count at isorank r, and the ranks (and count) closest to LoRA rank r's count."""

    construction: str
    isorank_ranks: Any
    isorank_parameters: int
    isoparameter_ranks: Any  # None when no ranks come near the budget
    isoparameter_parameters: int | None


def parameter_rows(model_config: Any, rank: int, roles: Sequence[str], factorization: str) -> tuple[int, list[Row]]:
    """LoRA rank ``rank``'s count and one row per tensor construction (the paper's seven)."""
    budget = lora_parameter_count(rank, model_config, roles)
    rows = []
    for construction in TENSOR_CONSTRUCTIONS:
        isorank = TensLoraConfig(construction=construction, factorization=factorization, ranks=rank, roles=list(roles))
        try:
            ranks = match_budget(construction, factorization, budget, model_config, roles=roles)
            matched = count_parameters(TensLoraConfig(construction=construction, factorization=factorization,
                                                      ranks=ranks, roles=list(roles)), model_config)
        except ValueError:  # no ranks within a factor 2 of the budget
            ranks, matched = None, None
        rows.append(Row(construction, rank, count_parameters(isorank, model_config), ranks, matched))
    return budget, rows


def format_ranks(ranks: Any) -> str:
    if ranks is None:
        return "-"
    return ",".join(f"{mode}={value}" for mode, value in ranks.items()) if isinstance(ranks, dict) else str(ranks)


def format_parameter_table(model_config: Any, model_name: str, rank: int, roles: Sequence[str],
                           factorization: str) -> str:
    """A plain-text table, one line per construction."""
    geometry = model_geometry(model_config, roles)
    budget, rows = parameter_rows(model_config, rank, roles, factorization)
    lines = [
        f"{model_name}: hidden {geometry.hidden_size}, {geometry.num_heads} heads, {geometry.num_layers} layers; "
        f"adapting {','.join(roles)}",
        f"LoRA rank {rank}: {budget:,} trainable parameters (classification head not counted)",
        "",
        f"{'construction':<15}{factorization + ' at rank ' + str(rank):>22}{'isoparameter ranks':>42}{'params':>12}",
    ]
    for row in rows:
        matched = "-" if row.isoparameter_parameters is None else f"{row.isoparameter_parameters:,}"
        lines.append(f"{row.construction:<15}{row.isorank_parameters:>22,}"
                     f"{format_ranks(row.isoparameter_ranks):>42}{matched:>12}")
    return "\n".join(lines)
