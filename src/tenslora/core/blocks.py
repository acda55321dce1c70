"""FacT's layout: every adapted projection cut into d x d blocks, every block one slice of one tensor.

FacT (Jie & Deng 2023) and MetaTT put the updates of all adapted projections of a model into one
tensor whose slices are d x d (d: the hidden size), where the role layout (``layout="roles"``) gives
each family (attention, MLP) tensors of its own width. Written, as everywhere in TensLoRA, as
(wide side) x (residual side), a role's update is cut along its wide side into ceil(width / d)
blocks of d rows; the last block is zero-padded (its rows past the width are never read):

- q, k, v, o: one block each where the attention width is d (BERT, ViT); grouped-query k/v are
  narrower: one block, zero-padded;
- up, gate (d_ffn x d): ceil(d_ffn / d) blocks of the projection's output features (row blocks);
- down (d x d_ffn, transposed as in the role layout): ceil(d_ffn / d) blocks of its input features
  (column blocks).

The blocks of one layer are its *slots*, in role order (q, k, v, o, gate, up, down; each role's
blocks in feature order); they make the ``qkv`` mode: 12 on BERT/ViT (q, k, v, o, 4 up, 4 down).
The constructions that stack roles and do not split heads apply: ``qkv`` (one tensor per layer),
``qkv_depth`` (one tensor: in, out, qkv, depth) and ``fused_qkv_depth`` (one tensor: in, out and
slots x layers, FacT's own shape).

The blocks of a role share their tensor's ``U_in``, so the role's B is its blocks' B side by side
(r x blocks * d), cropped to its width: the forward pass is the role layout's two thin matmuls,
``x U_in B`` for a row split and ``(x B^T) U_in^T`` for a column split. This module is pure Python.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .construction import (
    FAMILIES,
    FUSED_MODE,
    Construction,
    Geometry,
    RankSpec,
    TensorSpec,
    fit_ranks,
    index_of,
    one_or_per_family,
    resolve_family_ranks,
    resolve_ranks,
    tensor_specs,
)

#: ``layout="roles"``: one slice per projection, a family's tensors as wide as its projections;
#: ``layout="blocks"``: one slice per d x d block of every projection, all in the same tensor(s).
LAYOUTS = ("roles", "blocks")
#: The constructions a block layout applies to: a role mode to hold the slots, and no head split.
BLOCK_CONSTRUCTIONS = ("qkv", "qkv_depth", "fused_qkv_depth")
#: The ``family`` of the block tensors' specs (they hold attention and MLP blocks alike).
BLOCKS = "blocks"


@dataclass(frozen=True)
class Block:
    """One block of a role's update: its slice's index and how many of its d rows the update uses."""

    index: Mapping[str, int]
    width: int


def check_layout(layout: object, construction: Construction, ranks: RankSpec | None = None) -> str:
    """``layout``, refused with the fix where it is unknown, does not fit the construction or ranks come per family."""
    if layout not in LAYOUTS:
        raise ValueError(f"Unknown layout {layout!r}. Choose 'roles' (one slice per projection) or 'blocks' "
                         "(FacT's d x d blocks of every projection, one slice each).")
    if layout == "roles":
        return layout
    if construction.name not in BLOCK_CONSTRUCTIONS:
        raise ValueError(
            f"layout='blocks' stacks the d x d blocks of every projection along the role mode, but the "
            f"'{construction.name}' construction has modes {list(construction.modes)}. Choose one of "
            f"{list(BLOCK_CONSTRUCTIONS)} (or the presets fact_tt, fact_tk), or layout='roles'."
        )
    if isinstance(ranks, Mapping) and any(key in FAMILIES for key in ranks):
        raise ValueError(
            f"With layout='blocks' the attention and MLP blocks are slices of the same tensor(s) (modes "
            f"{list(construction.modes)}), so `ranks` cannot be given per family ({sorted(ranks)}): give one int, "
            "a list or a dict keyed by mode."
        )
    return layout


def block_count(geometry: Geometry, role: str) -> int:
    """How many d-high blocks the role's wide side is cut into (the last one zero-padded)."""
    return math.ceil(geometry.role_width(role) / geometry.hidden_size)


def slots(geometry: Geometry) -> dict[str, range]:
    """Each adapted role's slots (positions along the ``qkv`` mode), in role order."""
    result, start = {}, 0
    for role in geometry.roles:
        result[role] = range(start, start + block_count(geometry, role))
        start += len(result[role])
    return result


def block_sizes(construction: Construction, geometry: Geometry) -> dict[str, int]:
    """Mode sizes of a block tensor: in = out = d, the slots of a layer, the layers (or both fused)."""
    geometry.validate(construction)
    count = sum(block_count(geometry, role) for role in geometry.roles)
    sizes = {"in": geometry.hidden_size, "out": geometry.hidden_size, "qkv": count, "depth": geometry.num_layers,
             FUSED_MODE: count * geometry.num_layers}
    return {mode: sizes[mode] for mode in construction.modes}


def block_key(construction: Construction, layer: int) -> str:
    return BLOCKS if construction.stack_layers else f"{BLOCKS}_layer{layer}"


def blocks_of(construction: Construction, geometry: Geometry, role: str, layer_position: int) -> tuple[Block, ...]:
    """The blocks of ``role``'s update in ``layer_position``, in feature order: their slices and used rows."""
    d, width = geometry.hidden_size, geometry.role_width(role)
    return tuple(Block(index_of(construction, slot, layer_position, geometry.num_layers), min(d, width - number * d))
                 for number, slot in enumerate(slots(geometry)[role]))


@dataclass(frozen=True)
class PlannedTensors:
    """The tensors of an adapter with their resolved ranks, and the ranks as the adapter reports them."""

    tensors: dict[str, tuple[TensorSpec, Mapping[str, int] | int]]
    ranks: object


def plan_tensors(construction: Construction, factorization: str, ranks: RankSpec, geometry: Geometry,
                 layers: Sequence[int] | None = None, layout: str = "roles") -> PlannedTensors:
    """Every tensor of an adapter under ``layout``, by key (sorted), each with the ranks it is built with.

    Roles: one family's ranks fitted to each of its tensors (k/v alone under GQA are narrower), reported
    keyed by family when there are several. Blocks: every tensor has the same sizes and ranks.
    """
    layers = range(geometry.num_layers) if layers is None else layers
    if check_layout(layout, construction, ranks) == "roles":
        family_ranks = resolve_family_ranks(construction, factorization, ranks, geometry)
        tensors = {key: (spec, fit_ranks(family_ranks[spec.family], spec.sizes))
                   for key, spec in tensor_specs(construction, geometry, layers).items()}
        return PlannedTensors(tensors, one_or_per_family(family_ranks))
    sizes = block_sizes(construction, geometry)
    resolved = resolve_ranks(construction, factorization, ranks, sizes)
    specs = {block_key(construction, layer): TensorSpec(block_key(construction, layer), BLOCKS, sizes)
             for layer in layers}
    return PlannedTensors({key: (spec, resolved) for key, spec in sorted(specs.items())}, resolved)
