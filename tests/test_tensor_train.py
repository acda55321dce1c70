"""Tensor-train tensors (factorization="tt") against an independent dense reconstruction (tensorly.tt_to_tensor):
every construction, slice orientation and head layout; init; rank specs; counts, budgets, merging, saving."""

import itertools
import warnings

import pytest
import tensorly as tl
import torch
import torch._dynamo as dynamo
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file

import tenslora
from dense import dense_slice, dense_tensor
from tenslora import TensLoraConfig
from tenslora.app.params import format_parameter_table
from tenslora.core.budget import count_adapter_parameters, lora_parameter_count, match_budget
from tenslora.core.construction import CONSTRUCTIONS, FUSED_CONSTRUCTIONS, Geometry, get_construction, resolve_tt_ranks
from tenslora.core.tensors.tt import TensorTrainTensor
from test_all_linear import BUILD, adapter_numel, check_dense_updates, outputs
from tiny import bert, inputs, llama

tl.set_backend("pytorch")

ALL_CONSTRUCTIONS = sorted({**CONSTRUCTIONS, **FUSED_CONSTRUCTIONS})
GEOMETRY = Geometry(hidden_size=12, attention_width=8, num_layers=3, roles=("q", "k", "v"), num_heads=2)
BERT_BASE = Geometry(hidden_size=768, attention_width=768, num_layers=12, roles=("q", "k", "v"), num_heads=12)


def indices(modes: tuple[str, ...], sizes: dict[str, int]):
    index_modes = [m for m in modes if m in ("qkv", "depth", "qkv_depth")]
    for values in itertools.product(*(range(sizes[m]) for m in index_modes)):
        yield dict(zip(index_modes, values, strict=True))


def random_tt(name: str, ranks=3) -> TensorTrainTensor:
    construction = get_construction(name)
    sizes = GEOMETRY.mode_sizes(construction)
    tensor = TensorTrainTensor(sizes, resolve_tt_ranks(construction, ranks, sizes))
    with torch.no_grad():
        for parameter in tensor.parameters():
            parameter.normal_()
    return tensor


