"""The ``PeftType.TENSLORA`` member PEFT knows TensLoRA by: a leaf every other tuner module may import.

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
