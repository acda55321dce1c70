"""The seven ways of stacking projection updates into tensors (plus the plain matrix and two fused ones).

A *construction* decides which modes a tensor has and therefore which weight updates share a
tensor. Every update is written in one orientation, (wide side) x (residual side):

- ``in``  : the residual-stream side (the model's hidden size),
- ``out`` : the wide side: ``num_heads * head_dim`` for attention, ``d_ffn`` for the MLP; in the
            *att* constructions the attention side is split into ``head_dim`` x ``heads`` with
            Hugging Face's head-major layout (feature ``o = head * head_dim + j``),
- ``qkv`` : which projection role of the family (q, k, v, o; or gate, up, down),
- ``depth``: which layer,
- ``qkv_depth``: role and layer as one mode of size roles * L (the *fused* constructions, as FacT-TK and
  CaRA merge them), role-major: the update of role p in layer l is at ``p * L + l``, so the fused tensor is
  the ``qkv_depth`` tensor with its last two modes reshaped into one.

Roles come in two *families*: attention (q, k, v, o) and MLP (gate, up, down). Each family gets
its own tensors under the chosen construction, because their wide sides differ (d_att vs d_ffn).
The head split exists only for attention, so the *att* constructions make MLP tensors without it
(``att`` -> ``matrix``, ``att_qkv`` -> ``qkv``, ``att_depth`` -> ``depth``,
``att_qkv_depth`` -> ``qkv_depth``).

Projections that map residual -> wide side (q, k, v, gate, up) have the slice itself as update;
those that map wide side -> residual (``o``, ``down``) have the slice transposed, which keeps
their input features aligned with the wide-side modes. With grouped-query attention the
key/value projections are narrower than the query: a tensor that holds only k (or only v) has
k's own width (``num_kv_heads * head_dim``; in the *att* constructions ``num_kv_heads`` heads),
while a tensor that stacks k or v with q (a role mode) holds them zero-padded to the query's
width: their updates are the first ``num_kv_heads * head_dim`` rows of their slices.

This module is pure Python: it knows mode names and sizes, never a model.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Union

#: Role families: the roles of one family share tensors (their slices have one shape).
FAMILIES: dict[str, tuple[str, ...]] = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}
ROLE_NAMES = tuple(role for roles in FAMILIES.values() for role in roles)
#: ``roles="all-linear"``: every attention and MLP projection the model has (as PEFT's LoRA ``all-linear``).
ALL_LINEAR = "all-linear"
#: Roles mapping the wide side back to the residual stream: their update is their slice transposed.
TRANSPOSED_ROLES = ("o", "down")
FACTORIZATIONS = ("tucker", "cp", "tt")
#: The mode that fuses the role and depth modes (index ``role * L + layer``).
FUSED_MODE = "qkv_depth"
#: The modes that select *which* update a slice is (as opposed to its rows and columns), in mode order.
INDEX_MODES = ("qkv", "depth", FUSED_MODE)

#: What ``ranks`` may be: one int for every mode of every tensor, a list in the construction's mode
#: order, a dict keyed by mode name whose values are ints or ``"full"`` (the mode's size), or a dict
#: keyed by family (``{"attention": ..., "mlp": ...}``) whose values are any of the former. Tensor-train
#: ranks are the n - 1 bond ranks between adjacent modes instead: an int (every bond), a list in bond
#: order or a dict keyed by bond, named by its two modes (``{"in-out": 8, "out-qkv": 4, "qkv-depth": 2}``;
#: ``"full"`` = the bond's largest useful rank).
RankSpec = Union[int, Sequence[int], Mapping[str, Union[int, str]], Mapping[str, object]]


def family_of(role: str) -> str:
    for family, roles in FAMILIES.items():
        if role in roles:
            return family
    raise ValueError(f"Unknown role {role!r}; roles are {list(ROLE_NAMES)} or '{ALL_LINEAR}'.")


def one_or_per_family(per_family: Mapping[str, object]) -> object:
    """Ranks as a config writes them: one family's alone, several keyed by family."""
    return dict(per_family) if len(per_family) > 1 else next(iter(per_family.values()))


