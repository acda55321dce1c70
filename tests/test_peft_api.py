"""TensLoRA through the PEFT API: the user snippet, save/load, several adapters, other models, errors."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from torch import nn

import tenslora
from tenslora import TensLoraConfig, TensLoraLayer
from tiny import ALL_MODELS, bert, gpt2, inputs, llama

TESTS = Path(__file__).parent


def _run_fresh(script: str) -> None:
    """Run ``script`` in a new interpreter (nothing registered but what it imports)."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(script)], check=True, cwd=TESTS)


def test_peft_type_is_a_real_enum_member():
    member = PeftType("TENSLORA")
    assert member is PeftType.TENSLORA and member.value == "TENSLORA" and member in list(PeftType)
    assert TensLoraConfig().peft_type is member


def test_user_snippet_save_load_in_fresh_process_and_merge(tmp_path, capsys):
    config = TensLoraConfig(construction="qkv_depth", factorization="tucker",
                            ranks={"in": 8, "out": 8, "qkv": 3, "depth": 2}, scaling=1.0, task_type="SEQ_CLS")
    model = get_peft_model(bert(), config)
    model.print_trainable_parameters()
    adapter = tenslora.count_parameters(config, model.config)
    head = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "modules_to_save" in n)
    assert f"trainable params: {adapter + head:,d}" in capsys.readouterr().out
    with torch.no_grad():  # train a little so that the adapter is not zero
        for parameter in model.base_model.tenslora_tensors.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    batch = inputs("bert")
    expected = model(**batch).logits
    model.save_pretrained(tmp_path / "out")
    saved = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert saved == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    torch.save(expected, tmp_path / "expected.pt")
    _run_fresh(f"""
        import torch, tenslora
        from peft import PeftModel
        from tiny import bert, inputs
        model = PeftModel.from_pretrained(bert(), {str(tmp_path / 'out')!r})
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        torch.testing.assert_close(model(**inputs("bert")).logits, expected, atol=0, rtol=0)
        merged = model.merge_and_unload()
        assert type(merged).__name__ == "BertForSequenceClassification"
        assert not any(isinstance(m, tenslora.TensLoraLayer) for m in merged.modules())
        torch.testing.assert_close(merged(**inputs("bert")).logits, expected, atol=1e-5, rtol=1e-5)
    """)


