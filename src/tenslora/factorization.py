"""Tucker and CP parametrizations of one tensor of weight updates, read one slice at a time.

A tensor has modes ``in``, the output modes (``out``, or ``head_dim`` and ``heads``) and index
modes (``qkv``, ``depth``). The update stored at index ``i`` is never materialized during
training: both factorizations are read as a pair ``(A, B)`` with

    A = U_in                      (d_in x r)      shared by every slice of the tensor
    B = slice core x output side  (r x d_out)     small to form: r * d_out numbers

so that ``x @ A @ B`` costs what a LoRA of rank ``r`` costs per token. The dense slice, needed
only to merge weights, is ``(A @ B).T``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

# einsum letters: lower case for rank indices, upper case for size indices.
_RANK_LETTER = {"in": "a", "out": "b", "head_dim": "c", "heads": "d", "qkv": "e", "depth": "f"}
_SIZE_LETTER = {"out": "O", "head_dim": "J", "heads": "H"}
# Hugging Face lays out attention features head-major (feature = head * head_dim + j), so the
# output side of a slice is produced as (heads, head_dim) and flattened in that order.
_OUTPUT_ORDER = ("heads", "out", "head_dim")


def _output_modes(modes: tuple[str, ...]) -> list[str]:
    return [m for m in _OUTPUT_ORDER if m in modes]


def _index_modes(modes: tuple[str, ...]) -> list[str]:
    return [m for m in modes if m in ("qkv", "depth")]


class FactorizedTensor(nn.Module):
    """Common interface: ``input_factor()`` and ``output_matrix(index)`` give the (A, B) pair of a slice."""

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

    def input_factor(self) -> torch.Tensor:
        return self.factors["in"]

    def output_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        raise NotImplementedError

    def slice_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        """The dense (d_out x d_in) slice at ``index``: for merging and tests, never for training."""
        return (self.input_factor() @ self.output_matrix(index)).T

    def _index_vectors(self, index: Mapping[str, int]) -> list[torch.Tensor]:
        if sorted(index) != sorted(self.index_modes):
            raise ValueError(f"A slice of this tensor is addressed by modes {self.index_modes}, got {dict(index)}.")
        return [self.factors[m][index[m]] for m in self.index_modes]


def _orthonormal_columns(rows: int, cols: int) -> torch.Tensor:
    return nn.init.orthogonal_(torch.empty(rows, cols, dtype=torch.float32))


class TuckerTensor(FactorizedTensor):
    """T = G x_1 U_1 ... x_n U_n with one rank per mode.

    Init as in the paper: zero core (the update is zero, the model starts as the pretrained one)
    and orthonormal factors (so the core's first gradient is a well-conditioned projection).
    """

    def __init__(self, sizes: Mapping[str, int], ranks: Mapping[str, int]):
        super().__init__(sizes)
        self.ranks = {m: int(ranks[m]) for m in self.modes}
        self.core = nn.Parameter(torch.zeros(*(self.ranks[m] for m in self.modes), dtype=torch.float32))
        for mode in self.modes:
            self.factors[mode] = nn.Parameter(_orthonormal_columns(self.sizes[mode], self.ranks[mode]))
        core = "".join(_RANK_LETTER[m] for m in self.modes)
        index = [_RANK_LETTER[m] for m in self.index_modes]
        output = [_SIZE_LETTER[m] + _RANK_LETTER[m] for m in self.output_modes]
        result = "a" + "".join(_SIZE_LETTER[m] for m in self.output_modes)
        # The core is contracted with the index vectors first (cheap), then with the output factors.
        self._equation = ",".join([core, *index, *output]) + "->" + result

    def output_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        output = [self.factors[m] for m in self.output_modes]
        b = torch.einsum(self._equation, self.core, *self._index_vectors(index), *output)
        return b.reshape(self.ranks["in"], self.output_size)


class CPTensor(FactorizedTensor):
    """T = sum_r u^1_r o ... o u^n_r with one rank R.

    Init: the first output factor is zero (so the update starts at zero), the ``in`` factor is
    drawn like LoRA's A (uniform in +-1/sqrt(d_in)) and the index/head factors are standard normal,
    so the per-component weights of a slice have unit scale. On the 2-mode ``matrix``
    construction this is exactly LoRA: ``U_in = A^T`` and ``U_out = B``.
    """

    def __init__(self, sizes: Mapping[str, int], rank: int):
        super().__init__(sizes)
        self.rank = int(rank)
        zero_mode = self.output_modes[-1]  # `out`, or `head_dim` in the att constructions
        for mode in self.modes:
            n = self.sizes[mode]
            factor = torch.empty(n, self.rank, dtype=torch.float32)
            if mode == zero_mode:
                nn.init.zeros_(factor)
            elif mode == "in":
                nn.init.uniform_(factor, -1 / math.sqrt(n), 1 / math.sqrt(n))
            else:
                nn.init.normal_(factor)
            self.factors[mode] = nn.Parameter(factor)
        index = ["r"] * len(self.index_modes)
        output = [_SIZE_LETTER[m] + "r" for m in self.output_modes]
        result = "r" + "".join(_SIZE_LETTER[m] for m in self.output_modes)
        self._equation = ",".join([*index, *output]) + "->" + result

    def output_matrix(self, index: Mapping[str, int]) -> torch.Tensor:
        output = [self.factors[m] for m in self.output_modes]
        b = torch.einsum(self._equation, *self._index_vectors(index), *output)
        return b.reshape(self.rank, self.output_size)


def build_tensor(factorization: str, sizes: Mapping[str, int], ranks: Mapping[str, int] | int) -> FactorizedTensor:
    if factorization == "tucker":
        return TuckerTensor(sizes, ranks)
    if factorization == "cp":
        return CPTensor(sizes, ranks)
    raise ValueError(f"Unknown factorization '{factorization}'. Choose 'tucker' or 'cp'.")
