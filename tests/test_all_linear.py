"""MLP roles and ``roles="all-linear"``: every construction x factorization against an independent dense
reconstruction, merging, parameter counts, per-family ranks, and parity with PEFT LoRA's counts."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

import tenslora
from dense import expected_update, role_widths
from tenslora import TensLoraConfig
from tenslora.app.cli import main
from tenslora.app.params import format_parameter_table
from tenslora.core.construction import CONSTRUCTIONS
from tiny import bert, distilbert, gpt2, inputs, llama

#: Where each role's module is, per model (the test's own map, not the library's table).
MODULES = {
    "llama": {"q": "model.layers.{}.self_attn.q_proj", "k": "model.layers.{}.self_attn.k_proj",
              "v": "model.layers.{}.self_attn.v_proj", "o": "model.layers.{}.self_attn.o_proj",
              "gate": "model.layers.{}.mlp.gate_proj", "up": "model.layers.{}.mlp.up_proj",
              "down": "model.layers.{}.mlp.down_proj"},
    "gpt2": {"q": "transformer.h.{}.attn.c_attn", "k": "transformer.h.{}.attn.c_attn",
             "v": "transformer.h.{}.attn.c_attn", "o": "transformer.h.{}.attn.c_proj",
             "up": "transformer.h.{}.mlp.c_fc", "down": "transformer.h.{}.mlp.c_proj"},
    "bert": {"q": "bert.encoder.layer.{}.attention.self.query", "k": "bert.encoder.layer.{}.attention.self.key",
             "v": "bert.encoder.layer.{}.attention.self.value", "o": "bert.encoder.layer.{}.attention.output.dense",
             "up": "bert.encoder.layer.{}.intermediate.dense", "down": "bert.encoder.layer.{}.output.dense"},
}
BUILD = {"llama": llama, "gpt2": gpt2, "bert": bert}
SCALING = 0.5


def outputs(model, name: str) -> torch.Tensor:
    """Logits and the last hidden states (the classifier alone can hide a change)."""
    result = model(**inputs(name), output_hidden_states=True)
    return torch.cat([result.logits.flatten(), result.hidden_states[-1].flatten()])


def adapter_numel(model) -> int:
    return sum(p.numel() for p in model.base_model.tenslora_tensors.parameters())


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("construction", list(CONSTRUCTIONS))
@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_all_linear_is_the_dense_update_of_every_block_linear(name, construction, factorization):
    check_dense_updates(name, construction, factorization)


def check_dense_updates(name: str, construction: str, factorization: str) -> None:
    """An all-linear adapter on a tiny model = the base model with the dense updates added; merging gives it too;
    parameter count = numel."""
    base = BUILD[name]()
    reference = copy.deepcopy(base)
    torch.manual_seed(0)
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=3, roles="all-linear",
                            scaling=SCALING, init_weights=False)
    model = get_peft_model(base, config)
    bank = model.base_model.tenslora_tensors["default"]
    roles = tuple(MODULES[name])
    assert bank.geometry.roles == roles  # LLaMA has gate, GPT-2 and BERT do not; no head, embedding or pooler

    widths = role_widths(reference.config)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        original = outputs(reference, name)
        for layer in range(2):
            by_module: dict[str, list[str]] = {}
            for role in roles:
                by_module.setdefault(MODULES[name][role].format(layer), []).append(role)
            for module_name, fused in by_module.items():
                delta = SCALING * torch.cat([expected_update(bank, construction, roles, r, layer, widths)
                                             for r in fused])
                weight = modules[module_name].weight
                weight += delta.T if name == "gpt2" else delta  # Conv1D stores (in, out)
        expected = outputs(reference, name)
        adapted = outputs(model, name)
    assert (adapted - original).abs().max() > 1e-2  # the updates are not zero
    torch.testing.assert_close(adapted, expected, atol=1e-5, rtol=1e-4)

    assert adapter_numel(model) == tenslora.count_parameters(model.peft_config["default"], reference.config) == \
        tenslora.count_parameters(TensLoraConfig(construction=construction, factorization=factorization, ranks=3,
                                                 roles="all-linear"), reference.config)

    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(outputs(merged, name), expected, atol=1e-5, rtol=1e-4)
    merged_modules = dict(merged.named_modules())
    for layer in range(2):
        for role in roles:
            module_name = MODULES[name][role].format(layer)
            torch.testing.assert_close(merged_modules[module_name].weight, modules[module_name].weight)


def peft_lora_numel(base, **kwargs) -> int:
    lora = get_peft_model(copy.deepcopy(base), LoraConfig(r=2, **kwargs))
    return sum(p.numel() for n, p in lora.named_parameters() if "lora_" in n)


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert"])
def test_lora_preset_on_all_linear_has_peft_loras_count(name):
    base = BUILD[name]()
    # PEFT's all-linear on a classifier also adapts BERT's pooler, which is no block linear: left out here.
    expected = peft_lora_numel(base, target_modules="all-linear", task_type="SEQ_CLS",
                               exclude_modules=["pooler.dense"] if name == "bert" else None)
    if name == "gpt2":  # q, k and v of the fused c_attn get a rank-r LoRA each, PEFT one for the fused 32 -> 96
        expected += 2 * 2 * (3 * (32 + 32) - (32 + 96))
    config = TensLoraConfig(construction="lora", ranks=2, roles="all-linear")
    count = tenslora.count_parameters(config, base.config)
    assert adapter_numel(get_peft_model(base, config)) == count == expected == \
        tenslora.lora_parameter_count(2, base.config, "all-linear")


def test_grouped_query_key_value_tensors_have_their_own_width():
    """Tensors of k or v alone hold k/v's width (no dead rows); tensors stacking them with q are zero-padded."""
    base = llama()
    expected = peft_lora_numel(base, target_modules=["q_proj", "k_proj", "v_proj"])
    config = TensLoraConfig(construction="lora", ranks=2)
    assert adapter_numel(get_peft_model(copy.deepcopy(base), config)) == tenslora.count_parameters(
        config, base.config) == expected == 2 * 2 * ((32 + 32) + 2 * (32 + 16))
    assert tenslora.count_parameters(TensLoraConfig(construction="lora", ranks=4), base.config) == 1_280  # not 1,536
    for construction, mode, k_size, stacked_size in [("matrix", "out", 16, None), ("depth", "out", 16, None),
                                                      ("att", "heads", 2, None), ("att_depth", "heads", 2, None),
                                                      ("qkv", "out", None, 32), ("att_qkv_depth", "heads", None, 4)]:
        model = get_peft_model(copy.deepcopy(base), TensLoraConfig(construction=construction, ranks=2))
        tensors = model.base_model.tenslora_tensors["default"].tensors
        sizes = {key: tensor.sizes[mode] for key, tensor in tensors.items()}
        if k_size is None:
            assert set(sizes.values()) == {stacked_size}
        else:
            assert {key.split("_")[0]: size for key, size in sizes.items()} == {"q": 2 * k_size, "k": k_size,
                                                                                  "v": k_size}


