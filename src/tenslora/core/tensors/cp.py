"""CP: a sum of R rank-one tensors, one rank for every mode."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .base import FactorizedTensor


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
        self.input_rank = self.rank
        self._build_equations(lambda mode: "r", [])
