"""The seven ways of stacking attention-projection updates into tensors (plus the plain matrix).

A *construction* decides which modes a tensor has and therefore which weight updates share a
tensor. Every update is written in one orientation, (attention side) x (residual side):

- ``in``  : the residual-stream side (the model's hidden size),
- ``out`` : the attention side (``num_heads * head_dim``), or, in the *att* constructions, that
            side split into ``head_dim`` x ``heads`` with Hugging Face's head-major layout
            (feature ``o = head * head_dim + j``),
- ``qkv`` : which projection role (q, k, v, and o when adapted),
- ``depth``: which layer.

Query, key and value map residual -> attention, so their update is the slice itself; the output
projection ``o`` maps attention -> residual, so its update is the slice transposed, which keeps
its input features aligned with the head modes. With grouped-query attention the key/value
projections are narrower than the query: their updates are the first ``num_kv_heads * head_dim``
rows of their slice (the first ``num_kv_heads`` heads), i.e. the tensor is the one obtained by
zero-padding the key/value updates to the query's width.

This module is pure Python: it knows mode names and sizes, never a model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

ROLE_NAMES = ("q", "k", "v", "o")
FACTORIZATIONS = ("tucker", "cp")

#: What ``ranks`` may be: one int for every mode, a list in the construction's mode order, or a
#: dict keyed by mode name whose values are ints or ``"full"`` (the mode's size).
RankSpec = Union[int, Sequence[int], Mapping[str, Union[int, str]]]


@dataclass(frozen=True)
class Construction:
    """Which modes a tensor has; the remaining index dimensions give one tensor each."""

    name: str
    split_heads: bool
    stack_roles: bool
    stack_layers: bool

    @property
    def modes(self) -> tuple[str, ...]:
        """Mode names in the documented order: in, out | head_dim, heads, qkv, depth."""
        modes = ["in"]
        modes += ["head_dim", "heads"] if self.split_heads else ["out"]
        if self.stack_roles:
            modes.append("qkv")
        if self.stack_layers:
            modes.append("depth")
        return tuple(modes)

    @property
    def output_modes(self) -> tuple[str, ...]:
        return ("head_dim", "heads") if self.split_heads else ("out",)

    @property
    def index_modes(self) -> tuple[str, ...]:
        """Modes that select *which* update a slice is (as opposed to its rows and columns)."""
        return tuple(m for m in self.modes if m in ("qkv", "depth"))


CONSTRUCTIONS: dict[str, Construction] = {
    c.name: c
    for c in (
        Construction("matrix", split_heads=False, stack_roles=False, stack_layers=False),
        Construction("att", split_heads=True, stack_roles=False, stack_layers=False),
        Construction("qkv", split_heads=False, stack_roles=True, stack_layers=False),
        Construction("depth", split_heads=False, stack_roles=False, stack_layers=True),
        Construction("att_qkv", split_heads=True, stack_roles=True, stack_layers=False),
        Construction("att_depth", split_heads=True, stack_roles=False, stack_layers=True),
        Construction("qkv_depth", split_heads=False, stack_roles=True, stack_layers=True),
        Construction("att_qkv_depth", split_heads=True, stack_roles=True, stack_layers=True),
    )
}

#: The paper's seven tensor constructions (``matrix`` is the LoRA baseline's one-matrix "tensor").
TENSOR_CONSTRUCTIONS = tuple(name for name in CONSTRUCTIONS if name != "matrix")


@dataclass(frozen=True)
class Preset:
    """A published method expressed as a construction + factorization + rank rule."""

    construction: str
    factorization: str
    #: For Tucker: the rank of each mode given an int r ("r" = that int, "full" = the mode's size).
    tucker_ranks: Mapping[str, str] | None
    reference: str


PRESETS: dict[str, Preset] = {
    "lora": Preset("matrix", "cp", None, "LoRA (Hu et al. 2021): Delta W = B A, one matrix per projection"),
    "lotr": Preset(
        "depth", "tucker", {"in": "r", "out": "r", "depth": "full"},
        "LoTR (Bershatsky et al. 2024): shared in/out factors, one free r x r core per layer",
    ),
    "fact_tt": Preset(
        "qkv_depth", "tucker", {"in": "r", "out": "r", "qkv": "full", "depth": "full"},
        "FacT-TT (Jie & Deng 2023): shared in/out factors, one free r x r core per projection and layer",
    ),
    "lorta": Preset("att_qkv_depth", "cp", None, "LoRTA (Hounie et al. 2024): CP over in, head, heads, qkv, depth"),
}


@dataclass(frozen=True)
class Geometry:
    """The sizes of a model's adapted projections, as far as the constructions care."""

    hidden_size: int
    attention_width: int
    num_layers: int
    roles: tuple[str, ...] = ("q", "k", "v")
    num_heads: int | None = None
    num_kv_heads: int | None = None

    @property
    def head_dim(self) -> int | None:
        return None if self.num_heads is None else self.attention_width // self.num_heads

    def role_width(self, role: str) -> int:
        """Rows of the role's slice actually used: narrower for key/value under grouped-query attention."""
        if role in ("k", "v") and self.num_kv_heads is not None and self.head_dim is not None:
            return self.num_kv_heads * self.head_dim
        return self.attention_width

    def validate(self, construction: Construction) -> None:
        for name, value in (("hidden size", self.hidden_size), ("attention width", self.attention_width),
                            ("number of layers", self.num_layers)):
            if value <= 0:
                raise ValueError(f"The model's {name} is {value}; it must be positive.")
        unknown = [r for r in self.roles if r not in ROLE_NAMES]
        if unknown or not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"Roles must be distinct names among {ROLE_NAMES}, got {list(self.roles)}.")
        if self.num_heads is not None:
            if self.num_heads <= 0 or self.attention_width % self.num_heads:
                raise ValueError(
                    f"The attention width {self.attention_width} is not divisible by the number of heads "
                    f"{self.num_heads}; check `num_attention_heads` in the model config (or `num_heads` in the "
                    "TensLoraConfig)."
                )
            kv = self.num_kv_heads or self.num_heads
            if kv <= 0 or self.num_heads % kv:
                raise ValueError(
                    f"{self.num_heads} query heads cannot be grouped over {kv} key/value heads; check "
                    "`num_key_value_heads` in the model config."
                )
        elif construction.split_heads:
            raise ValueError(
                f"The '{construction.name}' construction splits the attention side into heads, but the model "
                "has no head information. Set `num_heads` in the TensLoraConfig, or choose a construction "
                "without 'att' (qkv, depth, qkv_depth)."
            )

    def mode_sizes(self, construction: Construction) -> dict[str, int]:
        self.validate(construction)
        sizes = {"in": self.hidden_size, "out": self.attention_width, "qkv": len(self.roles), "depth": self.num_layers}
        if construction.split_heads:
            sizes["head_dim"] = self.head_dim
            sizes["heads"] = self.num_heads
        return {mode: sizes[mode] for mode in construction.modes}


