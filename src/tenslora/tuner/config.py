"""``TensLoraConfig``: the PEFT config of a tensor adapter, checked when it is built."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

from peft import PeftModel
from peft.config import PeftConfig
from peft.utils import CONFIG_NAME

from ..core.blocks import check_layout
from ..core.construction import (
    ALL_LINEAR,
    PRESETS,
    ROLE_NAMES,
    Geometry,
    check_factorization,
    expand_preset,
    get_construction,
    parse_roles,
    read_ranks,
    resolve_ranks,
)
from .peft_type import tenslora_peft_type

#: What ``bias`` may be, with LoRA's meaning: train no bias, every bias of the model, or those of adapted modules.
BIAS_CHOICES = ("none", "all", "tenslora_only")


def _integer(name: str, value: object) -> int:
    """An int, also when it arrives as a string ("8", from YAML/JSON/the environment); anything else by name."""
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be an integer, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"`{name}` must be an integer, got {value!r} ({type(value).__name__}).")
    return value


def _real(name: str, value: object) -> float:
    """A finite float, also when it arrives as a string ("0.1")."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            raise ValueError(f"`{name}` must be a number, got {value!r}.") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}.")
    return float(value)


def _flag(name: str, value: object) -> bool:
    """A bool; the strings "true"/"false" (and yes/no, 1/0) are read as such, never as a non-empty string's truth."""
    words = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
    if isinstance(value, str) and value.strip().lower() in words:
        return words[value.strip().lower()]
    if not isinstance(value, bool):
        raise ValueError(f"`{name}` must be true or false, got {value!r}.")
    return value


def _regex(what: str, pattern: object, layer_group: bool = False) -> str:
    """``pattern`` compiled once here, so that a typo fails when the config is built and names the option."""
    if not isinstance(pattern, str):
        raise ValueError(f"{what} must be a regular expression (a string), got {pattern!r}.")
    try:
        compiled = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"{what} '{pattern}' is not a valid regular expression ({error}).") from None
    if layer_group and compiled.groups < 1:
        raise ValueError(f"{what} '{pattern}' has no capture group; it needs one around the layer index, "
                         r"e.g. r'\.layers\.(\d+)\.'.")
    return pattern


def _names(name: str, value: object, what: str = "a module name or regex, or a list of module names") -> object:
    """None, a string or a list (tuple, set) of strings, as PEFT's module options are; anything else by name."""
    if value is None or isinstance(value, str) or (isinstance(value, (list, tuple, set))
                                                   and all(isinstance(item, str) for item in value)):
        return value
    raise ValueError(f"`{name}` must be {what}, got {value!r}.")


def _text(name: str, value: object) -> object:
    """None or a string (a name, a path, a version)."""
    if value is not None and not isinstance(value, str):
        raise ValueError(f"`{name}` must be a string, got {value!r}.")
    return value


#: The sizes every recorded geometry holds; the others may be None (or absent, in older adapters).
_GEOMETRY_SIZES = ("hidden_size", "attention_width", "num_layers")


def _geometry(value: object) -> Optional[dict]:
    """A recorded geometry (see :func:`check_geometry`) with sizes that are integers and roles that are role names:
    an edited one is named here, not met as an AttributeError or a false 'built for a different model'."""
    if value is None:
        return None
    if not isinstance(value, Mapping) or any(key not in value for key in (*_GEOMETRY_SIZES, "roles")):
        raise ValueError(f"`geometry` must be the sizes recorded when the adapter was attached (a mapping with "
                         f"{[*_GEOMETRY_SIZES, 'roles']}), got {value!r}. Leave it unset in a new config.")
    geometry = dict(value)
    for size in (item.name for item in fields(Geometry) if item.name != "roles"):
        if geometry.get(size) is not None or size in _GEOMETRY_SIZES:
            geometry[size] = _integer(f"geometry.{size}", geometry[size])
    roles = geometry["roles"]
    try:
        valid = isinstance(roles, (list, tuple)) and parse_roles(roles) != ALL_LINEAR
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"`geometry.roles` must be the list of adapted roles (among {list(ROLE_NAMES)}), got "
                         f"{roles!r}.")
    return geometry


