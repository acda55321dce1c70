"""Truncating factorized tensors through their mode spectra: HOSVD for Tucker, TT-SVD (rounding) for tensor-trains.

Two uses, one piece of mathematics. A trained Tucker adapter is truncated without ever forming its tensor:
each factor is orthonormalized (``U_k = Q_k R_k``), the ``R_k`` are pushed into the core, and the core's mode-k
unfoldings, whose singular values are those of the whole tensor's unfoldings, give the leading directions
``V_k``: the new factors are ``Q_k V_k`` and the new core the old one projected on the ``V_k`` (HOSVD). A
tensor-train is right-orthogonalized, then swept left to right, each bond cut by an SVD (TT rounding). A
dense tensor (stacked LoRA updates) is the special case of identity factors (Tucker) or of its exact
tensor-train (TT-SVD). Both truncations are quasi-optimal: the error is at most sqrt(n) times the best one
of the same ranks, and exactly zero when no rank is cut.

Computations run in float64; the returned tensors are float32 modules like the ones training makes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .tensors import build_tensor
from .tensors.base import FactorizedTensor
from .tensors.tt import TensorTrainTensor, outer_two_way, three_way
from .tensors.tucker import TuckerTensor


def check_energy(energy: float) -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < energy <= 1.0:
        raise ValueError(f"The energy kept must be in (0, 1], e.g. 0.99; got {energy!r}.")
    return float(energy)


def energy_rank(singular_values: torch.Tensor, energy: float) -> int:
    """The smallest rank whose kept squared singular values reach ``energy`` of their total (at least 1)."""
    check_energy(energy)
    squares = singular_values.double() ** 2
    total = squares.sum()
    if total == 0:
        return 1
    kept = torch.cumsum(squares, 0) / total
    # A relative slack of 1e-12: an energy of 1.0 keeps every non-zero direction despite rounding.
    return int(torch.searchsorted(kept, torch.tensor(energy - 1e-12, dtype=kept.dtype)).item()) + 1


def mode_product(tensor: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """``tensor x_mode matrix``: mode ``mode`` of size n becomes ``matrix.shape[0]`` (``matrix`` is m x n)."""
    moved = torch.movedim(tensor, mode, 0)
    product = matrix @ moved.reshape(moved.shape[0], -1)
    return torch.movedim(product.reshape(matrix.shape[0], *moved.shape[1:]), 0, mode)


def _left_basis(unfolding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A complete orthonormal basis of the rows' space (n x n), by decreasing singular value, and those values.

    Through the n x n Gram matrix: an unfolding is short and very wide (the ``in`` mode of a stacked tensor is
    d x (d * roles * L)), and every n column is needed even where the unfolding has lower rank.
    """
    values, vectors = torch.linalg.eigh(unfolding @ unfolding.T)
    return vectors.flip(1), values.flip(0).clamp_min(0).sqrt()


def _tucker_bases(core: torch.Tensor, factors: Sequence[torch.Tensor]):
    """Orthonormal parts of the factors, the core with the rest pushed in, and that core's mode bases and spectra."""
    orthonormal, core = [], core.double()
    for mode, factor in enumerate(factors):
        q, r = torch.linalg.qr(factor.double())
        orthonormal.append(q)
        core = mode_product(core, r, mode)
    bases = [_left_basis(torch.movedim(core, mode, 0).reshape(core.shape[mode], -1)) for mode in range(core.dim())]
    return orthonormal, core, bases


