"""Fused role x layer modes (fused_qkv_depth, att_fused_qkv_depth) and the FacT-TK preset: modes, slice order,
slices against a dense reconstruction, models, counts and budgets."""

import pytest
import torch
from peft import get_peft_model

import tenslora
from dense import dense_slice, dense_tensor
from tenslora import TensLoraConfig
from tenslora.core.budget import count_adapter_parameters, lora_parameter_count, match_budget
from tenslora.core.construction import FUSED_CONSTRUCTIONS, Geometry, get_construction, slice_index
from tenslora.core.tensors.cp import CPTensor
from tenslora.core.tensors.tucker import TuckerTensor
from test_all_linear import check_dense_updates
from test_tensor_train import BERT_BASE, GEOMETRY, indices
from tiny import bert, gpt2

FUSED = sorted(FUSED_CONSTRUCTIONS)


def test_fused_constructions_have_one_role_layer_mode():
    assert {name: c.modes for name, c in FUSED_CONSTRUCTIONS.items()} == {
        "fused_qkv_depth": ("in", "out", "qkv_depth"),
        "att_fused_qkv_depth": ("in", "head_dim", "heads", "qkv_depth"),
    }
    att = get_construction("att_fused_qkv_depth")
    assert att.for_family("mlp").name == "fused_qkv_depth"  # no head split in MLP tensors
    geometry = Geometry(hidden_size=12, attention_width=8, num_layers=3, roles=("q", "k", "v", "o", "up", "down"),
                        num_heads=2, ffn_width=20)
    assert geometry.mode_sizes(att) == {"in": 12, "head_dim": 4, "heads": 2, "qkv_depth": 4 * 3}
    assert geometry.mode_sizes(att, "mlp") == {"in": 12, "out": 20, "qkv_depth": 2 * 3}


def test_fused_index_is_role_major():
    """Role p of layer l is at p * L + l: the qkv_depth tensor's last two modes reshaped into one."""
    construction = get_construction("fused_qkv_depth")
    geometry = Geometry(hidden_size=12, attention_width=8, num_layers=3, roles=("q", "k", "v", "up", "down"),
                        ffn_width=20)
    assert [slice_index(construction, geometry, role, layer)["qkv_depth"]
            for role in ("q", "k", "v") for layer in range(3)] == list(range(9))
    assert slice_index(construction, geometry, "down", 2) == {"qkv_depth": 1 * 3 + 2}  # counted in its family


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("name", FUSED)
def test_fused_slices_match_tensorly(name, factorization):
    sizes = GEOMETRY.mode_sizes(get_construction(name))
    tensor = TuckerTensor(sizes, {m: min(3, n) for m, n in sizes.items()}) if factorization == "tucker" \
        else CPTensor(sizes, 4)
    with torch.no_grad():
        for parameter in tensor.parameters():
            parameter.normal_()
    full = dense_tensor(tensor)
    for index in indices(tensor.modes, sizes):
        torch.testing.assert_close(tensor.slice_matrix(index), dense_slice(full, tensor.modes, index),
                                   atol=1e-4, rtol=1e-4)
        group = tensor.output_matrices({})  # the whole fused mode free: every slice's B at once
        torch.testing.assert_close(group[index["qkv_depth"]], tensor.output_matrix(index))


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("construction", FUSED)
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_fused_adapter_is_the_dense_update_of_every_block_linear(name, construction, factorization):
    check_dense_updates(name, construction, factorization)  # tensor-train: in test_tensor_train.py


def test_a_fused_factor_generalizes_the_two_modes():
    """With U_fused = U_qkv (x) U_depth (Kronecker, role-major) and the core's last two modes merged, the fused
    Tucker adapter gives qkv_depth's updates, on GPT-2's fused c_attn too."""
    torch.manual_seed(0)
    ranks = {"in": 3, "out": 4, "qkv": 2, "depth": 2}
    plain = get_peft_model(gpt2(), TensLoraConfig(construction="qkv_depth", ranks=ranks, init_weights=False))
    fused = get_peft_model(gpt2(), TensLoraConfig(construction="fused_qkv_depth",
                                                  ranks={"in": 3, "out": 4, "qkv_depth": 4}))
    source = plain.base_model.tenslora_tensors["default"].tensors["all"]
    target = fused.base_model.tenslora_tensors["default"].tensors["all"]
    with torch.no_grad():
        for mode in ("in", "out"):
            target.factors[mode].copy_(source.factors[mode])
        target.factors["qkv_depth"].copy_(torch.kron(source.factors["qkv"], source.factors["depth"]))
        target.core.copy_(source.core.reshape(3, 4, 4))
    for layer in range(2):  # c_attn: q, k and v side by side
        delta = plain.base_model.model.transformer.h[layer].attn.c_attn.get_delta_weight("default")
        assert delta.abs().max() > 1e-3
        torch.testing.assert_close(
            fused.base_model.model.transformer.h[layer].attn.c_attn.get_delta_weight("default"), delta,
            atol=1e-5, rtol=1e-5)