@dataclass
class TensLoraConfig(PeftConfig):
    """Configuration of a TensLoRA adapter (see ``docs/`` for the mathematics).

    Presets (``construction=``) expand to the method they reproduce: ``lora`` (CP on one matrix
    per projection, i.e. LoRA), ``lotr`` (depth + Tucker, ranks r, r, L), ``fact_tt`` (qkv_depth
    + Tucker, ranks r, r, n_roles, L), ``fact_tk`` (fused_qkv_depth + Tucker, ranks r, r, r) and
    ``lorta`` (att_qkv_depth + CP).
    """

    construction: str = field(
        default="qkv_depth",
        metadata={"help": "How updates are stacked into tensors: att, qkv, depth, att_qkv, att_depth, qkv_depth, "
                          "att_qkv_depth, matrix (one matrix per projection), fused_qkv_depth and "
                          "att_fused_qkv_depth (roles and layers as one mode, index role * L + layer), or a preset: "
                          "lora, lotr, fact_tt, fact_tk, lorta. qkv_depth is the default because it beat LoRA at "
                          "equal budget in the paper."},
    )
    factorization: Optional[str] = field(
        default=None,
        metadata={"help": "'tucker' (one rank per mode; the paper's choice, default), 'cp' (one rank) or 'tt' "
                          "(tensor-train: one rank per bond between adjacent modes). Presets set it themselves."},
    )
    ranks: Union[int, list[int], dict[str, Union[int, str]]] = field(
        default=8,
        metadata={"help": "Tucker: an int (every mode of every tensor, capped at the mode's size), a list in the "
                          "construction's mode order (in, out | head_dim, heads, qkv, depth) or a dict keyed by mode "
                          "name ('full' = the mode's size). CP: one int. TT: an int (every bond), a list in bond "
                          "order or a dict keyed by bond, named by its two modes ({'in-out': 8, 'out-qkv': 4, "
                          "'qkv-depth': 2}; 'full' = the bond's largest useful rank). Attention and MLP tensors may "
                          "get their own: {'attention': ..., 'mlp': ...}, each any of the former (needed by the att "
                          "constructions with both families, unless one int)."},
    )
    scaling: float = field(
        default=1.0,
        metadata={"help": "The update is scaling * Delta W. 1.0 as in the paper; for the LoRA preset, PEFT's "
                          "lora_alpha / r corresponds to scaling."},
    )
    dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter's input, as LoRA's lora_dropout."})
    roles: Union[list[str], str] = field(
        default_factory=lambda: ["q", "k", "v"],
        metadata={"help": "Projections to adapt: any of q, k, v, o (attention) and gate, up, down (MLP), as a "
                          "list or one comma-separated string ('q,k,v'), or 'all-linear': every attention and MLP "
                          "projection of the model's blocks (as PEFT's all-linear). Each family's roles form the "
                          "qkv mode of its own tensors."},
    )
    layout: str = field(
        default="roles",
        metadata={"help": "'roles': one slice per projection, each family (attention, MLP) in tensors of its own "
                          "width. 'blocks' (FacT, MetaTT): every projection cut into d x d blocks (d = hidden size; "
                          "the MLP's into ceil(d_ffn / d), zero-padded), every block one slice along the qkv mode of "
                          "the same tensor(s): 12 a layer on BERT/ViT. Needs qkv, qkv_depth or fused_qkv_depth (or "
                          "the fact_tt, fact_tk presets) and ranks not keyed by family."},
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
                          "factor; TT: a zero output core, the others orthonormal towards it). False: every "
                          "parameter random, for tests and debugging only."},
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
    bias: str = field(
        default="none",
        metadata={"help": "Biases trained (and saved) with the adapter, as LoRA's `bias`: 'none', 'all' (every bias "
                          "of the model) or 'tenslora_only' (the biases of the adapted projections). A trained bias "
                          "stays in the model when the adapter is disabled or unloaded, and PEFT allows it on one "
                          "adapter of a model only."},
    )
    geometry: Optional[dict] = field(
        default=None,
        metadata={"help": "Sizes of the model the adapter was built for (hidden size, attention width, layers, "
                          "heads, roles). Filled in when the adapter is attached and saved with it, so that loading "
                          "it into a model it does not fit fails with a clear error. Leave it unset."},
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = tenslora_peft_type()
        for name in ("construction", "factorization"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise ValueError(f"`{name}` must be a name (a string), got {getattr(self, name)!r}.")
        self.ranks = read_ranks(self.ranks)
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
        check_layout(self.layout, spec, self.ranks)
        # Check the shape of `ranks` now (count, mode names, positivity); sizes are known only with a model.
        resolve_ranks(spec, self.factorization, self.ranks, {mode: math.inf for mode in spec.modes})
        if self.bias not in BIAS_CHOICES:
            raise ValueError(f"`bias` must be one of {list(BIAS_CHOICES)} (as LoRA's, with 'tenslora_only' for "
                             f"'lora_only'), got {self.bias!r}.")
        self.dropout = _real("dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got {self.dropout}.")
        self.scaling = _real("scaling", self.scaling)
        self.init_weights = _flag("init_weights", self.init_weights)
        self.roles = parse_roles(self.roles)
        if self.target_modules in (ALL_LINEAR, [ALL_LINEAR]):
            raise ValueError(f"TensLoRA chooses modules by role: write roles='{ALL_LINEAR}' (every attention and MLP "
                             f"projection) rather than target_modules='{ALL_LINEAR}'; target_modules, when given, "
                             "only narrows the roles' modules.")
        if self.num_heads is not None:
            self.num_heads = _integer("num_heads", self.num_heads)
            if self.num_heads <= 0:
                raise ValueError(f"`num_heads` must be a positive integer, got {self.num_heads}.")
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, (int, str)) else layers
            if not isinstance(layers, (list, tuple)) or not layers:
                raise ValueError(f"`layers_to_transform` must be a layer index or a list of them, got {layers!r}.")
            self.layers_to_transform = [_integer("layers_to_transform", layer) for layer in layers]
            if any(layer < 0 for layer in self.layers_to_transform):
                raise ValueError(f"`layers_to_transform` holds layer indices (0, 1, ...), got {layers!r}.")
        if self.layer_pattern is not None:
            _regex("`layer_pattern`", self.layer_pattern, layer_group=True)
        if self.role_patterns is not None:
            if not isinstance(self.role_patterns, Mapping) or not self.role_patterns:
                raise ValueError(f"`role_patterns` must map role names to regular expressions, e.g. "
                                 f"{{'q': r'attn\\.q_proj'}}; got {self.role_patterns!r}.")
            unknown = [role for role in self.role_patterns if role not in ROLE_NAMES]
            if unknown:
                raise ValueError(f"`role_patterns` has unknown role(s) {unknown}; roles are {list(ROLE_NAMES)}.")
            self.role_patterns = {role: _regex(f"The pattern of role '{role}' in `role_patterns`", pattern)
                                  for role, pattern in self.role_patterns.items()}
        for name in ("target_modules", "exclude_modules", "layers_pattern"):
            _names(name, getattr(self, name))
        _names("modules_to_save", self.modules_to_save, "a list of module names")
        for name in ("base_model_name_or_path", "revision", "peft_version"):
            _text(name, getattr(self, name))
        if self.auto_mapping is not None and not isinstance(self.auto_mapping, Mapping):
            raise ValueError(f"`auto_mapping` must be a mapping (PEFT's), got {self.auto_mapping!r}.")
        self.inference_mode = _flag("inference_mode", self.inference_mode)
        self.geometry = _geometry(self.geometry)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str, subfolder: Optional[str] = None,
                        **kwargs: Any) -> TensLoraConfig:
        """PEFT's loading; a local adapter_config.json that is corrupt or fails a check of its fields is named,
        with the field, in one ValueError (not a traceback from inside PEFT)."""
        path = os.path.join(pretrained_model_name_or_path, subfolder or "", CONFIG_NAME)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        except (ValueError, TypeError) as error:
            if not os.path.isfile(path):  # not found, or on the Hub: PEFT's own message
                raise
            raise ValueError(f"'{path}' is not a valid TensLoRA adapter config: {error} Restore the file, or "
                             "re-save the adapter.") from None


def adapter_config_of(peft_model: Any, adapter_name: str, kind: type[PeftConfig]) -> Any:
    """The config of ``peft_model``'s adapter ``adapter_name``, which must be a ``kind`` (TensLoRA's or LoRA's):
    each wrong argument named, with what to pass instead."""
    if not isinstance(peft_model, PeftModel):
        raise ValueError("Pass the PeftModel that carries the adapter (what get_peft_model or "
                         "PeftModel.from_pretrained returns, before merge_and_unload), got a "
                         f"{type(peft_model).__name__}.")
    config = peft_model.peft_config.get(adapter_name)
    if config is None:
        raise ValueError(f"The model has no adapter named '{adapter_name}'; it has {list(peft_model.peft_config)}.")
    if not isinstance(config, kind):
        found = getattr(config.peft_type, "value", config.peft_type)
        wanted = "TensLoRA" if kind is TensLoraConfig else "LoRA"
        raise ValueError(f"Adapter '{adapter_name}' is a {found} adapter, not a {wanted} one.")
    return config
