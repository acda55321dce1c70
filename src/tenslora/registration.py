"""Make TensLoRA a PEFT method: ``import tenslora`` is all a user needs before ``PeftModel.from_pretrained``.

PEFT's ``PeftType`` is a closed ``Enum`` and ``register_peft_method`` only accepts its members,
so TensLoRA adds a real member (a string enum, like the others, so ``config.peft_type.value``
works everywhere in PEFT). Adding a member touches the Enum's member tables; the test-suite
checks the result behaves like a built-in member.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

PEFT_TYPE_NAME = "TENSLORA"


def tenslora_peft_type() -> PeftType:
    """The ``PeftType.TENSLORA`` member, created on first use."""
    if PEFT_TYPE_NAME in PeftType.__members__:
        return PeftType[PEFT_TYPE_NAME]
    member = str.__new__(PeftType, PEFT_TYPE_NAME)
    member._name_ = PEFT_TYPE_NAME
    member._value_ = PEFT_TYPE_NAME
    member.__objclass__ = PeftType
    PeftType._member_map_[PEFT_TYPE_NAME] = member
    PeftType._value2member_map_[PEFT_TYPE_NAME] = member
    PeftType._member_names_.append(PEFT_TYPE_NAME)
    type.__setattr__(PeftType, PEFT_TYPE_NAME, member)  # EnumType.__setattr__ refuses new members
    return member


def register() -> None:
    """Register the config and tuner classes with PEFT (idempotent)."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from .config import TensLoraConfig
    from .model import TensLoraModel

    if tenslora_peft_type() in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name="tenslora", config_cls=TensLoraConfig, model_cls=TensLoraModel, prefix="tenslora_")
