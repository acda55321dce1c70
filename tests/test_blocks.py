"""FacT's block layout (``layout="blocks"``): every projection cut into d x d blocks, each one slice of one tensor.
Checked against an independent dense reconstruction on BERT (d_ffn = 37 with d = 32: padded blocks), LLaMA
(grouped-query k/v narrower than d, gated MLP) and GPT-2 (fused q/k/v, Conv1D), with merging, counts and saving."""

import copy
import math

import pytest
import torch
import torch._dynamo as dynamo
import transformers
from peft import PeftModel, get_peft_model

import tenslora
from dense import expected_update
from tenslora import TensLoraConfig
from test_all_linear import MODULES as ALL_LINEAR_MODULES
from test_all_linear import adapter_numel, outputs
from tiny import TEXT, bert, gemma, gpt2, inputs, llama

#: Where each role's module is, per model (Gemma names them as LLaMA does); slots follow q, k, v, o, gate, up, down.
MODULES = {**ALL_LINEAR_MODULES, "gemma": ALL_LINEAR_MODULES["llama"]}
BUILD = {"llama": llama, "gemma": gemma, "gpt2": gpt2, "bert": bert}
#: The wide side of each role on the tiny models (d = 32): k/v of the GQA LLaMA are 16 wide, Gemma's attention is
#: 64 wide (q and o two blocks each), d_ffn is 37 on BERT, LLaMA and Gemma, 4 x 32 on GPT-2.
WIDTHS = {"gemma": {"q": 64, "k": 16, "v": 16, "o": 64, "gate": 37, "up": 37, "down": 37},
          "bert": {"q": 32, "k": 32, "v": 32, "o": 32, "up": 37, "down": 37},
          "llama": {"q": 32, "k": 16, "v": 16, "o": 32, "gate": 37, "up": 37, "down": 37},
          "gpt2": {"q": 32, "k": 32, "v": 32, "o": 32, "up": 128, "down": 128}}
D, LAYERS, SCALING = 32, 2, 0.5
#: fp32 through a whole model with random (init_weights=False) tensor-train cores: updates of order one.
TOLERANCE = {"atol": 1e-4, "rtol": 1e-4}


@pytest.mark.parametrize(("construction", "factorization"),
                         [("qkv_depth", "tucker"), ("fused_qkv_depth", "tucker"), ("qkv", "cp"), ("qkv_depth", "tt")])
@pytest.mark.parametrize("name", ["bert", "llama", "gemma", "gpt2"])
def test_blocks_are_the_dense_update_of_every_projection(name, construction, factorization):
    base = BUILD[name]()
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=3, roles="all-linear",
                            layout="blocks", scaling=SCALING, init_weights=False)
    model = get_peft_model(base, config)
    bank = model.base_model.tenslora_tensors["default"]
    roles = tuple(MODULES[name])
    assert bank.geometry.roles == roles
    slot_count = sum(math.ceil(width / D) for width in WIDTHS[name].values())
    for tensor in bank.tensors.values():  # d x d slices, the layer's slots along the role mode (or fused with depth)
        assert list(tensor.sizes.values())[:3] == [D, D, slot_count * (LAYERS if tensor.modes[2] == "qkv_depth" else 1)]

    modules = dict(reference.named_modules())
    with torch.no_grad():
        original = outputs(reference, name)
        for layer in range(LAYERS):
            by_module: dict[str, list[str]] = {}
            for role in MODULES[name]:
                by_module.setdefault(MODULES[name][role].format(layer), []).append(role)
            for module_name, fused in by_module.items():
                delta = SCALING * torch.cat([expected_update(bank, construction, roles, r, layer, WIDTHS[name], LAYERS,
                                                             "blocks") for r in fused])
                weight = modules[module_name].weight
                weight += delta.T if name == "gpt2" else delta  # Conv1D stores (in, out)
        expected = outputs(reference, name)
        adapted = outputs(model, name)
    assert (adapted - original).abs().max() > 1e-2  # the updates are not zero
    torch.testing.assert_close(adapted, expected, **TOLERANCE)

    plain = TensLoraConfig(construction=construction, factorization=factorization, ranks=3, roles="all-linear",
                           layout="blocks")
    assert adapter_numel(model) == tenslora.count_parameters(model.peft_config["default"], reference.config) == \
        tenslora.count_parameters(plain, reference.config)

    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, name), expected, **TOLERANCE)
    merged_modules = dict(merged.named_modules())
    for layer in range(LAYERS):
        for role in MODULES[name]:
            module_name = MODULES[name][role].format(layer)
            torch.testing.assert_close(merged_modules[module_name].weight, modules[module_name].weight)