@pytest.mark.parametrize("name", ALL_CONSTRUCTIONS)
def test_tt_slices_match_tensorly(name):
    tensor = random_tt(name)
    full = dense_tensor(tensor)
    assert full.shape == tuple(tensor.sizes.values())
    for index in indices(tensor.modes, tensor.sizes):
        torch.testing.assert_close(tensor.slice_matrix(index), dense_slice(full, tensor.modes, index),
                                   atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", ALL_CONSTRUCTIONS)
def test_tt_output_matrices_hold_every_slices_output_matrix(name):
    """The forward path's batched reader: with any index modes free, each free index gives that slice's own B."""
    tensor = random_tt(name, ranks=[2, 3, 4, 2][: len(get_construction(name).modes) - 1])
    full = dense_tensor(tensor)
    index_modes = tensor.index_modes
    for count in range(len(index_modes) + 1):
        for fixed_modes in itertools.combinations(index_modes, count):
            free = [m for m in index_modes if m not in fixed_modes]
            for fixed_values in itertools.product(*(range(tensor.sizes[m]) for m in fixed_modes)):
                fixed = dict(zip(fixed_modes, fixed_values, strict=True))
                group = tensor.output_matrices(fixed)
                assert group.shape == (*(tensor.sizes[m] for m in free), tensor.input_rank, tensor.output_size)
                for free_values in itertools.product(*(range(tensor.sizes[m]) for m in free)):
                    index = {**fixed, **dict(zip(free, free_values, strict=True))}
                    torch.testing.assert_close(group[free_values], tensor.output_matrix(index))
                    torch.testing.assert_close((tensor.input_factor() @ group[free_values]).T,
                                               dense_slice(full, tensor.modes, index), atol=1e-4, rtol=1e-4)


def test_tt_cores_have_the_documented_shapes():
    sizes = GEOMETRY.mode_sizes(CONSTRUCTIONS["att_qkv_depth"])  # in 12, head_dim 4, heads 2, qkv 3, depth 3
    ranks = {"in-head_dim": 5, "head_dim-heads": 2, "heads-qkv": 4, "qkv-depth": 3}
    tensor = TensorTrainTensor(sizes, ranks)
    assert {m: tuple(f.shape) for m, f in tensor.factors.items()} == {
        "in": (12, 5), "head_dim": (5, 4, 2), "heads": (2, 2, 4), "qkv": (4, 3, 3), "depth": (3, 3)}
    assert tensor.input_rank == 5 and tensor.output_matrix({"qkv": 0, "depth": 0}).shape == (5, 8)
    with pytest.raises(ValueError, match=r"one rank per bond \['in-head_dim', 'head_dim-heads'"):
        TensorTrainTensor(sizes, {"in": 5, "head_dim": 2})


@pytest.mark.parametrize("name", ["qkv_depth", "att_qkv_depth", "matrix", "fused_qkv_depth"])
def test_tt_init_is_a_zero_update_in_mixed_canonical_form(name):
    """The output core is zero; the cores around it are orthonormal towards it, so the zero core maps to the
    tensor isometrically: any value it takes is the tensor's norm (a well-conditioned first step)."""
    construction = get_construction(name)
    sizes = GEOMETRY.mode_sizes(construction)
    tensor = TensorTrainTensor(sizes, resolve_tt_ranks(construction, 3, sizes))
    zero = "head_dim" if construction.split_heads else "out"
    assert [m for m, f in tensor.factors.items() if torch.count_nonzero(f) == 0] == [zero]
    for index in indices(tensor.modes, sizes):
        assert torch.count_nonzero(tensor.slice_matrix(index)) == 0
    a = tensor.factors["in"]
    torch.testing.assert_close(a.T @ a, torch.eye(a.shape[1]), atol=1e-5, rtol=0)
    for mode in tensor.modes[tensor.modes.index(zero) + 1:]:
        right = tensor.factors[mode].reshape(tensor.factors[mode].shape[0], -1)
        torch.testing.assert_close(right @ right.T, torch.eye(right.shape[0]), atol=1e-5, rtol=0)
    with torch.no_grad():
        tensor.factors[zero].normal_()
    torch.testing.assert_close(dense_tensor(tensor).norm(), tensor.factors[zero].norm(), atol=1e-4, rtol=1e-4)


def test_gradients_reach_the_zero_core_through_a_peft_model():
    torch.manual_seed(0)
    model = get_peft_model(bert(), TensLoraConfig(construction="att_qkv_depth", factorization="tt", ranks=3))
    tensor = model.base_model.tenslora_tensors["default"].tensors["all"]
    model(**inputs("bert")).logits.square().sum().backward()
    assert tensor.factors["head_dim"].grad.abs().max() > 0  # the zero core learns from the first step
    for mode in ("in", "heads", "qkv", "depth"):  # the others' gradients pass through the zero core: zero at init
        assert torch.count_nonzero(tensor.factors[mode].grad) == 0


@pytest.mark.parametrize("construction", ALL_CONSTRUCTIONS)
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_tt_adapter_is_the_dense_update_of_every_block_linear(name, construction):
    check_dense_updates(name, construction, "tt")


def test_tt_rank_specs():
    construction = CONSTRUCTIONS["qkv_depth"]
    sizes = BERT_BASE.mode_sizes(construction)  # in 768, out 768, qkv 3, depth 12
    # Largest useful ranks: in-out min(768, 768*3*12), out-qkv min(768^2, 36) = 36, qkv-depth min(.., 12) = 12.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_tt_ranks(construction, 16, sizes) == {"in-out": 16, "out-qkv": 16, "qkv-depth": 12}
    assert resolve_tt_ranks(construction, [8, 4, 2], sizes) == {"in-out": 8, "out-qkv": 4, "qkv-depth": 2}
    # "full" is as large as is useful: out-qkv at most qkv's size times the rank of the bond right of it, 3 * 2.
    assert resolve_tt_ranks(construction, {"in-out": 8, "out-qkv": "full", "qkv-depth": 2}, sizes) == {
        "in-out": 8, "out-qkv": 6, "qkv-depth": 2}
    with pytest.warns(UserWarning, match="TT rank 20 of bond 'qkv-depth' exceeds its largest useful rank 12"):
        assert resolve_tt_ranks(construction, [8, 4, 20], sizes)["qkv-depth"] == 12


def test_tt_bond_ranks_stay_within_what_their_neighbours_allow():
    """qkv_depth on (in 12, out 8, qkv 3, depth 3), bonds [4, 6, 1]: out-qkv is below its largest useful rank 9, but
    with qkv-depth at 1 it can hold at most qkv's size 3: 6 would add parameters for nothing and its qkv core (6 x 3)
    could not have orthonormal rows, which the isometric init needs. Clamped to 3 everywhere: config, count, model."""
    construction = get_construction("qkv_depth")
    sizes = GEOMETRY.mode_sizes(construction)
    with pytest.warns(UserWarning, match="TT rank 6 of bond 'out-qkv' exceeds what its neighbours allow, 3"):
        ranks = resolve_tt_ranks(construction, [4, 6, 1], sizes)
    assert ranks == {"in-out": 4, "out-qkv": 3, "qkv-depth": 1}
    with pytest.warns(UserWarning, match="neighbours allow"):
        assert count_adapter_parameters("qkv_depth", "tt", [4, 6, 1], GEOMETRY) == 12 * 4 + 4 * 8 * 3 + 3 * 3 + 3
    tensor = TensorTrainTensor(sizes, ranks)
    right = tensor.factors["qkv"].reshape(3, -1)
    torch.testing.assert_close(right @ right.T, torch.eye(3), atol=1e-5, rtol=0)
    with torch.no_grad():
        tensor.factors["out"].normal_()
    torch.testing.assert_close(dense_tensor(tensor).norm(), tensor.factors["out"].norm(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"exceed what their neighbours allow, \{'in-out': 4, 'out-qkv': 3"):
        TensorTrainTensor(sizes, {"in-out": 4, "out-qkv": 6, "qkv-depth": 1})
    with pytest.warns(UserWarning, match="neighbours allow"):
        model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", factorization="tt", ranks=[4, 6, 1]))
    # BERT (in 32, out 32, qkv 3, depth 2): 32 * 4 + 4 * 32 * 3 + 3 * 3 * 1 + 1 * 2.
    assert adapter_numel(model) == 32 * 4 + 4 * 32 * 3 + 3 * 3 + 2


@pytest.mark.parametrize(
    ("ranks", "message"),
    [
        ([8, 8, 3, 4], r"has 3 bonds \['in-out', 'out-qkv', 'qkv-depth'\] but 4 ranks were given"),
        ({"in": 8, "out": 8, "qkv": 3, "depth": 4}, r"unknown bond\(s\) \['in', 'out', 'qkv', 'depth'\]"),
        ({"in-out": 8, "out-qkv": 8}, r"misses bond\(s\) \['qkv-depth'\].*in-out=8, out-qkv=8, qkv-depth=8"),
        ([8, 0, 2], "rank of bond 'out-qkv' must be a positive integer"),
    ],
)
def test_bad_tt_ranks_name_the_bonds(ranks, message):
    with pytest.raises(ValueError, match=message):
        TensLoraConfig(construction="qkv_depth", factorization="tt", ranks=ranks)


def test_tt_counts_are_the_sum_of_the_cores():
    d, L = 768, 12
    ranks = {"in-out": 8, "out-qkv": 4, "qkv-depth": 2}
    assert count_adapter_parameters("qkv_depth", "tt", ranks, BERT_BASE) == d * 8 + 8 * d * 4 + 4 * 3 * 2 + 2 * L
    # Per layer on att: in (d x r), head_dim (r x 64 x r'), heads (r' x 12); three roles, twelve layers.
    assert count_adapter_parameters("att", "tt", 8, BERT_BASE) == 3 * L * (d * 8 + 8 * 64 * 8 + 8 * 12)
    # matrix + TT is LoRA: in (d x r) and out (r x d).
    assert count_adapter_parameters("matrix", "tt", 8, BERT_BASE) == lora_parameter_count(8, BERT_BASE)


@pytest.mark.parametrize("construction", ["qkv_depth", "att_qkv_depth", "depth", "att", "fused_qkv_depth"])
def test_tt_match_budget_finds_the_closest_common_bond_rank(construction):
    budget = lora_parameter_count(8, BERT_BASE)
    ranks = match_budget(construction, "tt", budget, BERT_BASE)
    count = count_adapter_parameters(construction, "tt", ranks, BERT_BASE)
    r = ranks["in-out"] if "in-out" in ranks else ranks["in-head_dim"]
    for neighbour in (r - 1, r + 1):
        assert abs(count - budget) <= abs(count_adapter_parameters(construction, "tt", neighbour, BERT_BASE) - budget)
    assert abs(count - budget) / budget < 0.15
    fixed = match_budget("qkv_depth", "tt", budget, BERT_BASE, fixed={"qkv-depth": 2})
    # out-qkv stops at what its neighbours allow (qkv's size 3 times the fixed rank 2), in-out takes the rest.
    assert fixed["qkv-depth"] == 2 and fixed["out-qkv"] == 6 and fixed["in-out"] > 6
    with pytest.raises(ValueError, match=r"`fixed` names bond\(s\) \['qkv'\]"):
        match_budget("qkv_depth", "tt", budget, BERT_BASE, fixed={"qkv": 2})


def test_tt_match_budget_on_all_linear_llama():
    base = llama()
    budget = tenslora.lora_parameter_count(4, base.config, "all-linear")
    ranks = tenslora.match_budget("att_qkv_depth", "tt", budget, base.config, roles="all-linear")
    assert set(ranks) == {"attention", "mlp"} and "in-head_dim" in ranks["attention"] and "in-out" in ranks["mlp"]
    config = TensLoraConfig(construction="att_qkv_depth", factorization="tt", ranks=ranks, roles="all-linear")
    count = tenslora.count_parameters(config, base.config)
    assert adapter_numel(get_peft_model(base, config)) == count and abs(count - budget) / budget < 0.15
    assert tenslora.resolved_ranks(config, base.config) == ranks


def test_tt_adapter_saves_and_loads(tmp_path):
    torch.manual_seed(0)
    config = TensLoraConfig(construction="att_qkv_depth", factorization="tt", ranks=[4, 3, 2, 2], init_weights=False)
    model = get_peft_model(llama(), config)
    with torch.no_grad():
        expected = outputs(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].factorization == "tt"
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, "llama"), expected)


