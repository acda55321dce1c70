"""Parameter counts without building a model, and the isoparameter rank search of the paper."""

from __future__ import annotations

import math
from collections.abc import Mapping

from .construction import (
    Construction,
    Geometry,
    RankSpec,
    check_factorization,
    get_construction,
    resolve_ranks,
)


def tensor_count(construction: Construction, geometry: Geometry) -> int:
    """How many tensors a construction makes: one per role and/or layer that is not a mode."""
    roles = 1 if construction.stack_roles else len(geometry.roles)
    layers = 1 if construction.stack_layers else geometry.num_layers
    return roles * layers


def count_tensor_parameters(factorization: str, sizes: Mapping[str, int], ranks: Mapping[str, int] | int) -> int:
    """Tucker: sum n_k r_k + prod r_k. CP: R * sum n_k."""
    if factorization == "tucker":
        return sum(sizes[m] * ranks[m] for m in sizes) + math.prod(ranks[m] for m in sizes)
    return ranks * sum(sizes.values())


def count_adapter_parameters(construction: str, factorization: str, ranks: RankSpec, geometry: Geometry) -> int:
    """Trainable adapter parameters (without any classification head)."""
    spec = get_construction(construction)
    check_factorization(factorization)
    sizes = geometry.mode_sizes(spec)
    resolved = resolve_ranks(spec, factorization, ranks, sizes)
    return tensor_count(spec, geometry) * count_tensor_parameters(factorization, sizes, resolved)


def lora_parameter_count(rank: int, geometry: Geometry) -> int:
    """Parameters of LoRA rank r on the geometry's roles: r * (d_in + d_out) per projection and layer."""
    per_layer = sum(geometry.hidden_size + geometry.role_width(role) for role in geometry.roles)
    return rank * per_layer * geometry.num_layers


def match_budget(construction: str, factorization: str, budget: int, geometry: Geometry,
                 fixed: Mapping[str, int | str] | None = None) -> dict[str, int] | int:
    """Ranks whose parameter count is closest to ``budget`` (ties go to the smaller count).

    Tucker: one common rank r on every mode not in ``fixed``, capped at each mode's size (the
    mode-specific compression of the paper is reached through ``fixed``, e.g. ``{"qkv": 3}``).
    CP: the single rank R. Raises ``ValueError`` when no rank gets within a factor 2 of the budget.
    """
    spec = get_construction(construction)
    check_factorization(factorization)
    if budget <= 0:
        raise ValueError(f"The parameter budget must be positive, got {budget}.")
    sizes = geometry.mode_sizes(spec)
    fixed = dict(fixed or {})
    if factorization == "cp":
        if fixed:
            raise ValueError("CP has a single rank; `fixed` mode ranks only apply to Tucker.")
        per_rank = count_adapter_parameters(construction, "cp", 1, geometry)
        candidates = {max(1, budget // per_rank), max(1, budget // per_rank + 1)}
        best = min(candidates, key=lambda r: (abs(r * per_rank - budget), r))
        return _checked(best, best * per_rank, budget, construction, factorization)

    unknown = [m for m in fixed if m not in sizes]
    if unknown:
        raise ValueError(
            f"`fixed` names mode(s) {unknown} that the '{construction}' construction lacks: {list(sizes)}."
        )
    free = [m for m in sizes if m not in fixed]
    if not free:
        ranks = resolve_ranks(spec, "tucker", fixed, sizes)
        return _checked(ranks, count_adapter_parameters(construction, "tucker", ranks, geometry), budget,
                        construction, factorization)
    best, best_count = None, None
    for r in range(1, max(sizes[m] for m in free) + 1):
        ranks = {m: fixed.get(m, min(r, sizes[m])) for m in sizes}
        count = count_adapter_parameters(construction, "tucker", ranks, geometry)
        if best is None or abs(count - budget) < abs(best_count - budget):
            best, best_count = ranks, count
        if count > budget:
            break  # counts grow with r: nothing further can be closer
    return _checked(best, best_count, budget, construction, factorization)


def _checked(ranks, count: int, budget: int, construction: str, factorization: str):
    if not budget / 2 <= count <= budget * 2:
        raise ValueError(
            f"No ranks of the '{construction}' construction with {factorization} come near a budget of "
            f"{budget:,} parameters (closest: {count:,}). Choose a larger/smaller budget or another construction."
        )
    return ranks
