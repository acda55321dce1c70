"""PEFT's own generic checks (PeftCommonTester in PEFT's tests/testing_common.py) that TensLoRA must pass as LoRA
does: a config object is the adapter's config, not a copy; PEFT's message for a broken adapter's safe merge; the
adapted modules named in `target_modules`; the task heads' `modules_to_save`; any adapter name; and loading that
refuses weights or an adapter_config.json that do not belong together."""

import json
import shutil

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from safetensors.torch import load_file, save_file

from tenslora import TensLoraConfig, TensLoraLayer
from tiny import bert, bert_head, gpt2, inputs

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def _config(**changes) -> TensLoraConfig:
    return TensLoraConfig(**{"construction": "qkv_depth", "ranks": 2, "init_weights": False, **changes})


def _logits(model: torch.nn.Module, name: str = "bert") -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs(name)).logits


@pytest.mark.parametrize("build", [bert, gpt2])
def test_from_pretrained_keeps_the_config_object_given(build, tmp_path):
    """PEFT's test_from_pretrained_config_construction."""
    config = _config(task_type="SEQ_CLS")
    model = get_peft_model(build(), config)
    assert model.peft_config["default"] is config
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(), tmp_path, is_trainable=False, config=config)
    assert loaded.peft_config["default"] is config and config.inference_mode
    torch.testing.assert_close(_logits(loaded, build.__name__), _logits(model, build.__name__))


def test_one_config_object_is_shared_where_it_fits_and_left_as_it_was_where_refused():
    config = _config(roles=["q", "v"])
    misdescribed = bert()
    misdescribed.config.hidden_size = 48
    with pytest.raises(ValueError, match="maps 32 -> 32 features, but the model config implies"):
        get_peft_model(misdescribed, config)  # refused once its target modules were found
    assert config.target_modules is None and config.geometry is None
    first, second = get_peft_model(bert(), config), get_peft_model(bert(seed=1), config)
    assert first.peft_config["default"] is config and second.peft_config["default"] is config
    first.add_adapter("other", config)  # as PEFT's test_merge_layers_multi does
    assert first.peft_config["other"] is config
    larger = get_peft_model(bert(hidden=48), config)  # other sizes: a config of its own
    assert larger.peft_config["default"].geometry["hidden_size"] == 48 and config.geometry["hidden_size"] == 32


