"""Tiny random Transformers built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 100


#: The tiny size every model shares: 2 layers, hidden 32, 4 heads of 8.
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
TEXT = dict(SMALL, vocab_size=VOCAB)
#: Decoders: grouped-query attention (4 query heads share 2 key/value heads) and a padding token.
DECODER = dict(TEXT, num_key_value_heads=2, pad_token_id=0)


def _build(model_class: type, config_class: type, seed: int, **config) -> torch.nn.Module:
    torch.manual_seed(seed)
    return model_class(config_class(**config)).eval()


def bert(num_labels: int = 3, layers: int = 2, hidden: int = 32, seed: int = 0):
    return _build(transformers.BertForSequenceClassification, transformers.BertConfig, seed,
                  **dict(TEXT, hidden_size=hidden, num_hidden_layers=layers), num_labels=num_labels)


def bert_head(head: str, seed: int = 0):
    """BERT with another of transformers' heads, e.g. "TokenClassification", "QuestionAnswering"."""
    return _build(getattr(transformers, f"BertFor{head}"), transformers.BertConfig, seed, **TEXT)


def vit(num_labels: int = 3, seed: int = 0):
    return _build(transformers.ViTForImageClassification, transformers.ViTConfig, seed, **SMALL, image_size=16,
                  patch_size=8, num_labels=num_labels)


def llama(num_labels: int = 3, seed: int = 0):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    return _build(transformers.LlamaForSequenceClassification, transformers.LlamaConfig, seed, **DECODER,
                  num_labels=num_labels)


def gemma(num_labels: int = 3, seed: int = 0):
    """Attention width (4 heads x 16) differs from the hidden size (32), one key/value head."""
    return _build(transformers.GemmaForSequenceClassification, transformers.GemmaConfig, seed,
                  **dict(DECODER, head_dim=16, num_key_value_heads=1), num_labels=num_labels)


def roberta(num_labels: int = 3, seed: int = 0):
    return _build(transformers.RobertaForSequenceClassification, transformers.RobertaConfig, seed, **TEXT,
                  num_labels=num_labels)


def mistral(num_labels: int = 3, seed: int = 0):
    return _build(transformers.MistralForSequenceClassification, transformers.MistralConfig, seed, **DECODER,
                  num_labels=num_labels)


def qwen2(num_labels: int = 3, seed: int = 0):
    return _build(transformers.Qwen2ForSequenceClassification, transformers.Qwen2Config, seed, **DECODER,
                  num_labels=num_labels)


def gpt2(num_labels: int = 3, seed: int = 0):
    """Fused q/k/v projection (Conv1D ``c_attn``)."""
    return _build(transformers.GPT2ForSequenceClassification, transformers.GPT2Config, seed, n_embd=32, n_layer=2,
                  n_head=4, vocab_size=VOCAB, num_labels=num_labels, pad_token_id=0, bos_token_id=1, eos_token_id=1)


def distilbert(num_labels: int = 3, seed: int = 0):
    return _build(transformers.DistilBertForSequenceClassification, transformers.DistilBertConfig, seed, dim=32,
                  n_layers=2, n_heads=4, hidden_dim=37, vocab_size=VOCAB, num_labels=num_labels)


def bart(seed: int = 0):
    """An encoder-decoder (no TensLoRA role table): encoder and decoder layers are both numbered 0, 1."""
    return _build(transformers.BartModel, transformers.BartConfig, seed, d_model=32, encoder_layers=2,
                  decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=37,
                  decoder_ffn_dim=37, vocab_size=VOCAB, max_position_embeddings=64, pad_token_id=0, bos_token_id=1,
                  eos_token_id=1, decoder_start_token_id=1)


MODELS = {"bert": bert, "vit": vit, "llama": llama}
ALL_MODELS = {**MODELS, "roberta": roberta, "distilbert": distilbert, "mistral": mistral, "qwen2": qwen2,
              "gemma": gemma, "gpt2": gpt2}


def inputs(name: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, 7), generator=generator)}
