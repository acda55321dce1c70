"""A GGUF file (llama.cpp's format) as --model: a tiny LLaMA written to GGUF here (8-bit blocks, as a real file's are
quantized), fine-tuned through the CLI, merged, saved and reloaded."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

import tiny_llm
from tenslora.app.cli import main
from tenslora.app.modeling import build_causal_lm, load_preprocessor, load_trained_model
from tenslora.app.runs import read_run

gguf = pytest.importorskip("gguf")

#: transformers' names -> GGUF's (llama.cpp's convert_hf_to_gguf.py) for one block of a LLaMA.
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
         "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def _bpe() -> Tokenizer:
    """A byte-pair tokenizer of the tiny vocabulary, the kind a LLaMA GGUF file describes (tokens and merges)."""
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.BpeTrainer(special_tokens=list(tiny_llm.SPECIAL), vocab_size=200, show_progress=False)
    backend.train_from_iterator([" ".join(tiny_llm.WORDS), *tiny_llm.sentences(64)], trainer)
    return backend


def _interleave(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's order of the rotary halves in q and k (transformers undoes it on loading)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def write_gguf(model: transformers.LlamaForCausalLM, tokenizer: Tokenizer, path: Path) -> Path:
    """``model`` and ``tokenizer`` as a GGUF file: matrices in 8-bit blocks (Q8_0), norms in fp32."""
    config, writer = model.config, gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    vocabulary = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    writer.add_tokenizer_model("llama")
    writer.add_token_list([token for token, _ in vocabulary])
    writer.add_token_scores([0.0] * len(vocabulary))
    writer.add_token_types([3 if token in tiny_llm.SPECIAL else 1 for token, _ in vocabulary])
    merges = json.loads(tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in merges])
    for token, setter in [("<pad>", writer.add_pad_token_id), ("<s>", writer.add_bos_token_id),
                          ("</s>", writer.add_eos_token_id), ("<unk>", writer.add_unk_token_id)]:
        setter(tokenizer.token_to_id(token))
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    names.update({f"model.layers.{i}.{ours}": f"blk.{i}.{theirs}"
                  for i in range(config.num_hidden_layers) for ours, theirs in BLOCK.items()})
    for name, weight in model.state_dict().items():
        weight = weight.detach().float()
        if name.endswith("q_proj.weight"):
            weight = _interleave(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _interleave(weight, config.num_key_value_heads)
        data = weight.numpy()
        if data.ndim == 2:
            quantized = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(f"{names[name.removesuffix('.weight')]}.weight", gguf.quants.quantize(data, quantized),
                              raw_dtype=quantized)
        else:
            writer.add_tensor(f"{names[name.removesuffix('.weight')]}.weight", data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    """A tiny LLaMA (hidden 64: Q8_0 blocks are 32 wide) with its BPE tokenizer, as ``tiny.gguf``."""
    tokenizer = _bpe()
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
                                      tie_word_embeddings=False)
    return write_gguf(transformers.LlamaForCausalLM(config), tokenizer, tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def _texts(folder: Path) -> list[str]:
    for split, (count, seed) in {"train": (16, 0), "validation": (4, 1), "test": (4, 2)}.items():
        rows = "".join(json.dumps({"text": text}) + "\n" for text in tiny_llm.sentences(count, seed))
        (folder / f"{split}.jsonl").write_text(rows)
    return [f"--{split}-file={folder / f'{split}.jsonl'}" for split in ("train", "validation", "test")]


def test_a_gguf_file_loads_dequantized_with_its_tokenizer(gguf_file):
    model = build_causal_lm(str(gguf_file))
    layer = model.model.layers[0].mlp.down_proj
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None  # nothing of the GGUF quantizer is left: it saves
    tokenizer = load_preprocessor(str(gguf_file), "causal-lm")
    ids = tokenizer("the cat sat on the mat")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "the cat sat on the mat"
    assert tokenizer.unk_token_id not in ids and len(ids) >= 6


def test_train_merge_save_and_reload_a_gguf_model(gguf_file, tmp_path):
    run, merged = tmp_path / "run", tmp_path / "merged"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["train", "--task=causal-lm", f"--model={gguf_file}", *_texts(tmp_path), f"--output-dir={run}",
                     "--max-steps=2", "--batch-size=4", "--lr=1e-2", "--max-length=16", "--no-bf16"]) == 0
    assert not [w for w in caught if "vocabulary was not modified" in str(w.message)]  # no config.json: no alarm
    assert read_run(run)["model"] == str(gguf_file)
    assert main(["merge", str(run), str(merged)]) == 0
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    adapted, _ = load_trained_model(str(run), read_run(run))
    base = build_causal_lm(str(gguf_file)).eval()
    ids = tokenizer(tiny_llm.sentences(2, seed=7), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = adapted.eval()(input_ids=ids).logits
        assert not torch.allclose(base(input_ids=ids).logits, expected, atol=1e-4)  # the 2 steps changed it
        torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, atol=1e-5, rtol=1e-4)


def test_a_gguf_file_cannot_be_quantized_nor_be_garbage(gguf_file, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--task=causal-lm", f"--model={gguf_file}", *_texts(tmp_path), f"--output-dir={out}",
                 "--load-in-4bit"]) == 2
    error = capsys.readouterr().err.strip()
    assert "is a GGUF file, which transformers cannot load in 4 bits (--load-in-4bit): drop that option" in error
    assert len(error.splitlines()) == 1 and not out.exists()
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a GGUF file at all")
    with pytest.raises(ValueError, match=r"Cannot load the GGUF file '.*garbage.gguf' \("):
        build_causal_lm(str(garbage))
    with pytest.raises(ValueError, match=r"The GGUF file '.*missing.gguf' does not exist"):
        load_preprocessor(str(tmp_path / "missing.gguf"), "causal-lm")
