"""Tensor-train parametrization of one tensor of weight updates, read one slice at a time.

The cores follow the construction's mode order: ``G_in`` (d_in x r_1), ``G_k`` (r_{k-1} x n_k x r_k),
..., ``G_last`` (r_{n-1} x n_last). A slice is the same pair as Tucker's and CP's:

    A = G_in                                                    (d_in x r_1)
    B = the other cores, index modes read at the slice's index  (r_1 x d_out)

so the forward pass costs what theirs costs and the full tensor is never formed. The bond ranks
are keyed by bond, named by its two modes (``"in-out"``, ``"out-qkv"``, ``"qkv-depth"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from ..construction import bond_names, neighbour_bond_ranks
from .base import _SIZE_LETTER, FactorizedTensor, _subsets

_BOND_LETTERS = "abcdefgh"


def _initial_core(rows: int, size: int, cols: int, side: str) -> torch.Tensor:
    """An (rows x size x cols) core: ``"zero"``, ``"left"``-orthonormal (its (rows * size) x cols unfolding has
    orthonormal columns) or ``"right"``-orthonormal (its rows x (size * cols) unfolding has orthonormal rows)."""
    if side == "zero":
        return torch.zeros(rows, size, cols, dtype=torch.float32)
    unfolding = (rows * size, cols) if side == "left" else (rows, size * cols)
    return nn.init.orthogonal_(torch.empty(*unfolding, dtype=torch.float32)).reshape(rows, size, cols)


def three_way(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Cores as (left bond, size, right bond) arrays: the outer ones get back their bond of size 1."""
    last = len(cores) - 1
    return [core.unsqueeze(0) if k == 0 else core.unsqueeze(-1) if k == last else core for k, core in enumerate(cores)]


def outer_two_way(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The inverse of :func:`three_way`, the cores as a tensor-train keeps them: the outer ones drop their bond of
    size 1 (``G_in`` is d_in x r_1, the last r_{n-1} x n_last)."""
    last = len(cores) - 1
    return [core[0] if k == 0 else core[..., 0] if k == last else core for k, core in enumerate(cores)]


class TensorTrainTensor(FactorizedTensor):
    """T[i_1, ..., i_n] = G_1[i_1] G_2[:, i_2, :] ... G_n[:, i_n], one rank per bond.

    Init: the core of ``out`` (``head_dim`` in the att constructions: the mode CP zeroes) is zero, so
    the update starts at zero. The cores left of it are left-orthonormal and those right of it
    right-orthonormal (the mixed canonical form of a tensor-train), so the map from the zero core to
    the tensor is an isometry: its first gradient is a well-conditioned projection of the tensor's,
    as for Tucker's zero core between orthonormal factors.
    """

    def __init__(self, sizes: Mapping[str, int], ranks: Mapping[str, int]):
        super().__init__(sizes)
        bonds = bond_names(self.modes)
        if sorted(ranks) != sorted(bonds):
            raise ValueError(f"A tensor-train over modes {list(self.modes)} has one rank per bond {bonds}, "
                             f"got ranks {dict(ranks)}.")
        self.ranks = {bond: int(ranks[bond]) for bond in bonds}
        allowed = neighbour_bond_ranks(self.sizes, self.ranks)
        if allowed != self.ranks:
            raise ValueError(f"Bond ranks {self.ranks} exceed what their neighbours allow, {allowed} (r_k <= "
                             "r_(k-1) n_k and r_k <= n_(k+1) r_(k+1)): the extra rank adds parameters and no "
                             "expressive power. Resolve the ranks first (resolve_tt_ranks).")
        edges = [1, *self.ranks.values(), 1]
        zero = self.modes.index(self.output_modes[-1])
        cores = [_initial_core(edges[k], self.sizes[mode], edges[k + 1],
                               "zero" if k == zero else "left" if k < zero else "right")
                 for k, mode in enumerate(self.modes)]
        for mode, core in zip(self.modes, outer_two_way(cores), strict=True):
            self.factors[mode] = nn.Parameter(core)
        self.input_rank = edges[1]
        self._equations = {free: self._equation(free) for free in _subsets(self.index_modes)}

    def _core_letters(self, k: int, free: tuple[str, ...]) -> str:
        """Einsum letters of core k > 0: its left bond, its size if it is not read at an index, its right bond."""
        mode = self.modes[k]
        size = _SIZE_LETTER[mode] if mode in free or mode in self.output_modes else ""
        right = _BOND_LETTERS[k] if k < len(self.modes) - 1 else ""
        return _BOND_LETTERS[k - 1] + size + right

    def _equation(self, free: tuple[str, ...]) -> str:
        """Cores from the last to the second (the index cores, read as small matrices, are contracted first)
        -> (*free sizes, r_1, output sizes in Hugging Face's head-major order)."""
        cores = [self._core_letters(k, free) for k in reversed(range(1, len(self.modes)))]
        result = "".join(_SIZE_LETTER[m] for m in free) + _BOND_LETTERS[0] + "".join(
            _SIZE_LETTER[m] for m in self.output_modes)
        return ",".join(cores) + "->" + result

    def _operands(self, fixed: Mapping[str, int], free: tuple[str, ...]) -> list[torch.Tensor]:
        return [self.factors[mode].select(1, fixed[mode]) if mode in fixed else self.factors[mode]
                for mode in reversed(self.modes[1:])]