def parse_roles(value: object) -> Union[list[str], str]:
    """Role names in ``ROLE_NAMES`` order; "q,k,v" is read as three roles, "all-linear" is kept as it is.
    Anything else (an unknown or repeated name) is refused: a silently dropped role would change the budget."""
    if isinstance(value, str):
        value = [role.strip() for role in value.split(",") if role.strip()]
    if isinstance(value, (list, tuple)) and list(value) == [ALL_LINEAR]:
        return ALL_LINEAR
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(r, str) for r in value) \
            or any(r not in ROLE_NAMES for r in value) or len(set(value)) != len(value):
        raise ValueError(f"`roles` must be distinct names among {list(ROLE_NAMES)} (a list, or one string such as "
                         f"'q,k,v'), or '{ALL_LINEAR}'; got {value!r}.")
    return [r for r in ROLE_NAMES if r in value]  # the qkv mode follows ROLE_NAMES order


@dataclass(frozen=True)
class Construction:
    """Which modes a tensor has; the remaining index dimensions give one tensor each."""

    name: str
    split_heads: bool
    stack_roles: bool
    stack_layers: bool
    #: Roles and layers stacked as one ``qkv_depth`` mode rather than two (needs both stacked).
    fused: bool = False

    @property
    def modes(self) -> tuple[str, ...]:
        """Mode names in the documented order: in, out | head_dim, heads, qkv, depth | qkv_depth."""
        modes = ["in"]
        modes += ["head_dim", "heads"] if self.split_heads else ["out"]
        if self.fused:
            modes.append(FUSED_MODE)
        else:
            modes += ["qkv"] if self.stack_roles else []
            modes += ["depth"] if self.stack_layers else []
        return tuple(modes)

    @property
    def output_modes(self) -> tuple[str, ...]:
        return ("head_dim", "heads") if self.split_heads else ("out",)

    @property
    def index_modes(self) -> tuple[str, ...]:
        """Modes that select *which* update a slice is (as opposed to its rows and columns)."""
        return tuple(m for m in self.modes if m in INDEX_MODES)

    def for_family(self, family: str) -> Construction:
        """The construction a family's tensors use: the head split exists only for attention."""
        if family == "attention" or not self.split_heads:
            return self
        return next(c for c in (*CONSTRUCTIONS.values(), *FUSED_CONSTRUCTIONS.values())
                    if not c.split_heads and (c.stack_roles, c.stack_layers, c.fused)
                    == (self.stack_roles, self.stack_layers, self.fused))


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

