"""The generic contract PEFT holds every method to (in the spirit of PEFT's own common tests), on TensLoRA:
save/load (also with low_cpu_mem_usage), merging, unmerging, unloading, disabling, several adapters, training,
gradient checkpointing, inference_mode and generation, over the supported architectures. Where PEFT leaves the
behaviour to the method, it is compared with what PEFT's LoRA does on the same model."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from tenslora import TensLoraConfig, TensLoraLayer
from tiny import bart, bert, distilbert, gemma, gpt2, inputs, llama, mistral, qwen2, roberta
from tiny_llm import llama_causal_lm

BART_ENCODER = {role: rf"encoder\.layers\.\d+\.self_attn\.{name}"
                for role, name in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj"))}

#: Every architecture, with Tucker, CP and presets, and the output projection (o) adapted in several.
CASES = {
    "llama-gqa-tucker-o": (llama, dict(construction="qkv_depth", ranks=3, roles="q,k,v,o")),
    "gpt2-fused-cp-o": (gpt2, dict(construction="qkv_depth", factorization="cp", ranks=4, roles="q,k,v,o")),
    "mistral-lorta": (mistral, dict(construction="lorta", ranks=4)),
    "qwen2-att-tucker": (qwen2, dict(construction="att_qkv_depth", ranks=2)),
    "gemma-att-depth-cp": (gemma, dict(construction="att_depth", factorization="cp", ranks=3, roles="q,v,o")),
    "bert-tucker-o": (bert, dict(construction="qkv_depth", ranks=4, roles="q,k,v,o")),
    "roberta-lora": (roberta, dict(construction="lora", ranks=4)),
    "distilbert-depth-o": (distilbert, dict(construction="depth", ranks=3, roles="q,v,o")),
    "bart-encoder-patterns": (bart, dict(construction="qkv_depth", ranks=3, roles="q,k,v,o",
                                         role_patterns=BART_ENCODER)),
}


def _config(case: str, **changes) -> TensLoraConfig:
    build, options = CASES[case]
    task = None if build is bart else "SEQ_CLS"
    return TensLoraConfig(**{**options, "init_weights": False, "task_type": task, **changes})


def _peft_model(case: str, **changes) -> PeftModel:
    torch.manual_seed(0)
    return get_peft_model(CASES[case][0](), _config(case, **changes))


def _batch(case: str) -> dict[str, torch.Tensor]:
    return inputs(CASES[case][0].__name__)


def _output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    result = model(**batch)
    return result.logits if hasattr(result, "logits") else result.last_hidden_state


def _loss(output: torch.Tensor) -> torch.Tensor:
    """A loss that every output feature moves (a mean square would not: LayerNorm fixes it for BART's output)."""
    return (output.float() * torch.randn(output.shape, generator=torch.Generator().manual_seed(2))).sum()


def _base_output(case: str) -> torch.Tensor:
    with torch.no_grad():
        return _output(CASES[case][0](), _batch(case))


def _close(actual: torch.Tensor, expected: torch.Tensor, exact: bool = False) -> None:
    tolerance = 0 if exact else 1e-5
    torch.testing.assert_close(actual, expected, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
@pytest.mark.parametrize("case", CASES)
def test_save_and_load_round_trip(case, low_cpu_mem_usage, tmp_path):
    model = _peft_model(case)
    with torch.no_grad():
        expected = _output(model, _batch(case))
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(CASES[case][0](), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage)
    assert not any(p.is_meta for p in loaded.parameters())
    assert not any(p.requires_grad for p in loaded.parameters())  # loaded for inference, as PEFT does
    with torch.no_grad():
        _close(_output(loaded, _batch(case)), expected, exact=True)
    again = PeftModel.from_pretrained(CASES[case][0](), str(tmp_path), low_cpu_mem_usage=low_cpu_mem_usage,
                                      is_trainable=True)
    assert all(p.requires_grad for p in again.base_model.tenslora_tensors.parameters())


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_disable_unload(case):
    model = _peft_model(case)
    batch, base = _batch(case), _base_output(case)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        adapted = _output(model, batch)
        assert not torch.allclose(adapted, base, atol=1e-4)
        with model.disable_adapter():
            _close(_output(model, batch), base)
        model.merge_adapter(safe_merge=True)
        _close(_output(model, batch), adapted)
        model.unmerge_adapter()
        _close(_output(model, batch), adapted)
        for name, parameter in model.named_parameters():
            if name in weights:
                _close(parameter, weights[name])
        merged = model.merge_and_unload(safe_merge=True)
        assert not any(isinstance(m, TensLoraLayer) for m in merged.modules())
        _close(_output(merged, batch), adapted)
        assert model.merge_and_unload() is merged  # a second call finds nothing left to merge, as with LoRA
        plain = _peft_model(case)
        unloaded = plain.unload()
        _close(_output(unloaded, batch), base)
        assert plain.unload() is unloaded


@pytest.mark.parametrize("case", CASES)
def test_training_step_changes_only_the_adapter(case):
    model = _peft_model(case)
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    banks = {n for n in trainable if "tenslora_tensors.default." in n}
    assert banks and all("tenslora_tensors.default." in n or "modules_to_save.default." in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    _loss(_output(model, _batch(case))).backward()
    optimizer.step()
    now = dict(model.named_parameters())
    assert all(not torch.equal(now[n], trainable[n]) for n in banks)
    assert all(torch.equal(now[n], value) for n, value in frozen.items())


@pytest.mark.parametrize("case", CASES)
def test_gradient_checkpointing_gives_the_same_gradients(case):
    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = _peft_model(case)
        if checkpointing:
            model.get_base_model().activation_checkpointing_enable({"use_reentrant": False})
        model.train()
        torch.manual_seed(1)  # the same dropout masks in both runs (recomputation replays the RNG state)
        _loss(_output(model, _batch(case))).backward()
        return {n: p.grad for n, p in model.base_model.tenslora_tensors.named_parameters()}

    plain, checkpointed = gradients(False), gradients(True)
    for name, gradient in plain.items():
        _close(checkpointed[name], gradient)


@pytest.mark.parametrize("case", CASES)
def test_inference_mode_forward_equals_no_grad(case):
    model = _peft_model(case)
    with torch.no_grad():
        expected = _output(model, _batch(case))
    with torch.inference_mode():
        _close(_output(model, _batch(case)), expected, exact=True)
        model.merge_adapter()
        _close(_output(model, _batch(case)), expected)
        model.unmerge_adapter()


def _trainable_adapters(model: PeftModel) -> set[str]:
    return {name for name in model.peft_config
            if any(p.requires_grad for n, p in model.named_parameters() if f".{name}." in n)}


def _adapter_life(config, other_config, folder) -> list[tuple[list[str], set[str]]]:
    """Active and trainable adapters after each step of a typical multi-adapter session."""
    torch.manual_seed(0)
    model = get_peft_model(bert(), config, "first")
    states = []

    def record() -> None:
        states.append((list(model.active_adapters), _trainable_adapters(model)))

    model.add_adapter("second", other_config)
    record()
    model.load_adapter(str(folder), adapter_name="third", is_trainable=False)  # e.g. a reference adapter
    record()
    model.set_adapter("second")
    record()
    with pytest.warns(UserWarning, match="Adapter second was active which is now deleted"):
        model.delete_adapter("second")  # the active one: the first remaining becomes active (and trainable)
    record()
    model.load_adapter(str(folder), adapter_name="fourth", is_trainable=True)
    record()
    model.delete_adapter("third")
    record()
    return states


def test_multiple_adapters_behave_as_lora_adapters(tmp_path):
    lora = LoraConfig(r=2, target_modules=["query", "value"])
    get_peft_model(bert(), lora).save_pretrained(tmp_path / "lora")
    ours = TensLoraConfig(construction="qkv_depth", ranks=2, init_weights=False)
    get_peft_model(bert(), ours).save_pretrained(tmp_path / "ours")
    expected = _adapter_life(lora, LoraConfig(r=4, target_modules=["query", "value"]), tmp_path / "lora")
    assert expected[1] == (["first"], {"first"}) and expected[3] == (["first"], {"first"})  # what LoRA does
    assert _adapter_life(ours, TensLoraConfig(construction="att", ranks=2), tmp_path / "ours") == expected


def test_adapters_compute_their_own_updates_after_adding_setting_and_deleting():
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2, init_weights=False), "first")
    batch = inputs("bert")
    with torch.no_grad():
        first = _output(model, batch)
        model.add_adapter("second", TensLoraConfig(construction="att_depth", factorization="cp", ranks=2,
                                                   init_weights=False))
        _close(_output(model, batch), first)
        model.set_adapter("second")
        second = _output(model, batch)
        assert not torch.allclose(first, second)
        with pytest.warns(UserWarning, match="Setting active adapter to first"):
            model.delete_adapter("second")
        assert model.active_adapters == ["first"]
        _close(_output(model, batch), first)


def test_each_saved_adapter_is_complete_next_to_others(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2, init_weights=False))
    for name in ("default2", "q_adapter", "layer"):
        model.add_adapter(name, TensLoraConfig(construction="qkv_depth", ranks=2, init_weights=False))
    batch, outputs = inputs("bert"), {}
    with torch.no_grad():
        for name in model.peft_config:
            model.set_adapter(name)
            outputs[name] = _output(model, batch)
    model.save_pretrained(tmp_path)
    for name, expected in outputs.items():
        folder = tmp_path if name == "default" else tmp_path / name
        loaded = PeftModel.from_pretrained(bert(), str(folder))
        with torch.no_grad():
            _close(_output(loaded, batch), expected, exact=True)