@pytest.mark.parametrize("build", [gpt2, bert])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_safe_merge_of_a_broken_adapter_raises_peft_message_and_changes_nothing(build, value):
    """PEFT's test_merge_layers_nan, on GPT-2's Conv1D and BERT's nn.Linear."""
    model = get_peft_model(build(), _config(task_type="SEQ_CLS"))
    layer = next(module for module in model.modules() if isinstance(module, TensLoraLayer))
    weight = layer.get_base_layer().weight.clone()
    with torch.no_grad():
        for parameter in model.base_model.tenslora_tensors["default"].parameters():
            parameter.data.view(-1)[0] = value
    with pytest.raises(ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"):
        model.merge_and_unload(safe_merge=True)
    assert torch.equal(layer.get_base_layer().weight, weight) and not layer.merged


@pytest.mark.parametrize("build", [gpt2, bert])
def test_target_modules_name_the_adapted_modules(build):
    """PEFT's test_lora_conversion reads `config.target_modules` of the config it passed (as LoRA fills it)."""
    config = _config(roles="q,k,v,o")
    model = get_peft_model(build(), config)
    assert config.target_modules is not None
    adapted = {name for name, module in model.base_model.model.named_modules() if isinstance(module, TensLoraLayer)}
    matched = {name for name, _ in model.base_model.model.named_modules()
               if name and check_target_module_exists(config, name) and not name.endswith("base_layer")}
    assert matched == adapted


@pytest.mark.parametrize(("head", "task", "saved"), [("TokenClassification", "TOKEN_CLS", ["classifier", "score"]),
                                                     ("QuestionAnswering", "QUESTION_ANS", ["qa_outputs"])])
@pytest.mark.parametrize("method", ["lora", "tenslora"])
def test_task_heads_with_modules_to_save_none(head, task, saved, method):
    """PEFT's test_add_adapter_no_autocast_adapter_dtype: PEFT's task models fill `modules_to_save` themselves."""
    config = (LoraConfig(target_modules=["query"], task_type=task, modules_to_save=None) if method == "lora"
              else _config(task_type=task, modules_to_save=None))
    model = get_peft_model(bert_head(head), config, autocast_adapter_dtype=False)
    assert model.peft_config["default"].modules_to_save == saved
    trained = {name.split(".modules_to_save")[0] for name, p in model.named_parameters()
               if p.requires_grad and "modules_to_save" in name}
    assert trained == {f"base_model.model.{saved[0]}"}


def _saved_state(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / WEIGHTS)


@pytest.mark.parametrize("name", ["all", "in", "core", "factors", "tensors", "tenslora_tensors"])
@pytest.mark.parametrize("name_first", [False, True])
def test_any_adapter_name_saves_every_adapter_whole(name, name_first, tmp_path):
    """Names that are parts of the tensors' paths, which PEFT's filter of other adapters' keys would match."""
    names = [name, "default"] if name_first else ["default", name]
    model = get_peft_model(bert(), _config(), names[0])
    model.add_adapter(names[1], _config(construction="depth", factorization="cp"))
    outputs = {}
    for adapter in names:
        model.set_adapter(adapter)
        outputs[adapter] = _logits(model)
    model.save_pretrained(tmp_path)
    for adapter in names:
        folder = tmp_path if adapter == "default" else tmp_path / adapter
        bank = model.base_model.tenslora_tensors[adapter]
        assert len(_saved_state(folder)) == len(bank.state_dict())
        torch.testing.assert_close(_logits(PeftModel.from_pretrained(bert(), folder, adapter_name=adapter)),
                                   outputs[adapter], rtol=0, atol=0)


def test_the_saved_key_names_stay_those_of_earlier_versions(tmp_path):
    """Adapters saved before keep loading: the keys of a saved adapter are unchanged."""
    get_peft_model(bert(), _config()).save_pretrained(tmp_path)
    prefix = "base_model.tenslora_tensors.tensors.all."
    assert set(_saved_state(tmp_path)) == {prefix + key for key in
                                           ("core", "factors.in", "factors.out", "factors.qkv", "factors.depth")}


@pytest.fixture
def saved(tmp_path):
    model = get_peft_model(bert(), _config())
    model.save_pretrained(tmp_path / "adapter")
    return tmp_path / "adapter"


def _edit_weights(folder, edit) -> None:
    state = _saved_state(folder)
    edit(state)
    save_file(state, folder / WEIGHTS)


def _edit_config(folder, edit) -> None:
    config = json.loads((folder / CONFIG).read_text())
    edit(config)
    (folder / CONFIG).write_text(json.dumps(config))


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize(("edit_weights", "edit_config", "message"), [
    (lambda s: s.pop("base_model.tenslora_tensors.tensors.all.core"), None,
     r"missing tensors \['tensors.all.core'\], unexpected tensors \[\]"),
    (lambda s: s.update({"base_model.tenslora_tensors.tensors.all.factors.extra": torch.zeros(2)}), None,
     r"missing tensors \[\], unexpected tensors \['tensors.all.factors.extra'\]"),
    (None, lambda c: c.update(construction="depth"),
     r"\(construction 'depth', tucker, ranks 2\): missing tensors \['tensors.k.core', .*\(12 in all\), "
     r"unexpected tensors \['tensors.all.core'"),
])
def test_weights_that_do_not_match_their_config_are_refused(saved, edit_weights, edit_config, message,
                                                            low_cpu_mem_usage):
    if edit_weights:
        _edit_weights(saved, edit_weights)
    if edit_config:
        _edit_config(saved, edit_config)
    with pytest.raises(ValueError, match=f"The saved weights of adapter 'default' do not match its "
                                         f"adapter_config.json .*{message}"):
        PeftModel.from_pretrained(bert(), saved, low_cpu_mem_usage=low_cpu_mem_usage)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("geometry", "x", "`geometry` must be the sizes recorded when the adapter was attached"),
    ("geometry", {"hidden_size": "large", "attention_width": 32, "num_layers": 2, "roles": ["q"]},
     "`geometry.hidden_size` must be an integer, got 'large'"),
    ("geometry", {"hidden_size": 32, "attention_width": 32, "num_layers": 2, "roles": "q"},
     "`geometry.roles` must be the list of adapted roles"),
    ("target_modules", 5, "`target_modules` must be a module name or regex"),
    ("modules_to_save", 5, "`modules_to_save` must be a list of module names"),
    ("inference_mode", "x", "`inference_mode` must be true or false"),
    ("base_model_name_or_path", 5, "`base_model_name_or_path` must be a string"),
])
def test_a_tampered_config_file_is_named_with_its_field(saved, field, value, message):
    _edit_config(saved, lambda config: config.update({field: value}))
    with pytest.raises(ValueError, match=f"'{saved / CONFIG}' is not a valid TensLoRA adapter config: {message}"):
        PeftModel.from_pretrained(bert(), saved)


def test_a_corrupt_config_file_is_named(saved):
    """(PeftModel.from_pretrained reads the file's peft_type first, in PEFT: tenslora.load_adapter names it.)"""
    (saved / CONFIG).write_text('{"peft_type": "TENSLORA", "ranks": ')
    with pytest.raises(ValueError, match=f"'{saved / CONFIG}' is not a valid TensLoRA adapter config: Expecting value"):
        TensLoraConfig.from_pretrained(saved)


def test_a_recorded_size_written_as_a_string_still_loads(saved, tmp_path):
    expected = _logits(PeftModel.from_pretrained(bert(), saved))
    copy = shutil.copytree(saved, tmp_path / "copy")
    _edit_config(copy, lambda config: config["geometry"].update(hidden_size="32"))
    torch.testing.assert_close(_logits(PeftModel.from_pretrained(bert(), copy)), expected, rtol=0, atol=0)