#: Beyond the paper: ``qkv_depth`` and ``att_qkv_depth`` with the role and depth modes fused into one
#: ``qkv_depth`` mode of size roles * L (FacT-TK, CaRA). A Tucker factor on it mixes any role of any layer
#: with any other, where the two modes' factors could only mix roles and layers separately.
FUSED_CONSTRUCTIONS: dict[str, Construction] = {
    c.name: c
    for c in (
        Construction("fused_qkv_depth", split_heads=False, stack_roles=True, stack_layers=True, fused=True),
        Construction("att_fused_qkv_depth", split_heads=True, stack_roles=True, stack_layers=True, fused=True),
    )
}


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
    "fact_tk": Preset(
        "fused_qkv_depth", "tucker", {"in": "r", "out": "r", FUSED_MODE: "r"},
        "FacT-TK (Jie & Deng 2023): Tucker over in, out and one fused role x layer mode, ranks (r, r, r)",
    ),
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
    ffn_width: int | None = None  # d_ffn; read only when an MLP role is adapted

    @property
    def head_dim(self) -> int | None:
        return None if self.num_heads is None else self.attention_width // self.num_heads

    @property
    def families(self) -> tuple[str, ...]:
        """The families with at least one adapted role, in ``FAMILIES`` order."""
        return tuple(f for f in FAMILIES if self.family_roles(f))

    def family_roles(self, family: str) -> tuple[str, ...]:
        return tuple(r for r in self.roles if r in FAMILIES[family])

    def role_width(self, role: str) -> int:
        """Wide-side features of the role's update: narrower for key/value under grouped-query attention."""
        if family_of(role) == "mlp":
            return self.ffn_width
        if role in ("k", "v") and self.num_kv_heads is not None and self.head_dim is not None:
            return self.num_kv_heads * self.head_dim
        return self.attention_width

    def role_shape(self, role: str) -> tuple[int, int]:
        """(in_features, out_features) of the role's projection."""
        if role in TRANSPOSED_ROLES:
            return self.role_width(role), self.hidden_size
        return self.hidden_size, self.role_width(role)

    def validate(self, construction: Construction) -> None:
        for name, value in (("hidden size", self.hidden_size), ("attention width", self.attention_width),
                            ("number of layers", self.num_layers)):
            if value <= 0:
                raise ValueError(f"The model's {name} is {value}; it must be positive.")
        unknown = [r for r in self.roles if r not in ROLE_NAMES]
        if unknown or not self.roles or len(set(self.roles)) != len(self.roles):
            raise ValueError(f"Roles must be distinct names among {ROLE_NAMES}, got {list(self.roles)}.")
        if "mlp" in self.families and (self.ffn_width is None or self.ffn_width <= 0):
            raise ValueError(
                f"The MLP roles {list(self.family_roles('mlp'))} need the MLP's intermediate size, but it is "
                f"{self.ffn_width}; set `intermediate_size` in the model config."
            )
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
        elif construction.split_heads and "attention" in self.families:
            raise ValueError(
                f"The '{construction.name}' construction splits the attention side into heads, but the model "
                "has no head information. Set `num_heads` in the TensLoraConfig, or choose a construction "
                "without 'att' (qkv, depth, qkv_depth)."
            )

    def mode_sizes(self, construction: Construction, family: str = "attention",
                   role: str | None = None) -> dict[str, int]:
        """Mode sizes of a tensor of ``family``; ``role`` names the one role a tensor without a role mode holds.

        Without ``role`` the wide side is the widest of the family's adapted roles (a tensor
        stacking k/v with q holds them zero-padded); with it, the role's own width (a tensor of k
        alone has k's width).
        """
        self.validate(construction)
        construction = construction.for_family(family)
        roles = (role,) if role is not None else self.family_roles(family) or FAMILIES[family][:1]
        width = max(self.role_width(r) for r in roles)
        sizes = {"in": self.hidden_size, "out": width, "qkv": len(self.family_roles(family)),
                 "depth": self.num_layers, FUSED_MODE: len(self.family_roles(family)) * self.num_layers}
        if construction.split_heads:
            sizes["head_dim"] = self.head_dim
            sizes["heads"] = width // self.head_dim
        return {mode: sizes[mode] for mode in construction.modes}


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of an adapter: its family and its mode sizes (in its construction's mode order)."""

    key: str
    family: str
    sizes: Mapping[str, int]


def tensor_specs(construction: Construction, geometry: Geometry,
                 layers: Sequence[int] | None = None) -> dict[str, TensorSpec]:
    """Every tensor an adapter has, by key (sorted): one per family and per role/layer not stacked as a mode."""
    layers = range(geometry.num_layers) if layers is None else layers
    specs: dict[str, TensorSpec] = {}
    for role in geometry.roles:
        family = family_of(role)
        sizes = geometry.mode_sizes(construction, family, None if construction.stack_roles else role)
        for layer in layers:
            key = tensor_key(construction, role, layer)
            specs.setdefault(key, TensorSpec(key, family, sizes))
    return dict(sorted(specs.items()))


def get_construction(name: str) -> Construction:
    if name in FUSED_CONSTRUCTIONS:
        return FUSED_CONSTRUCTIONS[name]
    if name not in CONSTRUCTIONS:
        raise ValueError(
            f"Unknown construction '{name}'. Choose one of {sorted(CONSTRUCTIONS)}, a fused one among "
            f"{sorted(FUSED_CONSTRUCTIONS)} or a preset among {sorted(PRESETS)}."
        )
    return CONSTRUCTIONS[name]


def check_factorization(name: str) -> str:
    if name == "lora":
        raise ValueError("LoRA is a construction preset, not a factorization: use construction='lora'.")
    if name not in FACTORIZATIONS:
        raise ValueError(f"Unknown factorization '{name}'. Choose one of {list(FACTORIZATIONS)}.")
    return name


def tensor_key(construction: Construction, role: str, layer: int) -> str:
    """Name of the tensor that holds the update of ``role`` in ``layer`` (one tensor per index not stacked).

    Attention tensors that stack the roles are named by layer alone (``layer0``, or ``all``); MLP
    ones carry the family (``mlp_layer0``, ``mlp``); a tensor of one role is named by it (``up_layer0``).
    """
    family = family_of(role)
    if construction.stack_roles:
        parts = [] if family == "attention" else [family]
    else:
        parts = [role]
    parts += [] if construction.stack_layers else [f"layer{layer}"]
    return "_".join(parts) or "all"


def index_of(construction: Construction, role_position: int, layer_position: int, num_layers: int) -> dict[str, int]:
    """A slice's index along the construction's index modes, from its position along the role mode (a role of its
    family, or a block's slot) and its layer's position; the fused mode is indexed ``role * L + layer``."""
    if construction.fused:
        return {FUSED_MODE: role_position * num_layers + layer_position}
    index = {"qkv": role_position} if construction.stack_roles else {}
    return index | ({"depth": layer_position} if construction.stack_layers else {})


def slice_index(construction: Construction, geometry: Geometry, role: str, layer_position: int) -> dict[str, int]:
    """Position of the update along the index modes of its tensor (the role mode counts its family's roles)."""
    role_position = geometry.family_roles(family_of(role)).index(role) if construction.stack_roles else 0
    return index_of(construction, role_position, layer_position, geometry.num_layers)


def read_ranks(value: object) -> object:
    """A rank spec as Python, a config file or a saved adapter gives it: digit strings become ints, in lists and
    (family- or mode-keyed) dicts too. ``"full"`` and anything else are left as they are, for ``resolve_ranks``, the
    one place that checks a spec, to say what is wrong."""
    if isinstance(value, Mapping):
        return {key: read_ranks(rank) for key, rank in value.items()}
    if isinstance(value, (list, tuple)):
        return [read_ranks(rank) for rank in value]
    return int(value) if isinstance(value, str) and value.strip().isdigit() else value


def _positive_rank(name: str, value: object, kind: str = "mode") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"The rank of {kind} '{name}' must be a positive integer (or 'full'), got {value!r}.")
    return value


