"""Compression: HOSVD / TT-SVD truncation of trained adapters, LoRA adapters fitted into tensors, the command."""

from __future__ import annotations

import json

import pytest
import tensorly as tl
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tensorly.decomposition import tensor_train, tucker

import tenslora
from tenslora import TensLoraConfig, compress_adapter, from_lora
from tenslora.app.cli import main
from tenslora.core.tensors.tucker import TuckerTensor
from tenslora.core.truncation import energy_rank, fit, truncate_tt, truncate_tucker, tt_to_dense, tucker_to_dense
from tenslora.transfer.refit import delta_weights, relative_error
from test_train import tiny  # noqa: F401  (the session fixture of tiny models and data)
from tiny import bert, gpt2, inputs, llama

tl.set_backend("pytorch")


def _random(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _tucker_dense(core_shape: tuple[int, ...], sizes: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A tensor of exact Tucker ranks ``core_shape`` (its factors are not orthonormal)."""
    factors = [_random((n, r), seed + k + 1) for k, (n, r) in enumerate(zip(sizes, core_shape, strict=True))]
    return tucker_to_dense(_random(core_shape, seed), factors)


# ---------------------------------------------------------------------------------------------------------------
# The mathematics


def test_energy_rank():
    values = torch.tensor([3.0, 2.0, 1.0])  # squared: 9, 4, 1 of 14 -> 0.643, 0.929, 1
    assert [energy_rank(values, e) for e in (0.5, 0.643, 0.9, 0.93, 1.0)] == [1, 2, 2, 3, 3]
    assert energy_rank(torch.zeros(3), 0.9) == 1
    for energy in (0.0, 1.5):
        with pytest.raises(ValueError, match="energy kept must be in"):
            energy_rank(values, energy)


def test_tucker_truncation_is_hosvd():
    """Truncating core + non-orthonormal factors equals tensorly's HOSVD of the dense tensor, and meets its bound."""
    sizes, ranks = (7, 6, 4, 3), (5, 4, 3, 2)
    core = _random(ranks, 1)
    factors = [_random((n, r), 10 + k) for k, (n, r) in enumerate(zip(sizes, ranks, strict=True))]
    dense = tucker_to_dense(core, factors)
    full = tucker_to_dense(*truncate_tucker(core, factors, ranks))
    torch.testing.assert_close(full, dense)
    smaller = (3, 2, 2, 1)
    ours = tucker_to_dense(*truncate_tucker(core, factors, smaller))
    reference = tl.tucker_to_tensor(tucker(dense, rank=list(smaller), init="svd", n_iter_max=0))
    torch.testing.assert_close(ours, reference)
    # HOSVD bound: the squared error is at most the discarded squared singular values of every mode unfolding.
    discarded = sum(float((torch.linalg.svdvals(tl.unfold(dense, k))[r:] ** 2).sum()) for k, r in enumerate(smaller))
    assert 0 < float((ours - dense).norm() ** 2) <= discarded


def test_tt_truncation_is_tt_svd():
    """TT rounding of given cores equals tensorly's TT-SVD of the dense tensor at the same bond ranks."""
    sizes = (6, 5, 3, 4)
    cores = [_random((6, 4), 1), _random((4, 5, 5), 2), _random((5, 3, 3), 3), _random((3, 4), 4)]
    dense = tt_to_dense(cores)
    torch.testing.assert_close(tt_to_dense(truncate_tt(cores, [4, 5, 3])), dense)
    ours = tt_to_dense(truncate_tt(cores, [2, 3, 2]))
    reference = tl.tt_to_tensor(tensor_train(dense, [1, 2, 3, 2, 1]))
    torch.testing.assert_close(ours, reference)
    assert ours.shape == sizes and 0 < float((ours - dense).norm() / dense.norm()) < 1


def test_fit_fills_free_entries_with_the_fit():
    """Entries no update reads (grouped-query padding) are not pinned to zero: a low-rank tensor is recovered."""
    dense = _tucker_dense((2, 2, 2), (8, 6, 3), seed=3)
    known = torch.ones_like(dense, dtype=torch.bool)
    known[4:, :, 1:] = False  # like k and v holding half the rows of q's width
    tensor = TuckerTensor({"in": 8, "out": 6, "qkv": 3}, {"in": 2, "out": 2, "qkv": 2})
    fit(tensor, torch.where(known, dense, torch.zeros_like(dense)), known)
    fitted = tucker_to_dense(tensor.core.detach().double(), [tensor.factors[m].detach().double() for m in tensor.modes])
    torch.testing.assert_close(fitted[known], dense[known], atol=1e-5, rtol=1e-5)
    fit(tensor, torch.where(known, dense, torch.zeros_like(dense)))  # zero padding instead costs accuracy
    pinned = tucker_to_dense(tensor.core.detach().double(), [tensor.factors[m].detach().double() for m in tensor.modes])
    assert float((pinned - dense)[known].norm() / dense[known].norm()) > 1e-3


# ---------------------------------------------------------------------------------------------------------------
# Trained adapters, truncated

# BERT with the transposed `o`, LLaMA's grouped-query k/v (narrower slices, zero-padded in q's tensors) with the
# MLP roles and the head split, GPT-2's fused Conv1D `c_attn` (one tensor per layer: the qkv construction), a
# tensor-train, and FacT's block layout (d_ffn 37 cut into two zero-padded 32-wide blocks; down by columns).
CASES = {
    "bert-qkv_depth": (bert, dict(construction="qkv_depth", roles=["q", "k", "v", "o"], ranks=4)),
    "llama-att-all-linear": (llama, dict(construction="att_qkv_depth", roles="all-linear", ranks=3)),
    "gpt2-qkv": (gpt2, dict(construction="qkv", roles=["q", "k", "v", "o"], ranks=3)),
    "llama-tt": (llama, dict(construction="qkv_depth", factorization="tt", roles=["q", "k", "v", "o"], ranks=4)),
    "bert-fact-blocks": (bert, dict(construction="fused_qkv_depth", layout="blocks", roles="all-linear", ranks=3)),
}


def _adapted(name: str) -> PeftModel:
    build, options = CASES[name]
    torch.manual_seed(0)
    config = TensLoraConfig(task_type="SEQ_CLS", init_weights=False, scaling=2.0, **options)
    return get_peft_model(build(), config).eval()


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs("bert")).logits


@pytest.mark.parametrize("name", list(CASES))
def test_compressing_to_the_adapters_ranks_is_exact(name):
    model = _adapted(name)
    expected = _logits(model)
    report = compress_adapter(model, ranks=1000)
    assert report.relative_error < 1e-6
    assert report.ranks_after == report.ranks_before and report.parameters_after == report.parameters_before
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", list(CASES))
def test_compressed_adapter_saves_and_loads(name, tmp_path):
    """Smaller ranks: fewer parameters, the error reported is the updates', and the saved adapter loads as any."""
    model = _adapted(name)
    before = delta_weights(model)
    report = compress_adapter(model, energy=0.8)
    assert report.parameters_after < report.parameters_before
    assert 0 < report.relative_error < 1
    assert report.relative_error == pytest.approx(relative_error(before, delta_weights(model)))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["ranks"] == report.ranks_after
    loaded = PeftModel.from_pretrained(CASES[name][0](), tmp_path).eval()
    assert sum(p.numel() for p in loaded.base_model.tenslora_tensors.parameters()) == report.parameters_after
    torch.testing.assert_close(_logits(loaded), _logits(model), atol=1e-5, rtol=1e-5)


def test_truncation_error_is_the_hosvd_one():
    """One qkv_depth tensor on BERT (every entry is an update): the error is tensorly's HOSVD error of that tensor."""
    model = _adapted("bert-qkv_depth")
    tensor = model.base_model.tenslora_tensors["default"].tensor("all")
    dense = tucker_to_dense(tensor.core.detach().double(), [tensor.factors[m].detach().double() for m in tensor.modes])
    ranks = {"in": 2, "out": 3, "qkv": 2, "depth": 1}
    reference = tl.tucker_to_tensor(tucker(dense, rank=list(ranks.values()), init="svd", n_iter_max=0))
    report = compress_adapter(model, ranks=ranks)
    assert report.ranks_after == ranks
    assert report.relative_error == pytest.approx(float((reference - dense).norm() / dense.norm()), rel=1e-5)


def test_energy_keeps_the_smallest_ranks_reaching_it():
    model = _adapted("bert-qkv_depth")
    tensor = model.base_model.tenslora_tensors["default"].tensor("all")
    dense = tucker_to_dense(tensor.core.detach().double(), [tensor.factors[m].detach().double() for m in tensor.modes])
    energy = 0.9
    report = compress_adapter(model, energy=energy)
    for k, mode in enumerate(tensor.modes):
        squares = torch.linalg.svdvals(tl.unfold(dense, k)) ** 2
        kept = torch.cumsum(squares, 0) / squares.sum()
        rank = report.ranks_after[mode]
        assert kept[rank - 1] >= energy and (rank == 1 or kept[rank - 2] < energy)


def test_compression_refusals():
    model = _adapted("bert-qkv_depth")
    with pytest.raises(ValueError, match="exactly one of"):
        compress_adapter(model, ranks=2, energy=0.9)
    cp = get_peft_model(bert(), TensLoraConfig(task_type="SEQ_CLS", factorization="cp", ranks=2))
    with pytest.raises(ValueError, match="this one is CP"):
        compress_adapter(cp, ranks=1)
    report = compress_adapter(model, ranks={"in": 9, "out": 2, "qkv": 2, "depth": 2})
    assert report.ranks_after == {"in": 4, "out": 2, "qkv": 2, "depth": 2}  # never above the adapter's own


def test_a_budget_is_a_ceiling():
    """BERT, q, k, v, o in qkv_depth (in 32, out 32, qkv 4, depth 2): a common rank r has 64 r + 4 r + 2 min(r, 2) +
    r^3 min(r, 2) parameters: 71 at r = 1, 156 at r = 2. A budget of 150 gets r = 1 (the closest count, 156, is
    over it); below 71 nothing fits, and the adapter is left as it was."""
    model = _adapted("bert-qkv_depth")
    assert tenslora.match_budget("qkv_depth", "tucker", 150, model.base_model.model.config)["in"] == 2  # closest
    expected = _logits(model)
    for too_small in (70, "lora:4"):
        with pytest.raises(ValueError, match="fit within a budget of 70 parameters: the smallest adapter has 71"
                           if too_small == 70 else r"`budget` must be a positive number of parameters.*lora:8"):
            compress_adapter(model, budget=too_small)
        torch.testing.assert_close(_logits(model), expected, atol=0, rtol=0)
    report = compress_adapter(model, budget=150)
    assert report.ranks_after == {"in": 1, "out": 1, "qkv": 1, "depth": 1} and report.parameters_after == 71
    assert sum(p.numel() for p in model.base_model.tenslora_tensors.parameters()) == 71
    within = compress_adapter(model, budget=10**6)  # beyond any rank of the construction: nothing to cut
    assert within.ranks_after == within.ranks_before and within.parameters_after == report.parameters_after


def test_a_budget_keeps_full_the_modes_each_family_keeps_full(tmp_path):
    """Attention keeps its depth full, the MLP does not: compressed to a budget, each family keeps its own rule
    (the MLP's depth is not counted or recorded as full), and the saved adapter loads back to the same outputs."""
    ranks = {"attention": {"in": 4, "out": 4, "qkv": 3, "depth": "full"}, "mlp": {"in": 4, "out": 4, "qkv": 2,
                                                                                "depth": 1}}

    def adapted() -> PeftModel:
        torch.manual_seed(0)
        return get_peft_model(llama(), TensLoraConfig(task_type="SEQ_CLS", init_weights=False, roles="all-linear",
                                                      ranks=ranks)).eval()

    budget = compress_adapter(adapted(), ranks=2).parameters_after + 50
    model = adapted()
    report = compress_adapter(model, budget=budget)
    assert report.parameters_after <= budget
    recorded = model.peft_config["default"].ranks
    assert recorded["attention"]["depth"] == "full" and recorded["mlp"]["depth"] == 1
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs("llama")).logits, model(**inputs("llama")).logits)
    with pytest.raises(ValueError, match=r"keyed by family takes the families \['attention', 'mlp'\].*\['depth'\]"):
        tenslora.match_budget("qkv_depth", "tucker", budget, llama().config, roles="all-linear",
                              fixed={"depth": "full", "mlp": {"qkv": 1}})