def test_tensors_stacking_only_key_and_value_have_their_width():
    model = get_peft_model(llama(), TensLoraConfig(construction="att_qkv_depth", ranks=2, roles=["k", "v"]))
    assert model.base_model.tenslora_tensors["default"].tensors["all"].sizes == {
        "in": 32, "head_dim": 8, "heads": 2, "qkv": 2, "depth": 2}


def test_all_linear_with_family_ranks_saves_and_loads(tmp_path):
    ranks = {"attention": {"in": 3, "head_dim": 2, "heads": 2, "qkv": 2, "depth": 1}, "mlp": 3}
    torch.manual_seed(0)
    model = get_peft_model(llama(), TensLoraConfig(construction="att_qkv_depth", ranks=ranks, roles="all-linear",
                                                   init_weights=False))
    with torch.no_grad():
        expected = outputs(model, "llama")
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(llama(), tmp_path)
    assert loaded.peft_config["default"].roles == "all-linear" and loaded.peft_config["default"].ranks == ranks
    with torch.no_grad():
        torch.testing.assert_close(outputs(loaded, "llama"), expected)


def test_att_constructions_split_heads_only_in_attention_tensors():
    model = get_peft_model(llama(), TensLoraConfig(construction="att_qkv_depth", ranks=2, roles="all-linear"))
    tensors = model.base_model.tenslora_tensors["default"].tensors
    assert {key: t.modes for key, t in tensors.items()} == {
        "all": ("in", "head_dim", "heads", "qkv", "depth"), "mlp": ("in", "out", "qkv", "depth")}
    assert tensors["mlp"].sizes == {"in": 32, "out": 37, "qkv": 3, "depth": 2}


