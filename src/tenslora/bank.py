"""All factorized tensors of one adapter, addressed by (role, layer).

The bank is where the shared state lives: one bank per adapter, owned by the tuner, read by every
adapted projection. It knows nothing about models beyond a :class:`Geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import nn

from .construction import Construction, Geometry, RankSpec, resolve_ranks, slice_index, tensor_key, tensor_keys
from .factorization import FactorizedTensor, build_tensor


@dataclass(frozen=True)
class SliceAddress:
    """Where the update of one projection lives: which tensor, which index, how many rows it uses."""

    key: str
    index: Mapping[str, int]
    width: int
    transposed: bool  # the output projection's update is its slice transposed


class TensorBank(nn.Module):
    def __init__(self, construction: Construction, factorization: str, ranks: RankSpec, geometry: Geometry,
                 layers: Sequence[int]):
        super().__init__()
        if len(layers) != geometry.num_layers:
            raise ValueError(f"{len(layers)} adapted layers but the geometry says {geometry.num_layers}.")
        self.construction = construction
        self.geometry = geometry
        self.layer_position = {layer: position for position, layer in enumerate(sorted(layers))}
        sizes = geometry.mode_sizes(construction)
        self.ranks = resolve_ranks(construction, factorization, ranks, sizes)
        self.tensors = nn.ModuleDict(
            {key: build_tensor(factorization, sizes, self.ranks) for key in
             tensor_keys(construction, geometry.roles, sorted(layers))}
        )

    def address(self, role: str, layer: int) -> SliceAddress:
        if role not in self.geometry.roles or layer not in self.layer_position:
            raise KeyError(f"No update for role {role!r} in layer {layer} in this adapter.")
        return SliceAddress(
            key=tensor_key(self.construction, role, layer),
            index=slice_index(self.construction, self.geometry, role, self.layer_position[layer]),
            width=self.geometry.role_width(role),
            transposed=role == "o",
        )

    def tensor(self, key: str) -> FactorizedTensor:
        return self.tensors[key]

    def delta_weight(self, address: SliceAddress) -> torch.Tensor:
        """Dense update (d_out x d_in) of one projection, in the projection's own orientation."""
        dense = self.tensors[address.key].slice_matrix(address.index)[: address.width]
        return dense.T if address.transposed else dense