def bert_fact(d_ffn: int) -> torch.nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(**dict(TEXT, intermediate_size=d_ffn), num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def test_fact_has_twelve_slices_a_layer_on_bert():
    """d_ffn = 4d: q, k, v, o, 4 blocks of up and 4 of down; FacT-TK is Tucker (r, r, r) over (d, d, 12 L)."""
    base, r = bert_fact(4 * D), 3
    model = get_peft_model(copy.deepcopy(base), TensLoraConfig(construction="fact_tk", ranks=r, roles="all-linear",
                                                               layout="blocks"))
    tensors = model.base_model.tenslora_tensors["default"].tensors
    assert {key: t.sizes for key, t in tensors.items()} == {"blocks": {"in": D, "out": D, "qkv_depth": 12 * LAYERS}}
    assert adapter_numel(model) == 2 * D * r + 12 * LAYERS * r + r**3
    stacked = get_peft_model(copy.deepcopy(base), TensLoraConfig(construction="fact_tt", ranks=r, roles="all-linear",
                                                                 layout="blocks"))
    tensor = stacked.base_model.tenslora_tensors["default"].tensors["blocks"]
    assert tensor.sizes == {"in": D, "out": D, "qkv": 12, "depth": LAYERS} and tensor.core.shape == (r, r, 12, LAYERS)
    modules = dict(stacked.base_model.model.named_modules())
    blocks = {role: [address.index for address in modules[MODULES["bert"][role].format(1)]._segments[
        "default"][0].blocks] for role in ("q", "o", "up", "down")}
    assert blocks == {"q": [{"qkv": 0, "depth": 1}], "o": [{"qkv": 3, "depth": 1}],
                      "up": [{"qkv": slot, "depth": 1} for slot in range(4, 8)],
                      "down": [{"qkv": slot, "depth": 1} for slot in range(8, 12)]}
    with torch.no_grad():  # init_weights: the update starts at zero, so the model starts as the pretrained one
        torch.testing.assert_close(outputs(model, "bert"), outputs(base, "bert"))


def test_blocks_save_and_load(tmp_path):
    torch.manual_seed(0)
    config = TensLoraConfig(construction="qkv_depth", factorization="tt", ranks=3, roles="all-linear",
                            layout="blocks", init_weights=False)
    model = get_peft_model(llama(), config)
    with torch.no_grad():
        expected = outputs(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].layout == "blocks"
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, "llama"), expected)


def block_ranks_and_count(construction: str, factorization: str, r: int) -> tuple[list[int], int]:
    """The ranks and parameters of LLaMA's all-linear block tensor at common rank r, by this test's own sums: 10
    slots a layer (q, k, v, o one block each; gate, up, down two, d_ffn 37 > d), 2 layers."""
    sizes = {"qkv_depth": [D, D, 10, LAYERS], "fused_qkv_depth": [D, D, 10 * LAYERS]}[construction]
    if factorization == "cp":
        return [r], r * sum(sizes)
    if factorization == "tucker":
        ranks = [min(r, n) for n in sizes]
        return ranks, sum(n * k for n, k in zip(sizes, ranks, strict=True)) + math.prod(ranks)
    ranks = [min(r, math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))]
    edges = [1, *ranks, 1]
    return ranks, sum(edges[k] * n * edges[k + 1] for k, n in enumerate(sizes))


@pytest.mark.parametrize(("construction", "factorization"), [("qkv_depth", "tucker"), ("fused_qkv_depth", "tt"),
                                                             ("qkv_depth", "cp")])
def test_match_budget_on_blocks(construction, factorization):
    """The closest common rank to LoRA r=4's all-linear count, its ranks and count checked by hand, and the model."""
    base = llama()
    budget = tenslora.lora_parameter_count(4, base.config, "all-linear")
    assert budget == 4 * LAYERS * (2 * (D + D) + 2 * (D + 16) + 3 * (D + 37))  # q, o; k, v (GQA); gate, up, down
    ranks = tenslora.match_budget(construction, factorization, budget, base.config, roles="all-linear",
                                  layout="blocks")
    assert not (isinstance(ranks, dict) and "attention" in ranks)  # one spec for the one kind of tensor
    r = ranks if isinstance(ranks, int) else max(ranks.values())
    expected_ranks, expected_count = block_ranks_and_count(construction, factorization, r)
    closest = min(range(1, 100), key=lambda k: abs(block_ranks_and_count(construction, factorization, k)[1] - budget))
    assert r == closest
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks, roles="all-linear",
                            layout="blocks")
    resolved = tenslora.resolved_ranks(config, base.config)
    assert (list(resolved.values()) if isinstance(resolved, dict) else [resolved]) == expected_ranks
    assert tenslora.count_parameters(config, base.config) == expected_count
    assert adapter_numel(get_peft_model(base, config)) == expected_count


def test_blocks_compile_without_graph_break_and_run_under_inference_mode():
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=3, roles="all-linear",
                                                  layout="blocks", init_weights=False))
    with torch.no_grad():
        expected = outputs(model, "bert")
    with torch.inference_mode():
        torch.testing.assert_close(outputs(model, "bert"), expected)
    dynamo.reset()
    explanation = dynamo.explain(model)(**inputs("bert"))
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"layout": "diagonal"}, r"Unknown layout 'diagonal'.*'roles'.*'blocks'"),
        ({"layout": "blocks", "construction": "lotr"}, r"'depth' construction has modes.*fused_qkv_depth"),
        ({"layout": "blocks", "construction": "att_qkv_depth"}, r"Choose one of \['qkv', 'qkv_depth'"),
        ({"layout": "blocks", "ranks": {"attention": 4, "mlp": 2}}, "cannot be given per family"),
    ],
)
def test_bad_block_layouts_are_refused_by_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensLoraConfig(roles="all-linear", **kwargs)
