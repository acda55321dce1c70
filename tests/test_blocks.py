"""FacT's block layout (``layout="blocks"``): every projection cut into d x d blocks, each one slice of one tensor.
Checked against an independent dense reconstruction on BERT (d_ffn = 37 with d = 32: padded blocks), LLaMA
(grouped-query k/v narrower than d, gated MLP) and GPT-2 (fused q/k/v, Conv1D), with merging, counts and saving."""

import copy
import math

import pytest
import tensorly as tl
import torch
import torch._dynamo as dynamo
import transformers
from peft import PeftModel, get_peft_model

import tenslora
from dense import dense_tensor
from tenslora import TensLoraConfig
from test_all_linear import MODULES as ALL_LINEAR_MODULES
from test_all_linear import adapter_numel, outputs
from tiny import TEXT, bert, gemma, gpt2, inputs, llama

tl.set_backend("pytorch")

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


def expected_update(bank, name: str, construction: str, role: str, layer: int) -> torch.Tensor:
    """The (d_out x d_in) update of ``role`` in ``layer`` by this test's own rules: the layer's slots are the roles'
    blocks in role order, ceil(width / 32) each; a role's blocks stacked along the wide side, cropped to its
    width; o and down transposed."""
    widths = WIDTHS[name]
    first = sum(math.ceil(widths[r] / D) for r in list(widths)[: list(widths).index(role)])
    count = math.ceil(widths[role] / D)
    slot_count = sum(math.ceil(w / D) for w in widths.values())
    tensor = bank.tensors["blocks" if construction != "qkv" else f"blocks_layer{layer}"]
    full = dense_tensor(tensor)  # in, out, then qkv, depth | qkv_depth | qkv
    if construction == "qkv_depth":
        blocks = [full[:, :, slot, layer] for slot in range(first, first + count)]
    elif construction == "fused_qkv_depth":
        assert full.shape[2] == slot_count * LAYERS
        blocks = [full[:, :, slot * LAYERS + layer] for slot in range(first, first + count)]
    else:
        blocks = [full[:, :, slot] for slot in range(first, first + count)]
    assert full.shape[:2] == (D, D) and (construction == "fused_qkv_depth" or full.shape[2] == slot_count)
    update = torch.cat([block.T for block in blocks])[: widths[role]]  # (wide side) x (residual side)
    return update.T if role in ("o", "down") else update


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
    assert bank.geometry.roles == tuple(MODULES[name])

    modules = dict(reference.named_modules())
    with torch.no_grad():
        original = outputs(reference, name)
        for layer in range(LAYERS):
            by_module: dict[str, list[str]] = {}
            for role in MODULES[name]:
                by_module.setdefault(MODULES[name][role].format(layer), []).append(role)
            for module_name, fused in by_module.items():
                delta = SCALING * torch.cat([expected_update(bank, name, construction, r, layer) for r in fused])
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


@pytest.mark.parametrize(("construction", "factorization"), [("qkv_depth", "tucker"), ("fused_qkv_depth", "tt"),
                                                             ("qkv_depth", "cp")])
def test_match_budget_on_blocks(construction, factorization):
    base = llama()
    budget = tenslora.lora_parameter_count(4, base.config, "all-linear")
    ranks = tenslora.match_budget(construction, factorization, budget, base.config, roles="all-linear",
                                  layout="blocks")
    assert not (isinstance(ranks, dict) and "attention" in ranks)  # one spec for the one kind of tensor
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks, roles="all-linear",
                            layout="blocks")
    count = tenslora.count_parameters(config, base.config)
    assert adapter_numel(get_peft_model(base, config)) == count and abs(count - budget) / budget < 0.15
    assert tenslora.resolved_ranks(config, base.config) == model_ranks(config)


def model_ranks(config: TensLoraConfig):
    return get_peft_model(llama(), config).base_model.tenslora_tensors["default"].ranks


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
