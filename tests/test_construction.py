"""Rank specs, presets and parameter budgets, without any model."""

import warnings

import pytest

from tenslora import TensLoraConfig
from tenslora.core.budget import count_adapter_parameters, lora_parameter_count, match_budget
from tenslora.core.construction import CONSTRUCTIONS, TENSOR_CONSTRUCTIONS, Geometry, resolve_tucker_ranks

BERT_BASE = Geometry(hidden_size=768, attention_width=768, num_layers=12, roles=("q", "k", "v"), num_heads=12)


def test_the_seven_constructions_have_the_papers_modes():
    modes = {name: CONSTRUCTIONS[name].modes for name in TENSOR_CONSTRUCTIONS}
    assert modes == {
        "att": ("in", "head_dim", "heads"),
        "qkv": ("in", "out", "qkv"),
        "depth": ("in", "out", "depth"),
        "att_qkv": ("in", "head_dim", "heads", "qkv"),
        "att_depth": ("in", "head_dim", "heads", "depth"),
        "qkv_depth": ("in", "out", "qkv", "depth"),
        "att_qkv_depth": ("in", "head_dim", "heads", "qkv", "depth"),
    }


@pytest.mark.parametrize("ranks", [8, [8, 8, 3, 4], {"in": 8, "out": 8, "qkv": 3, "depth": 4}])
def test_rank_specs(ranks):
    resolved = resolve_tucker_ranks(CONSTRUCTIONS["qkv_depth"], ranks, BERT_BASE.mode_sizes(CONSTRUCTIONS["qkv_depth"]))
    assert resolved == ({"in": 8, "out": 8, "qkv": 3, "depth": 8} if ranks == 8 else
                        {"in": 8, "out": 8, "qkv": 3, "depth": 4})


def test_int_rank_is_capped_silently_but_explicit_rank_warns():
    sizes = BERT_BASE.mode_sizes(CONSTRUCTIONS["qkv"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_tucker_ranks(CONSTRUCTIONS["qkv"], 8, sizes)["qkv"] == 3
    with pytest.warns(UserWarning, match="mode 'qkv' exceeds its size 3; clamped to 3"):
        assert resolve_tucker_ranks(CONSTRUCTIONS["qkv"], {"in": 4, "out": 4, "qkv": 5}, sizes)["qkv"] == 3


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"construction": "heads"}, "Unknown construction 'heads'"),
        ({"factorization": "svd"}, "Unknown factorization 'svd'"),
        ({"factorization": "lora"}, "use construction='lora'"),
        ({"ranks": [8, 8, 3]}, "has 4 modes .* but 3 ranks"),
        ({"ranks": 0}, "must be a positive integer"),
        ({"ranks": [8, -1, 3, 4]}, "rank of mode 'out' must be a positive"),
        ({"ranks": {"in": 8, "out": 8, "qkv": 3, "layers": 4}}, r"unknown mode\(s\) \['layers'\]"),
        ({"ranks": {"in": 8, "out": 8, "qkv": 3}}, r"misses mode\(s\) \['depth'\]"),
        ({"factorization": "cp", "ranks": {"in": 8}}, "CP has one rank"),
        ({"construction": "lorta", "factorization": "tucker"}, "preset uses cp"),
        ({"roles": ["q", "x"]}, "`roles` must be distinct names"),
        ({"dropout": 1.5}, r"`dropout` must be in \[0, 1\)"),
    ],
)
def test_bad_configurations_name_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TensLoraConfig(**kwargs)


def test_presets_expand_to_the_methods_they_generalize():
    lotr = TensLoraConfig(construction="lotr", ranks=4)
    assert (lotr.construction, lotr.factorization) == ("depth", "tucker")
    assert lotr.ranks == {"in": 4, "out": 4, "depth": "full"}
    fact = TensLoraConfig(construction="fact_tt", ranks=4)
    assert (fact.construction, fact.factorization) == ("qkv_depth", "tucker")
    assert fact.ranks == {"in": 4, "out": 4, "qkv": "full", "depth": "full"}
    lorta = TensLoraConfig(construction="lorta", ranks=16)
    assert (lorta.construction, lorta.factorization, lorta.ranks) == ("att_qkv_depth", "cp", 16)
    lora = TensLoraConfig(construction="lora", ranks=8)
    assert (lora.construction, lora.factorization, lora.ranks) == ("matrix", "cp", 8)


