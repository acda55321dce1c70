"""``TensLoraConfig``: the PEFT config of a tensor adapter."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft.config import PeftConfig

from .construction import PRESETS, ROLE_NAMES, check_factorization, expand_preset, get_construction, resolve_ranks
from .registration import tenslora_peft_type


@dataclass
class TensLoraConfig(PeftConfig):
    """Configuration of a TensLoRA adapter (see ``docs/`` for the mathematics).

    Presets (``construction=``) expand to the method they reproduce: ``lora`` (CP on one matrix
    per projection, i.e. LoRA), ``lotr`` (depth + Tucker, ranks r, r, L), ``fact_tt`` (qkv_depth
    + Tucker, ranks r, r, n_roles, L) and ``lorta`` (att_qkv_depth + CP).
    """

    construction: str = field(
        default="qkv_depth",
        metadata={"help": "How updates are stacked into tensors: att, qkv, depth, att_qkv, att_depth, qkv_depth, "
                          "att_qkv_depth, matrix (one matrix per projection), or a preset: lora, lotr, fact_tt, lorta. "
                          "qkv_depth is the default because it beat LoRA at equal budget in the paper."},
    )
    factorization: Optional[str] = field(
        default=None,
        metadata={"help": "'tucker' (one rank per mode; the paper's choice, default) or 'cp' (one rank). "
                          "Presets set it themselves."},
    )
    ranks: Union[int, list[int], dict[str, Union[int, str]]] = field(
        default=8,
        metadata={"help": "Tucker: an int (every mode, capped at the mode's size), a list in the construction's "
                          "mode order (in, out | head_dim, heads, qkv, depth) or a dict keyed by mode name ('full' = "
                          "the mode's size). CP: one int."},
    )
    scaling: float = field(
        default=1.0,
        metadata={"help": "The update is scaling * Delta W. 1.0 as in the paper; for the LoRA preset, PEFT's "
                          "lora_alpha / r corresponds to scaling."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, as LoRA's lora_dropout."})
    roles: list[str] = field(
        default_factory=lambda: ["q", "k", "v"],
        metadata={"help": "Projections to adapt: any of q, k, v, o (o = attention output). They form the qkv mode."},
    )
    role_patterns: Optional[dict[str, str]] = field(
        default=None,
        metadata={"help": "For models TensLoRA does not know: a regex per role, matched against the end of module "
                          "names, e.g. {'q': r'attn\\.q', 'k': r'attn\\.k', 'v': r'attn\\.v'}. Roles that match "
                          "the same module make a fused projection (outputs side by side in role order)."},
    )
    layer_pattern: Optional[str] = field(
        default=None,
        metadata={"help": "Regex with one group capturing the layer index in a module name. Default: the first "
                          "'.N.' in the name."},
    )
    num_heads: Optional[int] = field(
        default=None,
        metadata={"help": "Number of attention heads, for models whose config lacks `num_attention_heads` (only "
                          "the att constructions need it)."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: the update starts at zero (Tucker: zero core, orthonormal factors; CP: one zero "
                          "factor). False: every parameter random, for tests and debugging only."},
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Filled in from the roles (a regex); set it only to restrict further."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules not to adapt."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None,
        metadata={"help": "Only adapt these layer indices; the depth mode then has one entry per listed layer."},
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Accepted for PEFT compatibility; use `layer_pattern` instead."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={"help": "Modules besides the adapter to train and save (PEFT adds the classifier for SEQ_CLS)."},
    )
    bias: str = field(default="none", metadata={"help": "Kept for PEFT; TensLoRA trains no bias."})
    geometry: Optional[dict] = field(
        default=None,
        metadata={"help": "Sizes of the model the adapter was built for (hidden size, attention width, layers, "
                          "heads, roles). Filled in when the adapter is attached and saved with it, so that loading "
                          "it into a model it does not fit fails with a clear error. Leave it unset."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = tenslora_peft_type()
        if self.construction in PRESETS:
            construction, factorization, self.ranks = expand_preset(self.construction, self.ranks)
            if self.factorization not in (None, factorization):
                raise ValueError(
                    f"The '{self.construction}' preset uses {factorization}, but factorization="
                    f"'{self.factorization}' was given. Drop `factorization` or use the plain construction."
                )
            self.construction, self.factorization = construction, factorization
        spec = get_construction(self.construction)
        self.factorization = check_factorization(self.factorization or "tucker")
        if isinstance(self.ranks, tuple):
            self.ranks = list(self.ranks)
        # Check the shape of `ranks` now (count, mode names, positivity); sizes are known only with a model.
        resolve_ranks(spec, self.factorization, self.ranks, {mode: math.inf for mode in spec.modes})
        if self.bias != "none":
            raise ValueError("TensLoRA trains no bias; set bias='none'.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not math.isfinite(self.scaling):
            raise ValueError(f"scaling must be a finite number, got {self.scaling}.")
        self.roles = list(self.roles)
        if not self.roles or any(r not in ROLE_NAMES for r in self.roles) or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"roles must be distinct names among {list(ROLE_NAMES)}, got {self.roles}.")
        self.roles = [r for r in ROLE_NAMES if r in self.roles]  # the qkv mode follows q, k, v, o order
        if isinstance(self.layers_to_transform, int):
            self.layers_to_transform = [self.layers_to_transform]