@pytest.mark.parametrize("name", list(CASES))
def test_compression_never_exceeds_its_budget(name):
    """One parameter below rank 2's count, where the closest count is rank 2's: every layout and factorization."""
    budget = compress_adapter(_adapted(name), ranks=2).parameters_after - 1
    model = _adapted(name)
    report = compress_adapter(model, budget=budget)
    assert report.parameters_after <= budget
    assert sum(p.numel() for p in model.base_model.tenslora_tensors.parameters()) == report.parameters_after


# ---------------------------------------------------------------------------------------------------------------
# LoRA adapters, fitted


def _lora_holding(model: PeftModel, build) -> PeftModel:
    """A PEFT LoRA on a fresh ``build()`` whose updates are exactly those of ``model`` (B A from their SVD)."""
    deltas = delta_weights(model)
    rank = max(min(delta.shape) for delta in deltas.values())
    lora = get_peft_model(build(), LoraConfig(task_type="SEQ_CLS", r=rank, lora_alpha=rank,
                                              target_modules=sorted(deltas))).eval()
    with torch.no_grad():
        for name, module in lora.base_model.model.named_modules():
            if name in deltas:
                u, s, vh = torch.linalg.svd(deltas[name], full_matrices=False)
                module.lora_A["default"].weight.zero_()[: s.shape[0]] = vh
                module.lora_B["default"].weight.zero_()[:, : s.shape[0]] = u * s
    return lora