def _resolve_named_ranks(construction: Construction, ranks: RankSpec, caps: Mapping[str, float], kind: str,
                         clamp_warning: str) -> dict[str, int]:
    """One rank per name of ``caps`` (Tucker: the modes, tensor-train: the bonds), each at most its cap.

    An int applies to every name and is capped silently; an explicit rank above its cap is clamped
    with ``clamp_warning`` (formatted with ``rank``, ``name`` and ``cap``), ``"full"`` is the cap.
    """
    names = list(caps)
    if isinstance(ranks, int) and not isinstance(ranks, bool):
        r = _positive_rank("all", ranks)
        return {name: min(r, caps[name]) for name in names}
    if isinstance(ranks, Mapping):
        unknown = [k for k in ranks if k not in names]
        missing = [n for n in names if n not in ranks]
        if unknown or missing:
            raise ValueError(
                f"The '{construction.name}' construction has {kind}s {names}; the rank dict "
                + (f"has unknown {kind}(s) {unknown}" if unknown else f"misses {kind}(s) {missing}")
                + f". Give one rank per {kind}, e.g. " + ", ".join(f"{n}=8" for n in names) + "."
            )
        explicit = dict(ranks)
    elif isinstance(ranks, Sequence) and not isinstance(ranks, str):
        if len(ranks) != len(names):
            raise ValueError(
                f"The '{construction.name}' construction has {len(names)} {kind}s {names} but {len(ranks)} "
                f"ranks were given ({list(ranks)}). Give one rank per {kind} in that order, or a dict keyed by "
                f"{kind}."
            )
        explicit = dict(zip(names, ranks, strict=True))
    else:
        raise ValueError(f"`ranks` must be an int, a list or a dict keyed by {kind} name, got {ranks!r}.")
    resolved = {}
    for name in names:
        value, cap = explicit[name], caps[name]
        rank = cap if value == "full" else _positive_rank(name, value, kind)
        if rank > cap:
            warnings.warn(clamp_warning.format(rank=rank, name=name, cap=cap), stacklevel=4)
            rank = cap
        resolved[name] = rank
    return resolved


