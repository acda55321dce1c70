"""Parameter counts without building a model, and the isoparameter rank search of the paper."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from .blocks import block_sizes, check_layout, plan_tensors
from .construction import (
    Geometry,
    RankSpec,
    bond_names,
    check_factorization,
    get_construction,
    max_bond_ranks,
    neighbour_bond_ranks,
    one_or_per_family,
)


def count_tensor_parameters(factorization: str, sizes: Mapping[str, int], ranks: Mapping[str, int] | int) -> int:
    """Tucker: sum n_k r_k + prod r_k. CP: R * sum n_k. TT: sum r_{k-1} n_k r_k (r_0 = r_n = 1)."""
    if factorization == "tucker":
        return sum(sizes[m] * ranks[m] for m in sizes) + math.prod(ranks[m] for m in sizes)
    if factorization == "tt":
        edges = [1, *(ranks[bond] for bond in bond_names(list(sizes))), 1]
        return sum(edges[k] * n * edges[k + 1] for k, n in enumerate(sizes.values()))
    return ranks * sum(sizes.values())


def count_adapter_parameters(construction: str, factorization: str, ranks: RankSpec, geometry: Geometry,
                             layout: str = "roles") -> int:
    """Trainable adapter parameters (without any classification head): the sum over the adapter's tensors."""
    spec = get_construction(construction)
    check_factorization(factorization)
    planned = plan_tensors(spec, factorization, ranks, geometry, layout=layout)
    return sum(count_tensor_parameters(factorization, t.sizes, t_ranks) for t, t_ranks in planned.tensors.values())


def lora_parameter_count(rank: int, geometry: Geometry) -> int:
    """Parameters of LoRA rank r on the geometry's roles: r * (d_in + d_out) per projection and layer."""
    per_layer = sum(sum(geometry.role_shape(role)) for role in geometry.roles)
    return rank * per_layer * geometry.num_layers


