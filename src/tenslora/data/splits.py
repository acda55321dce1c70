"""Deterministic splits and subsets, so that runs with different seeds or sizes are scored on comparable data."""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Mapping, Sequence
from itertools import accumulate

from datasets import Dataset, DatasetDict

from .errors import DataError

SPLITS = ("train", "validation", "test")

CARVED_SHARE = 0.1
"""Share of the training rows set aside for each evaluation split that the data does not provide."""

EVALUATION_SUBSET_SEED = 0
"""Evaluation subsets ignore the run's seed: runs with different seeds are then scored on the same examples."""


def hash_fraction(key: str) -> float:
    """A number in [0, 1) fixed by ``key`` alone (unlike ``hash``, the same in every process and on every machine)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big") / 2**64


def hash_split(dataset: Dataset, keys: Sequence[str], shares: Mapping[str, float]) -> DatasetDict:
    """Split rows by a hash of their key into splits of about ``shares`` (in that order; shares sum to 1).

    A row's split depends on its key only: not on the seed, the other rows, their order or any subset size.
    """
    names = list(shares)
    bounds = list(accumulate(shares[name] for name in names))
    bounds[-1] = 1.0  # guards against shares summing to 0.999...
    rows: dict[str, list[int]] = {name: [] for name in names}
    for index, key in enumerate(keys):
        rows[names[bisect.bisect_right(bounds, hash_fraction(key))]].append(index)
    # Flattened once (and cached by `datasets`): reading the columns of a bare ``select`` is slow.
    return DatasetDict({name: dataset.select(rows[name]).flatten_indices() for name in names})


def complete_splits(data: DatasetDict) -> DatasetDict:
    """Train, validation and test splits, carving each missing evaluation split from train (10% of its rows each).

    Rows are assigned by a hash of their index in the training data, so the carve is the same on every run.
    Splits other than the three are dropped.
    """
    missing = [split for split in SPLITS if split not in data]
    if not missing:
        return DatasetDict({split: data[split] for split in SPLITS})
    shares = {"train": 1 - CARVED_SHARE * len(missing), **{split: CARVED_SHARE for split in missing}}
    carved = hash_split(data["train"], [str(index) for index in range(len(data["train"]))], shares)
    return DatasetDict({split: (carved if split in carved else data)[split] for split in SPLITS})


def subsample(data: DatasetDict, sizes: Mapping[str, int | None], seed: int = 0) -> DatasetDict:
    """Cut each split to at most ``sizes[split]`` rows (``None``: keep all), by a seeded shuffle.

    The training subset follows ``seed``; evaluation subsets use a fixed seed. For one seed, a smaller subset is
    part of any larger one.
    """
    for split, size in sizes.items():
        if size is not None and size < 1:
            raise DataError(f"the {split} subset size must be at least 1 (got {size}); give none to keep all rows")
    out = {}
    for split, dataset in data.items():
        size = sizes.get(split)
        if size is None or size >= len(dataset):
            out[split] = dataset
        else:
            split_seed = seed if split == "train" else EVALUATION_SUBSET_SEED
            out[split] = dataset.shuffle(seed=split_seed).select(range(size))
    return DatasetDict(out)
