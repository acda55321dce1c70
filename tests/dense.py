"""The tests' one independent reference: full tensors rebuilt by tensorly, slices read from them by hand, and the
update of every projection assembled from those slices by the tests' own rules (not the library's slice code)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import tensorly as tl
import torch

from tenslora.core.construction import get_construction
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


#: The tests' own rules: the MLP roles have tensors of their own, o and down are updated by their slice transposed.
MLP, TRANSPOSED = ("gate", "up", "down"), ("o", "down")


def role_widths(config) -> dict[str, int]:
    """The wide side of each role, from a Hugging Face config (grouped-query k/v narrower, GPT-2's 4 x hidden MLP)."""
    hidden, heads = config.hidden_size, config.num_attention_heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (hidden // heads)
    ffn = getattr(config, "intermediate_size", None) or 4 * hidden  # GPT-2: n_inner=None means 4 x hidden
    return {"q": hidden, "k": kv, "v": kv, "o": hidden, "gate": ffn, "up": ffn, "down": ffn}


def _index(construction, position: int, layer: int, layers: int) -> dict[str, int]:
    if construction.fused:
        return {"qkv_depth": position * layers + layer}
    return ({"qkv": position} if construction.stack_roles else {}) | ({"depth": layer} if construction.stack_layers
                                                                       else {})


def expected_update(bank, construction: str, roles: Sequence[str], role: str, layer: int, widths: dict[str, int],
                    layers: int = 2, layout: str = "roles") -> torch.Tensor:
    """The unscaled (d_out x d_in) update of ``role`` in ``layer``, read from tensorly's full tensors.

    Roles layout: one tensor per family (attention, MLP), named by what is not stacked; the role mode counts the
    family's adapted roles; k/v rows are the first of their slice. Blocks layout: the layer's slots are the roles'
    d x d blocks in role order, ceil(width / d) each, stacked along the wide side. Either way the update is its
    slices stacked along the wide side, cropped to the role's width, transposed for o and down; a fused mode is
    indexed role * L + layer.
    """
    spec = get_construction(construction)
    if layout == "blocks":
        tensor = bank.tensors["blocks" if spec.stack_layers else f"blocks_layer{layer}"]
        full = dense_tensor(tensor)
        d = full.shape[0]
        first = sum(math.ceil(widths[r] / d) for r in roles[: list(roles).index(role)])
        positions = range(first, first + math.ceil(widths[role] / d))
    else:
        family = [r for r in roles if (r in MLP) == (role in MLP)]
        name = ("mlp" if role in MLP else "") if spec.stack_roles else role
        key = "_".join(part for part in (name, "" if spec.stack_layers else f"layer{layer}") if part)
        tensor = bank.tensors[key or "all"]
        assert role not in MLP or tensor.modes[1] == "out"  # no head split on MLP tensors
        full = dense_tensor(tensor)
        positions = [family.index(role)]
    slices = [dense_slice(full, tensor.modes, _index(spec, position, layer, layers)) for position in positions]
    update = torch.cat(slices)[: widths[role]]
    return update.T if role in TRANSPOSED else update