@pytest.mark.parametrize("model_name", sorted(ALL_MODELS))
def test_every_supported_architecture_round_trips(model_name, tmp_path):
    build = ALL_MODELS[model_name]
    construction = "att_qkv_depth" if model_name != "gpt2" else "qkv_depth"
    model = get_peft_model(build(), TensLoraConfig(construction=construction, ranks=2, init_weights=False,
                                                   roles=["q", "k", "v", "o"], task_type="SEQ_CLS"))
    with torch.no_grad():  # the classification head (RoBERTa's has two layers) is trained and saved too
        for name, parameter in model.named_parameters():
            if "modules_to_save" in name:
                parameter.add_(0.1)
    layers = [m for m in model.modules() if isinstance(m, TensLoraLayer)]
    assert len(layers) == (4 if model_name == "gpt2" else 8)  # gpt2: fused c_attn + c_proj per layer
    batch = inputs(model_name)
    expected = model(**batch).logits
    tenslora.save_adapter(model, tmp_path / "adapter")
    loaded = tenslora.load_adapter(build(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(**batch).logits, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded.merge_and_unload()(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_lora_preset_computes_what_peft_lora_computes():
    rank, alpha = 4, 8
    peft_lora = get_peft_model(bert(), LoraConfig(r=rank, lora_alpha=alpha, target_modules=["query", "key", "value"],
                                                  init_lora_weights=False))
    ours = get_peft_model(bert(), TensLoraConfig(construction="lora", ranks=rank, scaling=alpha / rank))
    bank = ours.base_model.tenslora_tensors["default"]
    with torch.no_grad():
        for name, module in peft_lora.named_modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                layer = int(name.split(".layer.")[1].split(".")[0])
                role = {"query": "q", "key": "k", "value": "v"}[name.rsplit(".", 1)[1]]
                tensor = bank.tensors[f"{role}_layer{layer}"]
                tensor.factors["in"].copy_(module.lora_A["default"].weight.T)
                tensor.factors["out"].copy_(module.lora_B["default"].weight)
    batch = inputs("bert")
    torch.testing.assert_close(ours(**batch).logits, peft_lora(**batch).logits, atol=1e-6, rtol=0)
    assert sum(p.numel() for p in bank.parameters()) == \
        sum(p.numel() for n, p in peft_lora.named_parameters() if "lora_" in n)


def test_several_adapters_add_set_delete():
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2, init_weights=False), "first")
    model.add_adapter("second", TensLoraConfig(construction="att_depth", ranks=2, init_weights=False))
    banks = model.base_model.tenslora_tensors
    batch = inputs("bert")
    first = model(**batch).logits
    assert all(p.requires_grad for p in banks["first"].parameters())
    assert not any(p.requires_grad for p in banks["second"].parameters())
    model.set_adapter("second")
    second = model(**batch).logits
    assert not torch.allclose(first, second)
    assert not any(p.requires_grad for p in banks["first"].parameters())
    assert all(p.requires_grad for p in banks["second"].parameters())
    model.base_model.set_adapter(["first", "second"])  # both active: their updates add up in every layer
    query = model.base_model.model.bert.encoder.layer[1].attention.self.query
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        both = query(x) - query.base_layer(x)
        separately = sum(query._adapter_output(name, x) for name in ("first", "second"))
    torch.testing.assert_close(both, separately, atol=1e-6, rtol=0)
    model.set_adapter("first")
    model.delete_adapter("second")
    assert list(banks) == ["first"]
    torch.testing.assert_close(model(**batch).logits, first, atol=1e-6, rtol=0)


def test_save_and_load_a_second_adapter(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2, init_weights=False))
    model.save_pretrained(tmp_path / "a")
    expected = model(**inputs("bert")).logits
    other = get_peft_model(bert(), TensLoraConfig(construction="att", ranks=2, init_weights=False), "other")
    other.load_adapter(str(tmp_path / "a"), adapter_name="loaded")
    other.set_adapter("loaded")
    torch.testing.assert_close(other(**inputs("bert")).logits, expected, atol=1e-6, rtol=0)


def test_half_precision_base_keeps_fp32_factors_and_merges_through_fp32():
    base = llama().to(torch.bfloat16)
    model = get_peft_model(base, TensLoraConfig(construction="att_qkv_depth", ranks=2, init_weights=False))
    bank = model.base_model.tenslora_tensors["default"]
    assert all(p.dtype == torch.float32 for p in bank.parameters())
    batch = inputs("llama")
    logits = model(**batch).logits
    assert logits.dtype == torch.bfloat16
    loss = logits.float().sum()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in bank.parameters())
    with torch.no_grad():
        merged = model.merge_and_unload()(**batch).logits
    torch.testing.assert_close(merged, logits.detach(), atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize(("base_dtype", "autocast", "factors"), [
    (torch.float64, True, torch.float64),  # PEFT raises half precision only
    (torch.bfloat16, True, torch.float32),
    (torch.bfloat16, False, torch.bfloat16),
])
def test_factors_take_the_adapted_weights_dtype_as_lora_does(base_dtype, autocast, factors):
    base = llama().to(base_dtype)
    base.model.embed_tokens.float()  # the first parameter is not what the factors follow: the adapted weights are
    model = get_peft_model(base, TensLoraConfig(construction="qkv_depth", ranks=2), autocast_adapter_dtype=autocast)
    lora = get_peft_model(llama().to(base_dtype), LoraConfig(r=2, target_modules=["q_proj"]),
                          autocast_adapter_dtype=autocast)
    assert lora.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == factors
    assert {p.dtype for p in model.base_model.tenslora_tensors["default"].parameters()} == {factors}


def test_gqa_key_value_updates_use_their_heads_only():
    model = get_peft_model(llama(), TensLoraConfig(construction="att_qkv", ranks=2, init_weights=False))
    k_proj = model.base_model.model.model.layers[0].self_attn.k_proj
    assert k_proj.get_delta_weight("default").shape == (16, 32)  # 2 kv heads x 8, not 4 x 8


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.wq, self.wk, self.wv = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x):
        return x + self.wq(x) * self.wk(x) + self.wv(x)


