"""Tiny random Transformers built from configs (no download), shared by the tests."""

from __future__ import annotations

import torch
import transformers

VOCAB = 100


def bert(num_labels: int = 3, layers: int = 2, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=4,
                                     intermediate_size=37, vocab_size=VOCAB, num_labels=num_labels)
    return transformers.BertForSequenceClassification(config).eval()


def vit(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                                    image_size=16, patch_size=8, num_labels=num_labels)
    return transformers.ViTForImageClassification(config).eval()


def llama(num_labels: int = 3, seed: int = 0):
    """Grouped-query attention: 4 query heads share 2 key/value heads."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=37, vocab_size=VOCAB,
                                      num_labels=num_labels, pad_token_id=0)
    return transformers.LlamaForSequenceClassification(config).eval()


def gemma(num_labels: int = 3, seed: int = 0):
    """Attention width (4 heads x 16) differs from the hidden size (32), one key/value head."""
    torch.manual_seed(seed)
    config = transformers.GemmaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, head_dim=16,
                                      num_key_value_heads=1, intermediate_size=37, vocab_size=VOCAB,
                                      num_labels=num_labels, pad_token_id=0)
    return transformers.GemmaForSequenceClassification(config).eval()


def roberta(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=37, vocab_size=VOCAB, num_labels=num_labels)
    return transformers.RobertaForSequenceClassification(config).eval()


def mistral(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=37, vocab_size=VOCAB,
                                        num_labels=num_labels, pad_token_id=0)
    return transformers.MistralForSequenceClassification(config).eval()


def qwen2(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, intermediate_size=37, vocab_size=VOCAB,
                                      num_labels=num_labels, pad_token_id=0)
    return transformers.Qwen2ForSequenceClassification(config).eval()


def gpt2(num_labels: int = 3, seed: int = 0):
    """Fused q/k/v projection (Conv1D ``c_attn``)."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, num_labels=num_labels,
                                     pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(config).eval()


def distilbert(num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=37, vocab_size=VOCAB,
                                           num_labels=num_labels)
    return transformers.DistilBertForSequenceClassification(config).eval()


MODELS = {"bert": bert, "vit": vit, "llama": llama}
ALL_MODELS = {**MODELS, "roberta": roberta, "distilbert": distilbert, "mistral": mistral, "qwen2": qwen2,
              "gemma": gemma, "gpt2": gpt2}


def inputs(name: str, batch: int = 2, seed: int = 1) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 16, 16, generator=generator)}
    return {"input_ids": torch.randint(2, VOCAB, (batch, 7), generator=generator)}
