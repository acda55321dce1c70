"""Each preset has the parametrization of the method it reproduces (on a real model)."""

import torch
from peft import LoraConfig, get_peft_model

import tenslora
from tenslora import TensLoraConfig
from tenslora.app.options import TrainOptions, adapter_config
from tiny import bert, llama


def _delta(model, layer: int, role: str) -> torch.Tensor:
    attention = model.base_model.model.bert.encoder.layer[layer].attention.self
    return getattr(attention, {"q": "query", "k": "key", "v": "value"}[role]).get_delta_weight("default")


def test_lotr_is_shared_factors_with_a_free_core_per_layer():
    """LoTR: Delta W_l = U_out C_l U_in^T with U_in, U_out shared across layers and C_l any r x r matrix."""
    model = get_peft_model(bert(), TensLoraConfig(construction="lotr", ranks=3))
    tensor = model.base_model.tenslora_tensors["default"].tensors["q"]
    assert tensor.core.shape == (3, 3, 2) and tensor.factors["depth"].shape == (2, 2)
    cores = torch.randn(2, 3, 3)
    with torch.no_grad():
        tensor.factors["depth"].copy_(torch.eye(2))
        tensor.core.copy_(cores.permute(1, 2, 0))
    for layer in range(2):
        expected = tensor.factors["out"] @ cores[layer].T @ tensor.factors["in"].T
        torch.testing.assert_close(_delta(model, layer, "q"), expected, atol=1e-5, rtol=1e-5)


def test_fact_tt_has_a_free_core_per_projection_and_layer():
    model = get_peft_model(bert(), TensLoraConfig(construction="fact_tt", ranks=3))
    tensor = model.base_model.tenslora_tensors["default"].tensors["all"]
    assert tensor.core.shape == (3, 3, 3, 2)  # r, r, n_roles, L
    cores = torch.randn(3, 2, 3, 3)  # (role, layer, r_in, r_out)
    with torch.no_grad():
        tensor.factors["qkv"].copy_(torch.eye(3))
        tensor.factors["depth"].copy_(torch.eye(2))
        tensor.core.copy_(cores.permute(2, 3, 0, 1))
    for p, role in enumerate("qkv"):
        for layer in range(2):
            expected = tensor.factors["out"] @ cores[p, layer].T @ tensor.factors["in"].T
            torch.testing.assert_close(_delta(model, layer, role), expected, atol=1e-5, rtol=1e-5)


def test_lorta_is_a_five_way_cp_over_heads_projection_and_depth():
    """LoRTA: Delta W_{p,l}[h*d_h + j, i] = sum_r A[i,r] D[j,r] H[h,r] P[p,r] L[l,r]."""
    model = get_peft_model(llama(), TensLoraConfig(construction="lorta", ranks=4))
    tensor = model.base_model.tenslora_tensors["default"].tensors["all"]
    with torch.no_grad():
        for factor in tensor.factors.values():
            factor.normal_()
    f = tensor.factors
    for p, role in enumerate(("q", "k", "v")):
        attention = model.base_model.model.model.layers[1].self_attn
        delta = getattr(attention, f"{role}_proj").get_delta_weight("default")
        heads = 4 if role == "q" else 2  # grouped-query attention: k and v have 2 heads
        expected = torch.einsum("ir,jr,hr,r,r->hji", f["in"], f["head_dim"], f["heads"][:heads], f["qkv"][p],
                                f["depth"][1]).reshape(heads * 8, 32)
        torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4)


def test_lotr_keeps_its_full_depth_on_every_budget_path():
    """LoTR's rule (depth full, only in and out move) under a budget: match_budget, the command line's config,
    compress_adapter and from_lora. On 4 layers, q, k, v: a tensor per role of 32 r + 32 r + 4 * 4 + 4 r^2
    parameters, 480 at r = 2; a common rank (depth 2 too) would give 432."""
    base, budget, lotr = bert(layers=4), 480, {"in": 2, "out": 2, "depth": "full"}
    assert tenslora.match_budget("lotr", "tucker", budget, base.config) == lotr
    assert adapter_config(TrainOptions(construction="lotr", budget=str(budget)), base.config, "SEQ_CLS").ranks == lotr

    torch.manual_seed(0)
    model = get_peft_model(bert(layers=4), TensLoraConfig(construction="lotr", ranks=4, init_weights=False))
    report = tenslora.compress_adapter(model, budget=budget)
    assert report.ranks_after == {"in": 2, "out": 2, "depth": 4} and report.parameters_after == budget
    assert model.peft_config["default"].ranks == lotr  # kept for the next compression too

    torch.manual_seed(0)
    lora = get_peft_model(bert(layers=4), LoraConfig(r=2, target_modules=["query", "key", "value"],
                                                     init_lora_weights=False))
    fitted, report = tenslora.from_lora(lora, "lotr", budget=budget)
    assert fitted.peft_config["default"].ranks == lotr and report.ranks_after == {"in": 2, "out": 2, "depth": 4}
