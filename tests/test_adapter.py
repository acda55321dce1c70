"""Every construction x factorization on tiny BERT, ViT and LLaMA (grouped-query attention)."""

import re

import pytest
import torch
from peft import get_peft_model

import tenslora
from dense import expected_update, role_widths
from tenslora import TensLoraConfig, TensLoraLayer
from tiny import MODELS, inputs

COMBINATIONS = [(c, f) for c in sorted(tenslora.CONSTRUCTIONS) for f in ("tucker", "cp")]
# Role of a module from its name, written independently of the library's pattern table.
ROLE_OF_NAME = {"query": "q", "key": "k", "value": "v", "q_proj": "q", "k_proj": "k", "v_proj": "v",
                "o_proj": "o", "attention.output.dense": "o"}
ROLES = ["q", "k", "v", "o"]


def _role(name: str) -> str:
    return next(role for suffix, role in ROLE_OF_NAME.items() if name.endswith(suffix))


def _layer(name: str) -> int:
    return int(re.search(r"\.(\d+)\.", name).group(1))


def _config(construction, factorization, **kwargs):
    ranks = 3 if factorization == "cp" else {"in": 3, "out": 4, "head_dim": 2, "heads": 3, "qkv": 2, "depth": 2}
    if isinstance(ranks, dict):
        ranks = {m: ranks[m] for m in tenslora.CONSTRUCTIONS[construction].modes}
    return TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks, roles=ROLES,
                          scaling=0.5, **kwargs)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize(("construction", "factorization"), COMBINATIONS)
def test_adapter_matches_dense_oracle_and_merges(model_name, construction, factorization):
    base = MODELS[model_name]()
    batch = inputs(model_name)
    reference = base(**batch).logits
    model = get_peft_model(base, _config(construction, factorization, init_weights=False))
    bank = model.base_model.tenslora_tensors["default"]
    geometry, widths = bank.geometry, role_widths(base.config)
    adapted = {n: m for n, m in model.named_modules() if isinstance(m, TensLoraLayer)}
    assert sorted({_role(n) for n in adapted}) == sorted(ROLES) and len(adapted) == 4 * geometry.num_layers
    deltas = {}
    for name, layer in adapted.items():
        expected = 0.5 * expected_update(bank, construction, ROLES, _role(name), _layer(name), widths,
                                         geometry.num_layers)
        deltas[name] = expected
        torch.testing.assert_close(layer.get_delta_weight("default"), expected, atol=1e-5, rtol=1e-4)
        x = torch.randn(2, 5, layer.in_features)
        with torch.no_grad():
            torch.testing.assert_close(layer(x) - layer.base_layer(x), x @ expected.T, atol=1e-5, rtol=1e-4)
    assert tenslora.count_parameters(model.peft_config["default"], base.config) == \
        sum(p.numel() for p in bank.parameters())

    with torch.no_grad():
        adapted_logits = model(**batch).logits
        assert (adapted_logits - reference).abs().max() > 1e-6
        base_weights = {n: m.base_layer.weight.clone() for n, m in adapted.items()}
        model.merge_adapter()
        for name, layer in adapted.items():  # the update itself, which may move these tiny logits very little
            torch.testing.assert_close(layer.base_layer.weight, base_weights[name] + deltas[name], atol=1e-5,
                                       rtol=1e-4)
        torch.testing.assert_close(model(**batch).logits, adapted_logits, atol=1e-5, rtol=1e-5)
        model.unmerge_adapter()
        for name, layer in adapted.items():
            torch.testing.assert_close(layer.base_layer.weight, base_weights[name], atol=1e-6, rtol=0)
        with model.disable_adapter():
            torch.testing.assert_close(model(**batch).logits, reference, atol=1e-6, rtol=0)
        merged = model.merge_and_unload()
        assert not any(isinstance(m, TensLoraLayer) for m in merged.modules())
        merged_modules = dict(merged.named_modules())
        for name in adapted:
            torch.testing.assert_close(merged_modules[name.removeprefix("base_model.model.")].weight,
                                       base_weights[name] + deltas[name], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(merged(**batch).logits, adapted_logits, atol=1e-5, rtol=1e-5)


def test_unload_returns_the_untouched_base_model():
    base = MODELS["llama"]()
    batch = inputs("llama")
    with torch.no_grad():
        reference = base(**batch).logits
        model = get_peft_model(base, _config("att_qkv_depth", "tucker", init_weights=False))
        unloaded = model.unload()
        assert not any(isinstance(m, TensLoraLayer) for m in unloaded.modules())
        torch.testing.assert_close(unloaded(**batch).logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize(("construction", "factorization"), COMBINATIONS)
def test_init_is_the_base_model_and_training_moves_only_adapter_and_head(model_name, construction, factorization):
    base = MODELS[model_name]()
    batch = inputs(model_name, batch=8)
    labels = torch.arange(8) % 3
    with torch.no_grad():
        reference = base(**batch).logits
    torch.manual_seed(0)
    model = get_peft_model(base, _config(construction, factorization, task_type="SEQ_CLS"))
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, reference, atol=1e-6, rtol=0)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("tenslora_tensors" in n or "modules_to_save" in n for n in trainable)
    bank = model.base_model.tenslora_tensors["default"]
    initial = {n: p.detach().clone() for n, p in bank.named_parameters()}
    model.train()
    # no weight decay: it would move every factor even without a gradient
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
        optimizer.zero_grad()
        loss.backward()
        if not losses:
            with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
            assert with_grad <= trainable
            assert any("tenslora_tensors" in n and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
                       if n in with_grad)
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    unmoved = [n for n, p in bank.named_parameters() if torch.equal(p, initial[n])]
    assert not unmoved, f"adapter tensors that training left as initialized: {unmoved}"
