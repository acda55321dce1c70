"""The tests' independent reference: full tensors rebuilt by tensorly, and slices read from them by hand."""

from __future__ import annotations

import tensorly as tl
import torch

from tenslora.core.tensors.cp import CPTensor
from tenslora.core.tensors.tt import TensorTrainTensor
from tenslora.core.tensors.tucker import TuckerTensor

tl.set_backend("pytorch")


def dense_tensor(tensor) -> torch.Tensor:
    """The full tensor from its factors, by tensorly, modes in the tensor's own order."""
    factors = [tensor.factors[mode].detach() for mode in tensor.modes]
    if isinstance(tensor, TensorTrainTensor):  # tensorly's cores all have both bonds: (1 x n_1 x r_1) ... (r x n_n x 1)
        return tl.tt_to_tensor([factors[0].unsqueeze(0), *factors[1:-1], factors[-1].unsqueeze(-1)])
    if isinstance(tensor, TuckerTensor):
        return tl.tucker_to_tensor((tensor.core.detach(), factors))
    assert isinstance(tensor, CPTensor)
    return tl.cp_to_tensor((torch.ones(tensor.rank), factors))


def dense_slice(full: torch.Tensor, modes: tuple[str, ...], index: dict[str, int]) -> torch.Tensor:
    """(d_out x d_in) slice at ``index``, Hugging Face's head-major rows (o = head * head_dim + j) written out."""
    for position in reversed(range(len(modes))):  # the index modes come last: select from the end
        if modes[position] in index:
            full = full.select(position, index[modes[position]])
    if full.dim() == 3:  # in, head_dim, heads
        d_in, head_dim, heads = full.shape
        return full.permute(2, 1, 0).reshape(heads * head_dim, d_in)
    return full.T