@pytest.mark.parametrize("name", list(CASES))
def test_lora_of_a_low_rank_tensor_is_recovered(name, tmp_path):
    """A LoRA whose updates ARE a Tucker / TT tensor of the construction is fitted back with no error at the same
    ranks, and gives the TensLoRA model's outputs; from a saved LoRA folder too."""
    build, options = CASES[name]
    model = _adapted(name)
    expected = _logits(model)
    lora = _lora_holding(model, build)
    torch.testing.assert_close(_logits(lora), expected, atol=1e-5, rtol=1e-5)
    lora.save_pretrained(tmp_path)
    config = model.peft_config["default"]
    fitted, report = from_lora(tmp_path, options["construction"], ranks=config.ranks,
                               factorization=config.factorization, layout=config.layout, base_model=build())
    assert report.relative_error < 1e-5
    assert fitted.peft_config["default"].roles == config.geometry["roles"]  # all-linear, written out
    assert report.parameters_after == sum(p.numel() for p in model.base_model.tenslora_tensors.parameters())
    torch.testing.assert_close(_logits(fitted.eval()), expected, atol=1e-5, rtol=1e-5)


def _trained_lora(build, **options) -> PeftModel:
    torch.manual_seed(0)
    config = LoraConfig(task_type="SEQ_CLS", init_lora_weights=False, lora_alpha=16, **options)
    return get_peft_model(build(), config).eval()


