"""Tasks from the user's own data: text files (CSV, TSV, JSON lines, parquet) or a folder-per-class image folder."""

from __future__ import annotations

from functools import partial

from datasets import Dataset, DatasetDict

from .images import load_image_folder
from .schema import check_columns
from .sources import load_file
from .tasks import TaskSpec

CUSTOM_TASK = "custom"


def custom_text_task(train_file: str, validation_file: str | None = None, test_file: str | None = None,
                     text_column: str = "text", text_pair_column: str | None = None,
                     label_column: str = "label") -> TaskSpec:
    """A text classification task from files; a missing validation or test file is carved from train."""
    files = {split: (path, option) for split, path, option in (("train", train_file, "--train-file"),
                                                                ("validation", validation_file, "--validation-file"),
                                                                ("test", test_file, "--test-file")) if path}
    columns = [column for column in (text_column, text_pair_column) if column]
    return TaskSpec(name=CUSTOM_TASK, modality="text", load=partial(_load_text_files, files, columns, label_column),
                    text_column=text_column, text_pair_column=text_pair_column)


def custom_image_task(image_root: str) -> TaskSpec:
    """An image classification task from ``image_root/<class>/<image>`` (optionally under split folders)."""
    return TaskSpec(name=CUSTOM_TASK, modality="image", load=partial(load_image_folder, image_root),
                    image_column="image")


def _load_text_files(files: dict[str, tuple[str, str]], text_columns: list[str], label_column: str) -> DatasetDict:
    data = DatasetDict({split: load_file(path, option) for split, (path, option) in files.items()})
    check_columns(data, [*text_columns, label_column],
                  "set --text-column, --text-pair-column and --label-column to columns of your files",
                  sources={split: path for split, (path, _) in files.items()})
    return DatasetDict({split: _with_label_column(dataset, label_column) for split, dataset in data.items()})


def _with_label_column(dataset: Dataset, column: str) -> Dataset:
    """``column`` renamed ``label``, the name the rest of the pipeline reads."""
    if column == "label":
        return dataset
    return dataset.remove_columns([name for name in dataset.column_names if name == "label"]).rename_column(
        column, "label")
