"""GLUE tasks, from the Hugging Face Hub or from local files with GLUE's columns.

GLUE hides its test labels, so the official validation split serves as the test split, and the validation split
is carved from train (see ``complete_splits``: 10% of the rows, the same on every run).
"""

from __future__ import annotations

from pathlib import Path

from datasets import DatasetDict

from .errors import DataError
from .sources import load_folder, load_hub

HUB_REPO = "nyu-mll/glue"

LABEL_NAMES = {  # of the label ids 0 and 1, for local files that store bare ids
    "cola": ("unacceptable", "acceptable"),
    "mrpc": ("not_equivalent", "equivalent"),
    "sst2": ("negative", "positive"),
    "rte": ("entailment", "not_entailment"),
}


def load_glue(subset: str, data_dir: str | None = None) -> DatasetDict:
    """Train and test (GLUE's validation) splits of ``subset``, from the Hub or from ``data_dir``.

    ``data_dir`` (or its ``<subset>/`` folder, as in a copy of the Hub repository) holds parquet, CSV or JSON
    lines files named ``train*`` and ``validation*`` (or ``dev*``) with GLUE's columns, e.g. ``sentence``, ``label``.
    """
    if data_dir is None:
        data = load_hub(HUB_REPO, subset, "--data-dir")
    else:
        folder = Path(data_dir) / subset if (Path(data_dir) / subset).is_dir() else Path(data_dir)
        data = load_folder(folder, "--data-dir")
    missing = [split for split in ("train", "validation") if split not in data]
    if missing:
        raise DataError(f"GLUE {subset} data has no {' or '.join(missing)} split (it has: {', '.join(data)}); "
                        "--data-dir needs train and validation (or dev) files: validation serves as the test split")
    return DatasetDict({"train": data["train"], "test": data["validation"]})