def test_lora_at_full_ranks_gives_the_lora_outputs():
    """A plain PEFT LoRA (random, not low-rank as a tensor) in full-rank Tucker tensors: its outputs, head included."""
    lora = _trained_lora(gpt2, r=4, target_modules=["c_attn", "c_proj"])
    expected = _logits(lora)
    fitted, report = from_lora(lora, "qkv_depth", ranks=1000)
    assert fitted.peft_config["default"].roles == ["q", "k", "v", "o", "down"]  # GPT-2's c_proj: `o` and MLP down
    assert report.relative_error < 1e-5
    torch.testing.assert_close(_logits(fitted.eval()), expected, atol=1e-5, rtol=1e-5)


def test_lora_truncated_to_a_budget_is_the_hosvd_of_its_stack():
    """BERT, q and v in qkv_depth: one tensor (in, out, 2 roles, 2 layers) holding the LoRA updates; the fit to a
    budget has the count match_budget gives and the error of tensorly's HOSVD of that stack."""
    lora = _trained_lora(bert, r=4, target_modules=["query", "value"])
    deltas = delta_weights(lora)
    names = {(role, layer): f"bert.encoder.layer.{layer}.attention.self.{module}"
             for role, module in (("q", "query"), ("v", "value")) for layer in (0, 1)}
    stack = torch.stack([torch.stack([deltas[names[role, layer]].T.double() for layer in (0, 1)], -1)
                         for role in ("q", "v")], -2)
    budget = 500
    ranks = tenslora.match_budget("qkv_depth", "tucker", budget, bert().config, roles=["q", "v"])
    fitted, report = from_lora(lora, "qkv_depth", budget=budget)
    assert fitted.peft_config["default"].ranks == ranks
    assert report.parameters_after == tenslora.count_parameters(fitted.peft_config["default"], bert().config)
    reference = tl.tucker_to_tensor(tucker(stack, rank=[ranks[m] for m in ("in", "out", "qkv", "depth")],
                                           init="svd", n_iter_max=0))
    assert report.relative_error == pytest.approx(float((reference - stack).norm() / stack.norm()), rel=1e-5)
    assert 0 < report.relative_error < 1