class _Custom(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.blocks = nn.ModuleList([_Block(), _Block()])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_custom_model_through_role_patterns():
    config = {"model_type": "mine", "hidden_size": 8, "num_hidden_layers": 2}
    model = get_peft_model(_Custom(config), TensLoraConfig(
        construction="qkv_depth", ranks=2, role_patterns={"q": r"wq", "k": r"wk", "v": r"wv"}, init_weights=False))
    assert sum(isinstance(m, TensLoraLayer) for m in model.modules()) == 6
    assert model(torch.randn(3, 8)).shape == (3, 8)
    with pytest.raises(ValueError, match="has no head information"):
        get_peft_model(_Custom(config), TensLoraConfig(construction="att", role_patterns={"q": "wq", "k": "wk",
                                                                                          "v": "wv"}))
    model = get_peft_model(_Custom(config), TensLoraConfig(construction="att", num_heads=2,
                                                           role_patterns={"q": "wq", "k": "wk", "v": "wv"}))
    assert model(torch.randn(3, 8)).shape == (3, 8)


def test_unknown_architecture_and_no_targets_are_explained():
    config = {"model_type": "mine", "hidden_size": 8, "num_hidden_layers": 2}
    with pytest.raises(ValueError, match="does not know where the attention projections of model type 'mine'"):
        get_peft_model(_Custom(config), TensLoraConfig(construction="qkv"))
    with pytest.raises(ValueError, match="No attention projection for roles"):
        get_peft_model(_Custom(config), TensLoraConfig(construction="qkv", role_patterns={"q": "x", "k": "y",
                                                                                          "v": "z"}))


def test_adapter_for_another_model_is_refused(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2))
    tenslora.save_adapter(model, tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"built for a different model: num_layers 2 \(adapter\) vs 3 \(model\)"):
        tenslora.load_adapter(bert(layers=3), tmp_path / "adapter")
    with pytest.raises(ValueError, match=r"hidden_size 32 \(adapter\) vs 48 \(model\)"):
        PeftModel.from_pretrained(bert(hidden=48), str(tmp_path / "adapter"))


