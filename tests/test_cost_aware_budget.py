"""The cost-aware budget choice: the rank that sets the cost per token capped, the budget spent elsewhere."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

import tenslora
from tenslora.app.cli import main
from tenslora.app.options import TrainOptions, adapter_config

#: SmolLM2-135M's shape (LLaMA: 30 layers, hidden 576, 9 heads over 3 key/value heads, MLP 1536).
SMOLLM2 = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      intermediate_size=1536, vocab_size=49152)


def _count(construction: str, factorization: str, ranks) -> int:
    config = tenslora.TensLoraConfig(construction=construction, factorization=factorization, ranks=ranks,
                                     roles="all-linear")
    return tenslora.count_parameters(config, SMOLLM2)


@pytest.mark.parametrize("rank", [1, 8])
def test_tucker_keeps_lora_s_cost_per_token_and_spends_the_budget_on_the_core(rank):
    """At LoRA rank r's all-linear budget the plain solver gives qkv_depth a large in rank (100 at r = 8); capped at
    r, the in rank is r in both families and the count still lands on the budget."""
    budget = tenslora.lora_parameter_count(rank, SMOLLM2, "all-linear")
    plain = tenslora.match_budget("qkv_depth", "tucker", budget, SMOLLM2, roles="all-linear")
    capped = tenslora.match_budget("qkv_depth", "tucker", budget, SMOLLM2, roles="all-linear", max_input_rank=rank)
    assert all(plain[family]["in"] > rank for family in plain)
    assert all(capped[family]["in"] == rank for family in capped)
    assert all(capped[family]["out"] > plain[family]["out"] for family in capped)
    assert abs(_count("qkv_depth", "tucker", capped) - budget) <= 0.01 * budget


def test_cp_and_tt_cap_what_sets_their_cost_per_token():
    budget = tenslora.lora_parameter_count(8, SMOLLM2, "all-linear")
    assert tenslora.match_budget("lorta", "cp", budget, SMOLLM2, roles="all-linear", max_input_rank=8) == 8
    ranks = tenslora.match_budget("qkv_depth", "tt", budget // 10, SMOLLM2, roles="all-linear", max_input_rank=4)
    assert all(family["in-out"] == 4 and family["out-qkv"] > 4 for family in ranks.values())


@pytest.mark.parametrize("factorization", ["tucker", "cp"])
@pytest.mark.parametrize("max_input_rank", [0, -1, "8", 2.5, True])
def test_a_max_input_rank_that_is_no_rank_is_named(factorization, max_input_rank):
    with pytest.raises(ValueError, match=f"`max_input_rank` must be a positive integer .*got {max_input_rank!r}"):
        tenslora.match_budget("qkv_depth", factorization, 30_000, SMOLLM2, roles="all-linear",
                              max_input_rank=max_input_rank)


def test_the_train_option_needs_a_budget_and_reaches_the_ranks(tmp_path, capsys):
    with pytest.raises(ValueError, match="--max-input-rank bounds the ranks --budget chooses"):
        TrainOptions(max_input_rank=8)
    assert "max_input_rank" not in TrainOptions().identity()  # runs recorded before it keep their identity
    options = TrainOptions(task="causal-lm", budget="lora:8", max_input_rank=2)
    assert options.identity()["max_input_rank"] == 2
    ranks = adapter_config(options, SMOLLM2, "CAUSAL_LM").ranks
    assert ranks["attention"]["in"] == ranks["mlp"]["in"] == 2
    code = main(["train", "--budget", "lora:8", "--max-input-rank", "0", "--output-dir", str(tmp_path / "x")])
    assert code == 2 and "max_input_rank" in capsys.readouterr().err and not (tmp_path / "x").exists()