def test_an_adapter_saved_with_oversized_bonds_loads_rounded_exactly(tmp_path):
    """Earlier versions kept a bond above what its neighbours allow (out-qkv 6 where qkv-depth 1 allows 3): such
    a saved adapter (here its out-qkv bond widened by M and M's pseudo-inverse, an exact but redundant rank 6) loads
    rounded to the bond the config now resolves to, with the same outputs."""
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="neighbours allow"):
        model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", factorization="tt", ranks=[4, 6, 1],
                                                      init_weights=False))
    with torch.no_grad():
        expected = outputs(model, "bert")
    model.save_pretrained(tmp_path)
    weights = tmp_path / "adapter_model.safetensors"
    saved = load_file(weights)
    (out_key,) = [key for key in saved if key.endswith("factors.out")]
    (qkv_key,) = [key for key in saved if key.endswith("factors.qkv")]
    widen = torch.randn(3, 6, dtype=torch.float64)
    saved[out_key] = (saved[out_key].double() @ widen).float()  # (4, 32, 6)
    saved[qkv_key] = torch.einsum("ab,bqc->aqc", torch.linalg.pinv(widen), saved[qkv_key].double()).float()
    save_file(saved, weights)
    with pytest.warns(UserWarning, match="neighbours allow"):
        loaded = PeftModel.from_pretrained(bert(), tmp_path)
    assert loaded.base_model.tenslora_tensors["default"].tensor("all").factors["out"].shape == (4, 32, 3)
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, "bert"), expected, atol=1e-5, rtol=1e-4)