def test_bad_adapter_folders_are_refused(tmp_path):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2))
    folder = tenslora.save_adapter(model, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        tenslora.load_adapter(bert(), folder)
    weights.unlink()
    (folder / "adapter_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="pickle file, which TensLoRA does not load"):
        tenslora.load_adapter(bert(), folder)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    with pytest.raises(ValueError, match="holds a LORA adapter"):
        tenslora.load_adapter(bert(), folder)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="is corrupt"):
        tenslora.load_adapter(bert(), folder)
    with pytest.raises(ValueError, match="No adapter_config.json"):
        tenslora.load_adapter(bert(), tmp_path / "missing")


def test_save_is_atomic(tmp_path, monkeypatch):
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv", ranks=2))
    folder = tenslora.save_adapter(model, tmp_path / "adapter")
    before = (folder / "adapter_model.safetensors").read_bytes()

    def crash(self, directory, **kwargs):
        Path(directory, "adapter_model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(PeftModel, "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        tenslora.save_adapter(model, folder)
    assert (folder / "adapter_model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_gpt2_fused_projection_partial_roles():
    """Adapting q and v of a fused c_attn leaves the k third of its output untouched."""
    model = get_peft_model(gpt2(), TensLoraConfig(construction="qkv", ranks=2, roles=["q", "v"], init_weights=False))
    c_attn = model.base_model.model.transformer.h[0].attn.c_attn
    delta = c_attn.get_delta_weight("default")  # Conv1D layout: (in, out)
    assert delta.shape == (32, 96)
    assert torch.count_nonzero(delta[:, 32:64]) == 0
    assert torch.count_nonzero(delta[:, :32]) and torch.count_nonzero(delta[:, 64:])


def test_shared_input_projection_is_reused_only_when_valid():
    """q, k, v share x @ U_in in the qkv constructions; another input, factor, grad mode or pass recomputes it."""
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2, init_weights=False))
    bank = model.base_model.tenslora_tensors["default"]
    q, k, v = (bank.addresses(role, 0)[0] for role in ("q", "k", "v"))
    x = torch.randn(2, 5, 32)
    first = bank.project(q, x)
    assert bank.project(k, x) is first
    assert bank.project(v, x.clone()) is not first
    assert bank.project(q, x) is not first  # q again: a new pass, though no hook said so
    with torch.no_grad():
        bank.tensors["all"].factors["in"].mul_(2.0)  # as an optimizer step would
    second = bank.project(k, x)
    assert second is not first
    torch.testing.assert_close(second, x @ bank.tensors["all"].factors["in"])
    with torch.no_grad():
        assert bank.project(v, x) is not second
    model(**inputs("bert"))
    assert not bank._projections  # nothing outlives a forward pass
    merged = model.merge_and_unload()
    assert not merged._forward_pre_hooks and not merged._forward_hooks  # the plain model keeps no TensLoRA hook


def test_layer_status_names_each_layers_adapters():
    """PEFT's ``get_layer_status`` lists the adapters of every adapted layer, as for LoRA (the tensors are shared on
    the tuner, so its per-layer ``requires_grad`` and ``devices`` stay empty)."""
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2))
    model.add_adapter("second", TensLoraConfig(construction="att", ranks=2, roles=["q"]))
    status = {layer.name.split("model.", 1)[1]: layer for layer in model.get_layer_status()}
    assert status["bert.encoder.layer.0.attention.self.query"].available_adapters == ["default", "second"]
    assert status["bert.encoder.layer.1.attention.self.value"].available_adapters == ["default"]
    assert all(layer.active_adapters == ["default"] for layer in status.values())


def test_passes_through_an_inner_module_compute_afresh():
    """Calls into the encoder itself (a custom head, a fused-loss trainer) are passes the model's hooks do not
    see: each one backpropagates on its own, and sees weights changed through ``.data`` in between."""
    model = get_peft_model(bert(), TensLoraConfig(construction="qkv_depth", ranks=2, init_weights=False))
    encoder, batch = model.base_model.model.bert, inputs("bert")
    tensors = [p for n, p in model.named_parameters() if "tenslora_tensors" in n]
    encoder(**batch).last_hidden_state.sum().backward()
    once = [p.grad.clone() for p in tensors]
    encoder(**batch).last_hidden_state.sum().backward()  # reached into the first pass's freed graph before
    for accumulated, single in zip((p.grad for p in tensors), once, strict=True):
        torch.testing.assert_close(accumulated, 2 * single)
    with torch.no_grad():
        before = encoder(**batch).last_hidden_state  # shares its products in the mode of the pass below
        for parameter in tensors:
            parameter.data.mul_(3.0)  # no version bump, as an EMA or an optimizer writing .data
        inner = encoder(**batch).last_hidden_state
        model(**batch)  # a top-level pass: its hooks clear what was shared
        fresh = encoder(**batch).last_hidden_state
    assert not torch.allclose(before, fresh, atol=1e-4)
    torch.testing.assert_close(inner, fresh)


@pytest.mark.parametrize("construction", ["qkv_depth", "att_qkv", "depth"])
def test_gradient_checkpointing_gives_the_same_gradients(construction):
    def gradients(checkpointing: bool) -> dict:
        model = get_peft_model(bert(), TensLoraConfig(construction=construction, ranks=2, init_weights=False))
        if checkpointing:
            model.base_model.model.activation_checkpointing_enable()
        model.train()
        model.base_model.model.config.hidden_dropout_prob = 0.0
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
        model(**inputs("bert"), labels=torch.tensor([0, 1])).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None and "tensors" in n}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
