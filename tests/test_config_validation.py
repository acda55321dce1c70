"""TensLoraConfig refuses bad values when it is built, with one clear ValueError; values given as strings (YAML,
JSON, the environment) are read as what they spell."""

import json

import pytest
import torch
from peft import PeftModel, get_peft_model

import tenslora
from tenslora import TensLoraConfig
from tiny import bert


def test_roles_as_a_comma_separated_string_are_split():
    assert TensLoraConfig(roles="q,k,v").roles == ["q", "k", "v"]
    assert TensLoraConfig(roles=" v, q ").roles == ["q", "v"]  # qkv-mode order, whatever the order given
    assert TensLoraConfig(roles=("o", "q")).roles == ["q", "o"]


def test_all_linear_stays_one_shorthand():
    assert TensLoraConfig(roles="all-linear").roles == "all-linear"
    assert TensLoraConfig(roles=["all-linear"]).roles == "all-linear"


@pytest.mark.parametrize("roles", ["q,x", ["q", "q"], [], "", ["q", 1], "all-linear,q", 5])
def test_bad_roles_are_refused(roles):
    with pytest.raises(ValueError, match="`roles` must be distinct names among"):
        TensLoraConfig(roles=roles)


@pytest.mark.parametrize("roles", ["query", ["q", "query"], "o,x"])
def test_budget_functions_refuse_unknown_roles(roles):
    """``lora_parameter_count`` and ``match_budget`` read roles as the config does: no name is dropped unseen."""
    with pytest.raises(ValueError, match="`roles` must be distinct names among"):
        tenslora.lora_parameter_count(8, bert().config, roles=roles)
    with pytest.raises(ValueError, match="`roles` must be distinct names among"):
        tenslora.match_budget("qkv_depth", "tucker", 5000, bert().config, roles=roles)


def test_budget_functions_count_the_modules_a_config_adapts():
    """roles="down" is one role (not "o" and "down", found in the string); ``role_patterns`` and
    ``layers_to_transform`` count what a config with them adapts, on a model type TensLoRA does not know."""
    config = bert().config
    assert tenslora.lora_parameter_count(8, config, roles="down") == 8 * (37 + 32) * 2  # down: 37 -> 32, 2 layers
    with pytest.raises(ValueError, match=r"No module pattern for role\(s\) \['gate'\]"):  # BERT has no gate
        tenslora.lora_parameter_count(8, config, roles="gate,up")
    unknown = config.to_dict() | {"model_type": "mystery"}
    patterns = {"q": r"attention\.self\.query", "up": r"intermediate\.dense"}
    assert tenslora.lora_parameter_count(8, unknown, "all-linear", [1], patterns) == 8 * (32 + 32 + 32 + 37)
    ranks = tenslora.match_budget("qkv_depth", "tucker", 3000, unknown, "all-linear", role_patterns=patterns)
    assert set(ranks) == {"attention", "mlp"}


def test_numbers_given_as_strings_are_read():
    config = TensLoraConfig(ranks="4", scaling="2", dropout="0.1", num_heads="4", layers_to_transform="1",
                            init_weights="false")
    assert (config.ranks, config.scaling, config.dropout, config.num_heads) == (4, 2.0, 0.1, 4)
    assert config.layers_to_transform == [1] and config.init_weights is False
    assert TensLoraConfig(construction="qkv", ranks=["8", "4", "full"]).ranks == [8, 4, "full"]
    assert TensLoraConfig(construction="qkv", ranks={"in": "8", "out": 4, "qkv": "full"}).ranks == \
        {"in": 8, "out": 4, "qkv": "full"}
    assert TensLoraConfig(construction="lotr", ranks="4").ranks == {"in": 4, "out": 4, "depth": "full"}


@pytest.mark.parametrize(("option", "value", "message"), [
    ("num_heads", 0, "`num_heads` must be a positive integer, got 0"),
    ("num_heads", -2, "`num_heads` must be a positive integer"),
    ("num_heads", "four", "`num_heads` must be an integer, got 'four'"),
    ("num_heads", 2.5, "`num_heads` must be an integer"),
    ("dropout", "a lot", "`dropout` must be a number, got 'a lot'"),
    ("dropout", "1.5", r"`dropout` must be in \[0, 1\)"),
    ("dropout", None, "`dropout` must be a finite number"),
    ("scaling", "nan", "`scaling` must be a finite number"),
    ("scaling", [1.0], "`scaling` must be a finite number"),
    ("init_weights", "maybe", "`init_weights` must be true or false"),
    ("ranks", "eight", "`ranks` must be an int"),
    ("ranks", "0", "must be a positive integer"),
    ("layers_to_transform", ["0", "x"], "`layers_to_transform` must be an integer, got 'x'"),
    ("layers_to_transform", [-1], "holds layer indices"),
    ("layers_to_transform", [], "a layer index or a list of them"),
    ("bias", "lora_only", "`bias` must be one of"),
    ("construction", 3, "`construction` must be a name"),
    ("target_modules", "all-linear", "write roles='all-linear'"),
])
def test_bad_values_are_refused_by_name(option, value, message):
    with pytest.raises(ValueError, match=message):
        TensLoraConfig(**{option: value})


def test_layer_pattern_must_compile_and_capture_the_layer():
    with pytest.raises(ValueError, match=r"`layer_pattern` 'layers' has no capture group"):
        TensLoraConfig(layer_pattern="layers")
    with pytest.raises(ValueError, match=r"`layer_pattern` 'layers\.\(\\d\+' is not a valid regular expression \(m"):
        TensLoraConfig(layer_pattern=r"layers.(\d+")
    assert TensLoraConfig(layer_pattern=r"\.layer\.(\d+)\.").layer_pattern == r"\.layer\.(\d+)\."