def test_params_table_with_tt():
    table = format_parameter_table(bert().config, "tiny-bert", 2, "q,k,v", "tt")
    assert "tt at rank 2" in table and "in-out=" in table


@pytest.mark.parametrize(("build", "construction"), [("gpt2", "att_qkv_depth"), ("llama", "fused_qkv_depth")])
def test_tt_adapter_exports_to_lora_exactly(tmp_path, build, construction):
    """Each TT slice is (G_in B)^T, of rank <= the in-bond rank: a plain LoRA gives the same outputs."""
    torch.manual_seed(0)
    config = TensLoraConfig(construction=construction, factorization="tt", ranks=3, roles="all-linear",
                            init_weights=False, task_type="SEQ_CLS")
    model = get_peft_model(BUILD[build](), config)
    with torch.no_grad():
        expected = outputs(model, build)
    tenslora.export_lora(model, tmp_path / "lora")
    lora = PeftModel.from_pretrained(BUILD[build](), tmp_path / "lora")
    assert lora.peft_config["default"].peft_type.value == "LORA"
    with torch.no_grad():
        torch.testing.assert_close(outputs(lora, build), expected, atol=1e-5, rtol=1e-4)


def test_tt_forward_compiles_without_graph_break():
    config = TensLoraConfig(construction="att_qkv_depth", factorization="tt", ranks=3, roles=["q", "k", "v", "o"],
                            init_weights=False)
    model = get_peft_model(bert(), config)
    dynamo.reset()
    explanation = dynamo.explain(model)(**inputs("bert"))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