@pytest.mark.parametrize("construction, arguments, lora_options, heads, message", [
    ("qkv", {"ranks": 2, "budget": 100}, {}, None, "exactly one of"),
    ("qkv", {"ranks": 0}, {}, None, "must be a positive integer"),
    ("qkv", {"ranks": 2}, {"use_dora": True}, None, "DoRA"),
    ("qkv", {"ranks": 2}, {"target_modules": ["query", "pooler.dense"]}, None, "not attention or MLP projections"),
    ("qkv", {"ranks": 2, "factorization": "cp"}, {}, None, "HOSVD"),
    ("qkv", {"budget": 10}, {}, None, "come near a budget of 10"),
    ("qkv", {"ranks": 2, "roles": ["q", "gate"]}, {}, None, r"No module pattern for role\(s\) \['gate'\]"),
    ("att", {"ranks": 2}, {}, 5, "not divisible by the number of attention heads 5"),
    ("qkv", {"ranks": 2, "roles": ["q"]}, {"target_modules": ["query", "value"]}, None,
     r"The LoRA adapts roles \['q', 'v'\]; roles=\['q'\] would drop its updates of \['v'\]"),
    ("qkv", {"ranks": 2, "roles": "q"}, {"target_modules": ["query", "value"]}, None,
     r"The LoRA adapts roles \['q', 'v'\]; roles=\['q'\] would drop its updates of \['v'\]"),
    ("qkv", {"ranks": 2, "roles": "all-linear"}, {"target_modules": ["query", "value"]}, None,
     r"no update for \d+ module\(s\)"),
    ("depth", {"ranks": 2}, {"layers_to_transform": [0]}, None,
     r"no update for 1 module\(s\).*\(bert.encoder.layer.1.attention.self.query\): they would get a zero update"),
    ("qkv", {"budget": "lora:4"}, {}, None, r"`budget` must be a positive number of parameters \(an int\)"),
])
def test_from_lora_refuses_before_it_consumes_the_lora(construction, arguments, lora_options, heads, message):
    """A refusal leaves the caller's LoRA model whole: its layers and its outputs as they were (``heads``: a
    config whose head count does not divide the 32 features, which only the construction's plan checks)."""
    lora = _trained_lora(bert, r=2, **{"target_modules": ["query"], **lora_options})
    if heads is not None:
        lora.get_base_model().config.num_attention_heads = heads
    layers, expected = _lora_layers(lora), _logits(lora)
    with pytest.raises(ValueError, match=message):
        from_lora(lora, construction, **arguments)
    assert layers and _lora_layers(lora) == layers
    torch.testing.assert_close(_logits(lora), expected, atol=0, rtol=0)


@pytest.mark.parametrize("roles", ["q,v", ["v", "q"], None])
def test_from_lora_reads_roles_as_everywhere_else(roles):
    """Roles as one string, a list in any order, or left out (the LoRA's): the same adapter."""
    lora = _trained_lora(bert, r=2, target_modules=["query", "value"])
    fitted, _ = from_lora(lora, "qkv", ranks=2, roles=roles)
    assert fitted.peft_config["default"].roles == ["q", "v"]