@pytest.mark.parametrize("pattern, captured", [(r"encoder\.(\w+)\.", "'layer'"), (r"encoder\.(x)?layer", "None")])
def test_a_layer_pattern_that_captures_no_number_is_named(pattern, captured):
    with pytest.raises(ValueError, match=rf"The layer pattern .* captures {captured} in module 'bert\.encoder\.layer"
                       r"\.0\.attention\.self\.query', not a layer number"):
        get_peft_model(bert(), TensLoraConfig(layer_pattern=pattern))


def test_role_patterns_must_compile_and_name_roles():
    with pytest.raises(ValueError, match="The pattern of role 'k' in `role_patterns` 'attn.k\\[' is not a valid"):
        TensLoraConfig(role_patterns={"q": r"attn\.q", "k": r"attn.k["})
    with pytest.raises(ValueError, match=r"`role_patterns` has unknown role\(s\) \['query'\]"):
        TensLoraConfig(role_patterns={"query": "q_proj"})
    with pytest.raises(ValueError, match="`role_patterns` must map role names"):
        TensLoraConfig(role_patterns="q_proj")


def test_absurd_ranks_are_refused_before_any_allocation():
    # CP over q, k, v of 2 layers (32 -> 32): 10**9 * (32 + 32) per tensor, 6 tensors, where full-rank Tucker
    # tensors (32 * 32 core + two 32 x 32 bases) have 3,072 parameters each.
    with pytest.raises(ValueError, match=r"would have 384,000,000,000 parameters, more than the 18,432 of full-rank"):
        get_peft_model(bert(), TensLoraConfig(construction="lora", ranks=10**9))
    # The largest sensible adapters still build: full-rank Tucker, and LoRA of rank = hidden size.
    for config in (TensLoraConfig(construction="qkv_depth", ranks=10**9), TensLoraConfig(construction="lora",
                                                                                         ranks=32)):
        assert sum(p.numel() for p in get_peft_model(bert(), config).base_model.tenslora_tensors.parameters())


def _edit_config(directory, **changes) -> None:
    path = directory / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_config_whose_ranks_disagree_with_the_weights_is_refused_on_load(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2))
    tenslora.save_adapter(model, tmp_path / "adapter")
    _edit_config(tmp_path / "adapter", ranks=3)
    message = (r"saved tensor 'tensors.all.core' of adapter 'default' has shape \(2, 2, 2, 2\), but its "
               r"adapter_config.json \(.*ranks 3\) implies \(3, 3, 3, 2\).*do not belong together")
    with pytest.raises(ValueError, match=message):
        tenslora.load_adapter(bert(), tmp_path / "adapter")
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(bert(), str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=message):
        PeftModel.from_pretrained(bert(), str(tmp_path / "adapter"), low_cpu_mem_usage=True)
    _edit_config(tmp_path / "adapter", ranks=10**9, factorization="cp")
    with pytest.raises(ValueError, match="too large for this model"):
        tenslora.load_adapter(bert(), tmp_path / "adapter")


def test_one_config_object_serves_models_of_other_sizes_and_kinds(tmp_path):
    from tiny import llama

    config = TensLoraConfig(construction="qkv_depth", ranks=2, roles=["q", "v"])
    small = get_peft_model(bert(), config)
    larger = get_peft_model(bert(layers=3, hidden=48), config)
    other = get_peft_model(llama(), config)
    assert small.peft_config["default"] is config  # the caller's object records the first model's sizes ...
    assert config.geometry["num_layers"] == 2 and config.geometry["hidden_size"] == 32
    assert larger.peft_config["default"] is not config and other.peft_config["default"] is not config  # ... not theirs
    assert larger.peft_config["default"].geometry["hidden_size"] == 48
    assert sum(isinstance(m, tenslora.TensLoraLayer) for m in other.modules()) == 4
    tenslora.save_adapter(larger, tmp_path / "larger")
    with pytest.raises(ValueError, match=r"built for a different model: hidden_size 48 \(adapter\) vs 32"):
        tenslora.load_adapter(bert(), tmp_path / "larger")


def test_count_parameters_counts_the_layers_the_model_has():
    config = TensLoraConfig(construction="qkv_depth", ranks=2, layers_to_transform=[0, 5])
    model = get_peft_model(bert(), config)
    built = sum(p.numel() for p in model.base_model.tenslora_tensors.parameters())
    assert tenslora.count_parameters(config, bert().config) == built
    assert built == tenslora.count_parameters(TensLoraConfig(construction="qkv_depth", ranks=2,
                                                             layers_to_transform=[0]), bert().config)
    with pytest.raises(ValueError, match=r"`layers_to_transform` \[5, 7\] names no layer of the model; it has 2"):
        tenslora.count_parameters(TensLoraConfig(layers_to_transform=[5, 7]), bert().config)


def test_bias_choices_train_and_save_biases_as_lora_does(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2, bias="tenslora_only"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad and name.endswith(".bias")}
    assert len(trainable) == 6 and all(".base_layer.bias" in name for name in trainable)
    with torch.no_grad():
        model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer.bias.add_(1.0)
    expected = model(input_ids=torch.tensor([[5, 6, 7]])).logits
    model.save_pretrained(tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(bert(), str(tmp_path / "adapter"))
    torch.testing.assert_close(loaded(input_ids=torch.tensor([[5, 6, 7]])).logits, expected)
    everything = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2, bias="all"))
    biases = [p.requires_grad for name, p in everything.named_parameters() if name.endswith(".bias")]
    assert len(biases) > 6 and all(biases)
