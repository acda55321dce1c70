"""A tiny causal LM and a word-level tokenizer built offline, for the LLM fine-tuning tests (TRL, causal-LM CLI)."""

from __future__ import annotations

import random
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "the a cat dog sat ran on under mat rug big small red blue and".split()
SPECIAL = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}


def tokenizer() -> PreTrainedTokenizerFast:
    vocab = {**SPECIAL, **{word: i + len(SPECIAL) for i, word in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def chat_tokenizer() -> PreTrainedTokenizerFast:
    """The tokenizer with a chat template in the tiny vocabulary: a turn is its content, the assistant's header
    ``<s>``, a turn's end ``</s>``."""
    chat = tokenizer()
    chat.chat_template = ("{% for message in messages %}{% if message.role == 'assistant' %}<s> {% endif %}"
                          "{{ message.content }} </s> {% endfor %}{% if add_generation_prompt %}<s> {% endif %}")
    return chat


def llama_causal_lm(seed: int = 0, hidden_size: int = 32, intermediate_size: int = 37) -> transformers.LlamaForCausalLM:
    """2 layers, hidden 32, 4 query heads over 2 key/value heads, gated MLP of width 37.

    bitsandbytes' 4-bit CPU kernels need widths that are multiples of 64: pass hidden_size=64,
    intermediate_size=128 for a base that will be quantized.
    """
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=hidden_size,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=intermediate_size, pad_token_id=0, bos_token_id=1,
                                      eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def sentences(count: int, seed: int = 0, length: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(count)]


def save_model_folder(path: Path, seed: int = 0, **sizes: int) -> Path:
    """A local model folder (weights + tokenizer), as a user's downloaded checkpoint would be."""
    llama_causal_lm(seed, **sizes).save_pretrained(path)
    tokenizer().save_pretrained(path)
    return path