def _lora_layers(model: PeftModel) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def test_from_lora_refuses_a_base_deeper_than_the_loras(tmp_path):
    """A LoRA folder of a 2-layer model loaded onto a 3-layer one: PEFT leaves the third layer's LoRA at its init
    (random here, as this LoRA's config says; zero by default), with a warning only."""
    _trained_lora(bert, r=2, target_modules=["query", "value"]).save_pretrained(tmp_path)
    message = r"no update for 2 module\(s\) the TensLoRA adapter would adapt \(bert.encoder.layer.2"
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=message):
        from_lora(tmp_path, "qkv_depth", ranks=2, base_model=bert(layers=3))


def test_from_lora_needs_the_base_of_an_adapter_folder(tmp_path):
    with pytest.raises(ValueError, match="pass base_model="):
        from_lora(tmp_path, "qkv", ranks=2)


# ---------------------------------------------------------------------------------------------------------------
# The command

_TRAIN = ["--task", "glue-mrpc", "--epochs", "1", "--max-steps", "2", "--batch-size", "8", "--lr", "1e-2",
          "--max-length", "32", "--no-bf16", "--roles", "q,v,o", "--ranks", "4"]


def test_compress_command(tiny, tmp_path, capsys):  # noqa: F811
    run = tmp_path / "run"
    assert main(["train", *_TRAIN, "--data-dir", str(tiny / "mrpc"), "--output-dir", str(run), "--model",
                 str(tiny / "bert")]) == 0
    full, small = tmp_path / "full", tmp_path / "small"
    capsys.readouterr()
    assert main(["compress", str(run), str(full), "--ranks", "100", "--eval"]) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((full / "metrics.json").read_text())
    assert metrics["relative_error"] < 1e-5 and "relative error of the updates" in printed
    evaluation = metrics["evaluation"]
    assert evaluation["after"]["accuracy"] == evaluation["before"]["accuracy"]
    assert f"test accuracy: {evaluation['before']['accuracy']:.4f} -> " in printed
    assert main(["compress", str(run), str(small), "--energy", "0.5"]) == 0
    recorded = json.loads((small / "run.json").read_text())
    summary = json.loads((small / "metrics.json").read_text())
    assert recorded["adapter_parameters"] == summary["parameters_after"] < summary["parameters_before"]
    assert recorded["adapter"]["ranks"] == summary["ranks_after"] and (small / "tokenizer.json").is_file()
    assert main(["eval", str(small)]) == 0  # a run folder like any other
    assert main(["compress", str(run), str(tmp_path / "budget"), "--budget", "150"]) == 0
    # q, v, o in qkv_depth: 70 parameters at rank 1, 154 at rank 2 (the closest to 150, over it).
    assert json.loads((tmp_path / "budget" / "metrics.json").read_text())["parameters_after"] == 70
    assert main(["compress", str(run), str(small), "--ranks", "2"]) == 2  # never into a folder that holds files
    assert main(["compress", str(run), str(tmp_path / "x"), "--ranks", "2", "--energy", "0.9"]) == 2
    assert "Give one of --ranks, --energy and --budget" in capsys.readouterr().err
    refused = {"energy kept must be in (0, 1]": ["--energy", "1.5"], "Cannot read ranks": ["--ranks", "abc"],
               "4 modes": ["--ranks", "4,4"], "Cannot read budget": ["--budget", "abc"]}
    for message, bad in refused.items():
        assert main(["compress", str(run), str(tmp_path / "x"), *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert main(["compress", str(run), str(tmp_path / "x"), "--budget", "69"]) == 2  # checked once the model is read
    assert "error: No ranks of the 'qkv_depth' construction with tucker fit within a budget of 69 parameters: the " \
        "smallest adapter has 70." in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x").exists()
    before = {path: path.read_bytes() for path in small.rglob("*") if path.is_file()}
    capsys.readouterr()
    assert main(["train", *_TRAIN, "--data-dir", str(tiny / "mrpc"), "--output-dir", str(small), "--model",
                 str(tiny / "bert"), "--resume"]) == 2  # the options of the run it was compressed from
    assert f"holds an adapter compressed from '{run}' by `tenslora compress`, not a training run" in \
        capsys.readouterr().err
    assert {path: path.read_bytes() for path in small.rglob("*") if path.is_file()} == before