def get_construction(name: str) -> Construction:
    if name not in CONSTRUCTIONS:
        raise ValueError(
            f"Unknown construction '{name}'. Choose one of {sorted(CONSTRUCTIONS)} or a preset among "
            f"{sorted(PRESETS)}."
        )
    return CONSTRUCTIONS[name]


def check_factorization(name: str) -> str:
    if name == "lora":
        raise ValueError("LoRA is a construction preset, not a factorization: use construction='lora'.")
    if name not in FACTORIZATIONS:
        raise ValueError(f"Unknown factorization '{name}'. Choose one of {list(FACTORIZATIONS)}.")
    return name


def tensor_key(construction: Construction, role: str, layer: int) -> str:
    """Name of the tensor that holds the update of ``role`` in ``layer`` (one tensor per index not stacked)."""
    parts = [] if construction.stack_roles else [role]
    parts += [] if construction.stack_layers else [f"layer{layer}"]
    return "_".join(parts) or "all"


def tensor_keys(construction: Construction, roles: Sequence[str], layers: Sequence[int]) -> list[str]:
    return sorted({tensor_key(construction, role, layer) for role in roles for layer in layers})


def slice_index(construction: Construction, geometry: Geometry, role: str, layer_position: int) -> dict[str, int]:
    """Position of the update along the index modes of its tensor."""
    index = {}
    if construction.stack_roles:
        index["qkv"] = geometry.roles.index(role)
    if construction.stack_layers:
        index["depth"] = layer_position
    return index


