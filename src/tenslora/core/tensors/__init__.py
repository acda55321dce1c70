"""The factorized tensors, one module each, and the one registry that names them."""

from __future__ import annotations

from collections.abc import Mapping

from .base import FactorizedTensor
from .cp import CPTensor
from .tt import TensorTrainTensor
from .tucker import TuckerTensor

#: Every factorization by its name in configs; ranks are per mode (Tucker), one (CP) or per bond (TT).
TENSOR_CLASSES: dict[str, type[FactorizedTensor]] = {
    "tucker": TuckerTensor,
    "cp": CPTensor,
    "tt": TensorTrainTensor,
}


def build_tensor(factorization: str, sizes: Mapping[str, int], ranks: Mapping[str, int] | int) -> FactorizedTensor:
    """The tensor of ``factorization`` with resolved ``ranks``."""
    if factorization not in TENSOR_CLASSES:
        raise ValueError(f"Unknown factorization '{factorization}'. Choose one of {sorted(TENSOR_CLASSES)}.")
    return TENSOR_CLASSES[factorization](sizes, ranks)


__all__ = ["TENSOR_CLASSES", "CPTensor", "FactorizedTensor", "TensorTrainTensor", "TuckerTensor", "build_tensor"]
