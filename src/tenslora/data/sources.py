"""Where data comes from: local files and folders, or the Hugging Face Hub; failures become ``DataError``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, load_dataset, load_dataset_builder
from datasets.exceptions import DatasetsError

from .errors import DataError

BUILDERS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
"""The `datasets` builder and its options for each file extension (maybe followed by a compression's, ``.gz``...)."""

COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")


def load_file(path: str | Path, option: str) -> Dataset:
    """The rows of one CSV, TSV, JSON (lines) or parquet file; ``option`` names the setting that gave the path."""
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; {option} takes a data file")
    if not path.is_file():
        raise DataError(f"file {path} not found; check {option}")
    suffixes = [suffix for suffix in path.suffixes[-2:] if suffix not in COMPRESSIONS]
    if not suffixes or suffixes[-1].lower() not in BUILDERS:
        raise DataError(f"{path} is not a {'/'.join(BUILDERS)} file; check {option}")
    builder_name, options = BUILDERS[suffixes[-1].lower()]
    try:
        with path.open("rb") as handle:
            handle.read(1)
    except OSError as error:
        raise DataError(f"cannot read {path} ({error.strerror}); check its permissions or {option}") from error
    if path.stat().st_size == 0:
        raise DataError(f"file {path} is empty; check {option}")
    try:  # what load_dataset does, with a look at the row count before the split is read
        builder = load_dataset_builder(builder_name, data_files=str(path), **options)
        builder.download_and_prepare()
    except Exception as error:  # the builders raise many kinds of errors for unreadable files
        raise DataError(f"could not read {path} as {builder_name}: {_reason(error)}; check {option}") from error
    if not builder.info.splits or not builder.info.splits["train"].num_examples:
        raise DataError(f"file {path} has no rows (only a header?); add rows or check {option}")
    return builder.as_dataset(split="train")


def load_folder(path: str | Path, option: str, builder: str | None = None) -> DatasetDict:
    """The splits of a data folder, found by `datasets` from file and folder names (``train*``, ``validation*``,
    ``dev*``, ``test*``, or ``train/``...); ``builder`` names the format when the files do not (``"imagefolder"``)."""
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"folder {path} not found; check {option}")
    try:
        return load_dataset(builder, data_dir=str(path)) if builder else load_dataset(str(path))
    except Exception as error:  # as above: empty folders, mixed formats, unreadable files...
        raise DataError(f"could not read the data in {path}: {_first_line(error)}; check {option}") from error


def load_hub(repo: str, subset: str | None, option: str) -> DatasetDict:
    """A dataset of the Hugging Face Hub: needs network (or `datasets`' cache); ``option`` names the offline way."""
    try:
        return load_dataset(repo, subset)
    except (OSError, DatasetsError) as error:  # no network, unknown repository, ...
        raise DataError(f"could not load {repo} from the Hugging Face Hub ({_first_line(error)}); "
                        f"without network, pass {option} with local data") from error


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _reason(error: BaseException) -> str:
    """The first line of the innermost cause (``datasets`` wraps the parser's error in a generic one)."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    if isinstance(error, UnicodeDecodeError):
        return "the file is not UTF-8 text; save it as UTF-8"
    return _first_line(error)