def check_budget(budget: object) -> int:
    """A budget is a positive count of parameters; ``"lora:8"`` is the command line's way to write one."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Integral) or budget <= 0:
        raise ValueError(f"`budget` must be a positive number of parameters (an int), got {budget!r}. For LoRA rank "
                         "r's count pass budget=tenslora.lora_parameter_count(r, model.config, roles) ('lora:8' is "
                         "the command line's form).")
    return int(budget)


def match_budget(construction: str, factorization: str, budget: int, geometry: Geometry,
                 fixed: Mapping[str, int | str] | None = None, layout: str = "roles", ceiling: bool = False,
                 held: Mapping[str, Mapping[str, int]] | None = None,
                 max_input_rank: int | None = None) -> RankSpec:
    """Ranks whose parameter count is closest to ``budget`` (ties go to the smaller count); with ``ceiling``,
    the largest ranks whose count is at most ``budget`` (what a compression to a budget must respect).

    Tucker: one common rank r on every mode not in ``fixed``, capped at each mode's size (the mode-specific
    compression of the paper is reached through ``fixed``, e.g. ``{"qkv": 3}``), the same r for the attention and
    the MLP tensors; with both families the ranks come keyed by family (``{"attention": {...}, "mlp": {...}}``), as
    each family's modes have their own sizes. TT: the same with bonds for modes (one common bond rank r, capped at
    each bond's largest useful rank; ``fixed`` keyed by bond, e.g. ``{"qkv-depth": 2}``). ``fixed`` applies to every
    family, or to each its own when keyed by family (``{"attention": {"depth": "full"}, "mlp": {}}``, as per-family
    ranks are). CP: the single rank R. ``layout="blocks"``: the block tensors' modes (one spec, never keyed by
    family). ``held`` bounds the ranks further, per family (``"blocks"`` under the block layout) and mode or bond:
    the ranks an adapter holds, which a truncation cannot raise. ``max_input_rank`` is the cost-aware choice: every
    slice is read as ``x @ A @ B``, so the columns of A (Tucker's ``in`` rank, CP's R, TT's first bond) alone set
    the cost per token, that of a LoRA of that rank; capped there, the budget goes to the other modes and the core,
    whose cost is paid once per step. Raises ``ValueError`` when no rank gets within a factor 2 of the budget
    (``ceiling``: when even the smallest ranks exceed it).
    """
    spec = get_construction(construction)
    check_factorization(factorization)
    budget = check_budget(budget)
    if max_input_rank is not None and (isinstance(max_input_rank, bool) or
                                       not isinstance(max_input_rank, numbers.Integral) or max_input_rank < 1):
        raise ValueError(f"`max_input_rank` must be a positive integer (the rank that sets the cost per token, e.g. "
                         f"LoRA's rank at its budget), got {max_input_rank!r}.")
    fixed = dict(fixed or {})
    if factorization == "cp":
        if any(fixed.values()):
            raise ValueError("CP has a single rank; `fixed` ranks only apply to Tucker (modes) and TT (bonds).")
        per_rank = count_adapter_parameters(construction, "cp", 1, geometry, layout)
        if max_input_rank is not None:
            budget = min(budget, max_input_rank * per_rank)
        if ceiling:
            best = budget // per_rank
            return _checked(best or None, per_rank, budget, construction, factorization, ceiling)
        candidates = {max(1, budget // per_rank), max(1, budget // per_rank + 1)}
        best = min(candidates, key=lambda r: (abs(r * per_rank - budget), r))
        return _checked(best, best * per_rank, budget, construction, factorization)

    # The caps of what gets a rank: the modes' sizes (Tucker), the bonds' largest useful ranks (TT).
    family_sizes = ({family: geometry.mode_sizes(spec, family) for family in geometry.families}
                    if check_layout(layout, spec) == "roles" else {"blocks": block_sizes(spec, geometry)})
    family_caps = family_sizes
    if factorization == "tt":
        family_caps = {family: max_bond_ranks(sizes) for family, sizes in family_sizes.items()}
    if held is not None:
        family_caps = {family: {name: min(cap, held[family][name]) for name, cap in names.items()}
                       for family, names in family_caps.items()}
    if max_input_rank is not None:
        family_caps = {family: {name: min(cap, max_input_rank) if _sets_input_rank(name) else cap
                                for name, cap in names.items()}
                       for family, names in family_caps.items()}
    kind = "bond" if factorization == "tt" else "mode"
    names = {name for caps in family_caps.values() for name in caps}
    fixed_in = fixed_by_family(fixed, family_caps)
    unknown = sorted({m for modes in fixed_in.values() for m in modes if m not in names})
    if unknown:
        raise ValueError(
            f"`fixed` names {kind}(s) {unknown} that the '{construction}' construction lacks under {factorization}: "
            f"{sorted(names)}."
        )
    invalid = {m: v for modes in fixed_in.values() for m, v in modes.items()
               if v != "full" and (isinstance(v, bool) or not isinstance(v, int) or v <= 0)}
    if invalid:
        raise ValueError(f"`fixed` ranks must be positive integers or 'full', got {invalid}.")

    def ranks_at(r: int) -> RankSpec:
        per_family = {family: {m: min(r, n) if m not in fixed_in[family] else
                               ("full" if fixed_in[family][m] == "full" else min(fixed_in[family][m], n))
                               for m, n in caps.items()}
                      for family, caps in family_caps.items()}
        if factorization == "tt":  # bonds within what their neighbours allow ("full" included)
            per_family = {family: neighbour_bond_ranks(family_sizes[family], {
                bond: family_caps[family][bond] if rank == "full" else rank for bond, rank in ranks.items()})
                for family, ranks in per_family.items()}
        return one_or_per_family(per_family)

    free_caps = [n for family, caps in family_caps.items() for m, n in caps.items() if m not in fixed_in[family]]
    best, best_count = None, None
    for r in range(1, max(free_caps, default=1) + 1):
        ranks = ranks_at(r)
        count = count_adapter_parameters(construction, factorization, ranks, geometry, layout)
        if count <= budget if ceiling else best is None or abs(count - budget) < abs(best_count - budget):
            best, best_count = ranks, count
        if count > budget:
            break  # counts grow with r: nothing further can be closer, or within the ceiling
    return _checked(best, count if best is None else best_count, budget, construction, factorization, ceiling)


def fixed_by_family(fixed: Mapping[str, Any], families: Iterable[str]) -> dict[str, dict[str, int | str]]:
    """``fixed`` ranks per family: a mapping of modes (bonds) applies to every family, one keyed by family gives
    each its own (a family it leaves out has none fixed)."""
    families = list(families)
    if not any(isinstance(value, Mapping) for value in fixed.values()):
        return {family: dict(fixed) for family in families}
    others = [key for key, value in fixed.items() if key not in families or not isinstance(value, Mapping)]
    if others:
        raise ValueError(f"`fixed` keyed by family takes the families {families}, each a mapping of modes to ranks; "
                         f"got {others} beside them. Key it by mode, or by family.")
    return {family: dict(fixed.get(family, {})) for family in families}


def _sets_input_rank(name: str) -> bool:
    """Whether mode or bond ``name`` is the one whose rank is the number of columns of A: ``in`` (Tucker), the bond
    leaving ``in`` (TT, ``in-...``)."""
    return name == "in" or name.startswith("in-")


def _checked(ranks, count: int, budget: int, construction: str, factorization: str, ceiling: bool = False):
    """``ranks``, or the refusal: under a ``ceiling`` when none fit (``count``: the smallest), else when the
    closest ``count`` is off by more than a factor 2."""
    if ceiling:
        if ranks is None:
            raise ValueError(
                f"No ranks of the '{construction}' construction with {factorization} fit within a budget of "
                f"{budget:,} parameters: the smallest adapter has {count:,}. Give a budget of at least {count:,}."
            )
        return ranks
    if not budget / 2 <= count <= budget * 2:
        raise ValueError(
            f"No ranks of the '{construction}' construction with {factorization} come near a budget of "
            f"{budget:,} parameters (closest: {count:,}). Choose a larger/smaller budget or another construction."
        )
    return ranks
