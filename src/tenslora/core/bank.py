"""All factorized tensors of one adapter, addressed by (role, layer).

The bank is where the shared state lives: one bank per adapter, owned by the tuner, read by every
adapted projection. It knows nothing about models beyond a :class:`Geometry`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .blocks import block_key, blocks_of, plan_tensors
from .construction import TRANSPOSED_ROLES, Construction, Geometry, RankSpec, slice_index, tensor_key
from .reuse import PassCache
from .tensors import build_tensor
from .tensors.base import FactorizedTensor


@dataclass(frozen=True)
class SliceAddress:
    """Where the update of one projection (or one d x d block of it, blocks.py) lives: which tensor, which index,
    how many rows it uses."""

    key: str
    index: Mapping[str, int]
    width: int
    transposed: bool  # o and down map the wide side to the residual: their update is the slice transposed

    #: The slice as a hashable value: which projection (or block) had a shared product (reuse.py). Formed once
    #: here, not in the forward passes that read it (a cached_property's lock would break torch.compile's graph).
    slot: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "slot", (self.key, *sorted(self.index.items())))


def side_by_side(blocks: Sequence[SliceAddress], outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A role's B (r x width) from the B of its slices: one slice in the role layout; in the block layout its d x d
    blocks, which share their tensor's U_in, side by side along the wide side, each cropped to the rows it uses."""
    cropped = [b if b.shape[-1] == address.width else b[:, : address.width]
               for address, b in zip(blocks, outputs, strict=True)]
    return cropped[0] if len(cropped) == 1 else torch.cat(cropped, dim=-1)


def factor_order(address: SliceAddress, input_factor: torch.Tensor,
                 output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A role's two factors in the order its input meets them, ``x Delta W^T = x @ first @ second`` (so ``Delta W =
    (first @ second)^T`` in ``nn.Linear`` layout): ``U_in`` then ``B``, or ``B^T`` then ``U_in^T`` for a transposed
    role (o, down: its update is its slice transposed)."""
    return (output.T, input_factor.T) if address.transposed else (input_factor, output)


def slice_rows(blocks: Sequence[SliceAddress], update: torch.Tensor) -> list[tuple[SliceAddress, torch.Tensor]]:
    """The inverse of :func:`factor_order` and :func:`side_by_side`: a role's update (``nn.Linear`` layout, its rows of
    the module's) cut into the matrices its slices hold, (rows used) x d_in, the wide side first."""
    wide = update.T if blocks[0].transposed else update
    return list(zip(blocks, wide.split([address.width for address in blocks]), strict=True))


class TensorBank(nn.Module):
    """The tensors of one adapter: per family (attention, MLP), those the construction makes (block layout: the
    tensors of every projection's d x d blocks)."""

    def __init__(self, construction: Construction, factorization: str, ranks: RankSpec, geometry: Geometry,
                 layers: Sequence[int], layout: str = "roles"):
        super().__init__()
        if len(layers) != geometry.num_layers:
            raise ValueError(f"{len(layers)} adapted layers but the geometry says {geometry.num_layers}.")
        self.construction = construction
        self.geometry = geometry
        self.layout = layout
        self.layer_position = {layer: position for position, layer in enumerate(sorted(layers))}
        planned = plan_tensors(construction, factorization, ranks, geometry, sorted(layers), layout)
        self.ranks = planned.ranks
        self.tensors = nn.ModuleDict(
            {key: build_tensor(factorization, spec.sizes, spec_ranks) for key, (spec, spec_ranks)
             in planned.tensors.items()}
        )
        self._projections = PassCache()

    def project(self, address: SliceAddress, x: torch.Tensor) -> torch.Tensor:
        """``x @ U_in`` of the slice's tensor: the projections that read the same ``x`` share it (reuse.py)."""
        factor = self.tensors[address.key].input_factor()
        return self._projections.get(("in", address.key), (x, factor), lambda: x @ factor.to(x.dtype), address.slot)

    def scaled_output(self, address: SliceAddress, scaling: float, dtype: torch.dtype) -> torch.Tensor:
        """``scaling * B`` (r x d_out) of one slice, in ``dtype`` (:func:`side_by_side` crops it to its width).

        Formed in one contraction with the B of every role of its tensor at the same layer (the
        slices that differ only in the role mode), which the layer's other projections reuse. Not
        once per pass for all layers: a checkpointed layer's recomputation must compute what its
        first run computed, and a reentrant one must not backpropagate twice into a shared product.
        """
        tensor = self.tensors[address.key]
        fixed = {mode: i for mode, i in address.index.items() if mode != "qkv"}

        def role_slices() -> tuple[torch.Tensor, ...]:
            group = (tensor.output_matrices(fixed) * scaling).to(dtype)
            return group.unbind(0) if "qkv" in address.index else (group,)

        name = ("out", address.key, tuple(fixed.items()), scaling, dtype)
        group = self._projections.get(name, tuple(tensor.parameters()), role_slices, address.slot)
        return group[address.index.get("qkv", 0)]

    def clear_projections(self) -> None:
        """Forget reused products: called before and after every forward pass of the model."""
        self._projections.clear()

    def addresses(self, role: str, layer: int) -> tuple[SliceAddress, ...]:
        """The slices whose updates, side by side along the wide side, make the update of ``role`` in ``layer``:
        one in the role layout, one per d x d block in the block layout (blocks.py)."""
        if role not in self.geometry.roles or layer not in self.layer_position:
            raise KeyError(f"No update for role {role!r} in layer {layer} in this adapter.")
        transposed, position = role in TRANSPOSED_ROLES, self.layer_position[layer]
        if self.layout == "blocks":
            key = block_key(self.construction, layer)
            return tuple(SliceAddress(key, block.index, block.width, transposed)
                         for block in blocks_of(self.construction, self.geometry, role, position))
        return (SliceAddress(
            key=tensor_key(self.construction, role, layer),
            index=slice_index(self.construction, self.geometry, role, position),
            width=self.geometry.role_width(role),
            transposed=transposed,
        ),)

    def tensor(self, key: str) -> FactorizedTensor:
        return self.tensors[key]
