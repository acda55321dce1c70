"""What every factorized tensor of weight updates shares: slices read as an (A, B) pair, one einsum each.

A tensor has modes ``in``, the output modes (``out``, or ``head_dim`` and ``heads``) and index
modes (``qkv``, ``depth``, or both fused as ``qkv_depth``). The tensor-train lives in
``tt.py`` behind the same interface. The update stored at index ``i`` is never materialized during
training: both factorizations are read as a pair ``(A, B)`` with

    A = U_in                      (d_in x r)      shared by every slice of the tensor
    B = slice core x output side  (r x d_out)     small to form: r * d_out numbers

so that ``x @ A @ B`` costs what a LoRA of rank ``r`` costs per token. The dense slice, needed
only to merge weights, is ``(A @ B).T``. ``output_matrices`` forms the B of several slices (those
that differ only in some index modes) in one contraction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from ..construction import INDEX_MODES

# einsum letters: lower case for rank indices, upper case for size indices.
_RANK_LETTER = {"in": "a", "out": "b", "head_dim": "c", "heads": "d", "qkv": "e", "depth": "f", "qkv_depth": "g"}
_SIZE_LETTER = {"out": "O", "head_dim": "J", "heads": "H", "qkv": "E", "depth": "F", "qkv_depth": "G"}
# Hugging Face lays out attention features head-major (feature = head * head_dim + j), so the
# output side of a slice is produced as (heads, head_dim) and flattened in that order.
_OUTPUT_ORDER = ("heads", "out", "head_dim")


def _output_modes(modes: tuple[str, ...]) -> list[str]:
    return [m for m in _OUTPUT_ORDER if m in modes]


def _index_modes(modes: tuple[str, ...]) -> list[str]:
    return [m for m in modes if m in INDEX_MODES]


def _subsets(modes: list[str]) -> list[tuple[str, ...]]:
    """Every subset of ``modes``, each in the order of ``modes``."""
    subsets: list[tuple[str, ...]] = [()]
    for mode in modes:
        subsets += [(*subset, mode) for subset in subsets]
    return subsets


class FactorizedTensor(nn.Module):
    """Common interface: ``input_factor()`` and ``output_matrix(index)`` give the (A, B) pair of a slice.

    A subclass sets ``input_rank`` (the columns of A) and either calls ``_build_equations`` and says in
    ``_leading`` which operands come before the factors (the Tucker core), or builds ``_equations`` itself
    and overrides ``_operands`` (the tensor train).
    """

    input_rank: int

    def __init__(self, sizes: Mapping[str, int]):
        super().__init__()
        if next(iter(sizes)) != "in":
            raise ValueError(f"The first mode of a tensor must be 'in', got modes {list(sizes)}.")
        self.sizes = dict(sizes)
        self.modes = tuple(sizes)
        self.output_modes = _output_modes(self.modes)
        self.index_modes = _index_modes(self.modes)
        self.output_size = math.prod(self.sizes[m] for m in self.output_modes)
        self.factors = nn.ParameterDict()
        self._equations: dict[tuple[str, ...], str] = {}

    def _build_equations(self, rank_letter: Callable[[str], str], leading: Sequence[str]) -> None:
        """One einsum per set of free index modes: leading operands, fixed index vectors, free index
        factors, output factors (contracting the cheap vectors first) -> (*free sizes, r, output sizes)."""
        output = [_SIZE_LETTER[m] + rank_letter(m) for m in self.output_modes]
        for free in _subsets(self.index_modes):
            vectors = [rank_letter(m) for m in self.index_modes if m not in free]
            free_factors = [_SIZE_LETTER[m] + rank_letter(m) for m in free]
            result = "".join(_SIZE_LETTER[m] for m in free) + rank_letter("in") + "".join(
                _SIZE_LETTER[m] for m in self.output_modes)
            self._equations[free] = ",".join([*leading, *vectors, *free_factors, *output]) + "->" + result

    def input_factor(self) -> torch.Tensor:
        return self.factors["in"]

    def _leading(self) -> list[torch.Tensor]:
        return []

    def output_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        """B (r x d_out) of the slice at ``index`` (every index mode given)."""
        if sorted(index) != sorted(self.index_modes):
            raise ValueError(f"A slice of this tensor is addressed by modes {self.index_modes}, got {dict(index)}.")
        return self.output_matrices(index)

    def output_matrices(self, fixed: Mapping[str, int]) -> torch.Tensor:
        """The B of every slice that agrees with ``fixed``, in one contraction: (*free sizes, r, d_out).

        Index modes missing from ``fixed`` are free and lead the result in mode order: the layers
        form the B of all roles of a layer at once, where one small einsum per slice cost more
        operator calls than the products themselves.
        """
        unknown = [m for m in fixed if m not in self.index_modes]
        if unknown:
            raise ValueError(f"This tensor's index modes are {self.index_modes}; {unknown} are not among them.")
        free = tuple(m for m in self.index_modes if m not in fixed)
        b = torch.einsum(self._equations[free], *self._operands(fixed, free))
        return b.reshape(*(self.sizes[m] for m in free), self.input_rank, self.output_size)

    def _operands(self, fixed: Mapping[str, int], free: tuple[str, ...]) -> list[torch.Tensor]:
        """The operands of ``self._equations[free]``, the index modes in ``fixed`` read at their index."""
        vectors = [self.factors[m][fixed[m]] for m in self.index_modes if m in fixed]
        return [*self._leading(), *vectors, *(self.factors[m] for m in free),
                *(self.factors[m] for m in self.output_modes)]

    def slice_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        """The dense (d_out x d_in) slice at ``index``, for inspection and tests (merging reads the (A, B) pair)."""
        return (self.input_factor() @ self.output_matrix(index)).T


def _orthonormal_columns(rows: int, cols: int) -> torch.Tensor:
    return nn.init.orthogonal_(torch.empty(rows, cols, dtype=torch.float32))
