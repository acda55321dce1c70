"""Make TensLoRA a PEFT method: ``import tenslora`` is all a user needs before ``PeftModel.from_pretrained``."""

from __future__ import annotations

from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import register_peft_method

from .config import TensLoraConfig
from .model import TensLoraModel
from .peft_type import tenslora_peft_type


def register() -> None:
    """Register the config and tuner classes with PEFT (idempotent)."""
    if tenslora_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name="tenslora", config_cls=TensLoraConfig, model_cls=TensLoraModel, prefix="tenslora_")
