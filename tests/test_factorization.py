"""The factorized tensors against an independent dense reconstruction (tensorly)."""

import itertools

import pytest
import tensorly as tl
import torch

from dense import dense_slice
from tenslora.core.construction import CONSTRUCTIONS, Geometry
from tenslora.core.tensors.cp import CPTensor
from tenslora.core.tensors.tucker import TuckerTensor

tl.set_backend("pytorch")

GEOMETRY = Geometry(hidden_size=12, attention_width=8, num_layers=3, roles=("q", "k", "v"), num_heads=2)


def _randomize(tensor: torch.nn.Module) -> None:
    with torch.no_grad():
        for parameter in tensor.parameters():
            parameter.normal_()


def _indices(modes, sizes):
    index_modes = [m for m in modes if m in ("qkv", "depth")]
    for values in itertools.product(*(range(sizes[m]) for m in index_modes)):
        yield dict(zip(index_modes, values, strict=True))


@pytest.mark.parametrize("name", sorted(CONSTRUCTIONS))
def test_tucker_slices_match_tensorly(name):
    construction = CONSTRUCTIONS[name]
    sizes = GEOMETRY.mode_sizes(construction)
    ranks = {m: max(1, min(3, n)) for m, n in sizes.items()}
    tensor = TuckerTensor(sizes, ranks)
    _randomize(tensor)
    full = tl.tucker_to_tensor((tensor.core, [tensor.factors[m] for m in construction.modes]))
    for index in _indices(construction.modes, sizes):
        expected = dense_slice(full, construction.modes, index)
        torch.testing.assert_close(tensor.slice_matrix(index), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CONSTRUCTIONS))
def test_cp_slices_match_tensorly(name):
    construction = CONSTRUCTIONS[name]
    sizes = GEOMETRY.mode_sizes(construction)
    tensor = CPTensor(sizes, rank=5)
    _randomize(tensor)
    full = tl.cp_to_tensor((torch.ones(5), [tensor.factors[m] for m in construction.modes]))
    for index in _indices(construction.modes, sizes):
        expected = dense_slice(full, construction.modes, index)
        torch.testing.assert_close(tensor.slice_matrix(index), expected, atol=1e-5, rtol=1e-5)


def test_att_output_rows_are_head_major():
    """Row o of a slice is feature j of head h with o = h * head_dim + j (Hugging Face's layout)."""
    sizes = {"in": 3, "head_dim": 4, "heads": 2}
    tensor = TuckerTensor(sizes, {"in": 3, "head_dim": 4, "heads": 2})
    _randomize(tensor)
    full = tl.tucker_to_tensor((tensor.core, [tensor.factors[m] for m in ("in", "head_dim", "heads")]))
    dense = tensor.slice_matrix({})
    for head in range(2):
        for j in range(4):
            for i in range(3):
                assert torch.isclose(dense[head * 4 + j, i], full[i, j, head], atol=1e-5)


def test_tucker_init_is_zero_update_with_orthonormal_factors():
    sizes = GEOMETRY.mode_sizes(CONSTRUCTIONS["att_qkv_depth"])
    tensor = TuckerTensor(sizes, {m: min(2, n) for m, n in sizes.items()})
    assert torch.count_nonzero(tensor.core) == 0
    for factor in tensor.factors.values():
        torch.testing.assert_close(factor.T @ factor, torch.eye(factor.shape[1]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(tensor.slice_matrix({"qkv": 1, "depth": 2})) == 0


def test_cp_init_zeroes_one_output_factor_only():
    sizes = GEOMETRY.mode_sizes(CONSTRUCTIONS["att_qkv_depth"])
    tensor = CPTensor(sizes, rank=4)
    zero = [m for m, f in tensor.factors.items() if torch.count_nonzero(f) == 0]
    assert zero == ["head_dim"]
    assert torch.count_nonzero(tensor.slice_matrix({"qkv": 0, "depth": 0})) == 0
    bound = 1 / sizes["in"] ** 0.5
    assert tensor.factors["in"].abs().max() <= bound  # LoRA's A init: U(-1/sqrt(d_in), 1/sqrt(d_in))


def test_initialization_draws_from_the_callers_rng_without_reseeding():
    sizes = GEOMETRY.mode_sizes(CONSTRUCTIONS["qkv"])
    torch.manual_seed(123)
    first, second = TuckerTensor(sizes, {m: 2 for m in sizes}), TuckerTensor(sizes, {m: 2 for m in sizes})
    after_build = torch.rand(1)
    torch.manual_seed(123)
    again = TuckerTensor(sizes, {m: 2 for m in sizes})
    assert not torch.equal(first.factors["in"], second.factors["in"])  # each tensor its own draw
    assert torch.equal(first.factors["in"], again.factors["in"])  # reproducible from the caller's seed
    torch.manual_seed(123)
    TuckerTensor(sizes, {m: 2 for m in sizes}), TuckerTensor(sizes, {m: 2 for m in sizes})
    assert torch.equal(torch.rand(1), after_build)  # the caller's stream simply continues: no reseeding


def test_first_mode_must_be_in():
    with pytest.raises(ValueError, match="first mode"):
        TuckerTensor({"out": 3, "in": 2}, {"out": 1, "in": 1})
