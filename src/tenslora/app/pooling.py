"""A sequence classifier on the *mean* of the token states: the head sentence-transformers models expect.

Sentence-transformers models (all-MiniLM-L6-v2 among them) were trained to be read through the
masked mean of their last hidden states; their [CLS] pooler was never trained, so the stock
``AutoModelForSequenceClassification`` head starts far behind. This class wraps any
``AutoModel`` encoder with a masked mean and one ``Linear`` layer.

The file imports only torch and transformers, on purpose: ``tenslora merge`` saves it next to the
merged weights (transformers' ``register_for_auto_class`` mechanism), so that
``AutoModelForSequenceClassification.from_pretrained(folder, trust_remote_code=True)`` rebuilds
the classifier without tenslora installed. The state dict is laid out like a stock
``...ForSequenceClassification`` (``<base_model_prefix>.*`` then ``classifier.*``), so
``AutoModel.from_pretrained(folder)`` loads the encoder alone.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput
from transformers.models.auto.modeling_auto import MODEL_MAPPING


def masked_mean(states: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``states`` (batch, tokens, hidden) over the tokens the mask keeps (all when no mask)."""
    if attention_mask is None:
        return states.mean(dim=1)
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """``AutoModel`` encoder -> masked mean of the last hidden states -> ``Linear`` (``classifier``).

    The encoder sits under its own ``base_model_prefix`` (``bert``, ``roberta``, ...), so the
    module names are those of the stock classifier: adapters find the attention projections by
    the usual names, PEFT recognises ``classifier`` as the head to train and save, and
    ``from_pretrained`` loads both bare-encoder checkpoints and merged classifier folders.
    """

    config_class = PretrainedConfig
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _keys_to_ignore_on_load_unexpected = [r"pooler\."]  # the unused [CLS] pooler of base checkpoints

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__(config)
        encoder = AutoModel.from_config(config, **_without_pooler(config))
        self.base_model_prefix = encoder.base_model_prefix
        setattr(self, self.base_model_prefix, encoder)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, **kwargs) -> SequenceClassifierOutput:
        kwargs = {key: value for key, value in kwargs.items() if value is not None and key != "return_dict"}
        states = self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        logits = self.classifier(masked_mean(states, attention_mask))
        loss = None if labels is None else nn.functional.cross_entropy(logits.float(), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _without_pooler(config: PretrainedConfig) -> dict:
    """``add_pooling_layer=False`` where the encoder has that switch: the pooler is unused here."""
    encoder_class = MODEL_MAPPING.get(type(config), None)
    if encoder_class is not None and "add_pooling_layer" in inspect.signature(encoder_class.__init__).parameters:
        return {"add_pooling_layer": False}
    return {}


# Saved folders of this model name this file in their config (auto_map), for trust_remote_code loading.
MeanPoolingForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