def test_fact_tk_preset_is_tucker_over_in_out_and_the_fused_mode():
    config = TensLoraConfig(construction="fact_tk", ranks=4)
    assert (config.construction, config.factorization) == ("fused_qkv_depth", "tucker")
    assert config.ranks == {"in": 4, "out": 4, "qkv_depth": 4}
    with pytest.raises(ValueError, match="preset uses tucker"):
        TensLoraConfig(construction="fact_tk", factorization="tt")
    family = TensLoraConfig(construction="fact_tk", ranks={"attention": 4, "mlp": 2}, roles="all-linear")
    assert family.ranks == {"attention": {"in": 4, "out": 4, "qkv_depth": 4},
                            "mlp": {"in": 2, "out": 2, "qkv_depth": 2}}


def test_fact_tk_delta_is_shared_factors_with_a_mixture_of_cores_per_projection_and_layer():
    """FacT-TK: Delta W_{p,l} = U_out (sum_k U_f[p L + l, k] G_k)^T U_in^T with U_in, U_out shared by every
    projection and layer and G one r x r x r core."""
    model = get_peft_model(bert(), TensLoraConfig(construction="fact_tk", ranks=3))
    tensor = model.base_model.tenslora_tensors["default"].tensors["all"]
    assert tensor.core.shape == (3, 3, 3) and tensor.factors["qkv_depth"].shape == (3 * 2, 3)
    with torch.no_grad():
        tensor.core.normal_()
    f = tensor.factors
    for p, role in enumerate(("query", "key", "value")):
        for layer in range(2):
            mixed = torch.einsum("abk,k->ab", tensor.core, f["qkv_depth"][p * 2 + layer])
            expected = f["out"] @ mixed.T @ f["in"].T
            module = getattr(model.base_model.model.bert.encoder.layer[layer].attention.self, role)
            torch.testing.assert_close(module.get_delta_weight("default"), expected, atol=1e-5, rtol=1e-5)


def test_fused_counts():
    d, r, L = 768, 8, 12
    assert count_adapter_parameters("fused_qkv_depth", "tucker", {"in": r, "out": r, "qkv_depth": r},
                                    BERT_BASE) == 2 * d * r + 3 * L * r + r**3
    assert count_adapter_parameters("fused_qkv_depth", "cp", r, BERT_BASE) == r * (2 * d + 3 * L)
    assert count_adapter_parameters("att_fused_qkv_depth", "tucker", 8, BERT_BASE) == \
        d * r + 64 * r + 12 * r + 3 * L * r + r**4
    base = bert()
    config = TensLoraConfig(construction="fact_tk", ranks=3, roles=["q", "k", "v", "o"])
    model = get_peft_model(base, config)
    count = sum(p.numel() for p in model.base_model.tenslora_tensors.parameters())
    assert count == tenslora.count_parameters(config, base.config) == 2 * 32 * 3 + 4 * 2 * 3 + 27


@pytest.mark.parametrize("factorization", ["tucker", "tt", "cp"])
@pytest.mark.parametrize("name", FUSED)
def test_fused_match_budget(name, factorization):
    budget = lora_parameter_count(8, BERT_BASE)
    ranks = match_budget(name, factorization, budget, BERT_BASE)
    count = count_adapter_parameters(name, factorization, ranks, BERT_BASE)
    assert abs(count - budget) / budget < 0.15
    if factorization == "tucker":  # one common rank, capped at each mode's size
        sizes = BERT_BASE.mode_sizes(get_construction(name))
        assert ranks == {mode: min(ranks["in"], size) for mode, size in sizes.items()}


def test_fused_rank_dicts_name_the_fused_mode():
    with pytest.raises(ValueError, match=r"unknown mode\(s\) \['qkv', 'depth'\]"):
        TensLoraConfig(construction="fused_qkv_depth", ranks={"in": 8, "out": 8, "qkv": 3, "depth": 4})
    with pytest.raises(ValueError, match=r"a fused one among \['att_fused_qkv_depth', 'fused_qkv_depth'\]"):
        TensLoraConfig(construction="fused")