def resolve_tucker_ranks(construction: Construction, ranks: RankSpec, sizes: Mapping[str, int]) -> dict[str, int]:
    """Turn a user rank spec into one rank per mode.

    An int applies to every mode and is capped at each mode's size without a warning (``ranks=8``
    on a 3-role ``qkv`` mode means rank 3). An explicit per-mode rank larger than its mode is
    clamped with a warning: a Tucker factor with more columns than rows cannot be orthonormal and
    adds parameters but no expressive power (the core absorbs any extra columns).
    """
    return _resolve_named_ranks(construction, ranks, {m: sizes[m] for m in construction.modes}, "mode",
                                "Tucker rank {rank} of mode '{name}' exceeds its size {cap}; clamped to {cap}.")


def bond_names(modes: Sequence[str]) -> list[str]:
    """The n - 1 bonds of a tensor-train over ``modes``, each named by its two modes: ``in-out``, ``out-qkv``."""
    return [f"{left}-{right}" for left, right in itertools.pairwise(modes)]


def max_bond_ranks(sizes: Mapping[str, float]) -> dict[str, float]:
    """The largest useful rank of each bond: the smaller product of the mode sizes on either side of it.

    Any tensor is a tensor-train with these ranks (TT-SVD), so a larger bond rank adds parameters and
    no expressive power.
    """
    modes = list(sizes)
    return {bond: min(math.prod(sizes[m] for m in modes[: k + 1]), math.prod(sizes[m] for m in modes[k + 1:]))
            for k, bond in enumerate(bond_names(modes))}


def neighbour_bond_ranks(sizes: Mapping[str, float], ranks: Mapping[str, int]) -> dict[str, int]:
    """Bond ranks no larger than their neighbours allow: ``r_k <= r_{k-1} n_k`` and ``r_k <= n_{k+1} r_{k+1}``
    (``r_0 = r_n = 1``; ``n_k`` the size of the mode between the bonds).

    The unfolding at a bond has no larger rank, so a larger one adds parameters and no expressive power; and its
    core could not be orthonormal, which the tensor-train's init (an isometry around its zero core) needs.
    """
    modes = list(sizes)
    bonds = bond_names(modes)
    edges = [1, *(ranks[bond] for bond in bonds), 1]
    for k in range(1, len(edges) - 1):  # left to right, then right to left
        edges[k] = min(edges[k], edges[k - 1] * sizes[modes[k - 1]])
    for k in reversed(range(1, len(edges) - 1)):
        edges[k] = min(edges[k], sizes[modes[k]] * edges[k + 1])
    return dict(zip(bonds, edges[1:-1], strict=True))