def test_preset_parameter_counts_are_the_originals():
    d, r, L = 768, 8, 12
    # LoTR: shared in/out factors, a free r x r core per layer (+ the L x L depth factor of the Tucker form).
    assert count_adapter_parameters("depth", "tucker", {"in": r, "out": r, "depth": "full"}, BERT_BASE) == \
        3 * (2 * d * r + L * r * r + L * L)
    # LoRA is CP on one matrix per projection: r (d_in + d_out) each.
    assert count_adapter_parameters("matrix", "cp", r, BERT_BASE) == lora_parameter_count(r, BERT_BASE) == \
        2 * r * d * 3 * L
    # LoRTA: R (d + head_dim + heads + 3 + L).
    assert count_adapter_parameters("att_qkv_depth", "cp", 16, BERT_BASE) == 16 * (d + 64 + 12 + 3 + L)


def test_grouped_query_attention_counts_kv_at_their_width():
    gqa = Geometry(hidden_size=32, attention_width=32, num_layers=2, num_heads=4, num_kv_heads=2)
    assert lora_parameter_count(1, gqa) == 2 * ((32 + 32) + 2 * (32 + 16))


@pytest.mark.parametrize("construction", TENSOR_CONSTRUCTIONS)
def test_match_budget_finds_the_closest_common_rank(construction):
    budget = lora_parameter_count(8, BERT_BASE)
    ranks = match_budget(construction, "tucker", budget, BERT_BASE)
    count = count_adapter_parameters(construction, "tucker", ranks, BERT_BASE)
    r = ranks["in"]
    sizes = BERT_BASE.mode_sizes(CONSTRUCTIONS[construction])
    for neighbour in (r - 1, r + 1):
        other = count_adapter_parameters(construction, "tucker", {m: min(neighbour, n) for m, n in sizes.items()},
                                         BERT_BASE)
        assert abs(count - budget) <= abs(other - budget)
    assert abs(count - budget) / budget < 0.15


def test_match_budget_cp_and_fixed_ranks():
    budget = lora_parameter_count(8, BERT_BASE)
    rank = match_budget("att_qkv_depth", "cp", budget, BERT_BASE)
    per_rank = count_adapter_parameters("att_qkv_depth", "cp", 1, BERT_BASE)
    assert abs(rank * per_rank - budget) <= per_rank / 2
    ranks = match_budget("qkv_depth", "tucker", budget, BERT_BASE, fixed={"qkv": 2, "depth": 4})
    assert ranks["qkv"] == 2 and ranks["depth"] == 4 and ranks["in"] == ranks["out"]


def test_unreachable_budget_is_refused():
    with pytest.raises(ValueError, match="come near a budget"):
        match_budget("qkv_depth", "tucker", 10, BERT_BASE)


def test_heads_must_divide_the_attention_width():
    with pytest.raises(ValueError, match="not divisible by the number of heads 5"):
        Geometry(hidden_size=32, attention_width=32, num_layers=2, num_heads=5).mode_sizes(CONSTRUCTIONS["att"])


def test_att_needs_head_information():
    with pytest.raises(ValueError, match="has no head information"):
        Geometry(hidden_size=32, attention_width=32, num_layers=2).mode_sizes(CONSTRUCTIONS["att_qkv"])


def test_budget_functions_read_hugging_face_configs():
    import transformers

    import tenslora

    roberta_base = transformers.RobertaConfig()  # 768 hidden, 12 layers, 12 heads: no weights are built
    assert tenslora.lora_parameter_count(8, roberta_base) == 2 * 8 * 768 * 3 * 12
    ranks = tenslora.match_budget("qkv_depth", "tucker", 2 * 8 * 768 * 3 * 12, roberta_base)
    config = TensLoraConfig(construction="qkv_depth", ranks=ranks)
    assert abs(tenslora.count_parameters(config, roberta_base) - 442_368) / 442_368 < 0.05
    assert tenslora.resolved_ranks(config, roberta_base) == ranks
    assert tenslora.resolved_ranks(TensLoraConfig(construction="qkv_depth", ranks=8), roberta_base) == {
        "in": 8, "out": 8, "qkv": 3, "depth": 8}
    assert tenslora.resolved_ranks(TensLoraConfig(construction="lotr", ranks=4), roberta_base) == {
        "in": 4, "out": 4, "depth": 12}
    assert tenslora.resolved_ranks(TensLoraConfig(construction="lorta", ranks=16), roberta_base) == 16
    with pytest.raises(ValueError, match="hidden size 30 is not divisible by the number of attention heads 4"):
        tenslora.count_parameters(TensLoraConfig(construction="att"), {"hidden_size": 30, "num_attention_heads": 4,
                                                                      "num_hidden_layers": 2})