def test_ranks_per_family():
    ranks = {"attention": {"in": 4, "head_dim": 4, "heads": 2, "qkv": 3, "depth": 2}, "mlp": [3, 5, 2, 1]}
    config = TensLoraConfig(construction="att_qkv_depth", ranks=ranks, roles="all-linear")
    base = llama()
    model = get_peft_model(base, config)
    tensors = model.base_model.tenslora_tensors["default"].tensors
    assert tensors["all"].core.shape == (4, 4, 2, 3, 2) and tensors["mlp"].core.shape == (3, 5, 2, 1)
    assert adapter_numel(model) == tenslora.count_parameters(config, base.config)
    assert tenslora.resolved_ranks(config, base.config) == {
        "attention": ranks["attention"], "mlp": {"in": 3, "out": 5, "qkv": 2, "depth": 1}}
    cp = TensLoraConfig(construction="lorta", ranks={"attention": 4, "mlp": 2}, roles="all-linear")
    assert tenslora.count_parameters(cp, base.config) == 4 * (32 + 8 + 4 + 4 + 2) + 2 * (32 + 37 + 3 + 2)
    lotr = TensLoraConfig(construction="lotr", ranks={"attention": 4, "mlp": 2}, roles="all-linear")
    assert lotr.ranks == {"attention": {"in": 4, "out": 4, "depth": "full"},
                          "mlp": {"in": 2, "out": 2, "depth": "full"}}


@pytest.mark.parametrize(
    ("construction", "roles", "ranks", "message"),
    [
        ("qkv_depth", "all-linear", {"attention": 4}, r"none for \['mlp'\]"),
        ("qkv_depth", ["q", "k", "v"], {"attention": 4, "mlp": 2}, r"\['mlp'\] has no adapted role"),
        ("att_qkv", "all-linear", [4, 4, 2, 3], r"cannot fit both.*ranks=\{'attention': \.\.\., 'mlp': \.\.\.\}"),
    ],
)
def test_bad_family_ranks_name_the_problem(construction, roles, ranks, message):
    config = TensLoraConfig(construction=construction, ranks=ranks, roles=roles)
    with pytest.raises(ValueError, match=message):
        tenslora.count_parameters(config, llama().config)
    with pytest.raises(ValueError, match=message):
        get_peft_model(llama(), config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ranks": {"attention": 4, "in": 2}}, r"mixes families \['attention'\] with mode\(s\) \['in'\]"),
        ({"ranks": {"attention": 4, "mlp": {"in": 2}}, "factorization": "cp"}, "CP has one rank"),
        ({"ranks": {"attention": 4, "mlp": {"in": 2, "out": 2, "depth": 2}}}, r"misses mode\(s\) \['qkv'\]"),
    ],
)
def test_bad_family_ranks_are_refused_by_the_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensLoraConfig(construction="qkv_depth", roles="all-linear", **kwargs)


def test_mlp_width_from_each_config_convention():
    assert tenslora.model_geometry(gpt2().config, "all-linear").ffn_width == 4 * 32  # n_inner=None
    assert tenslora.model_geometry({"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "n_inner": 48},
                                   "all-linear").ffn_width == 48
    assert tenslora.model_geometry(distilbert().config, "all-linear").ffn_width == 37  # hidden_dim
    assert tenslora.model_geometry(llama().config, ["q", "k", "v"]).ffn_width is None  # not read without MLP roles
    with pytest.raises(ValueError, match="MLP's intermediate size"):
        tenslora.model_geometry({"hidden_size": 32, "num_hidden_layers": 2}, ["up"])
    with pytest.raises(ValueError, match="needed to expand roles='all-linear'"):
        tenslora.model_geometry({"hidden_size": 32, "num_hidden_layers": 2}, "all-linear")


@pytest.mark.parametrize(("construction", "factorization"), [("qkv_depth", "tucker"), ("att_qkv_depth", "tucker"),
                                                             ("depth", "cp")])
def test_match_budget_on_all_linear(construction, factorization):
    base = llama()
    budget = tenslora.lora_parameter_count(4, base.config, "all-linear")
    assert budget == 4 * 2 * sum([32 + 32, 32 + 16, 32 + 16, 32 + 32, 32 + 37, 32 + 37, 37 + 32])
    ranks = tenslora.match_budget(construction, factorization, budget, base.config, roles="all-linear")
    assert factorization == "cp" or set(ranks) == {"attention", "mlp"}
    config = TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks, roles="all-linear")
    count = tenslora.count_parameters(config, base.config)
    assert adapter_numel(get_peft_model(base, config)) == count and abs(count - budget) / budget < 0.15


def test_params_table_on_all_linear():
    table = format_parameter_table(llama().config, "tiny-llama", 2, "all-linear", "tucker")
    assert "adapting q,k,v,o,gate,up,down" in table and "LoRA rank 2: 1,724 adapter parameters" in table
    assert "attention[in=" in table and "mlp[in=" in table


def test_cli_params_with_all_linear(tmp_path, capsys):
    llama().config.save_pretrained(tmp_path)
    assert main(["params", "--model", str(tmp_path), "--roles", "all-linear", "--lora-rank", "2"]) == 0
    table = capsys.readouterr().out
    assert "adapting q,k,v,o,gate,up,down" in table and "LoRA rank 2: 1,724 adapter parameters" in table