def resolve_tt_ranks(construction: Construction, ranks: RankSpec, sizes: Mapping[str, float]) -> dict[str, int]:
    """Turn a user rank spec into one rank per bond of the tensor-train (in the construction's mode order).

    An int is every bond's rank, capped silently at the bond's largest useful rank; a list gives
    the bonds in order; a dict is keyed by bond (``"in-out"``); explicit ranks above the cap warn, and so do
    explicit ranks above what their neighbours allow (:func:`neighbour_bond_ranks`), clamped to it (an int and
    ``"full"`` are capped there silently).
    """
    sizes = {m: sizes[m] for m in construction.modes}
    resolved = _resolve_named_ranks(
        construction, ranks, max_bond_ranks(sizes), "bond",
        "TT rank {rank} of bond '{name}' exceeds its largest useful rank {cap} (the smaller product of the mode "
        "sizes on either side); clamped to {cap}.",
    )
    allowed = neighbour_bond_ranks(sizes, resolved)
    given = (ranks if isinstance(ranks, Mapping) else {} if isinstance(ranks, int)
             else dict(zip(resolved, ranks, strict=True)))  # explicit ranks warn where clamped, ints do not
    for bond, rank in resolved.items():
        if allowed[bond] < rank and given.get(bond, "full") != "full":
            warnings.warn(f"TT rank {rank} of bond '{bond}' exceeds what its neighbours allow, {allowed[bond]} (the "
                          "rank of the bond beside it times the size of the mode between them); clamped to "
                          f"{allowed[bond]}.", stacklevel=3)
    return allowed


def resolve_cp_rank(ranks: RankSpec) -> int:
    """CP has a single rank shared by all modes (it may exceed a mode's size)."""
    if isinstance(ranks, Sequence) and not isinstance(ranks, str) and len(ranks) == 1:
        ranks = ranks[0]
    if isinstance(ranks, Mapping) or (isinstance(ranks, Sequence) and not isinstance(ranks, str)):
        raise ValueError(f"CP has one rank shared by every mode; pass an int (e.g. ranks=16), got {ranks!r}.")
    return _positive_rank("cp", ranks)


def _resolve_family_spec(construction: Construction, factorization: str, ranks: RankSpec,
                         sizes: Mapping[str, float]) -> dict[str, int] | int:
    if factorization == "tucker":
        return resolve_tucker_ranks(construction, ranks, sizes)
    if factorization == "tt":
        return resolve_tt_ranks(construction, ranks, sizes)
    return resolve_cp_rank(ranks)


def _family_specs(ranks: RankSpec) -> dict[str, RankSpec] | None:
    """The specs of a family-keyed rank dict (``{"attention": ..., "mlp": ...}``); None for any other spec."""
    if not isinstance(ranks, Mapping) or not any(key in FAMILIES for key in ranks):
        return None
    modes = [key for key in ranks if key not in FAMILIES]
    if modes:
        raise ValueError(
            f"`ranks` mixes families {[k for k in ranks if k in FAMILIES]} with mode(s) {modes}. Key it by mode, or "
            "by family: ranks={'attention': ..., 'mlp': ...}, each an int, a list or a dict keyed by mode."
        )
    return dict(ranks)


def resolve_ranks(construction: Construction, factorization: str, ranks: RankSpec,
                  sizes: Mapping[str, float]) -> dict[str, int] | int | dict[str, dict[str, int] | int]:
    """One rank per mode of the tensors with mode ``sizes`` (CP: the one rank).

    A family-keyed dict is resolved family by family, each against its family's construction
    (modes missing from ``sizes`` are unbounded: this is how a config checks its ranks before it
    knows a model); :func:`resolve_family_ranks` resolves against a model's real sizes.
    """
    specs = _family_specs(ranks)
    if specs is None:
        return _resolve_family_spec(construction, factorization, ranks, sizes)
    resolved = {}
    for family, spec in specs.items():
        own = construction.for_family(family)
        resolved[family] = _resolve_family_spec(own, factorization, spec,
                                                {mode: sizes.get(mode, math.inf) for mode in own.modes})
    return resolved


