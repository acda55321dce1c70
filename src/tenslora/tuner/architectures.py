"""Where the attention and MLP projections of a model are, and how big they are.

One table maps a Hugging Face ``model_type`` to a regular expression per role (matched against
the end of a module's name): attention q, k, v, o and MLP gate, up, down. ``roles="all-linear"``
means every role the table (or the user's ``role_patterns``) has for the model: the linear layers
of the transformer blocks, never the embeddings or the head. A module matched by several roles
is a fused projection (GPT-2's ``c_attn`` holds q, k and v side by side). The layer of a module
is the first ``.N.`` in its name unless a ``layer_pattern`` says otherwise. Any other model is
mapped the same way by passing ``role_patterns`` (and, if needed, ``layer_pattern``) in the
TensLoraConfig.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..core.construction import ALL_LINEAR, FAMILIES, ROLE_NAMES, Geometry, parse_roles

_BERT_LIKE = {
    "q": r"attention\.self\.query",
    "k": r"attention\.self\.key",
    "v": r"attention\.self\.value",
    "o": r"attention\.output\.dense",
    "up": r"intermediate\.dense",
    "down": r"layer\.\d+\.output\.dense",  # the block's own output, not attention.output.dense
}
_LLAMA_LIKE = {
    "q": r"self_attn\.q_proj",
    "k": r"self_attn\.k_proj",
    "v": r"self_attn\.v_proj",
    "o": r"self_attn\.o_proj",
    "gate": r"mlp\.gate_proj",
    "up": r"mlp\.up_proj",
    "down": r"mlp\.down_proj",
}

#: model_type -> role -> regex on the end of the module name.
ROLE_PATTERNS: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "distilbert": {
        "q": r"attention\.q_lin",
        "k": r"attention\.k_lin",
        "v": r"attention\.v_lin",
        "o": r"attention\.out_lin",
        "up": r"ffn\.lin1",
        "down": r"ffn\.lin2",
    },
    "vit": {  # transformers >= 5 names, then the 4.x names
        "q": r"attention\.(?:q_proj|attention\.query)",
        "k": r"attention\.(?:k_proj|attention\.key)",
        "v": r"attention\.(?:v_proj|attention\.value)",
        "o": r"attention\.(?:o_proj|output\.dense)",
        "up": r"(?:mlp\.fc1|intermediate\.dense)",
        "down": r"(?:mlp\.fc2|layer\.\d+\.output\.dense)",
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gpt2": {"q": r"attn\.c_attn", "k": r"attn\.c_attn", "v": r"attn\.c_attn", "o": r"attn\.c_proj",
             "up": r"mlp\.c_fc", "down": r"mlp\.c_proj"},
}

DEFAULT_LAYER_PATTERN = r"\.(\d+)\."


@dataclass(frozen=True)
class Target:
    """One module to adapt: the roles adapted in it and its layer index.

    ``fused_roles`` are all the roles the module computes, in output order (q, k, v for GPT-2's
    ``c_attn``); ``roles`` is the adapted subset.
    """

    name: str
    roles: tuple[str, ...]
    fused_roles: tuple[str, ...]
    layer: int


def is_all_linear(roles: str | Sequence[str]) -> bool:
    return roles == ALL_LINEAR or (not isinstance(roles, str) and list(roles) == [ALL_LINEAR])


def role_patterns_for(model_type: str | None, role_patterns: Mapping[str, str] | None,
                      roles: str | Sequence[str]) -> dict[str, str]:
    """The regex of every role the model has (user patterns or the table), checked to cover ``roles``."""
    if role_patterns:
        table = dict(role_patterns)
    elif model_type in ROLE_PATTERNS:
        table = ROLE_PATTERNS[model_type]
    else:
        raise ValueError(
            f"TensLoRA does not know where the attention projections of model type '{model_type}' are, nor its "
            "MLP ones"
            + (" (needed to expand roles='all-linear')" if is_all_linear(roles) else "")
            + ". Pass `role_patterns` in the TensLoraConfig, a regex per role matched against the end of the module "
            "names, e.g. role_patterns={'q': r'attn\\.q_proj', 'k': r'attn\\.k_proj', 'v': r'attn\\.v_proj', "
            f"'up': r'mlp\\.fc1', 'down': r'mlp\\.fc2'}}. Known model types: {sorted(ROLE_PATTERNS)}."
        )
    missing = [r for r in expand_roles(roles, table) if r not in table]
    if missing:
        raise ValueError(
            f"No module pattern for role(s) {missing}; add them to `role_patterns` or drop them from `roles`."
        )
    return table


def expand_roles(roles: str | Sequence[str], patterns: Mapping[str, str]) -> tuple[str, ...]:
    """The adapted roles in ``ROLE_NAMES`` order; ``"all-linear"`` is every role ``patterns`` has."""
    roles = parse_roles(roles)
    if roles == ALL_LINEAR:
        return tuple(r for r in ROLE_NAMES if r in patterns)
    return tuple(roles)


def adapted_roles(roles: str | Sequence[str], model_type: str | None,
                  role_patterns: Mapping[str, str] | None = None) -> tuple[str, ...]:
    """``roles`` for a model of ``model_type``: ``"all-linear"`` expanded by its role table, and roles it does not
    have refused (as ``get_peft_model`` would); for a model type TensLoRA does not know, explicit roles as given."""
    if is_all_linear(roles) or role_patterns or model_type in ROLE_PATTERNS:
        return expand_roles(roles, role_patterns_for(model_type, role_patterns, roles))
    return expand_roles(roles, {})


def target_regex(patterns: Mapping[str, str], roles: Sequence[str]) -> str:
    """One regex (PEFT ``target_modules`` syntax: full match) selecting the modules of ``roles``."""
    alternatives = "|".join(f"(?:{patterns[r]})" for r in dict.fromkeys(roles))
    return rf"(?:.*\.)?(?:{alternatives})"


def find_targets(module_names: Iterable[str], patterns: Mapping[str, str], roles: Sequence[str],
                 layer_pattern: str | None = None, layers_to_transform: Sequence[int] | None = None) -> list[Target]:
    """The modules to adapt, in model order, each with its roles (in ``ROLE_NAMES`` order) and layer."""
    compiled = {role: re.compile(rf"(?:^|\.)(?:{pattern})$") for role, pattern in patterns.items()}
    layer_regex = re.compile(layer_pattern or DEFAULT_LAYER_PATTERN)
    targets = []
    for name in module_names:
        fused = tuple(r for r in ROLE_NAMES if r in compiled and compiled[r].search(name))
        adapted = tuple(r for r in fused if r in roles)
        if not adapted:
            continue
        match = layer_regex.search(name)
        if match is None:
            raise ValueError(
                f"Module '{name}' matches role(s) {list(adapted)} but no layer index was found in its name with "
                f"the pattern {layer_regex.pattern!r}; pass `layer_pattern` (a regex with one group) in the config."
            )
        index = match.group(1)
        if index is None or not index.isdigit():
            raise ValueError(
                f"The layer pattern {layer_regex.pattern!r} captures {index!r} in module '{name}', not a layer "
                r"number; its first group must capture the digits of the layer index (e.g. r'layers\.(\d+)\.')."
            )
        layer = int(index)
        if layers_to_transform is None or layer in layers_to_transform:
            targets.append(Target(name, adapted, fused, layer))
    return targets


def config_value(model_config: Any, *names: str) -> Any:
    """Read the first present attribute (or dict key) among ``names``; HF configs map aliases already."""
    for name in names:
        value = model_config.get(name) if isinstance(model_config, Mapping) else getattr(model_config, name, None)
        if value is not None:
            return value
    return None


def ffn_width_from_config(model_config: Any, hidden: int) -> int | None:
    """d_ffn: ``intermediate_size`` (BERT, ViT, LLaMA), ``hidden_dim`` (DistilBERT), ``n_inner`` (GPT-2,
    whose ``n_inner=None`` means 4 x hidden), ``ffn_dim`` / ``d_ff`` elsewhere."""
    width = config_value(model_config, "intermediate_size", "n_inner", "hidden_dim", "ffn_dim", "d_ff")
    has_n_inner = "n_inner" in model_config if isinstance(model_config, Mapping) else hasattr(model_config, "n_inner")
    if width is None and has_n_inner:
        return 4 * hidden
    return width


def geometry_from_config(model_config: Any, roles: Sequence[str], num_heads: int | None = None,
                         layers_to_transform: Sequence[int] | None = None) -> Geometry:
    """Sizes from a Hugging Face config (object or dict). ``num_heads`` overrides the config's.

    ``roles`` are explicit role names (see :func:`adapted_roles` for ``"all-linear"``).
    """
    model_config = config_value(model_config, "text_config") or model_config  # multimodal: the language model
    hidden = config_value(model_config, "hidden_size", "n_embd", "dim", "d_model")
    layers = config_value(model_config, "num_hidden_layers", "n_layer", "n_layers", "num_layers")
    if hidden is None or layers is None:
        raise ValueError(
            "Could not read the hidden size and number of layers from the model config (expected `hidden_size` "
            "and `num_hidden_layers`). Set them on `model.config` for custom models."
        )
    heads = num_heads or config_value(model_config, "num_attention_heads", "n_head", "n_heads")
    kv_heads = config_value(model_config, "num_key_value_heads") if heads else None
    head_dim = config_value(model_config, "head_dim") if heads else None
    if heads and not head_dim and hidden % heads:
        raise ValueError(
            f"The hidden size {hidden} is not divisible by the number of attention heads {heads}; check "
            "`num_attention_heads` in the model config, or set `head_dim`."
        )
    ffn = None
    if any(role in FAMILIES["mlp"] for role in roles):
        ffn = ffn_width_from_config(model_config, hidden)
        if ffn is None:
            raise ValueError(
                f"Could not read the MLP's intermediate size from the model config, needed for role(s) "
                f"{[r for r in roles if r in FAMILIES['mlp']]}; set `intermediate_size` on `model.config`."
            )
    width = heads * head_dim if head_dim else hidden
    if layers_to_transform is not None:  # as get_peft_model: the listed layers the model has
        present = {layer for layer in layers_to_transform if 0 <= layer < layers}
        if not present:
            raise ValueError(f"`layers_to_transform` {list(layers_to_transform)} names no layer of the model; it has "
                             f"{layers} (0 to {layers - 1}).")
        layers = len(present)
    return Geometry(hidden_size=hidden, attention_width=width, num_layers=layers, roles=tuple(roles),
                    num_heads=heads, num_kv_heads=kv_heads if kv_heads and kv_heads != heads else None,
                    ffn_width=ffn)


def expected_shape(geometry: Geometry, roles: Sequence[str]) -> tuple[int, int]:
    """(in_features, out_features) a module computing ``roles`` (side by side when fused) must have."""
    shapes = [geometry.role_shape(role) for role in roles]
    return shapes[0][0], sum(out for _, out in shapes)