def tucker_spectra(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The singular values of each mode unfolding of the tensor ``core x_1 U_1 ... x_n U_n``."""
    return [values for _, values in _tucker_bases(core, factors)[2]]


def truncate_tucker(core: torch.Tensor, factors: Sequence[torch.Tensor],
                    ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """HOSVD of the tensor ``core x_k U_k`` at ``ranks`` (each at most its factor's columns): (core, factors)."""
    orthonormal, core, bases = _tucker_bases(core, factors)
    new_factors = []
    for mode, ((basis, _), q, rank) in enumerate(zip(bases, orthonormal, ranks, strict=True)):
        if rank > basis.shape[1]:
            raise ValueError(f"Mode {mode} has rank {basis.shape[1]}; a truncation cannot raise it to {rank}.")
        kept = basis[:, :rank]
        core = mode_product(core, kept.T, mode)
        new_factors.append(q @ kept)
    return core, new_factors


def _split(matrix: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``matrix ~ left @ right`` with orthonormal ``left`` columns (rank ``rank``, None: all), and the singular values.

    A rank above what the matrix holds gets zero columns and rows, so the bond keeps the size asked for.
    """
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    rank = s.shape[0] if rank is None else rank
    left, right = u[:, :rank], s[:rank, None] * vh[:rank]
    missing = rank - left.shape[1]
    if missing > 0:
        left = torch.cat([left, left.new_zeros(left.shape[0], missing)], 1)
        right = torch.cat([right, right.new_zeros(missing, right.shape[1])], 0)
    return left, right, s


def _round(cores: Sequence[torch.Tensor], ranks: Sequence[int] | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """TT rounding of two-way-outer cores: right-orthogonalize, then cut each bond by an SVD, left to right.

    Returns the new cores and each bond's singular values (exactly the spectra of the tensor's unfoldings at
    that bond when ``ranks`` is None: the sweep then cuts nothing).
    """
    cores = three_way([core.double() for core in cores])
    for k in range(len(cores) - 1, 0, -1):
        left_bond, size, right_bond = cores[k].shape
        q, r = torch.linalg.qr(cores[k].reshape(left_bond, size * right_bond).T)
        cores[k] = q.T.reshape(-1, size, right_bond)
        cores[k - 1] = torch.einsum("asb,cb->asc", cores[k - 1], r)
    spectra = []
    for k in range(len(cores) - 1):
        left_bond, size, _ = cores[k].shape
        left, right, values = _split(cores[k].reshape(left_bond * size, -1), None if ranks is None else ranks[k])
        spectra.append(values)
        cores[k] = left.reshape(left_bond, size, -1)
        cores[k + 1] = torch.einsum("ab,bsc->asc", right, cores[k + 1])
    return outer_two_way(cores), spectra


def tt_spectra(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The singular values of the tensor's unfolding at each bond (modes left of it x modes right of it)."""
    return _round(cores, None)[1]


def truncate_tt(cores: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """TT rounding to bond ``ranks``: cores in ``TensorTrainTensor``'s layout (outer ones two-way)."""
    return _round(cores, ranks)[0]


def exact_tt(dense: torch.Tensor) -> list[torch.Tensor]:
    """An exact tensor-train of ``dense`` (QR sweep; bond ranks at most the unfoldings' sizes): TT-SVD's start."""
    cores, rest, left_bond = [], dense.double(), 1
    for size in dense.shape[:-1]:
        q, r = torch.linalg.qr(rest.reshape(left_bond * size, -1))
        cores.append(q.reshape(left_bond, size, -1))
        rest, left_bond = r, q.shape[1]
    cores.append(rest.reshape(left_bond, dense.shape[-1], 1))
    return outer_two_way(cores)


def _parts(tensor: FactorizedTensor) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
    """(core, factors) of a Tucker tensor, (None, cores) of a tensor-train; CP has no spectra to cut."""
    factors = [tensor.factors[mode].detach() for mode in tensor.modes]
    if isinstance(tensor, TuckerTensor):
        return tensor.core.detach(), factors
    if isinstance(tensor, TensorTrainTensor):
        return None, factors
    raise ValueError("Only Tucker and tensor-train adapters have mode spectra to truncate; a CP adapter (and the "
                     "LoRA preset) has none. Train with factorization 'tucker' or 'tt' to compress afterwards.")


def spectra(tensor: FactorizedTensor) -> dict[str, torch.Tensor]:
    """Singular values per mode (Tucker) or per bond (tensor-train) of the tensor the factors represent."""
    core, factors = _parts(tensor)
    values = tt_spectra(factors) if core is None else tucker_spectra(core, factors)
    return dict(zip(tensor.ranks, values, strict=True))


def _state(modes: Sequence[str], core: torch.Tensor | None, factors: Sequence[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of a Tucker tensor (``core`` given) or a tensor-train (``core`` None, ``factors`` its cores)."""
    state = {f"factors.{mode}": factor.float() for mode, factor in zip(modes, factors, strict=True)}
    return state if core is None else {"core": core.float(), **state}


def truncated(tensor: FactorizedTensor, ranks: Mapping[str, int]) -> FactorizedTensor:
    """A new tensor of the same kind and sizes, HOSVD / TT-rounded to ``ranks`` (each at most the tensor's own)."""
    core, factors = _parts(tensor)
    raised = {name: (ranks[name], held) for name, held in tensor.ranks.items() if ranks[name] > held}
    if raised:
        raise ValueError(f"A truncation cannot raise ranks: {raised} (asked, current).")
    order = [ranks[name] for name in tensor.ranks]
    if core is None:
        factors = truncate_tt(factors, order)
    else:
        core, factors = truncate_tucker(core, factors, order)
    result = build_tensor("tt" if core is None else "tucker", tensor.sizes, dict(ranks))
    result.load_state_dict(_state(tensor.modes, core, factors))
    return result


def tucker_to_dense(core: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor ``core x_1 U_1 ... x_n U_n`` (for fitting and tests: a trained adapter is never formed densely)."""
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor, mode)
    return core


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The tensor of two-way-outer cores, contracted left to right."""
    dense = cores[0]
    for core in cores[1:]:
        dense = torch.tensordot(dense, core, dims=1)
    return dense


def _truncate_dense(dense: torch.Tensor, tucker: bool,
                    ranks: Sequence[int]) -> tuple[torch.Tensor | None, list[torch.Tensor], torch.Tensor]:
    """HOSVD (``tucker``: core and factors) or TT-SVD (None and the cores) of ``dense``, and the tensor they give."""
    if not tucker:
        cores = truncate_tt(exact_tt(dense), ranks)
        return None, cores, tt_to_dense(cores)
    core, factors = truncate_tucker(dense, [torch.eye(n, dtype=torch.float64) for n in dense.shape], ranks)
    return core, factors, tucker_to_dense(core, factors)


#: The fill-in of entries no update reads (grouped-query k/v padding) stops when a round changes the fit by less than
#: this (relative), or after this many rounds (each a HOSVD / TT-SVD of the stack; it converges linearly).
FILL_TOLERANCE, FILL_ROUNDS = 1e-9, 1000


def fit(tensor: FactorizedTensor, dense: torch.Tensor, known: torch.Tensor | None = None) -> None:
    """Set ``tensor`` (Tucker or tensor-train, at its own ranks) to the HOSVD / TT-SVD truncation of ``dense``
    (its modes in the tensor's order): the dense tensor is formed by the caller, at fit time only.

    ``known`` (a boolean mask) marks the entries an update reads; the others (the rows past a narrower k/v slice
    of a tensor stacking it with q) are free: they are filled with the fit's own values and the fit repeated
    (hard-impute), rather than pinned to zero, which would cost rank to represent padding.
    """
    tucker, order = _parts(tensor)[0] is not None, list(tensor.ranks.values())
    dense = dense.double().clone()
    core, factors, approximation = _truncate_dense(dense, tucker, order)
    if known is not None and not bool(known.all()):
        for _ in range(FILL_ROUNDS):
            dense[~known] = approximation[~known]
            core, factors, new_approximation = _truncate_dense(dense, tucker, order)
            change = float((new_approximation - approximation).norm() / approximation.norm().clamp_min(1e-30))
            approximation = new_approximation
            if change < FILL_TOLERANCE:
                break
    tensor.load_state_dict({key: value.to(tensor.factors["in"].dtype)
                            for key, value in _state(tensor.modes, core, factors).items()})


def place_slice(dense: torch.Tensor, tensor: FactorizedTensor, index: Mapping[str, int], matrix: torch.Tensor) -> None:
    """Write one update into the dense tensor ``dense`` of ``tensor``'s shape, as ``tensor.slice_matrix(index)`` reads
    it: ``matrix`` (width x d_in) fills the slice's first rows (zero-padding a narrower k/v), the wide side split
    into the output modes in Hugging Face's head-major order."""
    full = matrix.new_zeros(tensor.output_size, matrix.shape[1])
    full[: matrix.shape[0]] = matrix
    block = full.T.reshape(-1, *(tensor.sizes[m] for m in tensor.output_modes))
    side = [m for m in tensor.modes if m not in tensor.index_modes][1:]  # the output modes in the tensor's order
    block = block.permute(0, *(1 + tensor.output_modes.index(m) for m in side))
    dense[tuple(index[m] if m in tensor.index_modes else slice(None) for m in tensor.modes)] = block


def family_energy_ranks(tensors: Mapping[str, FactorizedTensor], families: Mapping[str, str],
                        energy: float) -> dict[str, dict[str, int]]:
    """Per family, the rank of each mode (bond) that keeps ``energy`` of its spectrum in every tensor of the family.

    A config gives one rank per mode and family (each tensor's capped at what it can hold), so a family's rank
    is the largest its tensors need: every tensor keeps at least ``energy`` of each mode's energy.
    """
    chosen: dict[str, dict[str, int]] = {}
    for key, tensor in tensors.items():
        ranks = chosen.setdefault(families[key], {})
        for name, values in spectra(tensor).items():
            ranks[name] = max(ranks.get(name, 1), energy_rank(values, energy))
    return chosen
