"""Tucker: one factor per mode and a core with one rank per mode (the paper's mode-specific compression)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .base import _RANK_LETTER, FactorizedTensor, _orthonormal_columns


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
        self.input_rank = self.ranks["in"]
        self._build_equations(_RANK_LETTER.__getitem__, ["".join(_RANK_LETTER[m] for m in self.modes)])

    def _leading(self) -> list[torch.Tensor]:
        return [self.core]
