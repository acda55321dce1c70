"""All factorized tensors of one adapter, addressed by (role, layer).

The bank is where the shared state lives: one bank per adapter, owned by the tuner, read by every
adapted projection. It knows nothing about models beyond a :class:`Geometry`.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .construction import (
    TRANSPOSED_ROLES,
    Construction,
    Geometry,
    RankSpec,
    fit_ranks,
    resolve_family_ranks,
    slice_index,
    tensor_key,
    tensor_specs,
)
from .factorization import FactorizedTensor, build_tensor


@dataclass(frozen=True)
class SliceAddress:
    """Where the update of one projection lives: which tensor, which index, how many rows it uses."""

    key: str
    index: Mapping[str, int]
    width: int
    transposed: bool  # o and down map the wide side to the residual: their update is the slice transposed


@dataclass(frozen=True)
class _Projection:
    """``x @ U_in`` of one tensor, with what it was computed from (to know when it may be reused)."""

    source: weakref.ref
    source_version: int
    factor_version: int
    grad_enabled: bool
    value: torch.Tensor

    def is_for(self, x: torch.Tensor, factor: torch.Tensor) -> bool:
        return (self.source() is x and self.source_version == x._version and self.factor_version == factor._version
                and self.grad_enabled == torch.is_grad_enabled())


class TensorBank(nn.Module):
    """The tensors of one adapter: per family (attention, MLP), those the construction makes."""

    def __init__(self, construction: Construction, factorization: str, ranks: RankSpec, geometry: Geometry,
                 layers: Sequence[int]):
        super().__init__()
        if len(layers) != geometry.num_layers:
            raise ValueError(f"{len(layers)} adapted layers but the geometry says {geometry.num_layers}.")
        self.construction = construction
        self.geometry = geometry
        self.layer_position = {layer: position for position, layer in enumerate(sorted(layers))}
        family_ranks = resolve_family_ranks(construction, factorization, ranks, geometry)
        # One family: its ranks as they always were; several: keyed by family, as `ranks` may be given.
        self.ranks = family_ranks if len(family_ranks) > 1 else next(iter(family_ranks.values()))
        self.tensors = nn.ModuleDict(
            {key: build_tensor(factorization, spec.sizes, fit_ranks(family_ranks[spec.family], spec.sizes))
             for key, spec in tensor_specs(construction, geometry, sorted(layers)).items()}
        )
        self._projections: dict[str, _Projection] = {}

    def project(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x @ U_in`` of tensor ``key``, computed once when several projections read the same input.

        q, k and v of a layer read the same hidden states and, in the constructions with a qkv
        mode, share ``U_in``: the second and third calls reuse the first product (same input
        object, unmodified input and factor, same grad mode). Input dropout makes a new tensor
        per call, so each projection then gets its own product, as in LoRA.
        """
        factor = self.tensors[key].input_factor()
        cached: Optional[_Projection] = self._projections.get(key)
        if cached is not None and cached.is_for(x, factor):
            return cached.value
        value = x @ factor.to(x.dtype)
        self._projections[key] = _Projection(weakref.ref(x), x._version, factor._version, torch.is_grad_enabled(),
                                             value)
        return value

    def clear_projections(self) -> None:
        """Forget reused products: called before and after every forward pass of the model."""
        self._projections.clear()

    def address(self, role: str, layer: int) -> SliceAddress:
        if role not in self.geometry.roles or layer not in self.layer_position:
            raise KeyError(f"No update for role {role!r} in layer {layer} in this adapter.")
        return SliceAddress(
            key=tensor_key(self.construction, role, layer),
            index=slice_index(self.construction, self.geometry, role, self.layer_position[layer]),
            width=self.geometry.role_width(role),
            transposed=role in TRANSPOSED_ROLES,
        )

    def tensor(self, key: str) -> FactorizedTensor:
        return self.tensors[key]

    def delta_weight(self, address: SliceAddress) -> torch.Tensor:
        """Dense update (d_out x d_in) of one projection, in the projection's own orientation."""
        dense = self.tensors[address.key].slice_matrix(address.index)[: address.width]
        return dense.T if address.transposed else dense