def family_ranks(construction: Construction, ranks: RankSpec, families: Sequence[str]) -> dict[str, RankSpec]:
    """Each adapted family's rank spec: a family-keyed dict gives each its own, any other spec applies to all.

    In the *att* constructions the attention and MLP tensors have different modes (only attention
    has the head split), so one list or mode dict cannot fit both: they need an int or a family dict.
    """
    specs = _family_specs(ranks)
    if specs is None:
        if construction.split_heads and len(families) > 1 and not isinstance(ranks, int):
            attention, mlp = construction.modes, construction.for_family("mlp").modes
            raise ValueError(
                f"With attention and MLP roles the '{construction.name}' construction makes attention tensors with "
                f"modes {list(attention)} and MLP tensors (no head split) with modes {list(mlp)}, so {ranks!r} "
                "cannot fit both. Give one int, or ranks per family: ranks={'attention': ..., 'mlp': ...}."
            )
        return {family: ranks for family in families}
    missing = [f for f in families if f not in specs]
    unused = [f for f in specs if f not in families]
    if missing or unused:
        adapted = ", ".join(f"{f} ({'/'.join(FAMILIES[f])})" for f in families) or "none"
        raise ValueError(
            "`ranks` gives ranks per family, but "
            + (f"none for {missing}" if missing else f"{unused} has no adapted role")
            + f". The adapted families are: {adapted}; give exactly one entry for each (or one rank for all)."
        )
    return {family: specs[family] for family in families}


def resolve_family_ranks(construction: Construction, factorization: str, ranks: RankSpec,
                         geometry: Geometry) -> dict[str, dict[str, int] | int]:
    """Each adapted family's ranks, resolved against its widest tensor (narrower ones: :func:`fit_ranks`)."""
    specs = family_ranks(construction, ranks, geometry.families)
    return {family: _resolve_family_spec(construction.for_family(family), factorization, spec,
                                         geometry.mode_sizes(construction, family))
            for family, spec in specs.items()}


def fit_ranks(ranks: Mapping[str, int] | int, sizes: Mapping[str, int]) -> dict[str, int] | int:
    """A family's ranks on one of its tensors: Tucker (mode) and TT (bond) ranks capped at what a narrower
    tensor (k/v under GQA) can use, bonds within what their neighbours allow."""
    if isinstance(ranks, int):
        return ranks
    caps = {**sizes, **max_bond_ranks(sizes)}
    fitted = {name: min(rank, caps[name]) for name, rank in ranks.items()}
    return neighbour_bond_ranks(sizes, fitted) if set(fitted) == set(bond_names(list(sizes))) else fitted


def _preset_ranks(preset: Preset, ranks: RankSpec) -> RankSpec:
    if preset.tucker_ranks is not None and isinstance(ranks, int) and not isinstance(ranks, bool):
        r = _positive_rank("all", ranks)
        return {mode: (r if rule == "r" else "full") for mode, rule in preset.tucker_ranks.items()}
    return ranks


def expand_preset(name: str, ranks: RankSpec) -> tuple[str, str, RankSpec]:
    """(construction, factorization, ranks) of a preset given the user's ``ranks``.

    An int r becomes the preset's rank rule (e.g. LoTR: in=r, out=r, depth=full), for each family
    when ranks are given per family; anything else is taken as explicit ranks of the construction.
    """
    preset = PRESETS[name]
    specs = _family_specs(ranks)
    if specs is None:
        ranks = _preset_ranks(preset, ranks)
    else:
        ranks = {family: _preset_ranks(preset, spec) for family, spec in specs.items()}
    return preset.construction, preset.factorization, ranks


def preset_fixed_ranks(name: str, ranks: RankSpec | None = None,
                       ) -> dict[str, str] | dict[str, dict[str, str]] | None:
    """The modes (bonds) a budget keeps full, for ``match_budget``'s ``fixed``: those a preset's rule keeps full
    (LoTR's depth), or those a config's ``ranks`` write as ``"full"`` (which is how a preset's rule is recorded
    once expanded, and what a user asks for), keyed by family where ``ranks`` are; ``None`` where there is none.
    The one rule of every budget path."""
    if name in PRESETS:
        ranks = expand_preset(name, 1)[2]
    if not isinstance(ranks, Mapping):
        return None
    specs = _family_specs(ranks)
    if specs is None:
        return _full_modes(ranks) or None
    per_family = {family: _full_modes(spec) for family, spec in specs.items()}
    return per_family if any(per_family.values()) else None


def _full_modes(spec: RankSpec) -> dict[str, str]:
    return {mode: "full" for mode, rank in spec.items() if rank == "full"} if isinstance(spec, Mapping) else {}