def _positive_rank(mode: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"The rank of mode '{mode}' must be a positive integer (or 'full'), got {value!r}.")
    return value


def resolve_tucker_ranks(construction: Construction, ranks: RankSpec, sizes: Mapping[str, int]) -> dict[str, int]:
    """Turn a user rank spec into one rank per mode.

    An int applies to every mode and is capped at each mode's size without a warning (``ranks=8``
    on a 3-role ``qkv`` mode means rank 3). An explicit per-mode rank larger than its mode is
    clamped with a warning: a Tucker factor with more columns than rows cannot be orthonormal and
    adds parameters but no expressive power (the core absorbs any extra columns).
    """
    modes = construction.modes
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        r = _positive_rank("all", ranks)
        return {m: min(r, sizes[m]) for m in modes}
    if isinstance(ranks, Mapping):
        unknown = [k for k in ranks if k not in modes]
        missing = [m for m in modes if m not in ranks]
        if unknown or missing:
            raise ValueError(
                f"The '{construction.name}' construction has modes {list(modes)}; the rank dict "
                + (f"has unknown mode(s) {unknown}" if unknown else f"misses mode(s) {missing}")
                + ". Give one rank per mode, e.g. " + ", ".join(f"{m}=8" for m in modes) + "."
            )
        explicit = dict(ranks)
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != len(modes):
            raise ValueError(
                f"The '{construction.name}' construction has {len(modes)} modes {list(modes)} but {len(ranks)} "
                f"ranks were given ({list(ranks)}). Give one rank per mode in that order, or a dict keyed by mode."
            )
        explicit = dict(zip(modes, ranks, strict=True))
    else:
        raise ValueError(f"`ranks` must be an int, a list or a dict keyed by mode name, got {ranks!r}.")
    resolved = {}
    for mode in modes:
        value = explicit[mode]
        rank = sizes[mode] if value == "full" else _positive_rank(mode, value)
        if rank > sizes[mode]:
            warnings.warn(
                f"Tucker rank {rank} of mode '{mode}' exceeds its size {sizes[mode]}; clamped to {sizes[mode]}.",
                stacklevel=3,
            )
            rank = sizes[mode]
        resolved[mode] = rank
    return resolved


def resolve_cp_rank(ranks: RankSpec) -> int:
    """CP has a single rank shared by all modes (it may exceed a mode's size)."""
    if isinstance(ranks, Sequence) and not isinstance(ranks, str) and len(ranks) == 1:
        ranks = ranks[0]
    if isinstance(ranks, Mapping) or (isinstance(ranks, Sequence) and not isinstance(ranks, str)):
        raise ValueError(f"CP has one rank shared by every mode; pass an int (e.g. ranks=16), got {ranks!r}.")
    return _positive_rank("cp", ranks)


def resolve_ranks(construction: Construction, factorization: str, ranks: RankSpec,
                  sizes: Mapping[str, int]) -> dict[str, int] | int:
    if factorization == "tucker":
        return resolve_tucker_ranks(construction, ranks, sizes)
    return resolve_cp_rank(ranks)


def expand_preset(name: str, ranks: RankSpec) -> tuple[str, str, RankSpec]:
    """(construction, factorization, ranks) of a preset given the user's ``ranks``.

    An int r becomes the preset's rank rule (e.g. LoTR: in=r, out=r, depth=full); anything else
    is taken as explicit ranks of the underlying construction.
    """
    preset = PRESETS[name]
    if preset.tucker_ranks is not None and isinstance(ranks, int) and not isinstance(ranks, bool):
        r = _positive_rank("all", ranks)
        ranks = {mode: (r if rule == "r" else "full") for mode, rule in preset.tucker_ranks.items()}
    return preset.construction, preset.factorization, ranks