def test_two_modules_in_one_role_and_layer_are_refused():
    patterns = {role: pattern.replace(r"encoder\.layers\.\d+\.", "") for role, pattern in BART_ENCODER.items()}
    with pytest.raises(ValueError, match=r"Modules 'encoder\.layers\.0\.self_attn\.([qv])_proj' and "
                                         r"'decoder\.layers\.0\.self_attn\.\1_proj' are both role '\1' of layer 0"):
        get_peft_model(bart(), TensLoraConfig(role_patterns=patterns, roles="q,v"))
    get_peft_model(bart(), TensLoraConfig(role_patterns=patterns, roles="q,v", exclude_modules=r".*decoder.*"))


@pytest.mark.parametrize("config", [LoraConfig(r=2, target_modules=["query"], bias="all"),
                                    TensLoraConfig(construction="qkv", ranks=2, bias="all")])
def test_only_one_adapter_may_train_biases_as_with_lora(config):
    model = get_peft_model(bert(), config)
    with pytest.raises(ValueError, match="supports only 1 adapter with bias"):
        model.add_adapter("other", config)
    with pytest.warns(UserWarning, match="disabling adapter layers with bias"):
        model.disable_adapter_layers()


def test_generation_with_the_adapter_and_after_merging():
    torch.manual_seed(0)
    model = get_peft_model(llama_causal_lm(), TensLoraConfig(construction="qkv_depth", ranks=3, roles="q,k,v,o",
                                                             init_weights=False, task_type="CAUSAL_LM"))
    prompt = torch.tensor([[1, 5, 6, 7, 8]])
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        adapted = model.generate(input_ids=prompt, **settings)
        with model.disable_adapter():
            base = model.generate(input_ids=prompt, **settings)
        base_logits = llama_causal_lm()(input_ids=prompt).logits
        assert not torch.allclose(model(input_ids=prompt).logits, base_logits, atol=1e-4)
        model.merge_adapter()
        assert torch.equal(model.generate(input_ids=prompt, **settings), adapted)
        model.unmerge_adapter()
        assert torch.equal(model.generate(input_ids=prompt, **settings), adapted)
        with model.disable_adapter():
            assert torch.equal(model.generate(input_ids=prompt, **settings), base)
        assert torch.equal(llama_causal_lm().generate(input_ids=prompt, **settings), base)
        assert torch.equal(model.merge_and_unload().generate(input_ids=prompt, **settings), adapted)
    assert adapted.shape == (1, 11) and not torch.equal(adapted, base)
